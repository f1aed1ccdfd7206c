"""`glmvoice selftest`: the whole pipeline on a tiny random model set, offline, without audio hardware.

It writes tokenizer/, lm/ and decoder/ in the official formats, loads them with the real loaders and
runs every user-facing path (tokenize, decode, tts, transcribe, a scripted chat turn) end to end, timing each step. Random
weights say nothing about quality; a pass says the install, the loaders and the plumbing work.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glmvoice_cli.errors import GlmVoiceError

if TYPE_CHECKING:
    from glmvoice_cli.pipeline.assistant import Assistant

SELFTEST_CODEBOOK = 64  # audio vocabulary shared by the three tiny stages
SELFTEST_MAX_NEW_TOKENS = 40  # generation cap: the random model never ends a turn by itself
SELFTEST_TEXT = "Hello! This is the glmvoice self test."
KEEP_MARKER = ".glmvoice-selftest"  # written in a --keep folder: a later selftest may replace what it made
MADE = ("tokenizer", "lm", "decoder", "selftest_tts.wav", "selftest_chat.wav", "selftest_session")


class SelftestError(GlmVoiceError):
    """A selftest step failed; the message names the step."""


@dataclass(frozen=True)
class Step:
    name: str
    seconds: float
    detail: str


class _Recorder:
    def __init__(self, report: Callable[[Step], None] | None) -> None:
        self.steps: list[Step] = []
        self.report = report

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        detail: list[str] = []
        start = time.perf_counter()
        try:
            yield detail
        except GlmVoiceError as e:
            raise SelftestError(f"selftest failed at '{name}': {e}") from e
        except Exception as e:  # the point of a selftest is to say where things break
            raise SelftestError(f"selftest failed at '{name}': {type(e).__name__}: {e}") from e
        step = Step(name, time.perf_counter() - start, " ".join(detail))
        self.steps.append(step)
        if self.report:
            self.report(step)


def prepare_kept_folder(folder: Path) -> Path:
    """Make `folder` ready for `run_selftest`: create it, or clear what an earlier selftest left there.

    A folder holding anything without the marker of an earlier selftest is the user's: it is refused,
    never written into. An unwritable path is a one-line SelftestError naming it.
    """
    if folder.exists() and not folder.is_dir():
        raise SelftestError(f"--keep {folder} is a file, not a folder")
    ours = (folder / KEEP_MARKER).is_file()
    if folder.is_dir() and not ours and any(folder.iterdir()):
        raise SelftestError(f"--keep {folder} already holds files that glmvoice selftest did not make: "
                            "give a new or empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / KEEP_MARKER).write_text("made by glmvoice selftest; it may replace what it made here\n",
                                          encoding="utf-8")
        for name in MADE if ours else ():
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    except OSError as e:
        raise SelftestError(f"--keep {folder}: cannot write there ({e.strerror or e})") from e
    return folder


def run_selftest(root: Path, report: Callable[[Step], None] | None = None) -> list[Step]:
    """Run every step with models written under `root`; returns the timed steps."""
    from glmvoice_cli.audio.io import resample, write_audio
    from glmvoice_cli.config import SAMPLE_RATE_IN
    from glmvoice_cli.events import AudioChunk, TextDelta
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.pipeline.speak import speak
    from glmvoice_cli.pipeline.transcribe import transcribe
    from glmvoice_cli.tiny.modelset import write_tiny_model_set

    rec = _Recorder(report)
    with rec.step("write tiny models") as d:
        dirs = write_tiny_model_set(root, codebook=SELFTEST_CODEBOOK).dirs
        d.append(f"official formats in {root}")
    with rec.step("load models") as d:
        assistant = Assistant.load(dirs)
        d.append(", ".join(f"{k} {v:.2f} s" for k, v in assistant.load_seconds.items()))
    speech_tokenizer, decoder = assistant.speech_tokenizer, assistant.decoder
    if speech_tokenizer is None or decoder is None:
        raise SelftestError("the tiny model set lacks the speech tokenizer or the decoder")
    t = np.arange(2 * SAMPLE_RATE_IN) / SAMPLE_RATE_IN
    probe = (0.3 * np.sin(2 * np.pi * 200 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    with rec.step("tokenize") as d:
        tokens = speech_tokenizer.encode([probe])[0]
        _expect(len(tokens) == 25, f"2 s of audio gave {len(tokens)} tokens, expected 25")
        d.append(f"2.0 s -> {len(tokens)} tokens")
    with rec.step("decode") as d:
        wave = decoder.decode(tokens)
        _expect(len(wave) > 0 and bool(np.isfinite(wave).all()), "no finite audio decoded")
        d.append(f"{len(tokens)} tokens -> {len(wave) / decoder.sample_rate:.2f} s")
    with rec.step("tts") as d:
        options = GenerationOptions(max_new_tokens=SELFTEST_MAX_NEW_TOKENS, seed=0)
        events = list(speak(assistant, SELFTEST_TEXT, options=options))
        chunks = [e.samples for e in events if isinstance(e, AudioChunk)]
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        _expect(bool(chunks), "the model produced no audio")
        speech = np.concatenate(chunks)
        rate = decoder.sample_rate
        write_audio(root / "selftest_tts.wav", speech, rate)
        d.append(f"{len(speech) / rate:.2f} s of speech, {len(text)} characters of text")
    with rec.step("transcribe") as d:
        result = transcribe(assistant, resample(speech, rate, SAMPLE_RATE_IN), max_new_tokens=16)
        _expect(result.generated_tokens > 0, "no text generated")
        d.append(f"{result.seconds:.2f} s -> {result.generated_tokens} text tokens")
    with rec.step("chat turn") as d:
        d.append(_chat_turn(assistant, root))
    return rec.steps


SPEECH_RMS = 0.02  # the scripted VAD's threshold: louder frames are speech


def _loud(frame: np.ndarray) -> bool:
    """A scripted voice-activity classifier (int16 frames): the selftest checks plumbing, not the VAD."""
    return float(np.sqrt(np.mean((frame.astype(np.float32) / 32768) ** 2))) > SPEECH_RMS


def _chat_turn(assistant: Assistant, root: Path) -> str:
    """One spoken turn through the chat engine: a file as the microphone, a recording as the speaker."""
    from glmvoice_cli.audio.fakes import ArraySource, RecordingSink
    from glmvoice_cli.audio.playback import VirtualClock
    from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
    from glmvoice_cli.config import SAMPLE_RATE_IN
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.sessions.store import SessionStore

    rate = SAMPLE_RATE_IN
    t = np.arange(int(1.5 * rate)) / rate
    burst = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    mic = np.concatenate([np.zeros(rate // 2), burst, np.zeros(2 * rate)]).astype(np.float32)
    clock = VirtualClock()
    sink = RecordingSink(root / "selftest_chat.wav", clock=clock)
    store = SessionStore.create(session_dir=root / "selftest_session", mode="selftest")
    config = EngineConfig(lockstep=True, generation=GenerationOptions(max_new_tokens=SELFTEST_MAX_NEW_TOKENS, seed=0))
    engine = ChatEngine(assistant, ArraySource(mic, rate, clock), sink, store=store, config=config,
                        classifier=_loud, clock=clock)
    engine.run()
    sink.close()
    if engine.error is not None:
        raise engine.error
    _expect(len(engine.reports) == 1, f"expected one answered turn, got {len(engine.reports)}")
    report = engine.reports[0]
    _expect(report.played_samples > 0, "the answer was not played")
    turns = [line for line in store.transcript_path.read_text().splitlines() if line.strip()]
    _expect(len(turns) == 2, f"the session holds {len(turns)} turns, expected 2")
    return f"1 turn, {report.played_samples / sink.sample_rate:.2f} s answered, session saved"


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise SelftestError(message)
