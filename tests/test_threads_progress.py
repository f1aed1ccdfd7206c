"""--threads and its default (the CPUs not already busy), and long steps' progress on stderr: shown on a
terminal, quiet when piped or with -q."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch

from glmvoice_cli import threads
from glmvoice_cli.commands import common
from glmvoice_cli.commands.conventions import configure_logging, reset_verbosity


@pytest.mark.parametrize(("cpus", "load", "expected"), [
    (8, 0.0, 8), (8, 5.6, 2), (8, 12.0, 1), (2, 1.4, 1), (4, None, 4),
])
def test_default_threads_leave_the_busy_cpus_alone(monkeypatch: pytest.MonkeyPatch, cpus: int,
                                                    load: float | None, expected: int) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(cpus)), raising=False)

    def loadavg() -> tuple[float, float, float]:
        if load is None:
            raise OSError("no load average here")
        return (load, load, load)

    monkeypatch.setattr(threads.os, "getloadavg", loadavg)
    choice = threads.default_threads()
    assert (choice.count, choice.cpus, choice.load) == (expected, cpus, load)


@pytest.fixture
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("_restore_threads")
def test_use_threads_sets_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert common.use_threads(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "default_threads", lambda: threads.ThreadChoice(3, 4, 1.0))
    assert common.use_threads(None) == 3 and torch.get_num_threads() == 3


def _stderr(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> io.StringIO:
    """Rich's stderr console, as a terminal that is not redrawn (TTY_INTERACTIVE=0) or as a pipe."""
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stderr", buffer)
    monkeypatch.setenv("TTY_COMPATIBLE", "1" if terminal else "0")
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    monkeypatch.setenv("COLUMNS", "80")
    return buffer


@pytest.mark.parametrize(("terminal", "quiet", "shown"), [(True, False, True), (False, False, False),
                                                           (True, True, False)])
def test_stage_progress_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch, terminal: bool, quiet: bool,
                                           shown: bool) -> None:
    err = _stderr(monkeypatch, terminal)
    configure_logging(0, quiet)
    try:
        with common.stage_progress("loading") as (stage, step):
            stage("decoder", "/models/decoder", None)
            step("compiling")
            stage("decoder", "/models/decoder", 1.25)
    finally:
        reset_verbosity()
    assert ("loading the decoder: 1.2 s" in err.getvalue()) is shown
    if not shown:
        assert err.getvalue() == ""
