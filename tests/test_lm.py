"""Prompts and the streaming generation loop on a tiny random GLM-4-Voice written by our tiny writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from glmvoice_cli.lm.prompts import (
    SPEECH_SYSTEM_PROMPT,
    TEXT_SYSTEM_PROMPT,
    InputMode,
    SpeechInput,
    TextInput,
    turn_ids,
)
from glmvoice_cli.lm.voice_lm import (
    AudioTokens,
    GenerationOptions,
    StopReason,
    TextPiece,
    TurnEnd,
    VoiceLM,
    tokens_through_audio,
)
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

SPEC = TinyLMSpec(
    hidden_size=32, num_layers=2, num_heads=4, kv_groups=2, kv_channels=12, ffn_hidden_size=64, n_reserved=3
)  # non-square attention: 4 x 12 != 32, as ChatGLM allows
FORCE = 1e4  # added to a logit to make that token win


@pytest.fixture(scope="module", params=["dynamic", "static"])
def lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> VoiceLM:
    """The loop over a dynamic cache, and over the static cache (run eagerly: hooks must see each step)."""
    folder = write_tiny_lm(tmp_path_factory.mktemp("lm"), SPEC)
    model = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    if request.param == "static":
        model.enable_static(compiled=False, max_len=512)  # room for a first turn and half the context
    return model


class Forcer:
    """Forward hook on lm_head making the scripted ids win, one per generation step after the prefill."""

    def __init__(self, lm: VoiceLM, script: list[int], on_call: dict[int, object] | None = None) -> None:
        self.script, self.calls, self.on_call = script, 0, on_call or {}
        self.handle = lm.model.lm_head.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        if step in self.on_call:
            self.on_call[step]()
        if step < len(self.script):
            out = out.clone()
            out[..., -1, self.script[step]] += FORCE
        return out

    def __enter__(self) -> Forcer:  # noqa: PYI034 - a test helper, never subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _collect(events: Iterator) -> tuple[list, TurnEnd]:
    out = list(events)
    assert isinstance(out[-1], TurnEnd)
    return out[:-1], out[-1]


# ---------------------------------------------------------------- prompts


def test_system_prompts_are_verbatim() -> None:
    tail = "Do it step by step. First, think about the instruction and respond in a interleaved manner, "
    tail += "with 13 text token followed by 26 audio tokens."
    assert SPEECH_SYSTEM_PROMPT == "User will provide you with a speech instruction. " + tail + " "  # noqa: SIM300 - ours, then the reference's
    assert TEXT_SYSTEM_PROMPT == "User will provide you with a text instruction. " + tail  # noqa: SIM300


def test_first_speech_turn_matches_the_official_string(lm: VoiceLM) -> None:
    tok = lm.text_tokenizer
    ids = turn_ids(tok, SpeechInput((3, 0, 7)), None)
    expected = (
        f"[gMASK]<sop><|system|>\n{SPEECH_SYSTEM_PROMPT}<|user|>\n<|begin_of_audio|><|audio_3|><|audio_0|>"
        "<|audio_7|><|end_of_audio|><|assistant|>streaming_transcription\n"
    )
    assert tok.decode(ids) == expected
    assert ids[:2] == tok.prefix_ids
    assert ids[-len(tok.encode("streaming_transcription\n")) - 1] == tok.token_id("<|assistant|>")


def test_first_text_turn_and_a_typed_turn_in_a_spoken_conversation(lm: VoiceLM) -> None:
    tok = lm.text_tokenizer
    first = tok.decode(turn_ids(tok, TextInput("Hi!"), None))
    assert (
        first
        == f"[gMASK]<sop><|system|>\n{TEXT_SYSTEM_PROMPT}<|user|>\nHi!<|assistant|>streaming_transcription\n"
    )
    later = turn_ids(tok, TextInput("Hi!"), InputMode.SPEECH)
    assert tok.decode(later) == "<|user|>\nHi!<|assistant|>streaming_transcription\n"
    assert tok.token_id("<|system|>") not in later


def test_conversation_keeps_the_first_system_prompt(lm: VoiceLM) -> None:
    conv = lm.new_conversation()
    options = GenerationOptions(seed=0, max_new_tokens=3)
    _collect(lm.stream(conv, SpeechInput((1, 2)), options))
    _collect(lm.stream(conv, TextInput("typed"), options))
    assert conv.system_mode is InputMode.SPEECH
    text = lm.text_tokenizer.decode(conv.ids)
    assert text.count("<|system|>") == 1 and SPEECH_SYSTEM_PROMPT in text
    assert "<|user|>\ntyped<|assistant|>" in text


# ---------------------------------------------------------------- streaming events and stops


def test_events_follow_the_sampled_tokens(lm: VoiceLM) -> None:
    tok = lm.text_tokenizer
    text_ids = tok.encode("天 ok")
    script = [*text_ids, tok.audio_offset + 4, tok.audio_offset + 9, tok.token_id("<|user|>")]
    conv = lm.new_conversation()
    with Forcer(lm, script):
        events, end = _collect(lm.stream(conv, SpeechInput((1,)), GenerationOptions(seed=1)))
    pieces = [e for e in events if isinstance(e, TextPiece)]
    assert "".join(p.text for p in pieces) == "天 ok"
    assert [p.token_id for p in pieces] == text_ids
    assert [e.indices for e in events if isinstance(e, AudioTokens)] == [(4,), (9,)]
    assert end.reason is StopReason.USER
    assert end.n_generated == len(script) - 1
    assert conv.last_output == script[:-1]  # the stop token is not kept


@pytest.mark.parametrize("name", ["<|endoftext|>", "<|observation|>"])
def test_eos_stops(lm: VoiceLM, name: str) -> None:
    with Forcer(lm, [lm.text_tokenizer.audio_offset, lm.text_tokenizer.token_id(name)]):
        events, end = _collect(lm.stream(lm.new_conversation(), TextInput("x"), GenerationOptions(seed=0)))
    assert end.reason is StopReason.EOS and end.n_generated == 1 and len(events) == 1


def test_max_new_tokens(lm: VoiceLM) -> None:
    with Forcer(lm, [lm.text_tokenizer.audio_offset] * 10):
        events, end = _collect(
            lm.stream(lm.new_conversation(), TextInput("x"), GenerationOptions(max_new_tokens=4))
        )
    assert end.reason is StopReason.MAX_TOKENS and end.n_generated == 4 and len(events) == 4


def test_padded_vocabulary_rows_are_never_sampled(lm: VoiceLM) -> None:
    assert lm.model.config.vocab_size > lm.text_tokenizer.vocab_size  # the tiny model is padded too
    padded = lm.model.config.vocab_size - 1
    conv = lm.new_conversation()
    with Forcer(lm, [padded] * 5):
        _collect(
            lm.stream(conv, TextInput("x"), GenerationOptions(max_new_tokens=5, temperature=1.0, top_p=1.0))
        )
    assert all(i < lm.text_tokenizer.vocab_size for i in conv.last_output)


def test_seed_makes_a_turn_reproducible(lm: VoiceLM) -> None:
    def run(seed: int) -> list[int]:
        conv = lm.new_conversation()
        _collect(
            lm.stream(conv, TextInput("x"), GenerationOptions(seed=seed, temperature=1.0, max_new_tokens=12))
        )
        return conv.last_output

    assert run(5) == run(5)


# ---------------------------------------------------------------- cancel


def test_cancel_from_another_thread_stops_within_one_step(lm: VoiceLM) -> None:
    cancel = threading.Event()
    in_step, resume = threading.Event(), threading.Event()

    def block_in_forward() -> None:  # the 4th forward (3rd decode step) waits for the main thread
        in_step.set()
        assert resume.wait(10)

    events: list = []
    conv = lm.new_conversation()
    with Forcer(lm, [lm.text_tokenizer.audio_offset] * 50, on_call={3: block_in_forward}):
        worker = threading.Thread(
            target=lambda: events.extend(lm.stream(conv, TextInput("x"), GenerationOptions(), cancel))
        )
        worker.start()
        assert in_step.wait(10)
        cancel.set()
        resume.set()
        worker.join(10)
    assert not worker.is_alive()
    assert events[-1] == TurnEnd(StopReason.CANCELLED, 3)  # the logits of the running step are dropped
    assert sum(isinstance(e, AudioTokens) for e in events) == 3


def test_cancel_before_start(lm: VoiceLM) -> None:
    cancel = threading.Event()
    cancel.set()
    conv = lm.new_conversation()
    events = list(lm.stream(conv, TextInput("x"), GenerationOptions(), cancel))
    assert events == [TurnEnd(StopReason.CANCELLED, 0)]


# ---------------------------------------------------------------- cache across turns and trimming


def _fresh_logits(lm: VoiceLM, ids: list[int]) -> torch.Tensor:
    fresh = lm.new_conversation()
    logits = lm.prefill(fresh, ids)
    assert fresh.last_prefill_tokens == len(ids)
    return logits


def test_second_turn_prefills_only_its_own_input(lm: VoiceLM) -> None:
    tok = lm.text_tokenizer
    conv = lm.new_conversation()
    with Forcer(lm, [tok.audio_offset + 1, *tok.encode("ok"), tok.token_id("<|user|>")]):
        _collect(lm.stream(conv, SpeechInput((2, 3)), GenerationOptions()))
    new_ids = turn_ids(tok, TextInput("and then?"), conv.system_mode)
    history = list(conv.ids)
    logits = lm.prefill(conv, new_ids)
    assert conv.last_prefill_tokens == len(new_ids)
    torch.testing.assert_close(logits, _fresh_logits(lm, history + new_ids), rtol=1e-5, atol=1e-5)


def test_stream_reuses_the_cache(lm: VoiceLM) -> None:
    tok = lm.text_tokenizer
    conv = lm.new_conversation()
    with Forcer(lm, [tok.audio_offset, tok.token_id("<|user|>")]):
        _collect(lm.stream(conv, SpeechInput((2,)), GenerationOptions()))
    with Forcer(lm, [tok.token_id("<|user|>")]):
        _collect(lm.stream(conv, SpeechInput((5, 6)), GenerationOptions()))
    assert conv.last_prefill_tokens == len(turn_ids(tok, SpeechInput((5, 6)), InputMode.SPEECH))
    assert conv.cached_ids == conv.ids


def test_barge_in_keeps_only_what_was_heard(lm: VoiceLM) -> None:
    tok = lm.text_tokenizer
    a = tok.audio_offset
    text = tok.encode("hi")
    script = [*text, a + 1, a + 2, a + 3, *tok.encode("more"), a + 4]
    conv = lm.new_conversation()
    with Forcer(lm, script):
        _collect(lm.stream(conv, SpeechInput((1,)), GenerationOptions(max_new_tokens=len(script))))
    assert conv.last_output == script
    heard = tokens_through_audio(conv.last_output, tok, 2)
    assert heard == len(text) + 2
    conv.keep_heard(heard)
    assert conv.last_output == [*text, a + 1, a + 2]
    assert conv.cached_ids == conv.ids  # the cache was cropped with the history
    new_ids = turn_ids(tok, SpeechInput((9,)), conv.system_mode)
    history = list(conv.ids)
    logits = lm.prefill(conv, new_ids)
    assert conv.last_prefill_tokens == len(new_ids)
    torch.testing.assert_close(logits, _fresh_logits(lm, history + new_ids), rtol=1e-5, atol=1e-5)


def test_keep_heard_bounds(lm: VoiceLM) -> None:
    conv = lm.new_conversation()
    with pytest.raises(ValueError):
        conv.keep_heard(0)
    with Forcer(lm, [lm.text_tokenizer.audio_offset] * 3):
        _collect(lm.stream(conv, TextInput("x"), GenerationOptions(max_new_tokens=3)))
    with pytest.raises(ValueError):
        conv.keep_heard(4)
    conv.keep_heard(0)
    assert conv.last_output == []


def test_consumer_stopping_early_keeps_what_was_generated(lm: VoiceLM) -> None:
    conv = lm.new_conversation()
    with Forcer(lm, [lm.text_tokenizer.audio_offset + 2] * 10):
        stream = lm.stream(conv, TextInput("x"), GenerationOptions(max_new_tokens=10))
        first = [next(stream) for _ in range(3)]
        stream.close()
    assert [e.indices for e in first] == [(2,)] * 3
    assert conv.last_output == [lm.text_tokenizer.audio_offset + 2] * 3


@pytest.mark.compiles
def test_benchmark_quick_smoke(tmp_path: Path) -> None:
    """benchmarks/lm.py --quick runs end to end on a tiny model and writes its JSON."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "lm.json"
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "lm.py"), "--quick", "--out", str(out),
         "--compile-cache", os.environ["TORCHINDUCTOR_CACHE_DIR"]],  # the session's (conftest)
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        timeout=1200,
    )
    result = json.loads(out.read_text())
    assert result["greedy_ids_match"] == {"eager_vs_generate": True, "compiled_vs_eager": True}
    assert result["eager"]["new_tokens"] == result["compiled"]["new_tokens"] == result["generate"]["new_tokens"]
    assert result["floor"]["tokens_per_s"] > 0 and set(result["fraction_of_floor"]) == {"eager", "compiled", "generate"}


