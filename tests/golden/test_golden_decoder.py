"""Speech decoder parity with the reference fixtures in `decoder_fixtures/` (MANIFEST.md).

Every size, seed, token and expected value is read from the fixture files; the recorded random
draws are replayed in consumption order. Tolerances follow MANIFEST section 4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.golden

ESTIMATOR_REL = 1e-4  # encoder/estimator intermediates: atol = 1e-4 * max|ref|
FLOW_MEL_ATOL = 1e-3  # after 10 guided Euler steps
MEL_TIGHT_REL = 1e-4  # streamed flow/vocoder mels
F0_ATOL = 5e-4  # Hz
SOURCE_ATOL = 1e-4
DECODE_ATOL = 1e-4  # vocoder given the source: deterministic
SPEECH_ATOL = 2e-3  # waveforms (float32 phase cumsum, thread-count sensitive)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel():
        diff = (got.float() - ref.float()).abs().max().item()
        assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol:.3g}"


def _rel(ref: torch.Tensor, rel: float) -> float:
    return rel * max(ref.abs().max().item(), 1.0) if ref.numel() else 0.0


@pytest.fixture(scope="module")
def fixtures(golden: Path) -> Path:
    return golden / "decoder_fixtures"


@pytest.fixture(scope="module")
def models(golden: Path):  # type: ignore[no-untyped-def]
    from glmvoice_cli.decoder.checkpoint import load_decoder

    return load_decoder(golden / "decoder")


@pytest.fixture(scope="module")
def draws(fixtures: Path) -> dict[str, list[torch.Tensor]]:
    """Saved draws grouped by fixture tag, in consumption order: tag -> [tensor, ...]."""
    meta = json.loads((fixtures / "random_draws.json").read_text())["order_of_consumption"]
    saved = _load(fixtures / "random_draws.safetensors")
    grouped: dict[str, list[torch.Tensor]] = {}
    for entry in sorted(meta, key=lambda e: e["idx"]):
        if entry.get("saved"):
            tensor = saved[entry["key"]]
            assert list(tensor.shape) == entry["shape"], entry["key"]
            grouped.setdefault(entry["tag"], []).append(tensor)
    return grouped


def _source_draws(tensors: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    from glmvoice_cli.decoder.vocoder import SourceDraws

    phase_u, noise = tensors
    return SourceDraws(phase_u, noise)


def test_a_flow_inference(models, fixtures: Path, draws) -> None:  # type: ignore[no-untyped-def]
    from glmvoice_cli.decoder.flow import FlowTrace

    a = _load(fixtures / "a_flow_inference.safetensors")
    trace, steps = FlowTrace(), {}

    def on_step(index: int, t: torch.Tensor, x: torch.Tensor) -> None:
        steps[index] = (t.clone(), x.clone())

    (noise,) = draws["a_flow"]
    mel = models.flow.inference(
        a["token"], a["prompt_token"], a["prompt_feat"], noise=noise,
        embedding=a["embedding"], trace=trace, on_step=on_step,
    )
    _close("mel", mel, a["mel"], FLOW_MEL_ATOL)
    for key, got in (
        ("int/spk_embed_affine", trace.spks), ("int/encoder", trace.encoder),
        ("int/encoder_proj", trace.encoder_proj), ("int/length_regulator", trace.mu),
    ):
        if key in a:
            _close(key, got, a[key], _rel(a[key], ESTIMATOR_REL))
    for key in a:
        match = re.fullmatch(r"int/euler_x_step(\d+)", key)
        if match:
            _close(key, steps[int(match.group(1))][1], a[key], FLOW_MEL_ATOL)
    if "int/t_values" in a:
        t_values = torch.cat([steps[i][0].reshape(1) for i in range(len(steps))])
        _close("t_values", t_values, a["int/t_values"], 1e-6)


def test_a_encoder_mask(models, fixtures: Path) -> None:  # type: ignore[no-untyped-def]
    a = _load(fixtures / "a_flow_inference.safetensors")
    if "int/encoder_mask" in a:
        assert bool(a["int/encoder_mask"].all()), "fixture has padding; the flow runs unpadded batches of 1"


def test_b_estimator_calls(models, fixtures: Path) -> None:  # type: ignore[no-untyped-def]
    b = _load(fixtures / "b_estimator_calls.safetensors")
    calls = sorted({key.split("/")[0] for key in b})
    assert calls
    estimator = models.flow.decoder.estimator
    for call in calls:
        args = [b[f"{call}/{name}"] for name in ("x", "mask", "mu", "t", "spks", "cond")]
        with torch.inference_mode():
            out = estimator(*args)
        ref = b[f"{call}/out"]
        _close(call, out, ref, _rel(ref, ESTIMATOR_REL))


def test_c_hift(models, fixtures: Path, draws) -> None:  # type: ignore[no-untyped-def]
    c = _load(fixtures / "c_hift.safetensors")
    trace: dict[str, torch.Tensor] = {}
    speech, source = models.hift.inference(c["mel"], draws=_source_draws(draws["c_hift"]), trace=trace)
    _close("int/f0", trace["f0"], c["int/f0"], F0_ATOL)
    _close("int/sine_merge", trace["sine_merge"], c["int/sine_merge"], SOURCE_ATOL)
    _close("source", source, c["source"], SOURCE_ATOL)
    _close("int/conv_post", trace["conv_post"], c["int/conv_post"], SPEECH_ATOL)
    _close("speech", speech, c["speech"], SPEECH_ATOL)
    decoded, _ = models.hift.inference(c["mel"], c["decode/cache_source"])
    _close("decode/speech", decoded, c["decode/speech"], DECODE_ATOL)


def test_reference_noise_regenerates_draws(fixtures: Path, draws) -> None:  # type: ignore[no-untyped-def]
    """MANIFEST section 3: a generator re-seeded with 42 per flow call yields the recorded draws."""
    from glmvoice_cli.decoder.noise import ReferenceNoise

    checks = json.loads((fixtures / "random_draws.json").read_text()).get("torch_cpu_regeneration_check", {})
    for tag, recorded in draws.items():
        if not checks.get(tag) or len(recorded) != 3:
            continue
        flow, phase_u, noise = recorded
        ref = ReferenceNoise(harmonics=phase_u.shape[1])
        assert torch.equal(ref.flow_noise(flow.shape[-1], 0), flow), tag
        got = ref.source_draws(noise.shape[-1], 0)
        assert torch.equal(got.phase_u, phase_u) and torch.equal(got.noise, noise), tag


def test_d_stream_token2wav(models, fixtures: Path, draws) -> None:  # type: ignore[no-untyped-def]
    from glmvoice_cli.decoder.noise import ReplayNoise
    from glmvoice_cli.decoder.speech_decoder import (
        MEL_CACHE_FRAMES,
        REFERENCE_SCHEDULE,
        SpeechDecoder,
        StreamSchedule,
    )

    d = _load(fixtures / "d_stream_token2wav.safetensors")
    meta = json.loads((fixtures / "d_stream_token2wav.json").read_text())
    derived = meta.get("derived_AudioDecoder_params", {})
    tags = [tag for tag in draws if re.fullmatch(r"d_call\d+", tag)]
    tags.sort(key=lambda tag: int(tag[len("d_call"):]))
    recorded = [(draws[tag][0], _source_draws(draws[tag][1:])) for tag in tags]
    schedule = StreamSchedule(**{**REFERENCE_SCHEDULE.__dict__, "block_sizes": tuple(meta["block_size_list"])})
    outputs: list = []
    decoder = SpeechDecoder(models, schedule, noise=ReplayNoise(recorded), on_block=outputs.append)
    if "mel_overlap_len" in derived:
        assert decoder.overlap_frames == derived["mel_overlap_len"]
        assert MEL_CACHE_FRAMES * decoder.samples_per_frame == derived["source_cache_len"]

    state, chunks = decoder.new_state(), []
    for token in d["tokens"][0].tolist():  # one token at a time, as the demo receives them
        chunks.extend(decoder.push(state, [token]))
    chunks.append(decoder.flush(state))

    assert len(outputs) == len(meta["calls"]) == len(tags)
    for i, (out, call) in enumerate(zip(outputs, meta["calls"], strict=True)):
        p = f"call{i}/"
        assert out.finalize == call["finalize"]
        assert chunks[i].shape == (call["speech_len"],)
        _close(p + "flow_mel", out.flow_mel, d[p + "flow_mel"], _rel(d[p + "flow_mel"], MEL_TIGHT_REL))
        _close(p + "prompt_feat", out.prompt_feat, d[p + "prompt_feat"], _rel(d[p + "prompt_feat"], MEL_TIGHT_REL))
        for key in ("hift_mel_in", "tts_mel_returned"):
            _close(p + key, out.returned_mel, d[p + key], _rel(d[p + key], MEL_TIGHT_REL))
        _close(p + "hift_cache_source", out.cache_source, d[p + "hift_cache_source"], SPEECH_ATOL)
        if p + "hift_source_full" in d:
            _close(p + "hift_source_full", out.source, d[p + "hift_source_full"], SPEECH_ATOL)
        _close(p + "tts_speech", torch.from_numpy(chunks[i])[None], d[p + "tts_speech"], SPEECH_ATOL)
    assert sum(len(c) for c in chunks) == sum(call["speech_len"] for call in meta["calls"])


class _ScriptedLM:
    """An LM that answers with given speech tokens, in runs of `run` (the voice model's 26 per interleave)."""

    waits_on_network = False

    def __init__(self, tokens: list[int], run: int = 26) -> None:
        self.tokens, self.run = tokens, run

    def stream(self, conv, user, options=None, cancel=None):  # type: ignore[no-untyped-def]
        from glmvoice_cli.lm.voice_lm import AudioTokens, StopReason, TurnEnd

        for start in range(0, len(self.tokens), self.run):
            yield AudioTokens(tuple(self.tokens[start : start + self.run]))
        yield TurnEnd(StopReason.USER, len(self.tokens))


@pytest.mark.parametrize("run", [1, 26])
def test_the_reference_schedule_through_the_pipeline_gives_the_demos_blocks(models, fixtures: Path, run: int
                                                                             ) -> None:  # type: ignore[no-untyped-def]
    """`tts/chat --schedule reference`: the decoder the commands load (schedule by name, the reference's own
    noise) turns an answer's tokens into the demo's blocks, with its audio."""
    from glmvoice_cli.decoder.speech_decoder import SpeechDecoder, schedule_named
    from glmvoice_cli.events import AudioChunk
    from glmvoice_cli.lm.prompts import TextInput
    from glmvoice_cli.pipeline.assistant import Assistant

    d = _load(fixtures / "d_stream_token2wav.safetensors")
    meta = json.loads((fixtures / "d_stream_token2wav.json").read_text())
    schedule = schedule_named("reference")
    assert schedule.block_sizes == tuple(meta["block_size_list"])  # the demo's blocks are ours
    tokens = d["tokens"][0].tolist()
    assistant = Assistant(_ScriptedLM(tokens, run), None, SpeechDecoder(models, schedule))  # type: ignore[arg-type]
    chunks = [e.samples for e in assistant.respond(None, TextInput("hi")) if isinstance(e, AudioChunk)]  # type: ignore[arg-type]
    assert [len(c) for c in chunks] == [call["speech_len"] for call in meta["calls"]]
    for i, chunk in enumerate(chunks):
        _close(f"call{i}/tts_speech", torch.from_numpy(chunk)[None], d[f"call{i}/tts_speech"], SPEECH_ATOL)
