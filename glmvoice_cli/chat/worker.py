"""One model worker: a thread that owns every torch call and serves any number of conversations.

On a CPU, torch ops from two threads at once oversubscribe the OpenMP pool and run many times slower;
on a GPU, one stream of small kernels per conversation leaves the chip idle between them. So every
conversation's model work runs here, on one thread, cut into small units: a task is a generator that
does one unit (tokenize a block, prefill, a token or a few, one decoder block) between two `yield`s.

Each `yield` says what the task needs next:
- `READY`: more work now; the worker picks the next unit by need (below).
- `WAIT`: it waits on something outside the worker (the speaker playing out, the end of a turn, a
  remote LM's next token); it is asked again after `WAIT_S`, or at once when `wake()` is called.

Order by need: each task's `priority()` is a sort key, smallest first; the conversation core gives
(kind, seconds of queued audio left), so a confirmed answer whose speaker runs dry soonest goes first,
then listening work, then speculative answers, which are the first to wait under load. Equal keys take
turns (the least recently run first), so no conversation starves.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

READY = "ready"  # a task's yield: it has more work now
WAIT = "wait"  # a task's yield: nothing to do until something outside changes
WAIT_S = 0.01  # a waiting task is asked again after this long (or when woken)
JOIN_TIMEOUT_S = 10.0


_Task = TypeVar("_Task", bound="WorkerTask")


class WorkerTask(Protocol):
    """What the worker runs: a unit-by-unit generator, an ordering key, and a place to report a crash."""

    def steps(self) -> Generator[str, None, None]: ...

    def priority(self) -> tuple[float, ...]: ...

    def crashed(self, error: BaseException) -> None: ...


@dataclass
class _Entry:
    task: WorkerTask
    steps: Generator[str, None, None]
    order: int  # when it last ran (round robin among equal priorities)
    waiting: bool = False
    waited_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class ModelWorker:
    """Runs the units of every task added, one at a time, on one thread (see the module docstring)."""

    def __init__(self, prepare: Callable[[], None] | None = None, name: str = "glmvoice-model") -> None:
        self._prepare = prepare  # run first on the worker thread (the in-process LM records CUDA graphs)
        self._name = name
        self._entries: list[_Entry] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None
        self.units = 0  # units run so far (for benchmarks and tests)
        self._failed: BaseException | None = None  # `prepare` failed: every task hears it
        self._shared: dict[Hashable, WorkerTask] = {}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def add(self, task: WorkerTask) -> threading.Event:
        """Serve `task` from now on; the Event is set once its generator has ended."""
        entry = _Entry(task, task.steps(), next(self._counter))
        with self._cond:
            failed = self._failed
            if failed is None:
                self._entries.append(entry)
                self._cond.notify()
        if failed is not None:
            task.crashed(failed)
            entry.done.set()
        return entry.done

    def shared(self, key: Hashable, make: Callable[[], _Task]) -> _Task:
        """The task registered under `key`, made with `make()` and added on first use (a batcher that every
        conversation on this worker shares)."""
        with self._cond:
            task = self._shared.get(key)
            if task is None:
                task = self._shared[key] = make()
                fresh = True
            else:
                fresh = False
        if fresh:
            self.add(task)
        return task  # type: ignore[return-value]

    def wake(self) -> None:
        """Something a waiting task waits on may have changed: ask the waiting tasks again now."""
        with self._cond:
            for entry in self._entries:
                entry.waiting = False
            self._cond.notify()

    def stop(self) -> None:
        """End the thread after the unit under way (tasks not finished are dropped)."""
        self._stop.set()
        self.wake()

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def others_urgent(self, task: WorkerTask) -> bool:
        """Another task is ready with the most urgent kind of work (priority starting with 0: a confirmed
        answer): a speculative unit of `task` should give way (see `chat.answer`)."""
        with self._cond:
            others = [entry.task for entry in self._entries if entry.task is not task and not entry.waiting]
        return any(_key(other)[:1] == (0,) for other in others)

    def on_this_thread(self) -> bool:
        return self._thread is threading.current_thread()

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        import time

        try:
            if self._prepare is not None:
                self._prepare()
        except BaseException as e:  # noqa: BLE001 - every task hears about it
            with self._cond:
                self._failed = e
                entries, self._entries = self._entries, []
            for entry in entries:
                entry.task.crashed(e)
                entry.done.set()
            return
        while not self._stop.is_set():
            chosen = self._next(time.monotonic())
            if chosen is not None:
                self._run(chosen, time.monotonic)
        with self._cond:
            entries, self._entries = self._entries, []
        for entry in entries:  # stopped with work left: each task's cleanup runs here, on this thread
            try:
                entry.steps.close()
            except BaseException as e:  # noqa: BLE001
                entry.task.crashed(e)
            entry.done.set()

    def _next(self, now: float) -> _Entry | None:
        """The ready entry with the smallest (priority, last run), or None after a short wait."""
        with self._cond:
            for entry in self._entries:
                if entry.waiting and now - entry.waited_at >= WAIT_S:
                    entry.waiting = False
            ready = [entry for entry in self._entries if not entry.waiting]
            if not ready:
                self._cond.wait(WAIT_S)
                return None
        return min(ready, key=lambda entry: (_key(entry.task), entry.order))

    def _run(self, entry: _Entry, clock: Callable[[], float]) -> None:
        finished = False
        try:
            need = next(entry.steps)
        except StopIteration:
            finished = True
        except BaseException as e:  # noqa: BLE001 - the task's own handlers let this through: a bug
            entry.task.crashed(e)
            finished = True
        else:
            self.units += 1
            entry.order = next(self._counter)
            if need == WAIT:
                entry.waiting, entry.waited_at = True, clock()
        if finished:
            with self._cond:
                self._entries.remove(entry)
            entry.done.set()


def _key(task: WorkerTask) -> tuple[float, ...]:
    try:
        return task.priority()
    except Exception:  # noqa: BLE001 - a key must never stop the worker
        return (float("inf"),)
