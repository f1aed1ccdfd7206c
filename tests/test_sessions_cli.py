"""`glmvoice sessions list|show|export|rm`, `--resume last` and ID prefixes; unknown IDs fail before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.sessions import catalog as sessions
from glmvoice_cli.sessions.store import SessionNotFoundError, SessionStore, sessions_root

runner = CliRunner()


def _session(folder: str, *said: str) -> SessionStore:
    store = SessionStore.create(session_dir=sessions_root() / folder, mode="text")
    for i, text in enumerate(said):
        store.append_user(text=text, token_ids=[i])
        store.append_assistant(text=f"answer {i}", token_ids=[100 + i], interrupted=i == 1)
    return store


@pytest.fixture()
def three() -> list[SessionStore]:
    return [_session("20261101-080000-aaaa", "first"), _session("20261102-080000-abcd", "hello", "again"),
            _session("20261103-080000-bbbb", "newest")]


def test_find_by_last_prefix_id_and_folder(three: list[SessionStore]) -> None:
    assert sessions.find_session("last") == three[-1].path
    assert sessions.find_session("20261102") == three[1].path
    assert sessions.find_session("20261101-080000-aaaa") == three[0].path
    assert sessions.find_session(str(three[0].path)) == three[0].path
    with pytest.raises(SessionNotFoundError, match=r"ambiguous.*20261101-080000-aaaa, 20261102-080000-abcd"):
        sessions.find_session("2026110")
    with pytest.raises(SessionNotFoundError) as info:
        sessions.find_session("nope")
    message = str(info.value)
    assert "\n" not in message and "20261103-080000-bbbb" in message and "sessions list" in message


def test_no_sessions_at_all() -> None:
    with pytest.raises(SessionNotFoundError, match="no saved sessions"):
        sessions.find_session("last")


def test_list_show_export(three: list[SessionStore], tmp_path: Path) -> None:
    rows = [json.loads(line) for line in runner.invoke(app, ["sessions", "list", "--json"]).stdout.splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in three] and rows[1]["turns"] == 4
    table = runner.invoke(app, ["sessions", "list"])
    assert table.exit_code == 0 and "20261102-080000-abcd" in table.stdout
    shown = runner.invoke(app, ["sessions", "show", "20261102"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines() == ["You: hello", "GLM-4-Voice: answer 0", "You: again",
                                         "GLM-4-Voice: answer 1 (interrupted)"]
    turns = [json.loads(x) for x in runner.invoke(app, ["sessions", "show", "last", "--json"]).stdout.splitlines()]
    assert [t["text"] for t in turns] == ["newest", "answer 0"]
    out = tmp_path / "s.md"
    result = runner.invoke(app, ["sessions", "export", "20261102", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# Session 20261102-080000-abcd") and "**You:** hello" in text


def test_rm_asks_and_checks_every_name_first(three: list[SessionStore]) -> None:
    result = runner.invoke(app, ["sessions", "rm", "20261101", "nope", "--yes"])
    assert result.exit_code != 0 and "unknown session 'nope'" in result.stderr
    assert three[0].path.exists()  # nothing deleted: one name was wrong
    kept = runner.invoke(app, ["sessions", "rm", "20261101"], input="n\n")
    assert "kept" in kept.stdout and three[0].path.exists()
    gone = runner.invoke(app, ["sessions", "rm", "20261101", "last"], input="y\ny\n")
    assert gone.exit_code == 0 and not three[0].path.exists() and not three[2].path.exists()
    assert three[1].path.exists()


def test_chat_with_an_unknown_session_fails_before_loading_models(three: list[SessionStore],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("models were loaded")

    monkeypatch.setattr("glmvoice_cli.commands.chat.load_assistant", no_loading)
    result = runner.invoke(app, ["chat", "--text", "--resume", "zzz"], input="")
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown session 'zzz'" in lines[0] and "20261103-080000-bbbb" in lines[0]


def test_last_skips_a_chat_left_before_its_first_turn(three: list[SessionStore]) -> None:
    empty = _session("20261104-080000-cccc")  # opened and closed without a word
    assert sessions.find_session("last") == three[-1].path
    assert sessions.find_session(empty.id) == empty.path  # still there by its ID


def test_export_format_from_the_extension_and_spoken_turns_shown_with_their_audio(
        three: list[SessionStore], tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "x.jsonl"
    done = runner.invoke(app, ["sessions", "export", "20261102", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()][:2] == ["hello", "answer 0"]
    quiet = runner.invoke(app, ["-q", "sessions", "export", "20261102", "-o", str(tmp_path / "x.md")])
    assert quiet.exit_code == 0 and "wrote" not in quiet.stderr  # -q: errors only
    assert (tmp_path / "x.md").read_text().startswith("# Session")
    voice = SessionStore.create(session_dir=sessions_root() / "20261105-080000-dddd", mode="voice")
    voice.append_user(np.zeros(16_000 * 2, np.float32), token_ids=[1])
    shown = runner.invoke(app, ["sessions", "show", "20261105"])
    assert shown.stdout.splitlines()[0] == "You: (speech, 2.0 s: audio/0001-user.wav)"
