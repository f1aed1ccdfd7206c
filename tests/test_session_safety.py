"""A session survives a full disk and a second chat: every completed turn stays readable, `--resume` works on
what was saved, and two chats never write one transcript (an OS lock, released even after a crash)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.sessions.lock import SessionBusyError, SessionLock
from glmvoice_cli.sessions.store import SessionStore, load_session
from glmvoice_cli.tiny.modelset import TinyModelSet

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-new-tokens", "30", "--seed", "1", "--no-live"]
SMALL_DISK = "1m"  # tmpfs size: room for the session's first turns, filled up after the first answer
HOLDER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def models(tiny_models: TinyModelSet) -> Path:
    return tiny_models.root


def _lines(session: Path) -> list[dict]:
    return [json.loads(line) for line in (session / "transcript.jsonl").read_text().splitlines()]


def _chat(models: Path, *args: str, input: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["chat", "--text", "--models", str(models), *args, *FAST], input=input)


# --- a full disk ------------------------------------------------------------------------------------


class SmallDisk:
    """A folder whose disk fill() makes full and free() empties again: a real small tmpfs where this process
    may mount one (CI runs as root), elsewhere an injected ENOSPC on every file the session writes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mounted = shutil.which("mount") is not None and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(folder)],
            capture_output=True, check=False).returncode == 0
        self.full = False

    def fill(self) -> None:
        self.full = True
        if not self.mounted:
            return
        with (self.folder / "filler").open("wb", buffering=0) as fh:  # until the kernel says the disk is full
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def free(self) -> None:
        self.full = False
        (self.folder / "filler").unlink(missing_ok=True)

    def write_file(self, real: Callable[[str | Path, bytes], None]) -> Callable[[str | Path, bytes], None]:
        def write(path: str | Path, data: bytes) -> None:
            if self.full and not self.mounted:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(path, data)

        return write


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    from glmvoice_cli.audio import io as audio_io

    folder = tmp_path / "disk"
    folder.mkdir()
    disk = SmallDisk(folder)
    monkeypatch.setattr(audio_io, "write_file", disk.write_file(audio_io.write_file))
    yield disk
    if disk.mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_disk_that_fills_mid_chat_keeps_every_saved_turn_and_resumes(
        models: Path, tmp_path: Path, small_disk: SmallDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    session = small_disk.folder / "S"
    real_append = SessionStore._append

    def append_then_fill(self: SessionStore, role: str, *args: object, **kwargs: object) -> object:
        record = real_append(self, role, *args, **kwargs)  # type: ignore[arg-type]
        if role == "assistant" and len(self.turns) == 2:
            small_disk.fill()  # the first exchange is saved; the disk is full from here on
        return record

    monkeypatch.setattr(SessionStore, "_append", append_then_fill)
    result = _chat(models, "--session-dir", str(session), "--output-file", str(tmp_path / "o.wav"),
                   input="First question.\nSecond question.\nThird question.\n")
    assert result.exit_code in (1, 2), result.output  # the answer's audio (2) or its line (1) did not fit
    err = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "soundfile" not in result.stderr, result.stderr
    assert err[-2] == f"session saved in {session}", err
    assert err[-1].startswith("error: cannot ") and err[-1].endswith("No space left on device"), err

    saved = load_session(session)
    assert saved.warnings == ()  # no line was cut
    assert [t.role for t in saved.turns][:2] == ["user", "assistant"] and len(saved.turns) >= 2
    for turn in saved.turns:
        if turn.audio is not None:
            assert len(sf.read(session / turn.audio)[0]) > 0
    assert [p.name for p in session.rglob(".*") if p.name != ".lock"] == []  # no temporary files left

    monkeypatch.setattr(SessionStore, "_append", real_append)
    small_disk.free()
    before = len(saved.turns)
    result = _chat(models, "--resume", str(session), "--output-file", str(tmp_path / "o2.wav"), input="Again.\n")
    assert result.exit_code == 0, result.output
    lines = _lines(session)
    assert len(lines) == before + 2 and lines[-2]["text"] == "Again." and lines[-1]["role"] == "assistant"


# --- one chat per session ---------------------------------------------------------------------------

HOLDER = r'''
import sys, time
from glmvoice_cli.sessions.lock import SessionLock
lock = SessionLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
'''


@pytest.fixture
def held_elsewhere(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A session folder locked by another process (as a running chat holds it)."""
    session = tmp_path / "S"
    store = SessionStore.create(session_dir=session, mode="text")
    store.append_user(None, text="mine")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(session)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield session, proc
    finally:
        proc.kill()
        proc.wait(HOLDER_TIMEOUT_S)


def test_two_opens_of_one_session_conflict_until_the_first_is_released(tmp_path: Path) -> None:
    first = SessionLock.acquire(tmp_path)
    with pytest.raises(SessionBusyError, match=f"in use by another glmvoice chat \\(process {os.getpid()}\\)"):
        SessionLock.acquire(tmp_path)
    first.release()
    SessionLock.acquire(tmp_path).release()


def test_the_lock_goes_with_a_crashed_process(held_elsewhere: tuple[Path, subprocess.Popen[str]]) -> None:
    session, proc = held_elsewhere
    with pytest.raises(SessionBusyError, match=f"process {proc.pid}"):
        SessionLock.acquire(session)
    proc.send_signal(signal.SIGKILL)  # a crash: nothing released it
    proc.wait(HOLDER_TIMEOUT_S)
    SessionLock.acquire(session).release()


@pytest.mark.parametrize("how", ["--resume", "--session-dir"])
def test_a_second_chat_on_a_held_session_is_one_line(models: Path, how: str, monkeypatch: pytest.MonkeyPatch,
                                                      held_elsewhere: tuple[Path, subprocess.Popen[str]]) -> None:
    from glmvoice_cli.commands import chat as chat_cmd

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models were loaded for a session that is in use")

    monkeypatch.setattr(chat_cmd, "load_assistant", never)  # refused before anything slow
    session, proc = held_elsewhere
    result = _chat(models, how, str(session), input="Interleave me.\n")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: session {session} is in use by another glmvoice chat (process {proc.pid}); "
        + "wait for it to end or start a new session"]
    assert [line["text"] for line in _lines(session)] == ["mine"]  # nothing was written into it


def test_sessions_rm_refuses_a_session_in_use(held_elsewhere: tuple[Path, subprocess.Popen[str]]) -> None:
    session, _ = held_elsewhere
    result = runner.invoke(app, ["sessions", "rm", "--yes", str(session)])
    assert result.exit_code == 1 and "in use by another glmvoice chat" in result.stderr
    assert (session / "transcript.jsonl").is_file()


def test_a_chat_started_on_a_full_disk_says_the_disk_is_full(models: Path, small_disk: SmallDisk) -> None:
    """The lock file is created and its pid write fails first; that must not hide (or replace) the real error."""
    if not small_disk.mounted:
        pytest.skip("needs a real small file system (mount tmpfs, as root)")
    small_disk.fill()
    result = _chat(models, "--session-dir", str(small_disk.folder / "S"), "--output-file",
                   str(small_disk.folder.parent / "o.wav"), input="Hello\n")
    assert result.exit_code != 0, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write session folder") and "No space left on device" in last, result.stderr
    assert "Traceback" not in result.output
