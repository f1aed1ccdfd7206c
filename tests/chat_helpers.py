"""Shared pieces of the chat engine tests: tiny models, synthetic speech, a scripted VAD, the fakes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmvoice_cli.audio.echo import make_echo_canceller
from glmvoice_cli.audio.fakes import ArraySource, EchoLoop, RecordingSink
from glmvoice_cli.audio.playback import VirtualClock
from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
from glmvoice_cli.chat.worker import ModelWorker
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.sessions.store import SessionStore

RATE, OUT_RATE = 16_000, 22_050
ENERGY_THRESHOLD = 0.01  # frame RMS (-40 dBFS) the scripted VAD calls speech
FAST_VAD = VadConfig(hangover_ms=300, pre_roll_ms=90, post_roll_ms=60, min_turn_ms=150)
# Decoder blocks batched with other streams' round differently from the same blocks alone, and the vocoder's
# source integrates f0 over every sample, so samples move by up to ~1e-4 (as much as decoding alone with 2
# threads instead of 1 does): audio is compared to that rounding, as a relative rms difference (-80 dB).
AUDIO_RELATIVE_RMS = 1e-4


def assert_same_audio(actual: np.ndarray, desired: np.ndarray) -> None:
    """The same audio up to float rounding: the same length, a relative rms difference under AUDIO_RELATIVE_RMS."""
    assert actual.shape == desired.shape
    if not np.any(desired):
        assert not np.any(actual)
        return
    difference = float(np.sqrt(np.mean((actual - desired) ** 2) / np.mean(desired**2)))
    assert difference <= AUDIO_RELATIVE_RMS, f"audio differs by {difference:.2e} (relative rms)"


def energy_vad(frame: np.ndarray) -> bool:
    """A scripted classifier: loud frames are speech (int16 frames in)."""
    return float(np.sqrt(np.mean(np.square(frame / 32_767.0)))) > ENERGY_THRESHOLD


def burst(seconds: float, level: float = 0.1, f0: float = 150.0) -> np.ndarray:
    """A voiced burst: a few harmonics at a steady level."""
    t = np.arange(int(seconds * RATE)) / RATE
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
    return (level * wave / np.std(wave)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


@dataclass
class Rig:
    engine: ChatEngine
    sink: RecordingSink
    store: SessionStore | None


def make_rig(assistant, user: np.ndarray, *, tmp_path: Path | None, max_new_tokens: int = 40,  # type: ignore[no-untyped-def]
             echo_mode: str = "off", echo_gain: float = 0.0, classifier=energy_vad,  # type: ignore[no-untyped-def]
             vad: VadConfig = FAST_VAD, store: SessionStore | None = None, conversation=None,  # type: ignore[no-untyped-def]
             seed: int = 1, worker: ModelWorker | None = None) -> Rig:
    clock = VirtualClock()
    ec = make_echo_canceller(echo_mode)  # type: ignore[arg-type]
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock, on_played=ec.reference)
    source = ArraySource(user, RATE, clock=clock)
    mic = EchoLoop(source, sink, delay_s=0.03, gain=echo_gain) if echo_gain else source
    if store is None and tmp_path is not None:
        store = SessionStore.create(session_dir=tmp_path / "session")
    config = EngineConfig(vad=vad, generation=GenerationOptions(max_new_tokens=max_new_tokens, seed=seed),
                          lockstep=True)
    engine = ChatEngine(assistant, mic, sink, store=store, echo=ec, config=config, classifier=classifier,
                        clock=clock, conversation=conversation, worker=worker)
    return Rig(engine, sink, store)


def run_rig(rig: Rig, timeout_s: float = 300.0) -> list[object]:
    """Run to the end; every event the engine emitted, in order."""
    rig.engine.start()
    assert rig.engine.wait(timeout_s), "the engine did not finish"
    rig.engine.join()
    rig.sink.close()
    events = []
    while (event := rig.engine.events.get_nowait()) is not None:
        events.append(event)
    return events
