"""How many CPU threads torch should use: the CPUs this process may run on, less those already busy.

torch's own default is every core; on a machine where other work keeps cores busy, that oversubscribes
them and a run gets several times slower (a seeded `tts` took 6.7-63.6 s with the default, a steady
5.5-6.3 s with one thread on a busy 2-core box). No torch here: doctor reports it without loading torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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
