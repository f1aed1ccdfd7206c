"""Checksums of downloaded model files against what the Hub said they were.

huggingface_hub records, for each file it downloads into a folder, the commit and the ETag it
saw in ``<folder>/.cache/huggingface/download/<file>.metadata`` (three lines: commit, ETag,
timestamp); in its cache, a snapshot's file is a link to ``blobs/<ETag>``. The ETag of a large (LFS) file is its SHA-256, that of a small file its git blob
SHA-1, so both can be recomputed locally. Files without such a record (folders written by
`selftest` or copied by hand) are reported as unverified, not as bad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmvoice_cli.models.cache import discard_download, matches_etag, recorded_etag
from glmvoice_cli.models.hub import Stage, inspect_stage

__all__ = ["Verification", "discard_download", "matches_etag", "recorded_etag", "verify_stage"]


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
