"""A session folder is untrusted input: links and special files inside it are refused before any write, `rm`
removes only sessions (never the working folder), and one damaged meta.json breaks no other session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.errors import GlmVoiceError
from glmvoice_cli.sessions.lock import SessionLock
from glmvoice_cli.sessions.store import SessionError, SessionStore, sessions_root

runner = CliRunner()


def _session(folder: Path, said: str = "hello") -> SessionStore:
    store = SessionStore.create(session_dir=folder, mode="text")
    store.append_user(text=said, token_ids=[1])
    store.append_assistant(text="answer", token_ids=[2])
    return store


@pytest.fixture()
def mine(tmp_path: Path) -> Path:
    """A file of the user's that a hostile session points at."""
    path = tmp_path / "precious.txt"
    path.write_text("my notes\n")
    return path


# --- links inside a session -------------------------------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(tmp_path: Path, mine: Path,
                                                                    dangling: bool) -> None:
    session = _session(sessions_root() / "20261101-080000-aaaa").path
    target = tmp_path / "created-by-the-lock.txt" if dangling else mine
    (session / ".lock").symlink_to(target)
    with pytest.raises(GlmVoiceError, match=r"\.lock is a symbolic link"):
        SessionLock.acquire(session)
    result = runner.invoke(app, ["sessions", "rm", session.name, "--yes"])
    assert result.exit_code != 0 and "symbolic link" in result.stderr and "Traceback" not in result.output
    assert session.is_dir()  # nothing removed
    assert not target.exists() if dangling else mine.read_text() == "my notes\n"


def test_a_lock_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    session = _session(tmp_path / "s").path
    os.mkfifo(session / ".lock")
    with pytest.raises(GlmVoiceError, match="not a regular file"):
        SessionLock.acquire(session)


def test_a_transcript_that_links_elsewhere_is_never_appended_to(tmp_path: Path, mine: Path) -> None:
    session = _session(tmp_path / "s").path
    real = session / "transcript.jsonl"
    mine.write_bytes(real.read_bytes() + b"not a line of mine to lose\n")
    real.unlink()
    real.symlink_to(mine)
    before = mine.read_bytes()
    with pytest.raises(SessionError, match=r"transcript.jsonl is a symbolic link"):
        SessionStore.resume(session)
    assert mine.read_bytes() == before


@pytest.mark.parametrize("where", ["audio", "audio/0003-user.wav"])
def test_audio_that_links_elsewhere_is_refused(tmp_path: Path, where: str) -> None:
    session = _session(tmp_path / "s").path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = session / where
    if where == "audio":
        (session / "audio").rmdir()
        link.symlink_to(elsewhere, target_is_directory=True)
    else:
        link.symlink_to(elsewhere / "written-through.wav")
    with pytest.raises(SessionError, match="symbolic link"):
        SessionStore.resume(session)
    assert list(elsewhere.iterdir()) == []


def test_a_new_session_in_a_folder_with_a_linked_meta_is_refused(tmp_path: Path, mine: Path) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "meta.json").symlink_to(mine)
    with pytest.raises(SessionError, match=r"meta.json is a symbolic link"):
        SessionStore.create(session_dir=folder)
    assert mine.read_text() == "my notes\n"


def test_a_saved_audio_path_that_leaves_the_folder_is_never_rewritten(tmp_path: Path, mine: Path) -> None:
    store = _session(tmp_path / "s")
    lines = store.transcript_path.read_text().splitlines()
    record = json.loads(lines[-1])
    record["audio"] = os.path.relpath(mine, store.path)  # "../precious.txt"
    store.transcript_path.write_text("\n".join([*lines[:-1], json.dumps(record)]) + "\n")
    resumed = SessionStore.resume(store.path)
    resumed.amend_last_answer([2], "ans", heard_samples=10)
    assert mine.read_text() == "my notes\n"


def test_a_transcript_that_is_a_fifo_is_one_line_not_a_hang(tmp_path: Path) -> None:
    session = _session(tmp_path / "s").path
    (session / "transcript.jsonl").unlink()
    os.mkfifo(session / "transcript.jsonl")
    result = runner.invoke(app, ["sessions", "show", str(session)])
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1  # and it returned: no hang


# --- rm removes sessions only ----------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["", " ", ".", ".."])
def test_rm_of_an_empty_or_dot_name_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    ref: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "transcript.jsonl").write_text("{}\n")
    (work / "meta.json").write_text("{}")
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["sessions", "rm", ref, "--yes"])
    assert result.exit_code != 0 and "names no session" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["meta.json", "thesis.tex", "transcript.jsonl"]


def test_rm_refuses_a_folder_that_is_not_a_session_or_holds_the_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lookalike = tmp_path / "notes"
    lookalike.mkdir()
    (lookalike / "transcript.jsonl").write_text("{}\n")  # no meta.json: not a session
    result = runner.invoke(app, ["sessions", "rm", str(lookalike), "--yes"])
    assert result.exit_code != 0 and "not a glmvoice session folder" in result.stderr and lookalike.is_dir()

    session = _session(tmp_path / "s").path
    monkeypatch.chdir(session / "audio")
    result = runner.invoke(app, ["sessions", "rm", str(session), "--yes"])
    assert result.exit_code != 0 and "holds the working folder" in result.stderr and session.is_dir()


# --- one damaged meta.json ----------------------------------------------------------------------------


@pytest.mark.parametrize("meta", ['{"created": 5, "mode": 42}', "[" * 100_000 + "]" * 100_000,
                                  '"just a string"', "\xff\xfe"])
def test_a_damaged_meta_breaks_no_other_session(meta: str) -> None:
    good = _session(sessions_root() / "20261102-080000-good", "good one")
    bad = _session(sessions_root() / "20261103-080000-bad", "bad one")
    (bad.path / "meta.json").write_bytes(meta.encode("utf-8", "surrogateescape") if meta != "\xff\xfe"
                                         else b"\xff\xfe")
    listed = runner.invoke(app, ["sessions", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [bad.id, good.id]  # no date: first
    assert f"{bad.path / 'meta.json'}" in listed.stderr and listed.stderr.startswith("warning: ")
    for args in (["show", good.id], ["show", bad.id], ["export", good.id], ["export", bad.id]):
        result = runner.invoke(app, ["sessions", *args])
        assert result.exit_code == 0 and "Traceback" not in result.output, (args, result.output)
    assert "good one" in runner.invoke(app, ["sessions", "show", "last"]).stdout  # the dated one is the newest
    removed = runner.invoke(app, ["sessions", "rm", bad.id, "--yes"])
    assert removed.exit_code == 0 and not bad.path.exists() and good.path.is_dir()
