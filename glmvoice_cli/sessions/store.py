"""Saved conversations: one folder per session, written as it goes so a crash loses nothing said.

Layout of a session folder (``<data root>/sessions/<ID>``, or the folder given as ``session_dir``)::

    meta.json           written once at creation: id, created, mode, model paths, format version
    transcript.jsonl    append-only, one JSON object per turn, flushed and fsynced on each write
    audio/0001-user.wav       16 kHz, the user's speech
    audio/0002-assistant.wav  22.05 kHz, what the assistant said (the played part when interrupted)

A turn's audio is written before its transcript line, so a line never names a missing file (the chat
engine's writer thread saves a spoken turn's audio at the end of speech, its line once the LM has it). Audio
files are numbered in the order their names are reserved, after any file already in the folder. The
data root is ``GLMVOICE_HOME`` when set, else the platform data folder. Loading tolerates a last
line cut by a crash (skipped, with a warning); resuming drops that fragment before appending.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from glmvoice_cli.audio.io import write_audio
from glmvoice_cli.config import SAMPLE_RATE_IN, SAMPLE_RATE_OUT
from glmvoice_cli.errors import GlmVoiceError
from glmvoice_cli.events import TurnTimings
from glmvoice_cli.files import fsync_dir, loads_json, read_limited, write_file
from glmvoice_cli.models.settings import APP_NAME, ENV_HOME, check_env_folder
from glmvoice_cli.sessions.lock import LOCK_FILE

SESSIONS_SUBDIR = "sessions"
TRANSCRIPT_FILE = "transcript.jsonl"
META_FILE = "meta.json"
AUDIO_SUBDIR = "audio"
FORMAT_VERSION = 2  # bumped when a field changes meaning (2: timings count from the end of voice, full breakdown)
ID_TIME_FORMAT = "%Y%m%d-%H%M%S"  # UTC, so IDs sort by creation time
ID_RANDOM_BYTES = 2  # 4 hex characters: two sessions started in the same second still differ
ID_ATTEMPTS = 8  # fresh random suffixes tried before giving up on a free folder name
ROLES = ("user", "assistant")
TRANSCRIPT_MAX_BYTES = 1 << 30  # years of talk (a turn's line is a few KiB): anything larger is not a transcript
META_MAX_BYTES = 1 << 20  # meta.json is a few hundred bytes: anything past a MiB is not one


class SessionError(GlmVoiceError):
    """A session folder cannot be created, written or read."""


class SessionNotFoundError(SessionError):
    """No saved session has the given ID or path."""


@dataclass(frozen=True)
class TurnRecord:
    """One line of transcript.jsonl."""

    role: str  # "user" | "assistant"
    audio: str | None  # the turn's wav, relative to the session folder; None for a typed or silent turn
    text: str | None  # transcript, typed text or the assistant's text; None where there is none
    token_ids: tuple[int, ...]  # the ids the LM history keeps for this turn (trimmed when interrupted)
    interrupted: bool  # assistant turns cut by barge-in; always False for user turns
    timings: dict[str, Any] | None  # TurnTimings.to_dict() for assistant turns
    created: str  # ISO 8601, UTC
    duration_s: float | None = None  # seconds of audio in `audio`
    reason: str | None = None  # assistant turns: why the answer ended (TurnEnded.reason), e.g. "context_full"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["token_ids"] = list(self.token_ids)
        return data

    @classmethod
    def from_json(cls, data: Any) -> TurnRecord:
        """Parse one decoded line; ValueError or TypeError says what is wrong with it."""
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("role") not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {data.get('role')!r}")
        ids = data.get("token_ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise TypeError("token_ids must be a list of integers")
        return cls(
            role=data["role"],
            audio=data.get("audio"),
            text=data.get("text"),
            token_ids=tuple(ids),
            interrupted=bool(data.get("interrupted", False)),
            timings=data.get("timings"),
            created=str(data.get("created", "")),
            duration_s=data.get("duration_s"),
            reason=data.get("reason") if isinstance(data.get("reason"), str) else None,
        )


class AudioFile(NamedTuple):
    """A turn's saved audio: its path relative to the session folder, and its length."""

    path: str
    duration_s: float


