"""Download progress: huggingface_hub's tqdm bars turned into calls on a `DownloadReporter` (the CLI draws them)."""

from __future__ import annotations

import functools
from typing import Any, Protocol


class DownloadReporter(Protocol):
    """Receives byte progress of each batch of files fetched, named "<stage>/<batch>" (e.g. "lm/weights").

    A batch's total grows as its files' sizes become known; bytes already on disk count as `initial`.
    Only files actually transferred are counted; the CLI renders them, the library never prints.
    """

    def file_started(self, name: str, total: int | None, initial: int) -> None: ...

    def file_advanced(self, name: str, n: int) -> None: ...

    def file_total(self, name: str, total: int) -> None: ...

    def file_finished(self, name: str) -> None: ...


@functools.cache  # one class for every download
def _reporter_bar_class() -> type:
    """`snapshot_download`'s `tqdm_class`: a `tqdm.auto.tqdm` that draws nothing and feeds a DownloadReporter.

    huggingface_hub instantiates it itself, with tqdm keyword arguments, for several bars: a count of files,
    the bytes written (its total grows as each file's size is known; this one feeds the reporter) and, since
    huggingface_hub 2.x, the network bytes of Xet transfers (ignored here). tqdm is imported here, with
    huggingface_hub, not when the CLI starts.
    """
    from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]

    class ReporterBar(tqdm):
        _bound: tuple[DownloadReporter | None, str] = (None, "")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            reporter, self._name = self._bound
            self._reporter: DownloadReporter | None = None  # tqdm's own setup of `total` is no news
            self._total: int | None = None
            super().__init__(*args, **{**kwargs, "disable": True})  # the CLI draws the bar, from the reporter
            if reporter is not None and _is_written_bytes_bar(kwargs):
                self._reporter = reporter
                reporter.file_started(self._name, self._total, int(self.n))

        @property
        def total(self) -> int | None:
            return self._total

        @total.setter
        def total(self, value: int | None) -> None:
            self._total = None if value is None else int(value)
            if self._reporter is not None and value is not None:
                self._reporter.file_total(self._name, int(value))

        def update(self, n: float | None = 1) -> bool | None:
            step = int(n or 0)
            self.n += step  # a disabled tqdm counts nothing itself
            if self._reporter is not None and step:
                self._reporter.file_advanced(self._name, step)
            return None

        def close(self) -> None:
            if self._reporter is not None:
                self._reporter.file_finished(self._name)
                self._reporter = None  # close may be called twice (context exit, then explicitly)
            super().close()

    return ReporterBar


def reporter_bar(reporter: DownloadReporter | None, name: str) -> type:
    """The tqdm class for one batch of files, bound to its reporter and batch name."""
    base = _reporter_bar_class()
    return type("BoundReporterBar", (base,), {"_bound": (reporter, name)})


def _is_written_bytes_bar(kwargs: dict[str, Any]) -> bool:
    """The bar of bytes written to disk: counted in bytes, and drawn with a total (the network-bytes bar of
    huggingface_hub 2.x has a format without one; the file-count bar has no unit)."""
    fmt = kwargs.get("bar_format")
    name = str(kwargs.get("name") or "")
    return kwargs.get("unit") == "B" and (fmt is None or "total" in fmt) and not name.endswith(".transfer")
