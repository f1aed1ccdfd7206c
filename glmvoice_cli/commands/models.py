"""`glmvoice models download|list|path|rm`: the model files on disk.

A thin adapter over `glmvoice_cli.models.hub` (what each stage needs, downloading) and
`glmvoice_cli.models.settings` (where each stage lives). Progress goes to stderr through Rich; results
go to stdout. No torch here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glmvoice_cli.errors import CheckpointError
from glmvoice_cli.models import hub, integrity, settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

models_app = typer.Typer(
    name="models",
    help="Download, list, locate and remove the GLM-4-Voice model files.",
    no_args_is_help=True,
    add_completion=False,
)

_BYTES_PER_GB = 1_000_000_000
_BYTES_PER_MB = 1_000_000


class Which(str, Enum):
    tokenizer = "tokenizer"
    lm = "lm"
    decoder = "decoder"
    all = "all"


def _stages(which: Which) -> list[hub.Stage]:
    return list(hub.STAGES.values()) if which is Which.all else [hub.get_stage(which.value)]


def human_size(n: int) -> str:
    """Decimal units, as the Hub shows them: 1.46 GB, 445.0 MB, 12 kB."""
    if n >= _BYTES_PER_GB:
        return f"{n / _BYTES_PER_GB:.2f} GB"
    if n >= _BYTES_PER_MB:
        return f"{n / _BYTES_PER_MB:.1f} MB"
    if n >= 1_000:
        return f"{n / 1_000:.0f} kB"
    return f"{n} B"


def _target(stage: hub.Stage, root: Path | None) -> Path:
    return root / stage.name if root is not None else settings.stage_cache_dir(stage.name)


class _RichReporter:
    """hub.DownloadReporter drawing one Rich progress row per transferred file."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def file_started(self, name: str, total: int | None, initial: int) -> None:
        self._tasks[name] = self._progress.add_task(name, total=total, completed=initial)

    def file_advanced(self, name: str, n: int) -> None:
        self._progress.advance(self._tasks[name], n)

    def file_total(self, name: str, total: int) -> None:
        self._progress.update(self._tasks[name], total=total)

    def file_finished(self, name: str) -> None:
        self._tasks.pop(name, None)  # the row stays as drawn: full on success, partial on failure


def _progress() -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _download_one(
    stage: hub.Stage,
    dest: Path,
    *,
    revision: str = hub.DEFAULT_REVISION,
    force: bool = False,
    quiet: bool = False,
) -> hub.StageStatus:
    if quiet:
        return hub.download_stage(stage, dest, revision=revision, force=force)
    with _progress() as progress:
        return hub.download_stage(
            stage, dest, revision=revision, force=force, reporter=_RichReporter(progress)
        )


