"""Streaming SpeechDecoder on a tiny random decoder: lengths, joins, flush, reset, schedules."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from glmvoice_cli.decoder.flow import mel_frames
from glmvoice_cli.decoder.noise import SeededNoise
from glmvoice_cli.decoder.speech_decoder import (
    DEFAULT_SCHEDULE,
    REFERENCE_SCHEDULE,
    BlockOutput,
    SpeechDecoder,
    StreamSchedule,
    fade_in_out,
)
from glmvoice_cli.errors import UsageError
from glmvoice_cli.tiny.decoder import TinyDecoderSpec, tiny_decoder

N_TOKENS = 120
SAMPLES_PER_FRAME = 256
SCHEDULES = [
    DEFAULT_SCHEDULE,
    StreamSchedule(block_sizes=(10,), context_tokens=20),
    StreamSchedule(block_sizes=(30, 60), context_tokens=None),
    REFERENCE_SCHEDULE,
]


@pytest.fixture(scope="module")
def models():  # type: ignore[no-untyped-def]
    return tiny_decoder(TinyDecoderSpec(seed=1))


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    return torch.randint(0, 64, (N_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def offline(models, tokens) -> np.ndarray:  # type: ignore[no-untyped-def]
    return SpeechDecoder(models, DEFAULT_SCHEDULE).decode(tokens)


@pytest.fixture(scope="module")
def streamed(models, tokens):  # type: ignore[no-untyped-def]
    """Streams of the 120 tokens, computed once per schedule."""
    cache: dict[StreamSchedule, list[np.ndarray]] = {}

    def get(schedule: StreamSchedule) -> list[np.ndarray]:
        if schedule not in cache:
            cache[schedule] = list(SpeechDecoder(models, schedule).stream(tokens))
        return cache[schedule]

    return get


def _max_join_jump(chunks: list[np.ndarray]) -> tuple[float, float]:
    """Largest sample-to-sample step across block joins, and inside the signal."""
    signal = np.concatenate(chunks)
    steps = np.abs(np.diff(signal))
    joins = np.cumsum([len(c) for c in chunks])[:-1]
    joins = joins[(joins > 0) & (joins < len(signal))]
    return float(steps[joins - 1].max()) if len(joins) else 0.0, float(steps.max())


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["default", "tens-ctx20", "full-ctx", "reference"])
def test_stream_length_and_joins(streamed, offline, schedule: StreamSchedule) -> None:  # type: ignore[no-untyped-def]
    chunks = streamed(schedule)
    total = sum(len(c) for c in chunks)
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    if schedule.reference_prompt:  # quirk Q9: one frame of drift per block
        assert abs(total - len(offline)) <= len(chunks) * SAMPLES_PER_FRAME
    else:
        assert total == len(offline) == mel_frames(N_TOKENS, 12.5) * SAMPLES_PER_FRAME
    join, inside = _max_join_jump(chunks)
    assert join <= inside, "a block join is the largest discontinuity of the signal"
    assert join < 0.5


def test_streamed_close_to_offline(streamed, offline) -> None:  # type: ignore[no-untyped-def]
    """Same noise positions and carried sine phases: only the flow's wider context differs.

    With random weights the estimator's GroupNorm statistics span the whole call, so the
    streamed audio is close to, not equal to, the one-shot decode.
    """
    audio = np.concatenate(streamed(DEFAULT_SCHEDULE))
    def rms(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(x))))

    assert 0.7 < rms(audio) / rms(offline) < 1.4
    assert rms(audio - offline) < 0.8 * rms(offline)
    assert np.corrcoef(audio, offline)[0, 1] > 0.4


def test_one_block_equals_offline(models, tokens, offline) -> None:  # type: ignore[no-untyped-def]
    schedule = StreamSchedule(block_sizes=(200,), context_tokens=None)
    chunks = list(SpeechDecoder(models, schedule).stream(tokens))
    assert np.array_equal(np.concatenate(chunks), offline)


def test_flush_keeps_tail(models, tokens) -> None:  # type: ignore[no-untyped-def]
    """Tokens ending exactly on a block boundary: the held-back 34 frames still come out."""
    decoder = SpeechDecoder(models, StreamSchedule(block_sizes=(20,), context_tokens=None))
    state = decoder.new_state()
    chunks = decoder.push(state, tokens[:40])
    assert len(chunks) == 2 and not state.pending and state.mel_overlap is not None
    tail = decoder.flush(state)
    total = sum(len(c) for c in chunks) + len(tail)
    assert total == mel_frames(40, 12.5) * SAMPLES_PER_FRAME
    assert len(tail) == (decoder.overlap_frames + 1) * SAMPLES_PER_FRAME  # overlap + cached frame


def test_push_small_and_empty_flush(models, tokens) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models)
    state = decoder.new_state()
    assert decoder.push(state, tokens[:5]) == []
    assert len(decoder.flush(state)) == mel_frames(5, 12.5) * SAMPLES_PER_FRAME
    assert len(decoder.flush(decoder.new_state())) == 0
    assert len(decoder.decode([])) == 0
    with pytest.raises(UsageError):
        decoder.push(state, [-1])


def test_reset_and_determinism(models, tokens) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models, seed=3)
    state = decoder.new_state()
    first = decoder.push(state, tokens[:30])
    state.reset()
    assert state == decoder.new_state()
    again = decoder.push(state, tokens[:30])
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = SpeechDecoder(models, seed=4).push(decoder.new_state(), tokens[:30])
    assert not np.array_equal(first[0], other[0])


def test_bounded_context(models, tokens) -> None:  # type: ignore[no-untyped-def]
    blocks: list[BlockOutput] = []
    schedule = StreamSchedule(block_sizes=(10,), context_tokens=20)
    decoder = SpeechDecoder(models, schedule, on_block=blocks.append)
    state = decoder.new_state()
    decoder.push(state, tokens[:60])
    assert len(state.context) <= 20
    assert max(b.prompt_feat.shape[1] for b in blocks) <= mel_frames(20, 12.5) + 1
    assert state.history is not None and state.history.shape[-1] <= mel_frames(20, 12.5) + decoder.overlap_frames


class _NoiseFlow:
    """A stand-in flow whose 'mel' is the start noise of the new frames: exposes the bookkeeping."""

    def __init__(self, flow) -> None:  # type: ignore[no-untyped-def]
        self.cfg, self.n_frames = flow.cfg, flow.n_frames

    def inference_rows(self, tokens, prompt_feats, noise, *, batch_guidance, on_step=None):  # type: ignore[no-untyped-def]
        assert noise.shape[-1] == self.n_frames(tokens.shape[1])
        return noise


@pytest.mark.parametrize("context", [None, 20])
def test_prompt_alignment(models, tokens, context: int | None) -> None:  # type: ignore[no-untyped-def]
    """Each block's prompt frames are the finalized frames just before its output, at the right position."""
    blocks: list[BlockOutput] = []
    noise = SeededNoise(11)
    decoder = SpeechDecoder(models, StreamSchedule((10, 20), context), noise=noise, on_block=blocks.append)
    decoder.flow = _NoiseFlow(models.flow)  # type: ignore[assignment]
    list(decoder.stream(tokens))
    bank = noise.flow_noise(mel_frames(N_TOKENS, 12.5), 0)
    done = 0
    for block in blocks:
        n = block.flow_mel.shape[-1]
        assert torch.equal(block.flow_mel, bank[:, :, done : done + n])  # output starts at frames_done
        if block.prompt_feat.shape[1]:
            assert block.prompt_feat.shape[1] <= done
        done += n if block.finalize else n - decoder.overlap_frames
    assert done == mel_frames(N_TOKENS, 12.5)


