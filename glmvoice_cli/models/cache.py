"""The Hugging Face cache layout: where `hf download`, transformers, vLLM and glmvoice share one copy.

A repository is cached as ``<hub cache>/models--<owner>--<name>/`` holding ``blobs/<etag>`` (the
content, named by its ETag), ``snapshots/<commit>/<file>`` (symlinks to the blobs) and
``refs/<branch>`` (the commit a branch pointed to when last fetched). The hub cache is, first found:
``$GLMVOICE_HOME/hub`` (glmvoice's own store, in the same layout), ``$HF_HUB_CACHE``,
``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``. All read at call
time (huggingface_hub reads them once, at import), and nothing here imports huggingface_hub.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from glmvoice_cli.errors import UsageError

HASH_CHUNK_BYTES = 8 * 1024 * 1024  # read size while hashing multi-GB shards
METADATA_DIR = Path(".cache") / "huggingface" / "download"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
REPO_PREFIX = "models--"
DEFAULT_BRANCH = "main"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def check_env_folder(name: str, path: Path) -> Path:
    """`path`, set by the environment variable `name`; a one-line UsageError naming the variable where it
    (or the nearest existing folder above it) is not a folder, before anything is written under it."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                where = "" if part == path else f" (under {part}, which is not a folder either)"
                raise UsageError(f"{name}={path} is not a folder{where}")
            break
    return path


def hub_cache_dir() -> Path:
    """Where model repositories are cached (see the module docstring for the order)."""
    home = _env_path("GLMVOICE_HOME")
    if home is not None:
        return check_env_folder("GLMVOICE_HOME", home) / "hub"
    explicit = _env_path("HF_HUB_CACHE")
    if explicit is not None:
        return check_env_folder("HF_HUB_CACHE", explicit)
    hf_home = _env_path("HF_HOME")
    if hf_home is not None:
        return check_env_folder("HF_HOME", hf_home) / "hub"
    xdg = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return xdg / "huggingface" / "hub"


def repo_dir(repo_id: str, cache: Path | None = None) -> Path:
    """``<cache>/models--THUDM--glm-4-voice-9b`` for ``THUDM/glm-4-voice-9b``."""
    return (cache or hub_cache_dir()) / (REPO_PREFIX + repo_id.replace("/", "--"))


def snapshots(repo_id: str, cache: Path | None = None, revision: str = DEFAULT_BRANCH) -> list[Path]:
    """The repository's snapshot folders, the one `revision` points to first, then newest first."""
    root = repo_dir(repo_id, cache)
    folder = root / "snapshots"
    if not folder.is_dir():
        return []
    found = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = root / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    except OSError:
        commit = revision
    pointed = folder / commit
    return ([pointed] if pointed in found else []) + [p for p in found if p != pointed]


def write_ref(repo_id: str, revision: str, commit: str, cache: Path | None = None) -> None:
    """Record that `revision` (a branch or tag) points to `commit`, as huggingface_hub does, so that tools
    asking for the branch offline find the snapshot; atomic, and skipped when already so."""
    ref = repo_dir(repo_id, cache) / "refs" / revision
    if revision == commit or (ref.is_file() and ref.read_text(encoding="utf-8").strip() == commit):
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    partial = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    partial.write_text(commit, encoding="utf-8")
    os.replace(partial, ref)


def true_size(folder: Path) -> int:
    """Bytes of the files under `folder`, following symlinks (a snapshot's files are links to blobs),
    each distinct file counted once."""
    if not folder.is_dir():
        return 0
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in folder.rglob("*"):
        try:
            st = path.stat()  # follows links
        except OSError:  # a dangling link
            continue
        if not path.is_file() or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_size
    return total


def blob_etag(path: Path) -> str | None:
    """The ETag of a cached snapshot file: the name of the blob its link points to, else None."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    return target.name.lower() if target.parent.name == "blobs" else None


def recorded_etag(folder: Path, filename: str) -> str | None:
    """The ETag huggingface_hub stored for `filename` in `folder` (a plain folder's metadata record, or
    the blob a cache snapshot's link points to), or None."""
    linked = blob_etag(folder / filename)
    if linked is not None:
        return linked
    record = folder / METADATA_DIR / f"{filename}.metadata"
    try:
        lines = record.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return lines[1].strip().strip('"').lower() if len(lines) >= 2 else None


def discard_download(folder: Path, filename: str) -> None:
    """Remove a downloaded file and its record: in the cache its blob too (huggingface_hub would otherwise
    hand the same bad blob back), in a plain folder its metadata (so the next download fetches it again)."""
    path = folder / filename
    if path.is_symlink():
        blob = path.resolve()
        path.unlink()
        blob.unlink(missing_ok=True)
    else:
        path.unlink(missing_ok=True)
    (folder / METADATA_DIR / f"{filename}.metadata").unlink(missing_ok=True)


def _digest(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algorithm)
    h.update(prefix)
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def matches_etag(path: Path, etag: str) -> bool | None:
    """Whether the file's content gives `etag`; None when the ETag is not a digest we know."""
    if _SHA256.fullmatch(etag):
        return _digest(path, "sha256") == etag
    if _SHA1.fullmatch(etag):  # git blob id: sha1 of "blob <size>\0" + content
        return _digest(path, "sha1", b"blob %d\0" % path.stat().st_size) == etag
    return None
