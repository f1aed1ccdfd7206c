"""Every read of a user's or a model folder's file has a cap that says itself in one line (tested with small
caps), JSON nested past the parser's depth is an error like any other, and a pipe nobody writes says so."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.errors import AudioError, CheckpointError
from glmvoice_cli.files import read_limited, waiting_note

runner = CliRunner()
DEEP = "[" * 50_000 + "]" * 50_000


def _one_line(result, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_read_limited_refuses_past_the_cap_and_from_dev_zero(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_limited(path, 10) == b"x" * 10
    with pytest.raises(OSError, match="over 1 KiB"):
        read_limited("/dev/zero", 1024)


def test_audio_longer_than_the_limit_says_the_limit_and_how_to_raise_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio.io import read_audio

    path = tmp_path / "long.wav"
    sf.write(path, np.full(3 * 8000, 0.1, np.float32), 8000)
    monkeypatch.setenv("GLMVOICE_MAX_AUDIO_S", "2")
    with pytest.raises(AudioError, match="GLMVOICE_MAX_AUDIO_S=SECONDS") as caught:
        read_audio(path)
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("GLMVOICE_MAX_AUDIO_S", "4")
    assert len(read_audio(path).samples) == 3 * 8000
    monkeypatch.setenv("GLMVOICE_MAX_AUDIO_S", "inf")
    with pytest.raises(AudioError, match="positive, finite"):
        read_audio(path)


def test_a_streamed_wav_past_the_limit_is_stopped_while_reading(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe's WAV header cannot say its length: the cap is counted on what is read."""
    from glmvoice_cli.audio.io import read_audio

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    data = tmp_path / "data.wav"
    sf.write(data, np.full(5 * 8000, 0.1, np.float32), 8000)

    def write() -> None:
        with open(fifo, "wb") as out:
            out.write(data.read_bytes())

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    monkeypatch.setenv("GLMVOICE_MAX_AUDIO_S", "2")
    with pytest.raises(AudioError, match=r"over 0.000556 h of audio"):
        read_audio(fifo)
    writer.join(10)


def test_tts_text_from_dev_zero_or_a_huge_stdin_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.commands import tts

    _one_line(runner.invoke(app, ["tts", "--file", "/dev/zero", "-o", "x.wav"]), "/dev/zero", "over 4 MiB")
    monkeypatch.setattr(tts, "TEXT_MAX_BYTES", 1000)
    _one_line(runner.invoke(app, ["tts", "-", "-o", "x.wav"], input="word " * 1000), "stdin", "over")


def test_decode_tokens_past_the_cap_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.commands import decode

    monkeypatch.setattr(decode, "TOKENS_MAX_BYTES", 1000)
    _one_line(runner.invoke(app, ["decode", "-", "-o", str(tmp_path / "x.wav")], input="1 " * 1000), "stdin")
    big = tmp_path / "t.txt"
    big.write_text("1 " * 1000)
    _one_line(runner.invoke(app, ["decode", str(big), "-o", str(tmp_path / "x.wav")]), str(big), "over 1000 bytes")


def test_a_tokenizer_model_past_its_cap_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.errors import CheckpointMismatchError
    from glmvoice_cli.lm import text_tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"YQ== 0\n" * 1000)
    monkeypatch.setattr(text_tokenizer, "RANKS_MAX_BYTES", 4096)
    with pytest.raises(CheckpointMismatchError, match=r"tokenizer.model: unreadable \(over 4 KiB"):
        text_tokenizer.read_ranks(path)


def test_json_nested_past_the_parser_is_a_bad_file_like_any_other(tmp_path: Path) -> None:
    from glmvoice_cli.lm.checkpoint import weight_files
    from glmvoice_cli.models.hub import read_shard_names

    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match="unreadable weight index"):
        read_shard_names(tmp_path / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(DEEP)
    with pytest.raises(CheckpointError):
        weight_files(tmp_path)


def test_a_deep_error_body_from_the_lm_server_is_still_one_line() -> None:
    from glmvoice_cli.lm.http_client import _server_message

    assert len(_server_message(DEEP.encode())) <= 200


def test_a_pipe_nobody_writes_says_what_it_waits_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "words"
    os.mkfifo(fifo)
    written = threading.Event()

    def late_writer() -> None:
        time.sleep(1.5)
        with open(fifo, "w") as out:
            out.write("hello")
        written.set()

    threading.Thread(target=late_writer, daemon=True).start()
    with waiting_note(fifo):
        assert read_limited(fifo, 100) == b"hello"
    assert written.wait(10)  # the writer sets it just after closing the pipe, which is what ended our read
    assert f"waiting for something to write into the named pipe {fifo}" in capsys.readouterr().err

    regular = tmp_path / "plain.txt"
    regular.write_text("hi")
    with waiting_note(regular):
        read_limited(regular, 100)
    assert capsys.readouterr().err == ""
