"""`glmvoice chat` assembled: the local audio transport, the conversation core, its worker and the session store.

The command (`commands/chat.py`) parses flags and shows the view; everything between is here, so a
Python user can build the same chat:

    audio = open_local_audio(LocalAudioOptions(input_file=path))   # devices first: a missing mic fails fast
    store = open_store(session_dir=None, resume=None, dirs=assistant.dirs, mode="voice")
    engine = make_engine(assistant, audio, store, TurnTaking(), GenerationOptions())
    engine.run(); audio.close()
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.audio.end_of_turn import TurnEndConfig
from glmvoice_cli.audio.vad import VadConfig, release_for
from glmvoice_cli.config import SPECULATIVE_PAUSE_MS

if TYPE_CHECKING:
    from glmvoice_cli.audio.devices import AudioSink, AudioSource
    from glmvoice_cli.audio.echo import EchoCanceller
    from glmvoice_cli.audio.end_of_turn import TurnJudge
    from glmvoice_cli.audio.playback import Clock
    from glmvoice_cli.chat.engine import ChatEngine
    from glmvoice_cli.pipeline import Assistant, GenerationOptions
    from glmvoice_cli.sessions.store import SessionStore

ECHO_DELAY_S = 0.03  # --simulate-echo: speaker-to-microphone delay of the simulated room

_VAD = VadConfig()  # the turn-taking flags default to the segmenter's own values
_TURN_END = TurnEndConfig()
ONSET_MS = _VAD.start_frames * _VAD.frame_ms  # voiced time that confirms a turn or an interruption


@dataclass(frozen=True)
class TurnTaking:
    """The chat's turn-taking flags (see `glmvoice chat --help`)."""

    aggressiveness: int = _VAD.aggressiveness
    end_silence_ms: int = _VAD.hangover_ms
    speculative_pause_ms: int = SPECULATIVE_PAUSE_MS
    pre_roll_ms: int = _VAD.pre_roll_ms
    min_speech_ms: int = _VAD.min_turn_ms
    max_turn_s: float = _VAD.max_turn_s
    barge_in: bool = True
    min_interruption_ms: int = ONSET_MS
    stream_input: bool = True
    vad_engine: str = _VAD.engine
    turn_detector: str = _TURN_END.detector
    end_of_turn_threshold: float = _TURN_END.threshold
    max_pause_ms: int = _TURN_END.max_pause_ms
    vad_threshold: float = _VAD.threshold

    def vad(self) -> VadConfig:
        frame_ms = VadConfig(engine=self.vad_engine).frame_ms
        return VadConfig(engine=self.vad_engine, aggressiveness=self.aggressiveness, threshold=self.vad_threshold,
                         release=release_for(self.vad_threshold),
                         hangover_ms=max(self.end_silence_ms, frame_ms), pre_roll_ms=self.pre_roll_ms,
                         min_turn_ms=self.min_speech_ms, max_turn_s=self.max_turn_s,
                         start_frames=max(1, -(-self.min_interruption_ms // frame_ms)))

    def turn_end(self) -> TurnEndConfig:
        return TurnEndConfig(self.turn_detector, self.end_of_turn_threshold, self.max_pause_ms)


@dataclass(frozen=True)
class LocalAudioOptions:
    """Where the local chat's audio comes from and goes (see `glmvoice chat --help`)."""

    input_file: Path | None = None  # the file is the microphone (virtual clock unless realtime)
    output_file: Path | None = None  # record what the speaker would play instead of playing it
    text: bool = False  # typed turns only: no microphone
    realtime: bool = False  # play input_file at wall-clock pace
    simulate_echo: float = 0.0  # feed the output back into the file microphone at this gain
    headphones: bool = False  # no echo cancellation
    input_device: str | None = None
    output_device: str | None = None


class LocalAudio:
    """The source, sink, echo canceller and clock of one run; close() writes the output file."""

    def __init__(self, source: AudioSource | None, sink: AudioSink, echo: EchoCanceller, clock: Clock,
                 lockstep: bool) -> None:
        self.source, self.sink, self.echo, self.clock, self.lockstep = source, sink, echo, clock, lockstep

    def start_clock(self) -> None:
        """The conversation begins now: a `--realtime` file starts playing from here (the devices are opened
        before the models load, so that a missing microphone fails fast, but the file must not play meanwhile)."""
        from glmvoice_cli.audio.fakes import RecordingSink
        from glmvoice_cli.audio.playback import RealClock

        if isinstance(self.clock, RealClock) and self.source is not None and not self.lockstep:
            self.clock.restart()
            if isinstance(self.sink, RecordingSink):
                self.sink.restart()

    def close(self) -> None:
        for device in (self.source, self.sink):
            if device is not None:
                device.close()

    @property
    def output_unwritten(self) -> bool:
        """An output file was asked for but nothing was ever played: it was not written (nor replaced)."""
        from glmvoice_cli.audio.fakes import RecordingSink

        sink = self.sink
        return isinstance(sink, RecordingSink) and sink.path is not None and sink.written == 0


def open_local_audio(options: LocalAudioOptions) -> LocalAudio:
    """Devices before models: a missing microphone fails in a second, not after a minute of loading."""
    from glmvoice_cli.audio.devices import Microphone, Speaker
    from glmvoice_cli.audio.echo import make_echo_canceller
    from glmvoice_cli.audio.fakes import EchoLoop, FileSource, RecordingSink
    from glmvoice_cli.audio.playback import RealClock, VirtualClock

    o = options
    hears_speaker = (o.input_file is None and not o.text) or o.simulate_echo > 0  # a room between them
    echo = make_echo_canceller("auto" if hears_speaker and not o.headphones else "off")
    lockstep = o.input_file is not None and not o.realtime
    clock = VirtualClock() if lockstep else RealClock()
    recording = None
    if o.output_file is not None or o.input_file is not None:
        recording = RecordingSink(o.output_file, clock=clock, on_played=echo.reference)
    sink: AudioSink = recording if recording is not None else Speaker(o.output_device, on_played=echo.reference)
    try:
        source: AudioSource | None = None
        if o.input_file is not None:
            source = FileSource(o.input_file, clock=clock)
            if o.simulate_echo and recording is not None:
                source = EchoLoop(source, recording, delay_s=ECHO_DELAY_S, gain=o.simulate_echo)
        elif not o.text:
            source = Microphone(o.input_device)
    except BaseException:
        sink.close()
        raise
    return LocalAudio(source, sink, echo, clock, lockstep)


def lock_session(folder: Path) -> contextlib.AbstractContextManager[object]:
    """Create the session folder if needed and hold its lock (one chat per session)."""
    from glmvoice_cli.sessions.lock import locked
    from glmvoice_cli.sessions.store import SessionError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SessionError(f"cannot create session folder {folder}: {e.strerror or e}") from e
    return locked(folder)


def open_store(session_dir: Path | None, resume: Path | None, dirs: dict[str, Path], mode: str) -> SessionStore:
    """The resumed session (its `warnings` say what could not be read), or a new one."""
    from glmvoice_cli.sessions.store import SessionStore

    if resume is not None:
        return SessionStore.resume(resume)
    return SessionStore.create(session_dir=session_dir, models=dirs, mode=mode)


def make_engine(assistant: Assistant, audio: LocalAudio, store: SessionStore, turns: TurnTaking,
                generation: GenerationOptions, transcribe_user: bool = False,
                turn_judge: TurnJudge | None = None) -> ChatEngine:
    """The chat engine over `audio`, continuing the history the store holds (`turn_judge`: the end-of-turn
    detector `--turn-detector smart` needs)."""
    from glmvoice_cli.chat.engine import ChatEngine
    from glmvoice_cli.chat.settings import TURN_TRANSCRIPT_MAX_TOKENS, EngineConfig
    from glmvoice_cli.pipeline.history import restore_conversation

    config = EngineConfig(vad=turns.vad(), lockstep=audio.lockstep, barge_in=turns.barge_in,
                          streaming=turns.stream_input, speculative_pause_ms=turns.speculative_pause_ms or None,
                          turn_end=turns.turn_end(),
                          generation=generation, transcribe_user=transcribe_user,
                          transcribe_max_new_tokens=min(generation.max_new_tokens, TURN_TRANSCRIPT_MAX_TOKENS))
    conversation = restore_conversation(assistant.lm, store.turns)
    return ChatEngine(assistant, audio.source, audio.sink, store=store, conversation=conversation, echo=audio.echo,
                      config=config, clock=audio.clock, turn_judge=turn_judge)
