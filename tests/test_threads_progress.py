"""--threads and its default (the CPUs not already busy), and long steps' progress on stderr: shown on a
terminal, quiet when piped or with -q."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from glmvoice_cli import threads
from glmvoice_cli.commands import common
from glmvoice_cli.commands.conventions import configure_logging, reset_verbosity
from glmvoice_cli.tiny.modelset import TinyModelSet


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


def test_on_passing_thread_returns_or_raises_what_its_thread_did() -> None:
    ran_on: list[threading.Thread] = []

    def work() -> int:
        ran_on.append(threading.current_thread())
        return 42

    assert threads.on_passing_thread(work) == 42
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()  # the thread has ended
    boom = ValueError("bad weights")
    with pytest.raises(ValueError) as caught:
        threads.on_passing_thread(lambda: (_ for _ in ()).throw(boom))
    assert caught.value is boom  # the very exception, its traceback kept for --debug


def test_models_load_on_a_thread_that_ends(tiny_models: TinyModelSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chat's model thread must hold the only OpenMP pool: loading on the caller's (main) thread would
    leave a second one (see threads.on_passing_thread)."""
    from glmvoice_cli.pipeline.assistant import Assistant

    loaded_on: list[threading.Thread] = []
    real_load = Assistant.load

    def load(*args: object, **kwargs: object) -> Assistant:
        loaded_on.append(threading.current_thread())
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Assistant, "load", load)
    dirs = tiny_models.dirs
    overrides: dict[str, Path | None] = {"tokenizer": dirs["tokenizer"], "lm": dirs["lm"], "decoder": dirs["decoder"]}
    stages = ("tokenizer", "lm", "decoder")
    assistant = common.load_assistant(stages, models=None, overrides=overrides, device="cpu", dtype=None,
                                      for_other_thread=True)
    assert assistant.speech_tokenizer is not None and assistant.decoder is not None
    assert loaded_on[0] is not threading.current_thread() and not loaded_on[0].is_alive()
    common.load_assistant(stages, models=None, overrides=overrides, device="cpu", dtype=None)
    assert loaded_on[1] is threading.current_thread()  # tts and transcribe run the models where they load them


def test_the_chat_loads_its_models_for_the_model_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from glmvoice_cli.commands import chat

    asked: list[bool] = []

    def load(*args: object, for_other_thread: bool = False, **kwargs: object) -> None:
        asked.append(for_other_thread)
        raise KeyboardInterrupt  # stop the command here: only the loading call is under test

    monkeypatch.setattr(chat, "load_assistant", load)
    with pytest.raises(KeyboardInterrupt):
        chat.chat(text=True, output=tmp_path / "answers.wav")  # a file, not the speaker
    assert asked == [True]
