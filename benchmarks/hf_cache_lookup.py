"""Finding a model's snapshots in the Hugging Face cache: ours (`models.cache.snapshots`) against
huggingface_hub's public `scan_cache_dir`, on a synthetic shared cache (many repositories, many files each).

Every command that locates a model folder asks this once per stage, so its cost is paid on every start. Both
are checked to give the same folders in the same order (the one `refs/main` points to first, then newest).
JSON to stdout and `--out`.

    python benchmarks/hf_cache_lookup.py --out benchmarks/results/hf-cache-lookup-cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_io import emit

REPEATS = 5


def fill_cache(root: Path, repos: int, files: int) -> None:
    """`repos` repositories in the cache layout, each with one snapshot of `files` linked blobs."""
    for r in range(repos):
        repo = root / f"models--org--model{r}"
        commit = hashlib.sha1(str(r).encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir()
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        for f in range(files):
            blob = repo / "blobs" / hashlib.sha256(f"{r}-{f}".encode()).hexdigest()
            blob.write_bytes(b"x")
            os.symlink(os.path.relpath(blob, snapshot), snapshot / f"file{f}.bin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repos", type=int, default=40)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from huggingface_hub import scan_cache_dir

    from glmvoice_cli.models import cache

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fill_cache(root, args.repos, args.files)
        repo_id = f"org/model{args.repos // 2}"

        def ours() -> list[Path]:
            return cache.snapshots(repo_id, root)

        def library() -> list[Path]:
            found = next(r for r in scan_cache_dir(root).repos if r.repo_id == repo_id)
            ordered = sorted(found.revisions, key=lambda v: ("main" not in v.refs, -v.last_modified))
            return [Path(v.snapshot_path) for v in ordered]

        assert ours() == library(), "the two lookups disagree"
        timings = {}
        for name, lookup in (("ours", ours), ("scan_cache_dir", library)):
            start = time.perf_counter()
            for _ in range(REPEATS):
                lookup()
            timings[name] = round((time.perf_counter() - start) / REPEATS * 1000, 3)
    emit({"benchmark": "hf_cache_lookup", "machine": platform.processor() or platform.machine(),
          "repos": args.repos, "files_per_repo": args.files, "ms_per_lookup": timings,
          "ratio": round(timings["scan_cache_dir"] / max(timings["ours"], 1e-6), 1)}, args.out)


if __name__ == "__main__":
    main()