@models_app.command("download")
def download(
    which: Annotated[Which, typer.Argument(help="Which model to fetch.")] = Which.all,
    root: Annotated[
        Path | None,
        typer.Option("--dir", help="Download into DIR/<model> instead of the cache (for --models DIR)."),
    ] = None,
    revision: Annotated[str, typer.Option(help="Branch, tag or commit of the repositories.")] = "main",
    force: Annotated[bool, typer.Option("--force", help="Fetch every file again.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Fetch model files from the Hugging Face Hub.

    Only the files each model needs; files already present and unchanged are kept, and a cut
    transfer resumes. Honours HF_ENDPOINT (a mirror), HF_TOKEN and HF_HUB_OFFLINE.
    """
    for stage in _stages(which):
        status = _download_one(stage, _target(stage, root), revision=revision, force=force, quiet=quiet)
        typer.echo(f"{stage.name}: {status.state}, {human_size(status.size_bytes)} in {status.path}")


def ensure_models(
    stages: tuple[str, ...],
    *,
    models: str | Path | None = None,
    overrides: Mapping[str, str | Path | None] | None = None,
    offer: bool | None = None,
) -> dict[str, Path]:
    """Checked model folders for a command, offering to download what the cache lacks.

    The offer (one prompt on stderr, with the total size) is made only for stages that would
    come from the cache, online, and when `offer` is True or (None) stdin and stderr are
    terminals; otherwise the first missing stage raises its one-line ModelNotFoundError.
    """
    overrides = overrides or {}
    where = {s: settings.locate(s, models=models, override=overrides.get(s)) for s in stages}
    absent = [
        s
        for s in stages
        if where[s].source is None and not hub.inspect_stage(hub.STAGES[s], where[s].path).complete
    ]
    if offer is None:
        offer = sys.stdin.isatty() and sys.stderr.isatty()
    if absent and offer and not hub.is_offline():
        total = sum(hub.STAGES[s].approx_bytes for s in absent)
        names = ", ".join(f"{s} ({human_size(hub.STAGES[s].approx_bytes)})" for s in absent)
        if typer.confirm(f"Not downloaded yet: {names}. Download {human_size(total)} now?", err=True):
            for s in absent:
                _download_one(hub.STAGES[s], where[s].path)
    return {s: hub.require_complete(hub.STAGES[s], where[s].path, where[s].source) for s in stages}


def _inspect(stage: hub.Stage, root: Path | None) -> tuple[settings.ModelLocation, hub.StageStatus]:
    if root is not None:
        where = settings.ModelLocation(stage.name, root / stage.name, "--dir")
    else:
        where = settings.locate(stage.name)
    return where, hub.inspect_stage(stage, where.path)


def _row(where: settings.ModelLocation, status: hub.StageStatus) -> dict[str, object]:
    stage = status.stage
    return {
        "model": stage.name,
        "repo": stage.repo_id,
        "state": status.state,
        "complete": status.complete,
        "size_bytes": status.size_bytes,
        "path": str(where.path),
        "source": where.source_label,
        "missing": list(status.missing),
    }


@models_app.command("list")
def list_models(
    root: Annotated[Path | None, typer.Option("--dir", help="Inspect DIR/<model> instead.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout.")] = False,
) -> None:
    """Show each model: complete or not, size on disk, folder, and which setting chose it."""
    found = [_inspect(stage, root) for stage in hub.STAGES.values()]
    rows = [_row(where, status) for where, status in found]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models (cache: {settings.models_root()})", title_justify="left")
    for column in ("model", "state", "size", "path", "from"):
        table.add_column(column, overflow="fold")
    for r in rows:
        state = str(r["state"])
        missing = r["missing"]
        if isinstance(missing, list) and missing and state != "absent":
            state += f" (missing {len(missing)})"
        style = "green" if r["complete"] else "yellow"
        size_bytes = r["size_bytes"]
        size = human_size(size_bytes if isinstance(size_bytes, int) else 0)
        table.add_row(str(r["model"]), f"[{style}]{state}[/]", size, str(r["path"]), str(r["source"]))
    Console(soft_wrap=True).print(table)
    for line in hub.describe_missing(status for _, status in found):
        typer.echo(f"hint: {line}")


@models_app.command("path")
def path(
    which: Annotated[
        Which | None, typer.Argument(help="A model, or nothing for the cache root.", show_default=False)
    ] = None,
) -> None:
    """Print the cache root, or the folder a model is read from (flags aside)."""
    if which is None:
        typer.echo(str(settings.cache_root()))
    elif which is Which.all:
        typer.echo(str(settings.models_root()))
    else:
        typer.echo(str(settings.locate(which.value).path))


@models_app.command("rm")
def remove(
    which: Annotated[Which, typer.Argument(help="Which model to delete from the cache.", show_default=False)],
    root: Annotated[Path | None, typer.Option("--dir", help="Delete DIR/<model> instead.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete downloaded model files (only the cache, or --dir; never folders set by env or config)."""
    for stage in _stages(which):
        folder = _target(stage, root)
        if not folder.exists():
            typer.echo(f"{stage.name}: nothing at {folder}")
            continue
        size = human_size(hub.folder_size(folder))
        if not yes and not typer.confirm(
            f"Remove the {stage.name} model ({size}) at {folder}?", default=False
        ):
            typer.echo(f"{stage.name}: kept")
            continue
        freed = hub.remove_stage(folder)
        typer.echo(f"{stage.name}: removed {folder} ({human_size(freed)} freed)")


@models_app.command("verify")
def verify(
    which: Annotated[Which, typer.Argument(help="Which model to check.")] = Which.all,
    root: Annotated[Path | None, typer.Option("--dir", help="Check DIR/<model> instead.")] = None,
) -> None:
    """Recompute the checksums of downloaded files and compare them with the Hub's."""
    failures: list[str] = []
    for stage in _stages(which):
        folder = root / stage.name if root is not None else settings.locate(stage.name).path
        result = integrity.verify_stage(stage, folder)
        line = f"{stage.name}: {len(result.good)} ok, {len(result.unverified)} without a checksum record"
        if result.bad or result.missing:
            line += f", {len(result.bad)} corrupt, {len(result.missing)} missing"
        typer.echo(line)
        if result.bad:
            failures.append(
                f"{stage.name} file {result.bad[0]} in {folder} does not match its checksum; "
                f"delete it and run `{stage.fetch_command}`"
            )
        elif result.missing:
            failures.append(
                f"{stage.name} in {folder} is missing {result.missing[0]}; run `{stage.fetch_command}`"
            )
    if failures:
        raise CheckpointError(failures[0])
