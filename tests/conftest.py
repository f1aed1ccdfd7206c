"""Shared test setup: seeded, single-threaded torch, an isolated GLMVOICE_HOME, the golden folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.tiny.modelset import TinyModelSet

    from .warm_python import WarmPython

REPO_ROOT = Path(__file__).resolve().parent.parent

# OpenMP threads that wait for work sleep instead of spinning. The suite pins torch to 1 thread; on a
# machine whose cores are busy (CI running a server beside the tests, a developer's build) spinning threads
# steal the cores the working ones need, and a tiny decoder stream took 20x the CPU time it takes with
# passive waiting. It must be set before torch loads its OpenMP runtime, so here, before any test imports
# torch; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


COMPILE_GROUP = "torch-compile"
WARM_GROUP = "warm-python"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores. Part of the suite waits rather than computes (subprocesses
    starting, real-time playback, servers answering), and the extra worker fills some of those gaps: on 2
    cores, runs alternating, the suite less the vLLM tests took 83-85 s with 2 workers, 79-80 s with 3."""
    return (os.cpu_count() or 1) + 1


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Work units for the workers (`--dist loadgroup`), the longest first.

    A test module is one unit, as with loadscope (its module fixtures are built once). Two more units span
    modules. The tests marked `compiles` run one after another on one worker, so the first compiles the
    tiny LM cold and the rest find it in the session's compile cache (two workers compiling the same graph
    at once would both pay the cold compile). The tests that use the `warm_python` fixture run on one
    worker too, so that one warm Python serves them all. Units are handed out in the order of `items`
    (`--no-loadscope-reorder`): those two first, then modules with tests marked `slow`, then the rest,
    so that no long unit starts last while the other worker sits idle.
    """
    def group(item: pytest.Item) -> str:
        if item.get_closest_marker("compiles"):
            return COMPILE_GROUP
        return WARM_GROUP if "warm_python" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    first = {COMPILE_GROUP: 0, WARM_GROUP: 1}
    slow = {group(item) for item in items if item.get_closest_marker("slow")}
    order = {name: index for index, name in enumerate(dict.fromkeys(group(item) for item in items))}
    items.sort(key=lambda item: (first.get(group(item), 2), group(item) not in slow, order[group(item)]))


def golden_dir() -> Path | None:
    """The golden fixture folder, or None where a user's fresh clone simply lacks it.

    In CI (``CI`` set) or when ``GLMVOICE_GOLDEN_DIR`` is given, a missing folder is a failure,
    never a skip.
    """
    explicit = os.environ.get("GLMVOICE_GOLDEN_DIR")
    path = Path(explicit) if explicit else REPO_ROOT.parent / "shared" / "golden"
    if path.is_dir():
        return path
    if explicit or os.environ.get("CI"):
        pytest.fail(f"golden fixtures not found at {path} (GLMVOICE_GOLDEN_DIR / CI is set)")
    return None


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if path is None:
        pytest.skip("no golden fixture folder (set GLMVOICE_GOLDEN_DIR)")
    return path


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's cache, config, settings or the network from a test."""
    for name in list(os.environ):  # any GLMVOICE_<OPTION> of the user's shell would set a flag
        if name.startswith("GLMVOICE_") and name != "GLMVOICE_GOLDEN_DIR":
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("glmvoice_home")
    monkeypatch.setenv("GLMVOICE_HOME", str(home))
    monkeypatch.setenv("GLMVOICE_CONFIG", os.devnull)
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GLMVOICE_THREADS", "1")  # commands set torch's threads: keep the pinned count


@pytest.fixture(autouse=True, scope="session")
def _compile_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One torch.compile cache for the whole run (its workers and subprocesses too): the compiled-LM tests,
    the benchmark smoke tests and the GPU check compile the same tiny LM, so only the first pays for it.
    Inductor's cache is safe for concurrent processes. A cache the developer chose is left alone."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "torch-compile"
    shared.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(shared)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    """Numerical results move slightly with the thread count: pin it. One thread: the tiny models' ops are
    too small to split, so a second thread only adds hand-offs (a decoder stream took twice the CPU time with
    two), and the workers of `-n auto` already keep every core busy. The golden tests pass at one thread or
    two (their tolerances cover the reduction order)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModelSet:
    """One set of tiny random models in the official formats (tokenizer, lm, decoder), built once per run."""
    from glmvoice_cli.tiny.modelset import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("tiny_models"), codebook=64)


@pytest.fixture(scope="session")
def assistant(tiny_models: TinyModelSet) -> Assistant:
    """The tiny models loaded once, on the CPU; tests make their own conversations."""
    from glmvoice_cli.options import LoadOptions
    from glmvoice_cli.pipeline.assistant import Assistant

    return Assistant.load(tiny_models.dirs, LoadOptions(device="cpu", seed=0))


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmPython]:
    """A Python with torch and transformers imported, forking a fresh process per run (tests/warm_python.py):
    the signal, damage and benchmark tests start their real processes without paying the imports each."""
    from .warm_python import WarmPython

    server = WarmPython(tmp_path_factory.mktemp("warm"))
    yield server
    server.close()
