"""Checksums of downloaded model files against what the Hub said they were.

huggingface_hub records, for each file it downloads into a folder, the commit and the ETag it
saw in ``<folder>/.cache/huggingface/download/<file>.metadata`` (three lines: commit, ETag,
timestamp); in its cache, a snapshot's file is a link to ``blobs/<ETag>``. The ETag of a large (LFS) file is its SHA-256, that of a small file its git blob
SHA-1, so both can be recomputed locally. Files without such a record (folders written by
`selftest` or copied by hand) are reported as unverified, not as bad.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from glmvoice_cli.models.hub import Stage, inspect_stage

HASH_CHUNK_BYTES = 8 * 1024 * 1024  # read size while hashing multi-GB shards
METADATA_DIR = Path(".cache") / "huggingface" / "download"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Verification:
    """The outcome of checking one stage folder."""

    stage: Stage
    path: Path
    good: tuple[str, ...]  # files whose digest matches the recorded ETag
    bad: tuple[str, ...]  # files whose digest differs: corrupt or changed by hand
    unverified: tuple[str, ...]  # present files with no usable record
    missing: tuple[str, ...]  # required files absent or empty

    @property
    def ok(self) -> bool:
        return not self.bad and not self.missing


def recorded_etag(folder: Path, filename: str) -> str | None:
    """The ETag huggingface_hub stored for `filename` in `folder` (a plain folder's metadata record, or
    the blob a cache snapshot's link points to), or None."""
    from glmvoice_cli.models.cache import blob_etag

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


def verify_stage(stage: Stage, folder: Path) -> Verification:
    """Check every required file of `stage` in `folder` (reads all of them: seconds per GB)."""
    status = inspect_stage(stage, folder)
    good: list[str] = []
    bad: list[str] = []
    unverified: list[str] = []
    for name in status.required:
        if name in status.missing:
            continue
        etag = recorded_etag(status.path, name)
        verdict = matches_etag(status.path / name, etag) if etag else None
        {True: good, False: bad, None: unverified}[verdict].append(name)
    return Verification(stage, status.path, tuple(good), tuple(bad), tuple(unverified), status.missing)
