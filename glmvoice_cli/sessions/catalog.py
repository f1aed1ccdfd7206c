"""Saved sessions by a short name: `last`, a unique ID prefix, a full ID or a folder; and their export.

`find_session` is what `chat --resume` and `glmvoice sessions` use, so an unknown or ambiguous name is
reported (with the IDs that exist) before any model loads. Nothing here prints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from glmvoice_cli.sessions.lock import locked
from glmvoice_cli.sessions.store import (
    META_FILE,
    TRANSCRIPT_FILE,
    SavedSession,
    SessionError,
    SessionNotFoundError,
    TurnRecord,
    check_own_files,
    list_sessions,
    load_session,
    resolve_session,
    sessions_root,
)

LAST = "last"  # the most recently created session
IDS_SHOWN = 5  # IDs named in an "unknown session" message (the newest)
EXPORT_FORMATS = ("md", "txt", "jsonl")


def find_session(ref: str, root: Path | None = None) -> Path:
    """The folder of the session `ref` names; SessionNotFoundError (one line, with the IDs that exist)."""
    root = root if root is not None else sessions_root()
    text = ref.strip()
    if text in ("", ".", ".."):  # the working folder is never a session named by accident
        raise SessionNotFoundError(f"{ref!r} names no session: give an ID, a unique start of one, 'last', "
                                   "or a session folder's path")
    saved = list_sessions(root)
    if text == LAST:
        if not saved:
            raise SessionNotFoundError(f"no saved sessions in {root}")
        spoken = [s for s in saved if s.turns]  # a chat left before its first turn is not the one to go on with
        return (spoken or saved)[-1].path
    if "/" in text or (Path(text).expanduser() / TRANSCRIPT_FILE).is_file():
        return resolve_session(text, root)  # a folder
    exact = [s for s in saved if s.id == text]
    matches = exact or [s for s in saved if s.id.startswith(text)]
    if len(matches) == 1 and text:
        return matches[0].path
    if len(matches) > 1:
        ids = ", ".join(s.id for s in matches[-IDS_SHOWN:])
        raise SessionNotFoundError(f"session {text!r} is ambiguous: it starts {len(matches)} IDs ({ids}); "
                                   "give more characters")
    if not saved:
        raise SessionNotFoundError(f"unknown session {text!r}: there are no saved sessions in {root}")
    newest = ", ".join(s.id for s in saved[-IDS_SHOWN:])
    more = f" and {len(saved) - IDS_SHOWN} older" if len(saved) > IDS_SHOWN else ""
    raise SessionNotFoundError(f"unknown session {text!r}; saved sessions: {newest}{more} "
                               "(glmvoice sessions list; 'last' is the newest)")


def load(ref: str, root: Path | None = None) -> SavedSession:
    return load_session(find_session(ref, root))


def export_text(session: SavedSession, fmt: str = "md") -> str:
    """The conversation as Markdown, plain text, or the transcript's JSON lines."""
    if fmt not in EXPORT_FORMATS:
        raise SessionError(f"unknown export format {fmt!r} (use {', '.join(EXPORT_FORMATS)})")
    if fmt == "jsonl":
        return "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in session.turns)
    names = {"user": "You", "assistant": "GLM-4-Voice"}
    lines: list[str] = []
    if fmt == "md":
        summary = (f"Created {session.meta.get('created', '?')}, {session.meta.get('mode', '?')} mode, "
                   f"{len(session.turns)} turns.")
        lines += [f"# Session {session.id}", "", summary, ""]
    for turn in session.turns:
        said = turn.text or (_speech(turn) if turn.audio else "(nothing)")
        mark = " (interrupted)" if turn.interrupted else ""
        lines.append(f"**{names[turn.role]}:** {said}{mark}" if fmt == "md" else f"{names[turn.role]}: {said}{mark}")
        if fmt == "md":
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def remove(path: Path) -> None:
    """Delete a session folder: only one that is a session (its meta and transcript present, its own files
    not links), and never the working folder or one that holds it."""
    if not (path / TRANSCRIPT_FILE).is_file() or not (path / META_FILE).is_file():
        raise SessionNotFoundError(f"{path} is not a glmvoice session folder (no {TRANSCRIPT_FILE} and "
                                   f"{META_FILE}): not removed")
    here, target = Path.cwd().resolve(), path.resolve()
    if here == target or target in here.parents:
        raise SessionError(f"{path} holds the working folder: change to another folder to remove it")
    check_own_files(path)
    try:
        with locked(path):  # never pull a session from under a running chat
            shutil.rmtree(path)
    except OSError as e:
        raise SessionError(f"cannot remove {path}: {e.strerror or e}") from e


def _speech(turn: TurnRecord) -> str:
    """A spoken turn with no transcript: its length and where its audio is (`(speech, 2.4 s: audio/0001-user.wav)`)."""
    length = f", {turn.duration_s:.1f} s" if turn.duration_s else ""
    return f"(speech{length}: {turn.audio})"