def test_fade_in_out_float64() -> None:
    a, b = torch.ones(1, 2, 40), torch.zeros(1, 2, 34)
    out = fade_in_out(a, b)
    window = np.hamming(68)
    assert np.allclose(out[0, 0, :34].numpy(), window[:34].astype(np.float32))
    assert torch.equal(out[:, :, 34:], a[:, :, 34:])


class _NoFloat64(torch.Tensor):
    """A stand-in for a tensor on a device without float64 (Apple MPS): any float64 result raises.

    Moving it to the CPU (`.cpu()`) gives a plain CPU tensor, as moving an MPS tensor would.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def, override]
        if func is torch.Tensor.cpu:
            return super().__torch_function__(func, types, args, kwargs).as_subclass(torch.Tensor)
        if func is torch.Tensor.double:
            raise TypeError("this device has no float64")
        out = super().__torch_function__(func, types, args, kwargs)
        if isinstance(out, _NoFloat64) and out.dtype == torch.float64:
            raise TypeError("this device has no float64")
        return out


def test_fade_in_out_never_uses_float64_on_the_model_device() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 80, 60, generator=g), torch.randn(1, 80, 34, generator=g)
    expected = fade_in_out(a, b)
    with pytest.raises(TypeError, match="float64"):  # the stand-in does refuse float64
        a.as_subclass(_NoFloat64).double()
    out = fade_in_out(a.as_subclass(_NoFloat64), b.as_subclass(_NoFloat64))
    assert out.dtype == torch.float32
    assert torch.equal(out.as_subclass(torch.Tensor), expected)  # same values: the fade ran on the CPU


def test_schedule_validation() -> None:
    with pytest.raises(UsageError):
        StreamSchedule(block_sizes=(3,))
    with pytest.raises(UsageError):
        StreamSchedule(context_tokens=4)
    assert StreamSchedule((10, 20)).block_size(5) == 20


def test_vocoder_pieces(models, tokens, offline) -> None:  # type: ignore[no-untyped-def]
    """Long blocks are vocoded in pieces: same length, identical before the first join, no clicks.

    After a join the harmonic phase carries over, but the F0 near the edge (conv context) differs
    slightly, so later samples are phase-shifted rather than equal.
    """
    limit = 128
    whole = SpeechDecoder(models, StreamSchedule(max_vocoder_frames=None)).decode(tokens)
    pieces = SpeechDecoder(models, StreamSchedule(max_vocoder_frames=limit)).decode(tokens)
    assert len(pieces) == len(whole) == len(offline)
    head = (limit - 16) * SAMPLES_PER_FRAME  # outside the receptive field of the first join (~12 frames)
    np.testing.assert_allclose(pieces[:head], whole[:head], atol=1e-4)
    joins = [(limit - 1) * SAMPLES_PER_FRAME * k for k in range(1, len(pieces) // (limit * SAMPLES_PER_FRAME))]
    steps = np.abs(np.diff(pieces))
    assert max(steps[j - 1] for j in joins) <= steps.max()


def _counting_estimator(decoder: SpeechDecoder, after: int | None, cancel: threading.Event) -> list[int]:
    """Count the flow estimator's calls on `decoder`; set `cancel` once `after` calls have run."""
    estimator = decoder.flow.decoder.estimator
    calls: list[int] = []
    real = estimator.forward

    def forward(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if after is not None and len(calls) == after:
            cancel.set()
        return real(*args, **kwargs)  # type: ignore[arg-type]

    estimator.forward = forward  # type: ignore[method-assign]
    return calls


def test_a_cancel_cuts_the_block_between_flow_steps(tokens) -> None:  # type: ignore[no-untyped-def]
    """A barge-in mid-block stops the flow before its next step: the block is dropped, the answer's state is
    spent (later pushes and the flush give nothing), and a new answer decodes exactly as on a fresh decoder."""
    models = tiny_decoder(TinyDecoderSpec(seed=1))  # its own copy: the estimator is wrapped below
    decoder, cancel = SpeechDecoder(models, DEFAULT_SCHEDULE), threading.Event()
    calls = _counting_estimator(decoder, after=1, cancel=cancel)
    state = decoder.new_state()
    assert decoder.push(state, tokens[:30], cancel) == []
    assert len(calls) == 1 and state.cancelled  # one step of the first block ran, then the cut
    assert decoder.push(state, tokens[30:60], cancel) == [] and len(calls) == 1
    assert len(decoder.flush(state)) == 0 and state == decoder.new_state()
    cancel.clear()
    calls.clear()
    state = decoder.new_state()
    decoder.push(state, tokens[:5])  # under one block: all of it waits for the flush
    cut_in_flush = _counting_estimator(decoder, after=1, cancel=cancel)
    assert len(decoder.flush(state, cancel)) == 0 and len(cut_in_flush) == 1 and state == decoder.new_state()
    del decoder.flow.decoder.estimator.forward
    cancel.clear()
    again = decoder.push(decoder.new_state(), tokens[:30], cancel)
    fresh = SpeechDecoder(tiny_decoder(TinyDecoderSpec(seed=1)), DEFAULT_SCHEDULE).push(
        SpeechDecoder(models).new_state(), tokens[:30])
    assert len(again) == len(fresh) > 0 and all(np.array_equal(a, b) for a, b in zip(again, fresh, strict=True))


def test_a_cancelled_answer_stops_decoding_within_a_flow_step(assistant) -> None:  # type: ignore[no-untyped-def]
    """Assistant.respond hands its cancel to the decoder: a turn cut while a block decodes ends there."""
    from glmvoice_cli.events import AudioChunk, TurnEnded
    from glmvoice_cli.lm.prompts import TextInput
    from glmvoice_cli.lm.voice_lm import GenerationOptions

    cancel = threading.Event()
    calls = _counting_estimator(assistant.decoder, after=1, cancel=cancel)
    try:
        events = list(assistant.respond(assistant.lm.new_conversation(), TextInput("hello"),
                                        GenerationOptions(max_new_tokens=200, seed=1), cancel))
    finally:
        del assistant.decoder.flow.decoder.estimator.forward  # back to the class's method
    assert len(calls) == 1 and not any(isinstance(e, AudioChunk) for e in events)
    assert isinstance(events[-1], TurnEnded) and events[-1].interrupted
