"""The three stages composed, without threads or I/O: speech or text in, events out.

    16 kHz samples -> SpeechTokenizer -> VoiceLM.stream -> SpeechDecoder.push/flush -> AudioChunk events

`Assistant.respond` is a generator: it yields TextDelta and AudioChunk events as the language model
samples and the decoder completes blocks, then one TurnEnded with the turn's timings. The chat engine
runs it in a worker thread; `tts` and `transcribe` iterate it directly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from glmvoice_cli.events import AudioChunk, TextDelta, TurnEnded, TurnTimings
from glmvoice_cli.options import LoadOptions

if TYPE_CHECKING:
    import torch

    from glmvoice_cli.decoder.noise import NoiseSource
    from glmvoice_cli.decoder.speech_decoder import BlockRequest, DecoderState, SpeechDecoder
    from glmvoice_cli.lm.backend import LMBackend
    from glmvoice_cli.lm.compiled import CompileReport
    from glmvoice_cli.lm.prompts import SpeechInput, UserInput
    from glmvoice_cli.lm.voice_lm import Conversation, GenerationOptions, LMEvent
    from glmvoice_cli.pipeline.listening import TurnListener
    from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer

STAGE_ORDER = ("tokenizer", "lm", "decoder")


class Assistant:
    """The loaded stages a command needs (any of them may be absent when not needed)."""

    def __init__(self, lm: LMBackend, tokenizer: SpeechTokenizer | None = None,
                 decoder: SpeechDecoder | None = None) -> None:
        self.lm, self.speech_tokenizer, self.decoder = lm, tokenizer, decoder
        self.load_seconds: dict[str, float] = {}
        self.dirs: dict[str, Path] = {}  # the model folders it was loaded from
        self.warnings: list[str] = []  # one line each, for the CLI to show (e.g. an eager fallback)
        self.compile_report: CompileReport | None = None  # set when the LM decodes compiled

    @classmethod
    def load(cls, dirs: dict[str, Path], options: LoadOptions | None = None,
             on_status: Callable[[str], None] | None = None,
             on_stage: Callable[[str, str, float | None], None] | None = None) -> Assistant:
        """Load the stages named in `dirs` (keys among tokenizer, lm, decoder); lm is required.

        `on_status` hears about slow steps (the LM's compile at first start); a compile that fails
        leaves the eager loop and one line in `warnings`. `on_stage(stage, folder, None)` is called as
        each stage starts loading and `on_stage(stage, folder, seconds)` when it is loaded. With
        `options.lm_server` the LM runs on that server and only its config and tokenizer load.
        """
        from glmvoice_cli.decoder.checkpoint import load_decoder
        from glmvoice_cli.decoder.speech_decoder import SpeechDecoder, schedule_named
        from glmvoice_cli.device import pick_device
        from glmvoice_cli.lm.backend import load_lm_backend
        from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer

        options = options or LoadOptions()
        schedule = schedule_named(options.schedule)  # a wrong name fails before anything loads
        device = pick_device(options.device)
        seconds: dict[str, float] = {}
        loaded: dict[str, object] = {}
        for stage in STAGE_ORDER:
            if stage not in dirs:
                continue
            start = time.perf_counter()
            if on_stage is not None:
                on_stage(stage, str(dirs[stage]), None)
            if stage == "tokenizer":
                loaded[stage] = SpeechTokenizer.from_pretrained(dirs[stage], device=str(device))
            elif stage == "lm":
                loaded[stage] = load_lm_backend(dirs[stage], replace(options, device=str(device)))
            else:
                loaded[stage] = SpeechDecoder(load_decoder(dirs[stage], device), schedule, seed=options.seed)
            seconds[stage] = time.perf_counter() - start
            if on_stage is not None:
                on_stage(stage, str(dirs[stage]), seconds[stage])
        assistant = cls(loaded["lm"], loaded.get("tokenizer"), loaded.get("decoder"))  # type: ignore[arg-type]
        assistant.load_seconds, assistant.dirs = seconds, dict(dirs)
        if _wants_compile(options, device):
            assistant._compile_lm(on_status)
        return assistant

    def _compile_lm(self, on_status: Callable[[str], None] | None) -> None:
        from glmvoice_cli.lm.compiled import CompileUnavailable, inductor_cache_dir

        if on_status is not None:
            on_status(f"compiling the language model's decode step (cached in {inductor_cache_dir()})")
        start = time.perf_counter()
        from glmvoice_cli.lm.voice_lm import VoiceLM

        if not isinstance(self.lm, VoiceLM):
            return
        try:
            report = self.lm.enable_static(compiled=True)
            self.compile_report = report
        except CompileUnavailable as e:
            self.warnings.append(f"compiling the language model failed ({e}); decoding eagerly (slower)")
        self.load_seconds["lm_compile"] = time.perf_counter() - start

    def new_conversation(self) -> Conversation:
        """An empty conversation with this assistant's LM (history and cache, owned by the caller)."""
        return self.lm.new_conversation()

    def prepare_thread(self) -> None:
        """Get the calling thread ready to run turns (call it on the thread that will: CUDA graphs)."""
        self.lm.prepare_thread()

    def listener(self) -> TurnListener | None:
        """A listener that tokenizes and prefills a turn while it is spoken (None without a speech tokenizer)."""
        from glmvoice_cli.pipeline.listening import TurnListener

        return TurnListener(self.speech_tokenizer, self.lm) if self.speech_tokenizer is not None else None

    def hear(self, samples: np.ndarray) -> SpeechInput:
        """A spoken turn from 16 kHz mono samples."""
        from glmvoice_cli.lm.prompts import SpeechInput

        if self.speech_tokenizer is None:
            raise RuntimeError("this assistant was loaded without a speech tokenizer")
        return SpeechInput(tuple(self.speech_tokenizer.encode([samples])[0]))

    def respond(self, conv: Conversation, user: UserInput, options: GenerationOptions | None = None,
                cancel: threading.Event | None = None, speak: bool = True, noise: NoiseSource | None = None,
                ) -> Iterator[TextDelta | AudioChunk | TurnEnded]:
        """Stream the answer to one turn: text pieces and decoded audio blocks, then TurnEnded.

        A cancelled turn (barge-in) is not flushed: the user has already moved on. `noise`: the decoder's
        random numbers for this stream (one per conversation; default the decoder's own).
        """
        for event in self.respond_in_steps(conv, user, options, cancel, speak, noise):
            if event is not None and not isinstance(event, Pending):
                yield event

    def respond_in_steps(self, conv: Conversation, user: UserInput, options: GenerationOptions | None = None,
                         cancel: threading.Event | None = None, speak: bool = True,
                         noise: NoiseSource | None = None, on_ready: Callable[[], None] | None = None,
                         blocks: BlockQueue | None = None,
                         ) -> Iterator[TextDelta | AudioChunk | TurnEnded | Pending | None]:
        """`respond`, with a None after every LM token: a worker serving several conversations switches
        between them there (a unit of work is one token, or one decoder block).

        With `on_ready`, an LM that waits on the network (`--lm-url`) is read on a thread of its own, and
        while its next token has not arrived this yields PENDING (the worker runs other conversations
        meanwhile); `on_ready()` is called as each one arrives. With `blocks`, each decoder block is handed
        to it (a batcher shared by the worker's conversations) and PENDING is yielded until it is decoded.
        """
        from glmvoice_cli.lm.voice_lm import AudioTokens, StopReason, TextPiece, TurnEnd

        voice = _Voice(self.decoder, noise, blocks) if speak and self.decoder is not None else None
        start = time.perf_counter()
        first_token: float | None = None
        first_text: float | None = None
        first_audio_token: float | None = None
        if on_ready is not None and self.lm.waits_on_network:
            events: Iterator[LMEvent | Pending] = _read_apart(
                lambda cut: self.lm.stream(conv, user, options, cut), cancel, on_ready)
        else:
            events = self.lm.stream(conv, user, options, cancel)
        try:
            for event in events:
                if isinstance(event, Pending):
                    yield event
                    continue
                if first_token is None and not isinstance(event, TurnEnd):
                    first_token = time.perf_counter() - start
                if first_text is None and isinstance(event, TextPiece):
                    first_text = time.perf_counter() - start
                if first_audio_token is None and isinstance(event, AudioTokens):
                    first_audio_token = time.perf_counter() - start
                yield None
                if isinstance(event, TextPiece) and event.text:
                    yield TextDelta(event.text)
                elif isinstance(event, AudioTokens) and voice is not None:
                    yield from voice.push(event.indices, start, cancel)
                elif isinstance(event, TurnEnd):
                    cut = event.reason == StopReason.CANCELLED
                    if voice is not None and not cut:
                        yield from voice.flush(start, cancel)
                    elapsed = time.perf_counter() - start
                    timings = TurnTimings(
                        first_token_s=first_token, first_audio_s=voice.first_audio_s if voice else None,
                        real_time_factor=elapsed / voice.seconds if voice and voice.seconds else None,
                        tokens=event.n_generated, first_text_s=first_text, first_audio_token_s=first_audio_token)
                    yield TurnEnded(interrupted=cut, reason=_REASONS.get(event.reason.value, event.reason.value),
                                    timings=timings)
        finally:
            if voice is not None:
                voice.close()  # the batcher stops counting on this stream's blocks


class Pending:
    """`respond_in_steps`: the LM's next token is on its way over the network (nothing to compute yet)."""


PENDING = Pending()


def _read_apart(open_stream: Callable[[threading.Event], Iterator[LMEvent]], cancel: threading.Event | None,
                on_ready: Callable[[], None]) -> Iterator[LMEvent | Pending]:
    """The events of a stream that blocks on the network, read on a thread of its own: PENDING while none
    has arrived. A set `cancel`, or the caller dropping this generator, cuts the stream (its own cancel)."""
    cut = threading.Event()
    arrived: queue.Queue[tuple[str, object]] = queue.Queue()

    def pump() -> None:
        try:
            for event in open_stream(cut):
                arrived.put(("event", event))
                on_ready()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
            arrived.put(("error", e))
        finally:
            arrived.put(("end", None))
            on_ready()

    threading.Thread(target=pump, name="glmvoice-lm-stream", daemon=True).start()
    try:
        while True:
            if cancel is not None and cancel.is_set():
                cut.set()
            try:
                kind, value = arrived.get_nowait()
            except queue.Empty:
                yield PENDING
                continue
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            if kind == "end":
                return
            yield value  # type: ignore[misc]
    finally:
        cut.set()


class BlockQueue(Protocol):
    """Where a conversation's decoder blocks go to be decoded with other conversations' (`chat.speech_batch`)."""

    def decode(self, request: BlockRequest) -> Iterator[None]:
        """Decode `request`, yielding while it waits its turn."""
        ...

    def track(self, state: DecoderState) -> None: ...

    def untrack(self, state: DecoderState) -> None: ...


class _Voice:
    """One turn's decoding: audio tokens in, AudioChunk events out, with the first-audio time.

    With a `BlockQueue`, each block is decoded there (PENDING while it waits), else here at once."""

    def __init__(self, decoder: SpeechDecoder, noise: NoiseSource | None = None,
                 blocks: BlockQueue | None = None) -> None:
        self.decoder, self.blocks = decoder, blocks
        self.state = decoder.new_state(noise)
        self.seconds = 0.0  # of audio produced
        self.first_audio_s: float | None = None
        if blocks is not None:
            blocks.track(self.state)

    def push(self, tokens: tuple[int, ...], start: float, cancel: threading.Event | None
             ) -> Iterator[AudioChunk | Pending]:
        self.decoder.receive(self.state, tokens)
        while (request := self.decoder.next_block(self.state, cancel)) is not None:
            yield from self._decode(request)  # a cancel cuts a block between flow steps
            if request.output is None:
                return
            yield self._chunk(request.output.samples(), start)

    def flush(self, start: float, cancel: threading.Event | None) -> Iterator[AudioChunk | Pending]:
        final = self.decoder.final_block(self.state, cancel)
        if final is not None:
            yield from self._decode(final)
        tail = self.decoder.end(self.state, final)
        if len(tail):
            yield self._chunk(tail, start)

    def close(self) -> None:
        if self.blocks is not None:
            self.blocks.untrack(self.state)

    def _decode(self, request: BlockRequest) -> Iterator[Pending]:
        """Decode `request` here at once, or in the batcher (PENDING while it waits its turn)."""
        if self.blocks is None:
            self.decoder.decode_blocks([request])
            return
        for _ in self.blocks.decode(request):
            yield PENDING

    def _chunk(self, samples: np.ndarray, start: float) -> AudioChunk:
        if self.first_audio_s is None:
            self.first_audio_s = time.perf_counter() - start
        self.seconds += len(samples) / self.decoder.sample_rate
        return AudioChunk(samples, self.decoder.sample_rate)


def _wants_compile(options: LoadOptions, device: torch.device) -> bool:
    """--compile/--no-compile, else on for CUDA only (on CPU the eager loop is faster: benchmarks/lm.py).

    Never for a remote LM: the server compiles its own.
    """
    if options.lm_server is not None:
        return False
    return options.compile if options.compile is not None else device.type == "cuda"


_REASONS = {"user": "done", "eos": "done", "max_tokens": "max_tokens", "context_full": "context_full",
            "cancelled": "cancelled"}
