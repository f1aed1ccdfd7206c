"""The speech decoder batched across streams: each stream's audio equals its audio decoded alone."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from glmvoice_cli.decoder.speech_decoder import (
    REFERENCE_SCHEDULE,
    BlockRequest,
    DecoderState,
    SpeechDecoder,
    StreamSchedule,
)
from glmvoice_cli.tiny.decoder import TinyDecoderSpec, tiny_decoder

from .chat_helpers import assert_same_audio

TOLERANCE = 1e-5  # fp32 on the CPU: a batched row of the flow or the vocoder may round differently from alone
# End to end, the audio is held to the rounding the vocoder's phase integration amplifies (chat_helpers)
ROUND_TOKENS = 13  # tokens each stream receives per round (about what the LM yields between blocks)


@pytest.fixture(scope="module", autouse=True)
def _threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():  # type: ignore[no-untyped-def]
    return tiny_decoder(TinyDecoderSpec(seed=5))


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _solo(decoder: SpeechDecoder, tokens: list[int], seed: int) -> np.ndarray:
    state = decoder.new_state(decoder.new_noise(seed))
    chunks = decoder.push(state, tokens)
    chunks.append(decoder.flush(state))
    return np.concatenate(chunks)


def _together(decoder: SpeechDecoder, streams: list[list[int]], seeds: list[int], joins: list[int] | None = None,
              cancels: list[threading.Event | None] | None = None) -> list[np.ndarray]:
    """Feed every stream ROUND_TOKENS per round (stream i from round joins[i]) through `push_streams`, then
    flush each; -> each stream's audio."""
    joins = joins or [0] * len(streams)
    states = [decoder.new_state(decoder.new_noise(seed)) for seed in seeds]
    out: list[list[np.ndarray]] = [[] for _ in streams]
    rounds = max(join + -(-len(tokens) // ROUND_TOKENS) for join, tokens in zip(joins, streams, strict=True))
    for r in range(rounds):
        pushes = [(state, tokens[(r - join) * ROUND_TOKENS : (r - join + 1) * ROUND_TOKENS] if r >= join else [])
                  for state, tokens, join in zip(states, streams, joins, strict=True)]
        for i, chunks in enumerate(decoder.push_streams(pushes, cancels)):
            out[i] += chunks
    for i, state in enumerate(states):
        out[i].append(decoder.flush(state, cancels[i] if cancels else None))
    return [np.concatenate(chunks) for chunks in out]


class _RowCounter:
    """Records the rows of every estimator call."""

    def __init__(self, decoder: SpeechDecoder) -> None:
        self.rows: list[int] = []
        estimator = decoder.flow.decoder.estimator
        self.handle = estimator.register_forward_pre_hook(lambda _m, args: self.rows.append(args[0].shape[0]))

    def close(self) -> None:
        self.handle.remove()


@pytest.mark.parametrize("n_streams", [1, 2, 3])
def test_streams_of_different_lengths_batched_equal_each_alone(models, n_streams: int) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models)
    streams = [_tokens(n, seed=n) for n in (137, 61, 200)[:n_streams]]
    seeds = [11, 12, 13][:n_streams]
    counter = _RowCounter(decoder)
    together = _together(decoder, streams, seeds)
    counter.close()
    for tokens, seed, audio in zip(streams, seeds, together, strict=True):
        assert_same_audio(audio, _solo(decoder, tokens, seed))
    if n_streams > 1:  # the streams really shared flow calls (2 rows per stream with batched guidance)
        assert max(counter.rows) == 2 * n_streams


def test_the_reference_schedule_batches_too(models) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models, REFERENCE_SCHEDULE)
    streams = [_tokens(90, seed=1), _tokens(60, seed=2)]
    together = _together(decoder, streams, [0, 0])
    for tokens, audio in zip(streams, together, strict=True):
        state = decoder.new_state(decoder.new_noise())
        alone = np.concatenate([*decoder.push(state, tokens), decoder.flush(state)])
        assert_same_audio(audio, alone)


