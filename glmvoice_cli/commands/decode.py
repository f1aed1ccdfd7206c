"""`glmvoice decode`: speech token ids to a 22.05 kHz audio file (the speech decoder's public face).

Pairs with `glmvoice tokenize` for a resynthesis round trip. torch is imported only inside the
command so that `glmvoice --help` stays instant.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glmvoice_cli.commands.common import (
    DecoderOpt,
    DeviceOpt,
    ModelsOpt,
    ThreadsOpt,
    known_schedule,
    status_line,
    use_threads,
)
from glmvoice_cli.commands.conventions import note
from glmvoice_cli.commands.signals import interrupts_as_keyboard
from glmvoice_cli.commands.speaker import drain, open_speaker
from glmvoice_cli.config import TOKENS_PER_SECOND
from glmvoice_cli.errors import UsageError
from glmvoice_cli.files import read_limited

if TYPE_CHECKING:
    import numpy as np

    from glmvoice_cli.audio.devices import AudioSink

_TOKEN_WORD = re.compile(r"[^\s,]+")  # ids are separated by whitespace and/or commas
MAX_TOKEN_DIGITS = 9  # no speech vocabulary has a billion ids: longer digit runs are refused before int()
SHOWN_VALUE_CHARS = 40  # a bad value is quoted in the error up to this length
TOKENS_MAX_BYTES = 64 << 20  # ~10 million ids, nine days of speech: more is a wrong file (or /dev/zero)


class _TooLong(ValueError):
    """A JSON integer with more than MAX_TOKEN_DIGITS digits."""


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_TOKEN_DIGITS:
        raise _TooLong(digits)
    return int(digits)


def parse_tokens(text: str, source: str = "tokens") -> list[int]:
    """Integers from whitespace/comma-separated text, a JSON list, or JSON objects with "tokens".

    Every failure is a one-line UsageError naming `source`: a 100,000-digit number is refused by its
    length (never converted), JSON nested too deeply by its depth (never a RecursionError).
    """
    text = text.strip()
    if not text:
        raise UsageError(f"{source}: no speech tokens")
    values: list[object] | None = _json_values(text, source) if text[0] in "[{" else None
    ids: list[int] = []
    for value in values if values is not None else (m.group() for m in _TOKEN_WORD.finditer(text)):
        token = _token_id(value)
        if token is None and isinstance(value, str) and value.isascii() and value.isdigit():
            raise UsageError(f"{source}: token id with {len(value)} digits is out of range")
        if token is None:
            raise UsageError(f"{source}: token ids must be non-negative integers, got {_shown(value)}")
        ids.append(token)
    if not ids:
        raise UsageError(f"{source}: no speech tokens")
    return ids


def _json_values(text: str, source: str) -> list[object]:
    values: list[object] = []
    try:
        for line in text.splitlines() if text[0] == "{" else [text]:
            if line.strip():
                data = json.loads(line, parse_int=_json_int)
                part = data["tokens"] if isinstance(data, dict) else data
                if not isinstance(part, list):  # a string would be taken apart character by character
                    raise TypeError(type(part).__name__)
                values += part
    except _TooLong as e:
        raise UsageError(f"{source}: token id with {len(str(e))} digits is out of range") from e
    except RecursionError as e:
        raise UsageError(f"{source}: JSON nested too deeply (expected a flat list of token ids)") from e
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"{source}: not a JSON list of token ids or objects with \"tokens\"") from e
    return values


def _token_id(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > MAX_TOKEN_DIGITS:
            return None
        return int(value)
    return None


def _shown(value: object) -> str:
    """repr(value), cut short: a bad value may be a million-character string or a huge nested list."""
    if isinstance(value, (list, dict)):
        return "a nested JSON list" if isinstance(value, list) else "a JSON object"
    if isinstance(value, str) and len(value) > SHOWN_VALUE_CHARS:
        return f"{value[:SHOWN_VALUE_CHARS]!r}... ({len(value)} characters)"
    return repr(value)


def read_tokens(tokens: str) -> list[int]:
    """Token ids from a file path or `-` (stdin); undecodable bytes are a one-line error, as in a file."""
    if tokens == "-":
        stream = getattr(sys.stdin, "buffer", None)
        try:
            data = stream.read(TOKENS_MAX_BYTES + 1) if stream is not None else sys.stdin.read(TOKENS_MAX_BYTES + 1)
            if len(data) > TOKENS_MAX_BYTES:
                raise UsageError(f"stdin holds over {TOKENS_MAX_BYTES >> 20} MiB of token ids (weeks of speech): "
                                 "decode it in parts")
            text = data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin is not UTF-8 text: {e.reason} at byte {e.start}") from e
        return parse_tokens(text, "stdin")
    path = Path(tokens)
    if not path.is_file():
        raise UsageError(f"token file not found: {path}")
    try:
        text = read_limited(path, TOKENS_MAX_BYTES).decode("utf-8")
    except OSError as e:
        raise UsageError(f"cannot read token file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"cannot read token file {path}: not UTF-8 text (byte {e.start})") from e
    return parse_tokens(text, str(path))


def decode(
    tokens: Annotated[str, typer.Argument(help="File of speech token ids (whitespace or JSON), or - for stdin.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Audio file to write: .wav, .flac or .ogg (without it, the speech is played).")
    ] = None,
    play: Annotated[bool, typer.Option("--play", help="Also play it (the default when no -o is given).")] = False,
    output_device: Annotated[str | None, typer.Option(help="Speaker name or index (see glmvoice devices).")
                             ] = None,
    decoder: DecoderOpt = None,
    models: ModelsOpt = None,
    stream: Annotated[bool, typer.Option("--stream", help="Decode block by block, as the assistant speaks.")] = False,
    schedule: Annotated[str, typer.Option(
        "--schedule", callback=known_schedule, help="With --stream: 'default' (first audio after 10 tokens) or 'reference' (the demo's).")
    ] = "default",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the decoder's noise (default 0; the reference schedule always seeds 42).")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="Flow model precision: auto (fp32), fp32, bf16 or fp16 (where the device runs it; "
        "less memory, some loss of quality). The vocoder always runs in fp32.")
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Turn speech token ids (12.5 per second) into 22.05 kHz speech: played, written to a file, or both."""
    ids = read_tokens(tokens)
    if output is not None and output.suffix.lower() not in (".wav", ".flac", ".ogg"):
        raise UsageError(f"cannot write {output}: use a .wav, .flac or .ogg file name")
    from glmvoice_cli.device import DTYPES

    if dtype not in (None, "auto", *DTYPES):  # before any model is looked for
        raise UsageError(f"unknown dtype {dtype!r} (use auto, fp32, bf16 or fp16)")
    from glmvoice_cli.commands.models import ensure_models

    # SIGTERM and SIGHUP as Ctrl-C: one line, the temporary file removed, an existing file kept.
    with interrupts_as_keyboard():
        speaker = open_speaker(output_device) if play or output is None else None
        try:
            folder = decoder or ensure_models(("decoder",), models=models)["decoder"]
            use_threads(threads)
            _decode(folder, ids, output, speaker, stream=stream, reference=schedule == "reference", seed=seed,
                    device=device, dtype=dtype)
        finally:
            if speaker is not None:
                speaker.close()


