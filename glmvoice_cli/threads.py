"""How many CPU threads torch should use, and which thread does its work.

How many: the CPUs this process may run on, less those already busy.

torch's own default is every core; on a machine where other work keeps cores busy, that oversubscribes
them and a run gets several times slower (a seeded `tts` took 6.7-63.6 s with the default, a steady
5.5-6.3 s with one thread on a busy 2-core box). No torch here: doctor reports it without loading torch.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
JOIN_POLL_S = 0.1  # the caller's wait steps: Ctrl-C reaches it between them


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    cpus: int  # CPUs this process may run on
    load: float | None  # 1-minute load average, where the platform has one


def available_cpus() -> int:
    """The CPUs this process may run on (affinity and cpusets count), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> ThreadChoice:
    """The available CPUs minus the busy ones (1-minute load average), at least 1."""
    cpus = available_cpus()
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        load = None
    idle = cpus if load is None else round(cpus - load)
    return ThreadChoice(count=max(1, min(cpus, idle)), cpus=cpus, load=load)


def on_passing_thread(fn: Callable[[], T], name: str = "glmvoice-load") -> T:
    """Run `fn` on a new thread that ends with it; return its result or raise its exception here.

    Why: on CPU, a thread that has run a parallel torch op keeps its OpenMP worker threads for as long as it
    lives. The chat computes on its own model thread. Had the main thread loaded the models, its idle workers
    would stay, the process would hold more OpenMP threads than cores, and libgomp then cuts its spin-waits
    short, so every op hands its work over through a sleep and a wake-up: on 2 cores the decoder's first
    block took 2.7 s on the model thread against 1.2-1.4 s with one pool (benchmarks/latency.py measures the
    chat). A thread that ends takes its workers with it. Ctrl-C reaches the caller while it waits.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
            failure.append(e)

    worker = threading.Thread(target=run, name=name, daemon=True)  # daemon: Ctrl-C need not wait for it
    worker.start()
    while worker.is_alive():
        worker.join(JOIN_POLL_S)
    if failure:
        raise failure[0]
    return result[0]


@contextlib.contextmanager
def after(seconds: float, action: Callable[[], None]) -> Iterator[None]:
    """Run `action` on a timer thread if the block is still running after `seconds` (a deadline, a note)."""
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
