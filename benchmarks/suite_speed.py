"""Test-suite speed, old commit against new, side by side on this machine in one run.

Each commit is exported (`git archive`) into its own temporary folder and its suite is run there with
the same Python, the same environment and the same golden fixtures, alternating old and new so that a
change in the machine's load touches both. The README's test command is the new side's command; the
old side runs what its own README said then (`python -m pytest -q`). The real-engine tests (marker
`vllm`) are left out of both: they time vLLM's start-up, not our suite.

    python benchmarks/suite_speed.py [--old d2060b7] [--new HEAD] [--rounds 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "d2060b7"  # the last commit before the suite was reorganised (issue 9's "before")
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def export(commit: str, into: Path) -> Path:
    """The tree of `commit` in `into/<sha>` (no .git: the suite runs on files only)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    folder = into / sha
    folder.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=ROOT, check=True,
                             capture_output=True).stdout
    tar_path = into / f"{sha}.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run_suite(folder: Path, golden: Path, extra: list[str]) -> dict[str, object]:
    """Wall time and outcome counts of one pytest run of the suite in `folder`."""
    env = {**os.environ, "PYTHONPATH": str(folder), "GLMVOICE_GOLDEN_DIR": str(golden), "CI": "1"}
    env.pop("GLMVOICE_VLLM_PYTHON", None)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not vllm", *extra]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    counts = {kind.rstrip("s"): int(n) for n, kind in SUMMARY.findall(tail)}
    return {"seconds": round(seconds, 1), "exit_code": done.returncode, "counts": counts, "summary": tail,
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default=BASELINE)
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--rounds", type=int, default=1, help="old/new pairs to run (alternating)")
    parser.add_argument("--golden", type=Path, default=Path(os.environ.get("GLMVOICE_GOLDEN_DIR",
                                                                             ROOT.parent / "shared" / "golden")))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, object]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="suite-speed-") as tmp:
        folders = {"old": export(args.old, Path(tmp)), "new": export(args.new, Path(tmp))}
        for _ in range(args.rounds):
            for side in ("old", "new"):
                result = run_suite(folders[side], args.golden.resolve(), [])
                runs[side].append(result)
                print(f"{side} ({folders[side].name}): {result['seconds']} s, {result['summary']}", flush=True)
    best = {side: min(float(r["seconds"]) for r in results) for side, results in runs.items()}  # type: ignore[arg-type]
    report = {
        "what": "the whole test suite (less the vLLM tests), old commit against new, alternating in one run",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "old": {"commit": folders["old"].name, "runs": runs["old"]},
        "new": {"commit": folders["new"].name, "runs": runs["new"]},
        "best_seconds": best,
        "speedup_new_over_old": round(best["old"] / best["new"], 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