def test_a_stream_joining_mid_batch_starts_with_its_own_first_block(models) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models)
    streams = [_tokens(150, seed=3), _tokens(90, seed=4)]
    firsts: list[int] = []
    decoder.on_block = lambda block: firsts.append(block.prompt_feat.shape[1])
    together = _together(decoder, streams, [1, 2], joins=[0, 4])
    decoder.on_block = None
    assert firsts.count(0) == 2  # each stream's first block had no prompt: the joiner took nothing of the other
    for tokens, seed, audio in zip(streams, [1, 2], together, strict=True):
        assert_same_audio(audio, _solo(decoder, tokens, seed))


class _CutAfter(threading.Event):
    """A cancel that turns set after it has been asked `n` times (a barge-in in the middle of a flow call)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.asked, self.n = 0, n

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.n or super().is_set()


def test_a_cancel_drops_its_row_and_leaves_the_others_unchanged(models) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models, StreamSchedule(block_sizes=(20,)))
    tokens = [_tokens(60, seed=5), _tokens(60, seed=6), _tokens(60, seed=7)]
    states = [decoder.new_state(decoder.new_noise(seed)) for seed in (1, 2, 3)]
    cut = _CutAfter(4)  # set from the fifth flow step of the first block on
    requests = [BlockRequest(state, t[:20], False, c) for state, t, c in zip(states, tokens, [None, cut, None], strict=True)]
    counter = _RowCounter(decoder)
    decoder.decode_blocks(requests)
    counter.close()
    assert counter.rows == [6] * 4 + [4] * 6  # the cut row left the batch; the other two went on
    assert requests[1].cut and requests[1].output is None and states[1].cancelled
    assert decoder.next_block(states[1]) is None  # a spent stream decodes nothing more
    for i in (0, 2):
        out = requests[i].output
        assert out is not None
        rest = [*decoder.push(states[i], tokens[i][20:]), decoder.flush(states[i])]
        audio = np.concatenate([out.speech.reshape(-1).numpy(), *rest])
        assert_same_audio(audio, _solo(decoder, tokens[i], i + 1))


def test_every_row_cut_ends_the_call(models) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models)
    cancel = threading.Event()
    cancel.set()
    requests = [BlockRequest(decoder.new_state(), _tokens(10, seed=s), False, cancel) for s in (1, 2)]
    decoder.decode_blocks(requests)
    assert all(r.cut and r.output is None for r in requests)
    assert all(r.state.samples_out == 0 for r in requests)


def test_seeds_are_per_conversation(models) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models)
    tokens = _tokens(80, seed=8)
    a, b, c = _together(decoder, [tokens, tokens, tokens], [21, 22, 21])
    np.testing.assert_array_equal(a, c)  # the same seed in one batch: the same audio
    assert np.abs(a - b).max() > 1e-3  # another seed: other noise
    assert_same_audio(a, _solo(decoder, tokens, 21))


def test_a_state_keeps_its_noise_across_answers(models) -> None:  # type: ignore[no-untyped-def]
    decoder = SpeechDecoder(models)
    state = DecoderState(noise=decoder.new_noise(4))
    decoder.push(state, _tokens(30, seed=9))
    decoder.flush(state)
    assert state.noise is not None and state.n_done == 0


def test_the_flow_batched_gives_each_rows_mel_alone(models) -> None:  # type: ignore[no-untyped-def]
    flow = models.flow
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (3, 40), generator=g)
    feats = [torch.zeros(1, 0, 80), torch.randn(1, 30, 80, generator=g), torch.randn(1, 12, 80, generator=g)]
    noise = torch.randn(3, 80, flow.n_frames(40), generator=g)
    both = flow.inference_rows(tokens, feats, noise, batch_guidance=True)
    for row in range(3):
        alone = flow.inference_rows(tokens[row : row + 1], feats[row : row + 1], noise[row : row + 1],
                                    batch_guidance=True)
        torch.testing.assert_close(both[row : row + 1], alone, atol=TOLERANCE, rtol=0)


def test_the_vocoder_batched_gives_each_rows_speech_alone(models) -> None:  # type: ignore[no-untyped-def]
    from glmvoice_cli.decoder.vocoder import SourceDraws

    hift = models.hift
    g = torch.Generator().manual_seed(1)
    harmonics = hift.cfg.nb_harmonics + 1
    mel = torch.randn(3, 80, 60, generator=g)
    phase, noise = torch.rand(3, harmonics, 1, generator=g), torch.randn(3, harmonics, 60 * 256, generator=g)
    cache = torch.randn(3, 1, 256, generator=g) * 0.1
    both, _ = hift.inference(mel, cache, draws=SourceDraws(phase, noise))
    for row in range(3):
        one = slice(row, row + 1)
        alone, _ = hift.inference(mel[one], cache[one], draws=SourceDraws(phase[one], noise[one]))
        torch.testing.assert_close(both[one], alone, atol=TOLERANCE, rtol=0)


# --- the worker's batcher -----------------------------------------------------------------------------


def _answer(kind: int, queued_s: float):  # type: ignore[no-untyped-def]
    return lambda: (kind, queued_s)


def test_blocks_handed_in_together_are_decoded_in_one_batch_on_the_worker(models) -> None:  # type: ignore[no-untyped-def]
    from glmvoice_cli.chat.speech_batch import batcher_for
    from glmvoice_cli.chat.worker import ModelWorker

    decoder = SpeechDecoder(models)
    worker = ModelWorker()
    assistant = SimpleNamespace(decoder=decoder)
    batcher = batcher_for(worker, assistant)  # type: ignore[arg-type]
    assert batcher is not None and batcher_for(worker, assistant) is batcher  # type: ignore[arg-type]  # one per worker
    streams = [_tokens(10, seed=s) for s in (1, 2)]
    states = [decoder.new_state(decoder.new_noise(seed)) for seed in (1, 2)]
    tickets = []
    for state, tokens in zip(states, streams, strict=True):
        decoder.receive(state, tokens)
        request = decoder.next_block(state)
        assert request is not None
        tickets.append(batcher.submit(request, _answer(0, 0.0)))
    worker.start()
    try:
        for _ in range(3000):
            if all(t.finished for t in tickets):
                break
            threading.Event().wait(0.01)
    finally:
        worker.stop()
        worker.join()
    assert batcher.stats.batches == [2]
    for ticket, tokens, seed in zip(tickets, streams, (1, 2), strict=True):
        out = ticket.item.output
        assert out is not None and ticket.error is None and ticket.result is out
        alone = decoder.new_state(decoder.new_noise(seed))
        assert_same_audio(out.samples(), np.concatenate(decoder.push(alone, tokens)))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _batcher_with(models, clock: _Clock):  # type: ignore[no-untyped-def]
    from glmvoice_cli.pipeline.speech_batch import BatchPolicy, DecoderBatcher

    decoder = SpeechDecoder(models, StreamSchedule(block_sizes=(20,)))
    policy = BatchPolicy(join_tokens=13, max_hold_s=0.25, margin_s=0.1)
    return decoder, DecoderBatcher(decoder, policy=policy, clock=clock)


def _one_waiting_block(decoder: SpeechDecoder, batcher, priority) -> DecoderState:  # type: ignore[no-untyped-def]
    """A stream with a whole block handed in to `batcher` (and tracked), waiting for its batch."""
    waiting = decoder.new_state()
    decoder.receive(waiting, _tokens(20, seed=0))
    request = decoder.next_block(waiting)
    assert request is not None
    batcher.submit(request, priority)
    batcher.track(waiting)
    return waiting


def _stream_short_of_its_block(decoder: SpeechDecoder, missing: int) -> DecoderState:
    state = decoder.new_state()
    decoder.receive(state, _tokens(20 - missing, seed=missing))
    return state


@pytest.mark.parametrize(("kind", "queued_s", "missing", "holds"), [
    (0, 0.0, 5, False),  # the waiting answer's speaker is dry: run now
    (0, 3.0, 5, True),  # 3 s of audio queued and another stream 5 tokens short: wait for it
    (0, 3.0, 20, False),  # the other stream is far from its block: run now
    (2, 0.0, 5, True),  # a speculative answer plays nothing yet: it may wait
])
def test_the_batch_waits_only_for_a_close_stream_and_never_past_a_speaker(
        models, kind: int, queued_s: float, missing: int, holds: bool) -> None:  # type: ignore[no-untyped-def]
    clock = _Clock()
    decoder, batcher = _batcher_with(models, clock)
    _one_waiting_block(decoder, batcher, _answer(kind, queued_s))
    batcher.track(_stream_short_of_its_block(decoder, missing))
    assert batcher.hold() is holds
    if holds:
        clock.now += 0.3  # past max_hold_s: the batch runs with what it has
        assert batcher.hold() is False


def test_a_finished_or_cut_stream_is_not_waited_for(models) -> None:  # type: ignore[no-untyped-def]
    clock = _Clock()
    decoder, batcher = _batcher_with(models, clock)
    _one_waiting_block(decoder, batcher, _answer(0, 3.0))
    close = _stream_short_of_its_block(decoder, 3)
    batcher.track(close)
    assert batcher.hold() is True
    close.cancelled = True
    assert batcher.hold() is False
    close.cancelled = False
    batcher.untrack(close)
    assert batcher.hold() is False


def test_a_cut_row_and_a_failing_batch_reach_their_answers(models) -> None:  # type: ignore[no-untyped-def]
    clock = _Clock()
    decoder, batcher = _batcher_with(models, clock)
    states = [decoder.new_state() for _ in range(2)]
    cancel = threading.Event()
    tickets = []
    for state, cut in zip(states, [cancel, None], strict=True):
        decoder.receive(state, _tokens(20, seed=1))
        request = decoder.next_block(state, cut)
        assert request is not None
        tickets.append(batcher.submit(request, _answer(0, 0.0)))
    cancel.set()
    batcher.run()
    assert tickets[0].item.cut and states[0].cancelled and tickets[0].finished
    assert tickets[1].item.output is not None and batcher.stats.batches == [1]

    def broken(_requests: list[BlockRequest]) -> None:
        raise RuntimeError("CUDA error: out of memory")

    decoder.decode_blocks = broken
    state = decoder.new_state()
    decoder.receive(state, _tokens(20, seed=2))
    request = decoder.next_block(state)
    assert request is not None
    waiting = batcher.wait(request, _answer(0, 0.0))
    next(waiting)  # handed in, waiting
    batcher.run()
    with pytest.raises(RuntimeError, match="out of memory"):
        next(waiting)


# --- the speech tokenizer's blocks ----------------------------------------------------------------------


def test_tokenizer_blocks_of_several_streams_encoded_together_equal_each_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from glmvoice_cli.tiny.tokenizer import TinyTokenizerSpec, write_tiny_tokenizer
    from glmvoice_cli.tokenizer.block_encoder import Span, encode_span, encode_spans
    from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
    from glmvoice_cli.tokenizer.streaming import StreamingTokenizer
    from glmvoice_cli.tokenizer.whisper_vq import CONV2_STRIDE

    tok = SpeechTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok", TinyTokenizerSpec(seed=3)), device="cpu")
    block = StreamingTokenizer(tok).block_frames // CONV2_STRIDE  # positions per causal block
    g = torch.Generator().manual_seed(0)
    feats = [tok.logmel(torch.randn(1, 16_000 * 9, generator=g) * 0.1)[0] for _ in range(3)]  # > two blocks
    valid = [torch.ones(f.shape[1], dtype=torch.bool) for f in feats]
    first = [Span(f, v, 0, block, None) for f, v in zip(feats, valid, strict=True)]
    together = encode_spans(tok.model, first)
    second = [Span(f, v, block, 2 * block, r.caches) for f, v, r in zip(feats[:2], valid[:2], together[:2], strict=True)]
    # streams at different places: two second blocks and a first block share one call (keys padded, hidden)
    rows: list[int] = []
    hook = tok.model.layers[0].self_attn_layer_norm.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    mixed = encode_spans(tok.model, [*second, first[2]])
    hook.remove()
    assert rows == [3]
    for span, got in zip([*first, *second, first[2]], [*together, *mixed], strict=True):
        alone = encode_span(tok.model, span.feats, span.frame_valid, span.p0, span.p1, span.past)
        assert got.ids == alone.ids and got.valid == alone.valid
        torch.testing.assert_close(got.states, alone.states, atol=TOLERANCE, rtol=0)
        for (k, v), (k1, v1) in zip(got.caches, alone.caches, strict=True):
            torch.testing.assert_close(k, k1, atol=TOLERANCE, rtol=0)
            torch.testing.assert_close(v, v1, atol=TOLERANCE, rtol=0)


def test_two_users_completed_blocks_wait_for_one_batch_and_give_the_ids_heard_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from glmvoice_cli.pipeline.listening import TurnListener
    from glmvoice_cli.pipeline.speech_batch import StreamSpans, TokenizerBatcher
    from glmvoice_cli.tiny.tokenizer import TinyTokenizerSpec, write_tiny_tokenizer
    from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer

    tok = SpeechTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok", TinyTokenizerSpec(seed=4)), device="cpu")
    batcher = TokenizerBatcher(tok.model)
    g = np.random.default_rng(0)
    speech = [(0.1 * g.standard_normal(16_000 * 9)).astype(np.float32) for _ in range(2)]
    conv = SimpleNamespace(system_mode=None)  # no LM: the listener only tokenizes
    together = [TurnListener(tok, None) for _ in speech]
    steps = [listener.hear_steps(0, audio, conv, spans=StreamSpans(batcher, _answer(1, 0.0)))  # type: ignore[arg-type]
             for listener, audio in zip(together, speech, strict=True)]
    for step in steps:
        next(step)  # each hands its first completed block in and waits
    assert len(batcher._pending) == 2
    while any(batcher.waiting or step is not None for step in steps):
        batcher.run()
        for i, step in enumerate(steps):
            if step is not None:
                try:
                    next(step)
                except StopIteration:
                    steps[i] = None  # type: ignore[call-overload]
    assert batcher.stats.batches[0] == 2
    for listener, audio in zip(together, speech, strict=True):
        alone = TurnListener(tok, None)
        alone.hear(0, audio, conv)  # type: ignore[arg-type]
        assert listener.stream.ids == alone.stream.ids and len(alone.stream.ids) > 0


def test_on_the_worker_two_users_blocks_completed_at_once_share_one_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The tokenizer's batch gives way to a conversation of the same priority: the second user's block is handed
    in before the batch runs, even though the batcher was there first."""
    from glmvoice_cli.chat.speech_batch import tokenizer_batcher_for
    from glmvoice_cli.chat.worker import READY, WAIT, ModelWorker
    from glmvoice_cli.pipeline.listening import TurnListener
    from glmvoice_cli.pipeline.speech_batch import StreamSpans
    from glmvoice_cli.tiny.tokenizer import TinyTokenizerSpec, write_tiny_tokenizer
    from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer

    tok = SpeechTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok", TinyTokenizerSpec(seed=4)), device="cpu")
    worker = ModelWorker()
    batcher = tokenizer_batcher_for(worker, SimpleNamespace(speech_tokenizer=tok))  # type: ignore[arg-type]
    assert batcher is not None
    g = np.random.default_rng(1)
    conv = SimpleNamespace(system_mode=None)

    class User:
        def __init__(self) -> None:
            self.listener = TurnListener(tok, None)
            self.audio = (0.1 * g.standard_normal(16_000 * 5)).astype(np.float32)  # one completed 4 s block

        def steps(self):  # type: ignore[no-untyped-def]
            for _ in self.listener.hear_steps(0, self.audio, conv, spans=StreamSpans(batcher, self.priority)):
                yield WAIT
            yield READY

        def priority(self) -> tuple[float, ...]:
            return (1, 0.0)  # listening, nothing queued to play

        def crashed(self, error: BaseException) -> None:
            raise AssertionError(error)

    users = [User(), User()]
    done = [worker.add(user) for user in users]
    worker.start()
    try:
        assert all(d.wait(120) for d in done)
    finally:
        worker.stop()
        worker.join()
    assert batcher.stats.batches == [2]
    for user in users:
        alone = TurnListener(tok, None)
        alone.hear(0, user.audio, conv)  # type: ignore[arg-type]
        assert user.listener.stream.ids == alone.stream.ids