@dataclass(frozen=True)
class SavedSession:
    """A session read back from disk (what `--resume` starts from)."""

    id: str
    path: Path
    meta: dict[str, Any]
    turns: tuple[TurnRecord, ...]
    warnings: tuple[str, ...] = ()  # one line each: skipped lines, a missing meta.json


@dataclass(frozen=True)
class SessionInfo:
    """One row of list_sessions()."""

    id: str
    path: Path
    created: str | None
    mode: str | None
    turns: int  # complete transcript lines
    problem: str | None = None  # what is wrong with its meta.json (then created and mode are None)


def sessions_root() -> Path:
    """<GLMVOICE_HOME>/sessions when set, else <platform data folder>/sessions."""
    home = os.environ.get(ENV_HOME, "").strip()
    if home:
        return check_env_folder(ENV_HOME, Path(home).expanduser()) / SESSIONS_SUBDIR
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME)) / SESSIONS_SUBDIR


def new_session_id(now: datetime | None = None) -> str:
    """'20261125-092752-a3f1': UTC creation time and a short random suffix."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime(ID_TIME_FORMAT)}-{secrets.token_hex(ID_RANDOM_BYTES)}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


class SessionStore:
    """Appends the turns of one session to its folder from one thread at a time (audio_name: any thread)."""

    def __init__(self, path: Path, turns: Sequence[TurnRecord] = (), warnings: Sequence[str] = ()) -> None:
        self.path = path
        self.id = path.name
        self.turns: list[TurnRecord] = list(turns)
        self.warnings = tuple(warnings)
        self._lock = threading.Lock()
        self._names_lock = threading.Lock()  # apart from _lock, which is held across fsyncs
        self._last_number = max(len(self.turns), _highest_audio_number(path))  # audio files named so far

    @property
    def transcript_path(self) -> Path:
        return self.path / TRANSCRIPT_FILE

    @classmethod
    def create(
        cls,
        *,
        session_dir: str | Path | None = None,
        models: Mapping[str, str | Path] | None = None,
        mode: str = "voice",
        extra: Mapping[str, Any] | None = None,
    ) -> SessionStore:
        """A new, empty session in `session_dir`, else in a fresh folder under sessions_root().

        `models` maps stage name to the folder used; `extra` is merged into meta.json (JSON values).
        """
        path = _claim_folder(session_dir)
        meta = {
            "format": FORMAT_VERSION,
            "id": path.name,
            "created": _now(),
            "mode": mode,
            "models": {k: str(v) for k, v in (models or {}).items()},
            "sample_rates": {"user": SAMPLE_RATE_IN, "assistant": SAMPLE_RATE_OUT},
            **dict(extra or {}),
        }
        try:
            (path / AUDIO_SUBDIR).mkdir(exist_ok=True)
            write_file(path / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
            (path / TRANSCRIPT_FILE).touch()
            fsync_dir(path)
        except OSError as e:
            raise SessionError(f"cannot write session folder {path}: {_reason(e)}") from e
        return cls(path)

    @classmethod
    def resume(cls, ref: str | Path, root: Path | None = None) -> SessionStore:
        """Reopen a saved session (ID or folder) to append to it; a cut last line is dropped first."""
        saved = load_session(ref, root)
        check_own_files(saved.path)  # before any write: nothing may lead outside the folder
        try:
            _repair_tail(saved.path / TRANSCRIPT_FILE)
            (saved.path / AUDIO_SUBDIR).mkdir(exist_ok=True)
        except OSError as e:
            raise SessionError(f"cannot write session folder {saved.path}: {_reason(e)}") from e
        return cls(saved.path, saved.turns, saved.warnings)

    def append_user(
        self,
        samples: np.ndarray | None = None,
        *,
        text: str | None = None,
        token_ids: Sequence[int] = (),
        timings: TurnTimings | Mapping[str, Any] | None = None,
        sample_rate: int = SAMPLE_RATE_IN,
        audio: AudioFile | None = None,
    ) -> TurnRecord:
        """Save a user turn: its speech (n,) float32 at sample_rate Hz, or None for a typed turn.

        `audio`: the speech already saved by save_audio (then `samples` is not used).
        """
        audio = audio or self.save_audio("user", samples, sample_rate)
        return self._append("user", audio, text, token_ids, False, timings)

    def append_assistant(
        self,
        samples: np.ndarray | None = None,
        *,
        text: str | None = None,
        token_ids: Sequence[int] = (),
        interrupted: bool = False,
        timings: TurnTimings | Mapping[str, Any] | None = None,
        sample_rate: int = SAMPLE_RATE_OUT,
        reason: str | None = None,
        audio: AudioFile | None = None,
    ) -> TurnRecord:
        """Save an assistant turn: the audio played (n,) float32 at sample_rate Hz, its text and ids.

        `audio`: the audio already saved by save_audio (then `samples` is not used).
        """
        audio = audio or self.save_audio("assistant", samples, sample_rate)
        return self._append("assistant", audio, text, token_ids, interrupted, timings, reason)

    def _append(
        self,
        role: str,
        audio: AudioFile | None,
        text: str | None,
        token_ids: Sequence[int],
        interrupted: bool,
        timings: TurnTimings | Mapping[str, Any] | None,
        reason: str | None = None,
    ) -> TurnRecord:
        with self._lock:
            record = TurnRecord(
                role=role,
                audio=None if audio is None else audio.path,
                text=text if text else None,
                token_ids=tuple(int(i) for i in token_ids),
                interrupted=interrupted,
                timings=timings.to_dict() if isinstance(timings, TurnTimings) else _plain(timings),
                created=_now(),
                duration_s=None if audio is None else audio.duration_s,
                reason=reason,
            )
            _append_line(self.transcript_path, json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            self.turns.append(record)
            return record

    def amend_last_answer(self, token_ids: Sequence[int], text: str, heard_samples: int) -> TurnRecord | None:
        """The last answer was heard only in part (a client's truncate after it ended): its line and its audio
        are rewritten to what was heard, each whole or not at all. None when the last line is not an answer."""
        from dataclasses import replace

        with self._lock:
            if not self.turns or self.turns[-1].role != "assistant":
                return None
            record = self.turns[-1]
            duration = record.duration_s
            audio = inside(self.path, record.audio)
            if audio is not None and audio.is_file() and not audio.is_symlink():
                duration = self._trim_audio(audio, heard_samples)
            record = replace(record, token_ids=tuple(int(i) for i in token_ids), text=text or None,
                             interrupted=True, duration_s=duration)
            lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in [*self.turns[:-1], record])
            try:
                write_file(self.transcript_path, lines.encode("utf-8"))
            except OSError as e:
                raise SessionError(f"cannot rewrite {self.transcript_path}: {_reason(e)}") from e
            self.turns[-1] = record
            return record

    @staticmethod
    def _trim_audio(path: Path, samples: int) -> float:
        from glmvoice_cli.audio.io import read_audio

        audio = read_audio(path)  # at its own rate
        kept = audio.samples[: max(0, samples)]
        write_audio(path, kept, audio.sample_rate)
        return round(len(kept) / audio.sample_rate, 3)

    def audio_name(self, role: str) -> str:
        """Reserve the next audio file name for a turn of `role` (memory only: no disk access)."""
        with self._names_lock:
            self._last_number += 1
            return f"{AUDIO_SUBDIR}/{self._last_number:04d}-{role}.wav"

    def save_audio(
        self, role: str, samples: np.ndarray | None, sample_rate: int, name: str | None = None
    ) -> AudioFile | None:
        """Write a turn's wav (fsynced) under `name` (default: a fresh audio_name); None without audio."""
        if samples is None or len(samples) == 0:
            return None
        relative = name or self.audio_name(role)
        # a file left by a turn whose line was lost is kept; a link (even a dangling one) is never written through
        while (self.path / relative).exists() or (self.path / relative).is_symlink():
            relative = self.audio_name(role)
        # whole or not at all, fsynced (a full disk leaves no cut file for a later turn to trip on)
        write_audio(self.path / relative, np.asarray(samples, dtype=np.float32).reshape(-1), sample_rate)
        return AudioFile(relative, round(len(samples) / sample_rate, 3))


def _append_line(transcript: Path, line: str) -> None:
    """Append one line, fsynced; a failed write (a full disk) is cut off again, so the lines already saved
    stay the whole file and a later line never lands after a fragment."""
    data = line.encode("utf-8")
    try:
        fd = os.open(transcript, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "ab") as fh:
            size = fh.tell()
            try:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    fh.truncate(size)
                raise
    except OSError as e:
        raise SessionError(f"cannot append to {transcript}: {_reason(e)}") from e


def _highest_audio_number(path: Path) -> int:
    """The largest turn number among the audio files already in a session folder (0 if none)."""
    try:
        names = [p.name for p in (path / AUDIO_SUBDIR).iterdir()]
    except OSError:
        return 0
    numbers = [int(n[:4]) for n in names if n[:4].isdigit()]
    return max(numbers, default=0)


def _plain(timings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if timings is None else dict(timings)


def _claim_folder(session_dir: str | Path | None) -> Path:
    """Create the session folder; a given folder may exist but must not hold a transcript yet."""
    if session_dir is not None:
        path = Path(session_dir).expanduser()
        transcript = path / TRANSCRIPT_FILE
        if transcript.is_file() and transcript.stat().st_size > 0:
            raise SessionError(f"{path} already holds a session; continue it with --resume {path}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SessionError(f"cannot create session folder {path}: {_reason(e)}") from e
        check_own_files(path)
        return path
    root = sessions_root()
    for _ in range(ID_ATTEMPTS):
        path = root / new_session_id()
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise SessionError(f"cannot create session folder {path}: {_reason(e)}") from e
    raise SessionError(f"cannot find a free session folder name under {root}")


def _repair_tail(transcript: Path) -> None:
    """Before appending: end the file with a newline, dropping a fragment a crash left unparsable."""
    data = transcript.read_bytes() if transcript.exists() else b""
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        loads_json(data[cut:])
        complete = True
    except ValueError:  # not UTF-8, not JSON, or nested past the parser
        complete = False
    with transcript.open("r+b") as fh:
        if complete:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
        else:
            fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())


def resolve_session(ref: str | Path, root: Path | None = None) -> Path:
    """A session folder from an ID (under root) or a path; SessionNotFoundError otherwise."""
    root = root if root is not None else sessions_root()
    text = str(ref)
    is_name = not Path(text).is_absolute() and "/" not in text and os.sep not in text
    candidates = ([root / text] if is_name else []) + [Path(text).expanduser()]
    for path in candidates:
        if (path / TRANSCRIPT_FILE).is_file():
            return path
    if not is_name and Path(text).is_dir():
        if (Path(text) / LOCK_FILE).is_file():  # a chat starting in it holds the lock before its first file
            from glmvoice_cli.sessions.lock import SessionLock

            SessionLock.acquire(Path(text)).release()  # busy: says which process has it
        raise SessionNotFoundError(f"{text} is not a glmvoice session folder (no {TRANSCRIPT_FILE})")
    raise SessionNotFoundError(f"unknown session {text!r}: no such ID in {root} and no such folder")


def load_session(ref: str | Path, root: Path | None = None) -> SavedSession:
    """Read a session's meta and turns; bad lines are skipped with a warning, never fatal."""
    path = resolve_session(ref, root)
    warnings: list[str] = []
    meta, problem = read_meta(path)
    if problem:
        warnings.append(f"{path / META_FILE}: {problem}; using defaults")
    data = _read_transcript(path / TRANSCRIPT_FILE)
    turns = _parse_transcript(data, path / TRANSCRIPT_FILE, warnings)
    return SavedSession(path.name, path, meta, tuple(turns), tuple(warnings))


def _read_transcript(transcript: Path) -> bytes:
    """The transcript's bytes; a FIFO or device (which would block or never end) and a file past any real
    conversation's size are refused in one line."""
    try:
        if not stat.S_ISREG(os.stat(transcript).st_mode):
            raise SessionError(f"{transcript} is not a regular file")
        return read_limited(transcript, TRANSCRIPT_MAX_BYTES)
    except OSError as e:  # unreadable, or past the cap
        raise SessionError(f"cannot read {transcript}: {_reason(e)}") from e


def _parse_transcript(data: bytes, where: Path, warnings: list[str]) -> list[TurnRecord]:
    lines = data.split(b"\n")
    turns: list[TurnRecord] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            turns.append(TurnRecord.from_json(loads_json(raw)))
        except (ValueError, TypeError) as e:
            if number == len(lines):  # no newline after it: the write was cut
                warnings.append(f"{where}: last line is incomplete (cut by a crash?); skipped it")
            else:
                warnings.append(f"{where}: line {number} is not a valid turn ({e}); skipped it")
    return turns


def list_sessions(root: Path | None = None) -> list[SessionInfo]:
    """Saved sessions under root (default sessions_root()), oldest first."""
    root = root if root is not None else sessions_root()
    if not root.is_dir():
        return []
    found: list[SessionInfo] = []
    for path in root.iterdir():
        transcript = path / TRANSCRIPT_FILE
        if not transcript.is_file():
            continue
        meta, problem = read_meta(path)  # a damaged one leaves this session without a date, never breaks the list
        try:
            count = transcript.read_bytes().count(b"\n")
        except OSError:
            count = 0
        created, mode = _text(meta.get("created")), _text(meta.get("mode"))
        if problem is None and (created, mode) != (meta.get("created"), meta.get("mode")):
            problem = "created and mode must be text"
        found.append(SessionInfo(path.name, path, created, mode, count,
                                 None if problem is None else f"{path / META_FILE}: {problem}"))
    return sorted(found, key=lambda s: (s.created or "", s.id))


def _text(value: Any) -> str | None:
    """A meta field shown as text: a string, or None for anything else a damaged file holds."""
    return value if isinstance(value, str) else None


def read_meta(path: Path) -> tuple[dict[str, Any], str | None]:
    """A session's meta.json as a dict, and what is wrong with it (None: nothing). Never raises: a session is
    untrusted input, and one damaged file must not break the commands for every other session."""
    try:
        loaded = loads_json(read_limited(path / META_FILE, META_MAX_BYTES))
    except FileNotFoundError:
        return {}, "missing"
    except OSError as e:  # unreadable, or past the cap
        return {}, f"unreadable ({_reason(e)})"
    except ValueError as e:  # not UTF-8, not JSON, nested past the parser
        return {}, f"not valid JSON ({str(e).splitlines()[0][:80]})"
    if not isinstance(loaded, dict):
        return {}, "not a JSON object"
    return loaded, None


def inside(folder: Path, relative: str | None) -> Path | None:
    """`folder / relative` when `relative` (from a transcript line) names a path inside the folder, else None:
    an absolute path or one with '..' is refused, however the line came to hold it."""
    if not relative or not isinstance(relative, str):
        return None
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        return None
    return folder / candidate


_OWN_FILES = ((TRANSCRIPT_FILE, "file"), (META_FILE, "file"), (LOCK_FILE, "file"), (AUDIO_SUBDIR, "folder"))
AUDIO_ENTRIES_CHECKED = 100_000  # a session of that many turns is already beyond any real conversation


def check_own_files(folder: Path) -> None:
    """Refuse, in one line and before any write, a session folder whose own files or folders are links or
    special files: written through, they would put a chat's turns, audio or lock into files outside it."""
    for name, kind in _OWN_FILES:
        _check_entry(folder, name, kind)
    audio = folder / AUDIO_SUBDIR
    if not audio.is_dir():
        return
    try:
        with os.scandir(audio) as entries:
            for count, entry in enumerate(entries):
                if count >= AUDIO_ENTRIES_CHECKED:
                    break
                if entry.is_symlink():
                    raise SessionError(_refusal(folder, f"{AUDIO_SUBDIR}/{entry.name} is a symbolic link"))
    except OSError as e:
        raise SessionError(f"cannot read {audio}: {_reason(e)}") from e


def _refusal(folder: Path, what: str) -> str:
    return f"cannot write session folder {folder}: {what} (a session's files must be its own; remove it)"


def _check_entry(folder: Path, name: str, kind: str) -> None:
    try:
        mode = os.lstat(folder / name).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise SessionError(f"cannot read {folder / name}: {_reason(e)}") from e
    if stat.S_ISLNK(mode):
        raise SessionError(_refusal(folder, f"{name} is a symbolic link"))
    if kind == "file" and not stat.S_ISREG(mode):
        raise SessionError(_refusal(folder, f"{name} is not a regular file"))
    if kind == "folder" and not stat.S_ISDIR(mode):
        raise SessionError(_refusal(folder, f"{name} is not a folder"))
