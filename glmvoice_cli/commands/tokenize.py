"""`glmvoice tokenize`: speech files to 12.5 Hz token ids (the speech tokenizer's public face)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from glmvoice_cli.commands.common import (
    DeviceOpt,
    ModelsOpt,
    ThreadsOpt,
    TokenizerOpt,
    status_line,
    use_threads,
)

TokDtypeOpt = Annotated[str | None, typer.Option("--dtype", help="fp32 (default) or bf16.")]


def tokenize(
    files: Annotated[list[Path], typer.Argument(help="Audio files (wav, flac, ogg, mp3; any rate or channels).")],
    tokenizer: TokenizerOpt = None,
    models: ModelsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line: file, tokens, seconds.")] = False,
    device: DeviceOpt = None,
    dtype: TokDtypeOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Windows of 30 s encoded at once (memory, not results).")] = 8,
    threads: ThreadsOpt = None,
) -> None:
    """Print the speech token ids (12.5 per second) of each FILE; all files are encoded in one batch."""
    from glmvoice_cli.audio.io import load_audio
    from glmvoice_cli.commands.models import ensure_models
    from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer

    audios = [load_audio(f) for f in files]  # every file is checked before the model loads
    folder = ensure_models(("tokenizer",), models=models, overrides={"tokenizer": tokenizer})["tokenizer"]
    for audio in audios:
        for warning in audio.warnings:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    use_threads(threads)
    model = SpeechTokenizer.from_pretrained(folder, device=device, dtype=dtype, micro_batch=batch_size)
    with status_line(f"encoding {len(audios)} file(s), {sum(a.seconds for a in audios):.0f} s of audio"):
        encoded = model.encode([a.samples for a in audios])
    for path, audio, ids in zip(files, audios, encoded, strict=True):
        if as_json:
            typer.echo(json.dumps({"file": str(path), "tokens": ids, "seconds": round(audio.seconds, 3)}))
        elif len(files) == 1:
            typer.echo(" ".join(map(str, ids)))
        else:
            typer.echo(f"{path}: {' '.join(map(str, ids))}")
