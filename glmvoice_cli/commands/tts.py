"""`glmvoice tts`: speak a text with GLM-4-Voice, streamed to the speaker and/or written to a file."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

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
    TopPOpt,
    lm_server,
    load_assistant,
    use_threads,
    with_sampling,
)
from glmvoice_cli.commands.conventions import note
from glmvoice_cli.commands.signals import interrupts_as_keyboard
from glmvoice_cli.commands.speaker import drain, open_speaker
from glmvoice_cli.config import SAMPLE_RATE_OUT
from glmvoice_cli.errors import UsageError
from glmvoice_cli.files import read_limited, waiting_note
from glmvoice_cli.pipeline.instructions import DIALECTS, EMOTIONS, SPEEDS

if TYPE_CHECKING:
    import numpy as np

    from glmvoice_cli.audio.devices import AudioSink
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.pipeline.instructions import SpeakingStyle

TEXT_MAX_BYTES = 4 << 20  # about 700,000 words, days of speech: more is a wrong file (or /dev/zero)


def tts(
    text: Annotated[str | None, typer.Argument(help="Text to speak; '-' or nothing reads stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the speech here (.wav, .flac, .ogg; '-' = WAV on stdout).")] = None,
    play: Annotated[bool, typer.Option("--play", help="Also play it (the default when no -o is given).")] = False,
    emotion: Annotated[str, typer.Option(help=f"One of: {', '.join(EMOTIONS)}.",
                                         autocompletion=lambda incomplete: _starting(EMOTIONS, incomplete))
                       ] = "neutral",
    speed: Annotated[str, typer.Option(help=f"One of: {', '.join(SPEEDS)}.",
                                       autocompletion=lambda incomplete: _starting(SPEEDS, incomplete))] = "normal",
    dialect: Annotated[str, typer.Option(help=f"One of: {', '.join(DIALECTS)}.",
                                         autocompletion=lambda incomplete: _starting(DIALECTS, incomplete))
                       ] = "mandarin",
    instruction: Annotated[str | None, typer.Option(
        help="Your own instruction instead of the template; '{text}' marks where the text goes.")] = None,
    output_device: Annotated[str | None, typer.Option(help="Speaker name or index (see glmvoice devices).")
                             ] = None,
    models: ModelsOpt = None, lm: LmOpt = None, decoder: DecoderOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None, compile_lm: CompileOpt = None,
    max_new_tokens: MaxTokensOpt = None, seed: SeedOpt = None, schedule: ScheduleOpt = "default",
    temperature: TemperatureOpt = None, top_p: TopPOpt = None, threads: ThreadsOpt = None,
    lm_url: LmUrlOpt = None, lm_api_key: LmApiKeyOpt = None, lm_model: LmModelOpt = None,
    lm_timeout: LmTimeoutOpt = None,
) -> None:
    """Speak TEXT with GLM-4-Voice, in the chosen emotion, speed and dialect (long texts go sentence by sentence)."""
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.pipeline.instructions import SpeakingStyle
    from glmvoice_cli.pipeline.speak import TTS_MAX_NEW_TOKENS

    style = SpeakingStyle(emotion=emotion, speed=speed, dialect=dialect)
    words = _read_text(text, file)
    _check_output(output)
    with interrupts_as_keyboard():  # SIGTERM and SIGHUP keep what was spoken, as Ctrl-C does
        speaker = open_speaker(output_device) if play or output is None else None
        try:
            use_threads(threads)
            assistant = load_assistant(("lm", "decoder"), models=models, overrides={"lm": lm, "decoder": decoder},
                                       device=device, dtype=dtype, quantize=quantize, seed=seed,
                                       compile=compile_lm, schedule=schedule,
                                       server=lm_server(lm_url, lm_api_key, lm_model, lm_timeout))
            options = with_sampling(GenerationOptions(max_new_tokens=max_new_tokens or TTS_MAX_NEW_TOKENS,
                                                      seed=seed), temperature, top_p)
            _run(assistant, words, style, instruction, output, speaker, options)
        finally:
            if speaker is not None:
                speaker.close()


def _run(assistant: Assistant, words: str, style: SpeakingStyle, instruction: str | None, output: Path | None,
         speaker: AudioSink | None, options: GenerationOptions) -> None:
    """Stream the events: text to the console, audio to the speaker and the file (replaced only at the end:
    a failure leaves an existing file untouched; an interrupt writes what was spoken so far)."""

    from glmvoice_cli.events import AudioChunk, TextDelta
    from glmvoice_cli.pipeline.speak import speak

    echo = sys.stderr if str(output) == "-" else sys.stdout
    chunks: list[np.ndarray] = []
    cancel = threading.Event()
    rate = assistant.decoder.sample_rate if assistant.decoder is not None else SAMPLE_RATE_OUT
    try:
        for event in speak(assistant, words, style, instruction, options, cancel):
            if isinstance(event, TextDelta):
                echo.write(event.text)
                echo.flush()
            elif isinstance(event, AudioChunk):
                chunks.append(event.samples)
                if speaker is not None:
                    speaker.write(event.samples)
        echo.write("\n")
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP: keep what was spoken so far
        echo.write("\n")
        if output is not None:
            _write_partial(output, chunks, rate)
        raise
    if output is not None:
        seconds = _write(output, chunks, rate)
        note(f"wrote {_where(output)} ({seconds:.2f} s, {rate} Hz)")
    if speaker is not None:
        drain(speaker)


def _write(output: Path, chunks: list[np.ndarray], rate: int) -> float:
    """Write the speech (whole or not at all); its length in seconds."""
    import numpy as np

    from glmvoice_cli.audio.io import write_audio

    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    write_audio(output, audio, rate)
    return len(audio) / rate


def _write_partial(output: Path, chunks: list[np.ndarray], rate: int) -> None:
    """After an interrupt: the speech so far, or nothing at all (an existing file stays) when there is none."""
    if not chunks:
        kept = " (the existing file is unchanged)" if output.exists() and str(output) != "-" else ""
        typer.echo(f"nothing was spoken yet: {_where(output)} not written{kept}", err=True)
        return
    seconds = _write(output, chunks, rate)
    note(f"wrote {_where(output)} with the {seconds:.2f} s spoken so far")


def _where(output: Path) -> str:
    return "stdout" if str(output) == "-" else str(output)


def _read_text(text: str | None, file: Path | None) -> str:
    if file is not None:
        if text is not None:
            raise UsageError("give the text either as an argument or with --file, not both")
        try:
            with waiting_note(file):
                words = read_limited(file, TEXT_MAX_BYTES).decode("utf-8")
        except OSError as e:
            raise UsageError(f"cannot read text file {file}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise UsageError(f"cannot read text file {file}: not UTF-8 text (byte {e.start})") from e
    elif text is None or text == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError('no text: pass it as an argument, with --file, or on stdin (glmvoice tts "Hello")')
        words = sys.stdin.read(TEXT_MAX_BYTES + 1)
        if len(words) > TEXT_MAX_BYTES:
            raise UsageError(f"the text on stdin is over {TEXT_MAX_BYTES >> 20} MiB (days of speech): "
                             "split it into parts")
    else:
        words = text
    if not words.strip():
        raise UsageError("the text to speak is empty")
    return words.strip()


def _check_output(output: Path | None) -> None:
    """Fail before generating, not after, on an output path that cannot be written."""
    from glmvoice_cli.audio.io import WRITE_FORMATS

    if output is None or str(output) == "-":
        return
    if output.suffix.lower() not in WRITE_FORMATS:
        raise UsageError(f"cannot write {output}: use one of {', '.join(WRITE_FORMATS)} (or - for stdout)")
    if not output.parent.exists():
        raise UsageError(f"cannot write {output}: folder {output.parent} does not exist")


def _starting(names: Iterable[str], incomplete: str) -> list[str]:
    """Shell completion: the values that start with what was typed."""
    return [name for name in names if name.startswith(incomplete)]
