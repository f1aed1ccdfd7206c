"""`glmvoice decode`: speech token ids to a 22.05 kHz audio file (the speech decoder's public face).

Pairs with `glmvoice tokenize` for a resynthesis round trip. torch is imported only inside the
command so that `glmvoice --help` stays instant.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from glmvoice_cli.commands.common import (
    DecoderOpt,
    DeviceOpt,
    ModelsOpt,
    ThreadsOpt,
    status_line,
    use_threads,
)
from glmvoice_cli.config import TOKENS_PER_SECOND
from glmvoice_cli.errors import UsageError

_INT_SEPARATORS = re.compile(r"[\s,]+")
SCHEDULES = ("default", "reference")


def parse_tokens(text: str, source: str = "tokens") -> list[int]:
    """Integers from whitespace/comma-separated text, a JSON list, or JSON objects with "tokens"."""
    text = text.strip()
    if not text:
        raise UsageError(f"{source}: no speech tokens")
    if text[0] in "[{":
        try:
            values: list[object] = []
            for line in text.splitlines() if text[0] == "{" else [text]:
                if line.strip():
                    data = json.loads(line)
                    values += data["tokens"] if isinstance(data, dict) else data
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UsageError(f"{source}: not a JSON list of token ids or objects with \"tokens\"") from e
    else:
        values = [v for v in _INT_SEPARATORS.split(text) if v]
    ids: list[int] = []
    for value in values:
        token = _token_id(value)
        if token is None:
            raise UsageError(f"{source}: token ids must be non-negative integers, got {value!r}")
        ids.append(token)
    if not ids:
        raise UsageError(f"{source}: no speech tokens")
    return ids


def _token_id(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def read_tokens(tokens: str) -> list[int]:
    """Token ids from a file path or `-` (stdin)."""
    if tokens == "-":
        return parse_tokens(sys.stdin.read(), "stdin")
    path = Path(tokens)
    if not path.is_file():
        raise UsageError(f"token file not found: {path}")
    try:
        return parse_tokens(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read token file {path}: {e}") from e


def decode(
    tokens: Annotated[str, typer.Argument(help="File of speech token ids (whitespace or JSON), or - for stdin.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Audio file to write: .wav, .flac or .ogg.")],
    decoder: DecoderOpt = None,
    models: ModelsOpt = None,
    stream: Annotated[bool, typer.Option("--stream", help="Decode block by block, as the assistant speaks.")] = False,
    schedule: Annotated[str, typer.Option(
        "--schedule", help="With --stream: 'default' (first audio after 10 tokens) or 'reference' (the demo's).")
    ] = "default",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the decoder's noise (default 0; the reference schedule always seeds 42).")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="The decoder runs in fp32 (auto): flow matching and the vocoder lose quality in 16 bits.")
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Turn speech token ids (12.5 per second) into 22.05 kHz speech."""
    ids = read_tokens(tokens)
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r} (use {', '.join(SCHEDULES)})")
    if output.suffix.lower() not in (".wav", ".flac", ".ogg"):
        raise UsageError(f"cannot write {output}: use a .wav, .flac or .ogg file name")
    if dtype not in (None, "auto", "fp32", "float32"):
        raise UsageError(f"the speech decoder runs in fp32 only (got --dtype {dtype})")
    from glmvoice_cli.audio.io import write_audio
    from glmvoice_cli.commands.models import ensure_models
    from glmvoice_cli.decoder.speech_decoder import synthesize

    folder = decoder or ensure_models(("decoder",), models=models)["decoder"]
    use_threads(threads)
    with status_line(f"decoding {len(ids)} speech tokens ({len(ids) / TOKENS_PER_SECOND:.0f} s of speech)"):
        audio, rate = synthesize(folder, ids, stream=stream, reference=schedule == "reference", seed=seed,
                                 device=device)
    write_audio(output, audio, rate)
    typer.echo(f"wrote {output} ({len(audio) / rate:.2f} s, {rate} Hz, {len(ids)} tokens)", err=True)