def _decode(folder: Path, ids: list[int], output: Path | None, speaker: AudioSink | None, *, stream: bool,
            reference: bool, seed: int | None, device: str | None, dtype: str | None) -> None:
    from glmvoice_cli.audio.chunk_writer import write_audio_chunks
    from glmvoice_cli.decoder.speech_decoder import synthesize_blocks

    with status_line(f"decoding {len(ids)} speech tokens ({len(ids) / TOKENS_PER_SECOND:.0f} s of speech)"):
        chunks, rate = synthesize_blocks(folder, ids, stream=stream, reference=reference, seed=seed,
                                         device=device, dtype=dtype)
        if speaker is not None:
            chunks = _played(chunks, speaker)  # each block is heard as soon as it is decoded
        if output is not None:
            samples = write_audio_chunks(output, chunks, rate)  # block by block: memory stays flat
        else:
            samples = sum(len(chunk) for chunk in chunks)
    if output is not None:
        note(f"wrote {output} ({samples / rate:.2f} s, {rate} Hz, {len(ids)} tokens)")
    if speaker is not None:
        drain(speaker)


def _played(chunks: Iterable[np.ndarray], speaker: AudioSink) -> Iterator[np.ndarray]:
    for chunk in chunks:
        speaker.write(chunk)
        yield chunk
