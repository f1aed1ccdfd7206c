"""`glmvoice chat`: a spoken conversation with barge-in, a live transcript and a saved session.

Audio in and out, by option:

- default: the microphone and the speaker (PortAudio), with echo cancellation (`--headphones`
  turns it off: no acoustic echo to remove, and no risk of the canceller eating the user's voice).
- `--input-file in.wav`: the file is the microphone. By default it runs on a virtual clock: each
  answer is generated completely before the file moves on (model time counts as zero), so the run
  is reproducible and as fast as the CPU allows. `--realtime` plays it at wall-clock pace instead,
  against the live model. `--output out.wav` (or `--output-file`) records what the speaker would play, on the
  same sample timeline as the input. `--simulate-echo GAIN` feeds that output back into the file
  microphone (30 ms later), as a room would.
- `--text`: typed turns, one per line of stdin, answered in speech. In a spoken conversation on a
  terminal, a line typed and sent with Enter is a typed turn as well.

The run ends when the input (file or stdin) has ended and the last answer is done, or on Ctrl-C;
the session is saved as it goes (`--session-dir`, or a new folder under the data folder).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glmvoice_cli.audio.end_of_turn import TurnEndConfig
from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.chat.local import (
    ONSET_MS,
    LocalAudioOptions,
    TurnTaking,
    lock_session,
    make_engine,
    open_local_audio,
    open_store,
)
from glmvoice_cli.commands import signals
from glmvoice_cli.commands.common import (
    CompileOpt,
    DecoderOpt,
    DeviceOpt,
    DtypeOpt,
    LmApiKeyOpt,
    LmModelOpt,
    LmOpt,
    LmTimeoutOpt,
    LmUrlOpt,
    MaxTokensOpt,
    ModelsOpt,
    QuantizeOpt,
    ScheduleOpt,
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TokenizerOpt,
    TopPOpt,
    lm_server,
    load_assistant,
    load_turn_judge,
    use_threads,
    with_sampling,
)
from glmvoice_cli.config import SPECULATIVE_PAUSE_MS
from glmvoice_cli.errors import UsageError

if TYPE_CHECKING:
    from glmvoice_cli.audio.end_of_turn import TurnJudge
    from glmvoice_cli.chat.engine import ChatEngine
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.sessions.store import SessionStore

__all__ = ["TurnTaking", "chat"]  # TurnTaking lives in chat.local: the flags' defaults come from it

_VAD = VadConfig()  # the turn-taking flags default to the segmenter's own values
_TURN_END = TurnEndConfig()
MAX_MS = 60_000  # a turn-taking time past a minute is a typo (and overflows the VAD's frame arithmetic)
MAX_TURN_S = 600.0  # ten minutes of one turn, cut into tokenizer windows; inf would overflow the VAD


class VadEngine(str, Enum):
    webrtc = "webrtc"
    silero = "silero"


class TurnDetector(str, Enum):
    silence = "silence"
    smart = "smart"


def chat(
    input_device: Annotated[str | None, typer.Option(help="Microphone name or index (see glmvoice devices).", rich_help_panel="Audio")
                            ] = None,
    output_device: Annotated[str | None, typer.Option(help="Speaker name or index.", rich_help_panel="Audio")] = None,
    input_file: Annotated[Path | None, typer.Option(
        "--input-file", help="Use this audio file as the microphone (virtual clock unless --realtime).", rich_help_panel="Audio")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", "--output-file",
        help="Record what the speaker would play to this .wav instead of playing it.", rich_help_panel="Audio")] = None,
    realtime: Annotated[bool, typer.Option("--realtime", help="Play --input-file at wall-clock pace.", rich_help_panel="Audio")] = False,
    simulate_echo: Annotated[float, typer.Option(
        min=0.0, max=2.0, help="With --input-file: feed the output back into the input at this gain (0-2).", rich_help_panel="Audio")] = 0.0,
    text: Annotated[bool, typer.Option("--text", help="Typed turns from stdin, one per line.", rich_help_panel="Audio")] = False,
    headphones: Annotated[bool, typer.Option("--headphones", help="No echo cancellation (the speaker cannot reach the mic).", rich_help_panel="Audio")
                          ] = False,
    vad_aggressiveness: Annotated[int, typer.Option(min=0, max=3,
                                                    help="0 keeps most audio as speech, 3 the least.", rich_help_panel="Turn-taking")] = _VAD.aggressiveness,
    end_silence_ms: Annotated[int, typer.Option(min=30, max=MAX_MS, help=(
        "Silence that ends your turn. Lower answers sooner but cuts you off at pauses."), rich_help_panel="Turn-taking")] = _VAD.hangover_ms,
    speculative_pause_ms: Annotated[int, typer.Option(min=0, max=MAX_MS, help=(
        "A pause this long starts the answer unheard (dropped if you go on); 0 turns it off (saves CPU)."), rich_help_panel="Turn-taking")] = (
        SPECULATIVE_PAUSE_MS),
    pre_roll_ms: Annotated[int, typer.Option(min=0, max=MAX_MS, help=(
        "Audio kept from before your speech was detected, so the first syllable is not clipped."), rich_help_panel="Turn-taking")] = _VAD.pre_roll_ms,
    min_speech_ms: Annotated[int, typer.Option(min=0, max=MAX_MS, help=(
        "Shorter bursts (a cough, a door) are not a turn."), rich_help_panel="Turn-taking")] = _VAD.min_turn_ms,
    max_turn_s: Annotated[float, typer.Option(min=1.0, max=MAX_TURN_S, help=(
        "A turn this long is cut and answered, and what follows is a new turn."), rich_help_panel="Turn-taking")] = _VAD.max_turn_s,
    barge_in: Annotated[bool, typer.Option(help=(
        "Speaking while it answers interrupts it; --no-barge-in makes your speech wait its turn."), rich_help_panel="Turn-taking")] = True,
    min_interruption_ms: Annotated[int, typer.Option(min=10, max=MAX_MS, help=(
        "Speech needed to start a turn or interrupt. Higher ignores short noises but reacts later."), rich_help_panel="Turn-taking")] = (
        ONSET_MS),
    stream_input: Annotated[bool, typer.Option(help=(
        "Tokenize and prefill your speech while you speak; --no-stream-input does it all after your turn."), rich_help_panel="Turn-taking")] = True,
    vad: Annotated[VadEngine, typer.Option(help=(
        "Voice detector: webrtc (webrtcvad) or silero (Silero VAD, a small net: steadier in noise)."), rich_help_panel="Turn-taking")] = (
        VadEngine.webrtc),
    vad_threshold: Annotated[float, typer.Option(min=0.01, max=1.0, help=(
        "Silero: the speech probability that starts speech (it ends 0.15 lower). Raise it in a noisy room."), rich_help_panel="Turn-taking")] = (
        _VAD.threshold),
    turn_detector: Annotated[TurnDetector, typer.Option(help=(
        "How your turn's end is found: silence (--end-silence-ms), or smart: Smart Turn judges each pause and a "
        "finished turn ends at once, an unfinished one waits up to --max-pause-ms."), rich_help_panel="Turn-taking")] = (
        TurnDetector.silence),
    end_of_turn_threshold: Annotated[float, typer.Option(min=0.01, max=1.0, help=(
        "Smart: the probability of 'finished' that ends the turn; higher waits for more certainty."), rich_help_panel="Turn-taking")] = (
        _TURN_END.threshold),
    max_pause_ms: Annotated[int, typer.Option(min=30, max=MAX_MS, help=(
        "Smart: the longest pause in a turn judged unfinished."), rich_help_panel="Turn-taking")] = _TURN_END.max_pause_ms,
    session_dir: Annotated[Path | None, typer.Option(help="Save the session in this folder.", rich_help_panel="Sessions")] = None,
    resume: Annotated[str | None, typer.Option(
        autocompletion=_complete_session, help="Continue a saved session: 'last', an ID or a unique start of one, or a folder.", rich_help_panel="Sessions")] = None,
    transcribe_user: Annotated[bool, typer.Option(
        "--transcribe-user", help="Also transcribe each spoken turn (a text-only pass: adds latency).", rich_help_panel="Turn-taking")] = False,
    live: Annotated[bool, typer.Option(help="Rich live view; --no-live prints plain lines.", rich_help_panel="Sessions")] = True,
    models: ModelsOpt = None, tokenizer: TokenizerOpt = None, lm: LmOpt = None, decoder: DecoderOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None, compile_lm: CompileOpt = None,
    max_new_tokens: MaxTokensOpt = None, seed: SeedOpt = None, schedule: ScheduleOpt = "default",
    temperature: TemperatureOpt = None, top_p: TopPOpt = None, threads: ThreadsOpt = None,
    lm_url: LmUrlOpt = None, lm_api_key: LmApiKeyOpt = None, lm_model: LmModelOpt = None,
    lm_timeout: LmTimeoutOpt = None,
) -> None:
    """Talk with GLM-4-Voice: speak (or type with --text), interrupt it any time; the session is saved."""
    _check_options(input_file, output, text, realtime, simulate_echo, session_dir, resume)
    resumed = _find_resumed(resume)  # an unknown session fails now, not after a minute of loading
    # SIGTERM and SIGHUP save the answer being played, as Ctrl-C does; one chat per session folder, locked
    # before anything slow so that a busy session fails in a second
    with signals.interrupts_as_keyboard(), contextlib.ExitStack() as held:
        folder = session_dir or resumed
        if folder is not None:
            held.enter_context(lock_session(folder))
        io = open_local_audio(LocalAudioOptions(input_file, output, text, realtime, simulate_echo, headphones,
                                                input_device, output_device))
        try:
            use_threads(threads)
            judge = None if text else _turn_judge(vad.value, turn_detector.value, models)  # before the slow loads
            stages = ("lm", "decoder") if text else ("tokenizer", "lm", "decoder")
            assistant = load_assistant(stages, models=models,
                                       overrides={"tokenizer": tokenizer, "lm": lm, "decoder": decoder},
                                       device=device, dtype=dtype, quantize=quantize, seed=seed,
                                       compile=compile_lm, schedule=schedule,
                                       server=lm_server(lm_url, lm_api_key, lm_model, lm_timeout),
                                       for_other_thread=True)  # the engine's model thread runs them
            store = open_store(session_dir, resumed, assistant.dirs, "text" if text else "voice")
            for warning in store.warnings:
                typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
            if folder is None:  # a new folder of its own: locked against a `--resume last` elsewhere
                held.enter_context(lock_session(store.path))
            turns = TurnTaking(vad_aggressiveness, end_silence_ms, speculative_pause_ms, pre_roll_ms,
                               min_speech_ms, max_turn_s, barge_in, min_interruption_ms, stream_input,
                               vad.value, turn_detector.value, end_of_turn_threshold, max_pause_ms, vad_threshold)
            generation = with_sampling(_generation(max_new_tokens, seed), temperature, top_p)
            engine = make_engine(assistant, io, store, turns, generation, transcribe_user, judge)
            io.start_clock()
            _converse(engine, store, text, live)
        finally:
            io.close()
            if io.output_unwritten:
                kept = " (the existing file is unchanged)" if output is not None and output.exists() else ""
                typer.echo(f"nothing was played: {output} not written{kept}", err=True)


def _turn_judge(vad: str, detector: str, models: Path | None) -> TurnJudge | None:
    """Fail now, not after a minute of loading: the chosen VAD's package, and the smart detector's model."""
    from glmvoice_cli.audio.vad import VadConfig, make_classifier

    make_classifier(VadConfig(engine=vad))
    return load_turn_judge(required=True, models=models) if detector == "smart" else None


def _complete_session(incomplete: str) -> list[str]:
    from glmvoice_cli.commands.sessions import complete_session

    return complete_session(incomplete)


def _check_options(input_file: Path | None, output_file: Path | None, text: bool, realtime: bool,
                   simulate_echo: float, session_dir: Path | None, resume: str | None) -> None:
    if text and input_file is not None:
        raise UsageError("--text reads typed turns from stdin: it cannot be used with --input-file")
    if not simulate_echo < float("inf"):
        raise UsageError("--simulate-echo must be a finite gain")
    if (realtime or simulate_echo) and input_file is None:
        raise UsageError("--realtime and --simulate-echo apply to --input-file runs only")
    if session_dir is not None and resume is not None:
        raise UsageError("give either --session-dir (a new session) or --resume (a saved one), not both")
    if input_file is not None and not input_file.is_file():
        raise UsageError(f"input file {input_file} does not exist")
    if output_file is not None and (output_file.suffix.lower() != ".wav" or not output_file.parent.is_dir()):
        raise UsageError(f"cannot write {output_file}: give a .wav path in an existing folder")


def _find_resumed(resume: str | None) -> Path | None:
    from glmvoice_cli.sessions.catalog import find_session

    return find_session(resume) if resume is not None else None


def _generation(max_new_tokens: int | None, seed: int | None) -> GenerationOptions:
    from glmvoice_cli.lm.voice_lm import DEFAULT_MAX_NEW_TOKENS, GenerationOptions

    return GenerationOptions(max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS, seed=seed)


def _converse(engine: ChatEngine, store: SessionStore, text: bool, live: bool) -> None:
    """Run the engine, show its events; Ctrl-C and failures end cleanly with the session saved."""
    from glmvoice_cli.ui.keys import cbreak

    # Under the live view, keys are read one by one (no terminal echo) and the view draws the draft
    keyboard = live and sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty()
    with cbreak(sys.stdin.fileno()) if keyboard else contextlib.nullcontext(False) as keys:
        _run_engine(engine, store, text, live, keys)


def _run_engine(engine: ChatEngine, store: SessionStore, text: bool, live: bool, keys: bool) -> None:
    from glmvoice_cli.ui.view import PlainView, show_live

    engine.start()
    if keys:
        threading.Thread(target=_read_keys, args=(engine, text), name="glmvoice-keys", daemon=True).start()
    elif text or sys.stdin.isatty():  # while talking, a line typed in the terminal is a typed turn too
        threading.Thread(target=_read_turns, args=(engine, text), name="glmvoice-stdin", daemon=True).start()
    try:
        if live:
            show_live(engine.events, store.turns, text_mode=text, typing=keys)
        else:
            PlainView(sys.stdout).run(engine.events)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP: the answer being played is saved, interrupted
        engine.stop()
        engine.join()
        _print_latency(engine)
        typer.secho(f"{signals.describe(e)}; session saved in {store.path} (continue with --resume "
                    f"{resume_ref(store.path)})", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(signals.exit_code(e)) from None
    engine.join()
    _print_latency(engine)
    if engine.error is not None or engine.last_turn_error is not None:
        typer.echo(f"session saved in {store.path}", err=True)
        failure = engine.error or engine.last_turn_error
        assert failure is not None
        raise failure
    typer.echo(f"session {store.id} saved in {store.path} (continue with --resume {resume_ref(store.path)})",
               err=True)


def resume_ref(folder: Path) -> str:
    """What `--resume` takes for `folder` from any directory: its ID under the sessions folder, else its
    absolute path (a `--session-dir` folder elsewhere), quoted for a shell when it needs it."""
    import shlex

    from glmvoice_cli.sessions.store import sessions_root

    folder = folder.resolve()
    try:
        if folder.parent == sessions_root().resolve():
            return folder.name
    except OSError:
        pass
    return shlex.quote(str(folder))


def _print_latency(engine: ChatEngine) -> None:
    """The p50/p90 of each turn's breakdown (from the end of voice), on stderr."""
    from glmvoice_cli.chat.turn_timing import summary_text

    text = summary_text([r.timings for r in engine.reports if r.timings is not None and r.utterance_end])
    if text:
        typer.echo(text, err=True)


def _read_keys(engine: ChatEngine, end_at_eof: bool) -> None:
    """Typed turns from the terminal in cbreak mode; the draft goes to the view as it is typed."""
    from glmvoice_cli.ui.keys import read_keys
    from glmvoice_cli.ui.live_view import DraftChanged

    ended = read_keys(sys.stdin.fileno(), on_draft=lambda draft: engine.events.put(DraftChanged(draft)),
                      on_line=lambda line: engine.type_text(line, interrupt=True), stopped=lambda: engine.stopped)
    if ended and end_at_eof:
        engine.end_input()


def _read_turns(engine: ChatEngine, end_at_eof: bool) -> None:
    """Typed turns: one per stdin line; in --text mode the end of stdin ends the conversation."""
    interactive = sys.stdin.isatty()  # a person pressed Enter: cut the answer as speech would; piped lines queue
    for line in sys.stdin:
        if engine.stopped:
            return
        engine.type_text(line, interrupt=interactive)
    if end_at_eof:
        engine.end_input()
