"""How much memory this process can still use, and a check that a planned allocation fits in it.

Model folders are checked against the machine rather than against fixed caps: a size that a real
checkpoint of another scale could have is accepted when it fits, and a hostile one (an upsampling
factor of 10^8, a million layers) is refused before anything is allocated, with an error naming the
file and the field.
"""

from __future__ import annotations

import os
from pathlib import Path

from glmvoice_cli.errors import CheckpointMismatchError

MEMINFO = Path("/proc/meminfo")
GIB = 1 << 30


def available_bytes() -> int:
    """Memory this process may still allocate: the machine's available memory, capped by RLIMIT_AS."""
    machine = machine_available()
    limits = [machine if machine is not None else 1 << 62]  # unknown: do not refuse on a guess
    soft = _address_space_limit()
    if soft is not None:
        limits.append(max(soft - _address_space_used(), 0))
    return min(limits)


def _address_space_limit() -> int | None:
    """RLIMIT_AS where the platform has one (Unix); None on Windows, which has no `resource` module."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def machine_available() -> int | None:
    """MemAvailable on Linux, else physical pages free where sysconf knows, else None."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_used() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def check_fits(n_bytes: float, where: Path | str, what: str) -> None:
    """Raise CheckpointMismatchError when `n_bytes` (an estimate) exceeds the memory left."""
    free = available_bytes()
    if n_bytes > free:
        raise CheckpointMismatchError(
            f"{where}: {what} would need about {n_bytes / GIB:.3g} GiB, more than the {free / GIB:.3g} GiB available"
        )
