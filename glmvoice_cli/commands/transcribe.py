"""`glmvoice transcribe`: speech files to text with the language model, one model load for all."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glmvoice_cli.commands.common import (
    CompileOpt,
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
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TokenizerOpt,
    TopPOpt,
    lm_server,
    load_assistant,
    sampling,
    use_threads,
)
from glmvoice_cli.commands.conventions import is_quiet, note
from glmvoice_cli.config import SAMPLE_RATE_IN, WINDOW_SECONDS

if TYPE_CHECKING:
    from glmvoice_cli.pipeline.transcribe import Transcript

SILENCE_PEAK = 1e-4  # -80 dBFS: below this a file holds no speech, only digital silence
SUBTITLES = ("srt", "vtt")


def _complete_format(incomplete: str) -> list[str]:
    from glmvoice_cli.pipeline.transcript_formats import FORMATS

    return [name for name in FORMATS if name.startswith(incomplete)]


def transcribe(
    files: Annotated[list[Path], typer.Argument(help="Audio files (wav, flac, ogg, mp3; any rate or channels).")],
    fmt: Annotated[str | None, typer.Option(
        "--format", "-f", metavar="txt|json|srt|vtt", help="txt (the text), json (one object per file, with timed segments), srt or vtt "
        "(subtitles, one cue per utterance).", autocompletion=_complete_format)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", "-d", help="Write FILE's transcript to DIR/<name>.<format> (one file each) "
        "instead of stdout.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --output-dir: replace existing "
                                            "transcripts (else that is an error before any work).")] = False,
    prompt: Annotated[str | None, typer.Option(help="Replace the transcription instruction.")] = None,
    window: Annotated[float, typer.Option(min=1.0, max=600.0, help="Longest stretch of audio per model call, in seconds "
                                          "(longer utterances are cut).")] = WINDOW_SECONDS,
    models: ModelsOpt = None, tokenizer: TokenizerOpt = None, lm: LmOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None, compile_lm: CompileOpt = None,
    max_new_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    seed: SeedOpt = None, threads: ThreadsOpt = None,
    lm_url: LmUrlOpt = None, lm_api_key: LmApiKeyOpt = None, lm_model: LmModelOpt = None,
    lm_timeout: LmTimeoutOpt = None,
) -> None:
    """Transcribe each FILE with GLM-4-Voice (the speech plus an instruction, text-only output), utterance by
    utterance, with times."""
    import numpy as np

    from glmvoice_cli.audio.io import load_audio
    from glmvoice_cli.errors import AudioError, UsageError
    from glmvoice_cli.pipeline.transcribe import WINDOW_TRANSCRIPT_MAX_TOKENS
    from glmvoice_cli.pipeline.transcribe import transcribe as run

    if not window < float("inf"):
        raise UsageError("--window must be a finite number of seconds")
    chosen = _format(fmt, as_json)
    targets = _targets(files, chosen, output_dir, overwrite)
    audios = [load_audio(f) for f in files]  # every file is checked before the models load
    for audio in audios:
        if float(np.abs(audio.samples).max()) < SILENCE_PEAK:
            raise AudioError(f"{audio.source} is silent (no signal above -80 dBFS): there is nothing to transcribe")
    use_threads(threads)
    start = time.perf_counter()
    assistant = load_assistant(("tokenizer", "lm"), models=models, overrides={"tokenizer": tokenizer, "lm": lm},
                               device=device, dtype=dtype, quantize=quantize,
                               compile=compile_lm,
                               server=lm_server(lm_url, lm_api_key, lm_model, lm_timeout))
    load_s = time.perf_counter() - start
    with _progress([len(a.samples) / SAMPLE_RATE_IN for a in audios]) as advance:
        for index, (path, audio, target) in enumerate(zip(files, audios, targets, strict=True)):
            for warning in audio.warnings:
                typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
            advance(index, 0.0, path.name)
            result = run(assistant, audio.samples, prompt=prompt, window_s=window,
                         max_new_tokens=max_new_tokens or WINDOW_TRANSCRIPT_MAX_TOKENS,
                         on_window=functools.partial(_fraction, advance, index, path.name),
                         seed=seed, **sampling(temperature, top_p))
            _emit(result, chosen, path, target, load_s, several=len(files) > 1)


def _fraction(advance: Callable[[int, float, str], None], index: int, name: str, done: int, total: int) -> None:
    advance(index, done / total, name)


def _format(fmt: str | None, as_json: bool) -> str:
    from glmvoice_cli.errors import UsageError
    from glmvoice_cli.pipeline.transcript_formats import FORMATS

    if fmt is not None and fmt.lower() not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    if as_json and fmt is not None and fmt.lower() != "json":
        raise UsageError(f"--json and --format {fmt} disagree: give one")
    return "json" if as_json else (fmt or "txt").lower()


def _targets(files: list[Path], fmt: str, output_dir: Path | None, overwrite: bool) -> list[Path | None]:
    """Where each transcript goes (None: stdout); every clash is an error before any model loads."""
    from glmvoice_cli.errors import UsageError

    if output_dir is None:
        if fmt in SUBTITLES and len(files) > 1:
            raise UsageError(f"{len(files)} files as {fmt} subtitles: give --output-dir DIR for one {fmt} file each")
        return [None] * len(files)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} is a file, not a folder")
    targets = [output_dir / f"{f.stem}.{fmt}" for f in files]
    seen: dict[Path, Path] = {}
    for source, target in zip(files, targets, strict=True):
        if target in seen:
            raise UsageError(f"{seen[target]} and {source} would both be written to {target}: "
                             "transcribe them into different --output-dir folders")
        seen[target] = source
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        what = f"{existing[0]} exists" if len(existing) == 1 else \
            f"{len(existing)} transcripts exist in {output_dir} ({', '.join(t.name for t in existing)})"
        raise UsageError(f"{what} (add --overwrite to replace {'it' if len(existing) == 1 else 'them'})")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --output-dir {output_dir}: {e.strerror or e}") from e
    return list(targets)


def _emit(result: Transcript, fmt: str, path: Path, target: Path | None, load_s: float, several: bool) -> None:
    """One file's transcript to stdout, or whole-or-nothing to its file as soon as it is done."""
    from glmvoice_cli.errors import UsageError
    from glmvoice_cli.files import write_file
    from glmvoice_cli.pipeline.transcript_formats import render

    text = render(result, fmt, str(path), load_s)
    if target is not None:
        try:
            write_file(target, text.encode("utf-8"))
        except OSError as e:
            raise UsageError(f"cannot write {target}: {e.strerror or e}") from e
        note(f"wrote {target} ({len(result.segments)} segments)")
    elif fmt == "txt" and several:
        typer.echo(f"{path}: {text}", nl=False)
    else:
        typer.echo(text, nl=False)


@contextmanager
def _progress(seconds: list[float]) -> Iterator[Callable[[int, float, str], None]]:
    """One bar for all files, in seconds of audio; advance(file index, fraction of it done, its name).
    On a terminal only (and not with -q): piped runs print nothing but the transcripts."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal or is_quiet():
        yield lambda index, fraction, name: None
        return
    before = [sum(seconds[:i]) for i in range(len(seconds))]
    columns = (TextColumn("transcribing {task.description}"), BarColumn(),
               TextColumn("{task.completed:.0f}/{task.total:.0f} s of audio"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=sum(seconds) or 1.0)

        def advance(index: int, fraction: float, name: str) -> None:
            progress.update(task, completed=before[index] + fraction * seconds[index], description=name)

        yield advance
