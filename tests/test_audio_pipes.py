"""Named pipes and `<(cat x.wav)` as audio input: read once, whole, and decoded from memory."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.audio.io import read_audio
from glmvoice_cli.cli import app
from glmvoice_cli.errors import AudioError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
TIMEOUT_S = 60  # a hang fails the test instead of stalling the suite
RATE = 16_000


def _wav_bytes(seconds: float = 1.0, fmt: str = "WAV") -> tuple[bytes, np.ndarray]:
    t = np.arange(int(seconds * RATE)) / RATE
    samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format=fmt, subtype="PCM_16")
    return buffer.getvalue(), samples


@contextmanager
def _fifo_fed(path: Path, data: bytes) -> Iterator[Path]:
    """A named pipe at `path` that a thread writes `data` into once a reader opens it."""
    os.mkfifo(path)

    def feed() -> None:
        try:
            with path.open("wb") as fh:
                fh.write(data)
        except BrokenPipeError:  # a reader that stops early: its own error is what the test checks
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        yield path
    finally:
        if writer.is_alive():  # nobody opened it: open the read end so the writer can finish
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(TIMEOUT_S)
            os.close(fd)
        writer.join(TIMEOUT_S)


def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    """fn(*args) in a thread, joined with a timeout: (result, error); a hang fails the test."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"reading the pipe hung for {TIMEOUT_S} s"
    return out.get("result"), out.get("error")


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_a_named_pipe_is_read_once_and_decoded(tmp_path: Path, fmt: str) -> None:
    data, samples = _wav_bytes(fmt=fmt)
    with _fifo_fed(tmp_path / "in.pipe", data) as pipe:
        audio, error = _in_thread(read_audio, pipe)
    assert error is None, error
    assert audio.sample_rate == RATE and audio.warnings == ()
    np.testing.assert_allclose(audio.samples, samples, atol=1 / 32768)


def test_an_empty_pipe_is_one_line(tmp_path: Path) -> None:
    with _fifo_fed(tmp_path / "in.pipe", b"") as pipe:
        _, error = _in_thread(read_audio, pipe)
    assert isinstance(error, AudioError) and str(error) == f"audio file is empty (0 bytes): {pipe}"


def test_a_pipe_of_text_names_the_pipe(tmp_path: Path) -> None:
    with _fifo_fed(tmp_path / "in.pipe", b"hello, not audio\n" * 100) as pipe:
        _, error = _in_thread(read_audio, pipe)
    assert isinstance(error, AudioError) and str(pipe) in str(error) and "not a readable audio file" in str(error)


def test_tokenize_reads_a_pipe_like_the_file(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data, _ = _wav_bytes(seconds=2.0)
    (tmp_path / "x.wav").write_bytes(data)
    runner = CliRunner()
    args = ["tokenize", "--tokenizer", str(tiny_models.dirs["tokenizer"])]
    from_file = runner.invoke(app, [*args, str(tmp_path / "x.wav")])
    assert from_file.exit_code == 0, from_file.output
    with _fifo_fed(tmp_path / "x.pipe", data) as pipe:
        from_pipe, error = _in_thread(runner.invoke, app, [*args, str(pipe)])
    assert error is None and from_pipe.exit_code == 0, from_pipe.output
    assert from_pipe.stdout == from_file.stdout and len(from_pipe.stdout.split()) == 25
