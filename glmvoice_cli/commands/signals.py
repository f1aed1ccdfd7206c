"""SIGTERM and SIGHUP treated as Ctrl-C, and a second signal that cannot break the cleanup of the first.

`chat` and `tts` keep what was said when interrupted (the session's turn marked interrupted, the speech
written so far). Within `interrupts_as_keyboard()`, SIGINT, SIGTERM and SIGHUP all raise `Interrupted` (a
KeyboardInterrupt) in the main thread, so the one Ctrl-C path saves the work whichever signal came. Any
later signal is only noted: the cleanup it would otherwise cut (a file being renamed into place, the
session writer finishing its last turn, the interpreter's exit) runs to its end and the process exits as
cleanly as after the first. Each step of that cleanup is bounded (thread joins and device closes have
timeouts), so ignoring the later signals cannot hang the exit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
SHELL_SIGNAL_BASE = 128  # a process ended by signal N exits with 128 + N in the shell's convention


class Interrupted(KeyboardInterrupt):
    """The first SIGINT, SIGTERM or SIGHUP: handled exactly like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return SHELL_SIGNAL_BASE + self.signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal that caused it (130 for a plain Ctrl-C)."""
    return interrupt.exit_code if isinstance(interrupt, Interrupted) else SHELL_SIGNAL_BASE + signal.SIGINT


def describe(interrupt: KeyboardInterrupt) -> str:
    """'interrupted', or 'interrupted (SIGTERM)' when it was not Ctrl-C."""
    if isinstance(interrupt, Interrupted) and interrupt.signum != signal.SIGINT:
        return f"interrupted ({signal.Signals(interrupt.signum).name})"
    return "interrupted"


class _Handler:
    """Raises Interrupted for the first signal, then ignores the rest (counted, for tests and -v)."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread while the block runs (see the module
    docstring). Off the main thread (where Python cannot set handlers) it does nothing.

    After a signal the handlers stay installed, still ignoring: the process is on its way out and a second
    Ctrl-C must not print a traceback from the interpreter's shutdown. Without one they are restored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _Handler()
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum, old in previous.items():
        if old is not signal.SIG_IGN:  # `nohup glmvoice tts ...` keeps running when the terminal closes
            signal.signal(signum, handler)
    try:
        yield
    finally:
        if not handler.received:
            for signum, old in previous.items():
                signal.signal(signum, old)


def ignore_while_exiting() -> None:
    """The job is done and saved: a signal from here on (the interpreter's shutdown: thread joins, library
    teardown) must not turn a finished run into one killed by SIGTERM. Main thread of the CLI process only."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