def test_text_only_never_samples_audio_and_instruction_precedes_speech(tmp_path) -> None:
    from glmvoice_cli.lm.prompts import SpeechInput, user_turn_ids
    from glmvoice_cli.lm.voice_lm import GenerationOptions, VoiceLM
    from glmvoice_cli.tiny.modelset import write_tiny_model_set

    dirs = write_tiny_model_set(tmp_path / "m", codebook=32).dirs
    lm = VoiceLM.from_folder(dirs["lm"])
    tok = lm.text_tokenizer
    user = SpeechInput((1, 2, 3), instruction="Transcribe:")
    ids = user_turn_ids(tok, user)
    begin = ids.index(tok.token_id("<|begin_of_audio|>"))
    assert tok.decode(ids[1:begin]) == "\nTranscribe:"
    assert ids[begin + 1 : begin + 4] == tok.audio_ids([1, 2, 3])

    conv = lm.new_conversation()
    spoken = [e for e in lm.stream(conv, user, GenerationOptions(max_new_tokens=40, seed=0))]
    assert any(type(e).__name__ == "AudioTokens" for e in spoken), "the tiny set is built to emit audio"
    conv = lm.new_conversation()
    events = list(lm.stream(conv, user, GenerationOptions(max_new_tokens=40, seed=0, text_only=True)))
    assert not any(type(e).__name__ == "AudioTokens" for e in events)
    assert not any(tok.is_audio(i) for i in conv.last_output)
