"""`glmvoice models download|list|path|rm`: the model files on disk.

A thin adapter over `glmvoice_cli.models.hub` (what each stage needs, downloading) and
`glmvoice_cli.models.settings` (where each stage lives). Progress goes to stderr through Rich; results
go to stdout. No torch here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glmvoice_cli.errors import CheckpointError, ModelNotFoundError
from glmvoice_cli.models import hub, integrity, settings

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from glmvoice_cli.models.memory_need import MemoryNeed

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
    turn = "turn"
    all = "all"


def _stages(which: Which) -> list[hub.Stage]:
    return list(hub.STAGES.values()) if which is Which.all else [hub.get_stage(which.value)]  # all: the pipeline


def human_size(n: int) -> str:
    """Decimal units, as the Hub shows them: 1.46 GB, 445.0 MB, 12 kB."""
    if n >= _BYTES_PER_GB:
        return f"{n / _BYTES_PER_GB:.2f} GB"
    if n >= _BYTES_PER_MB:
        return f"{n / _BYTES_PER_MB:.1f} MB"
    if n >= 1_000:
        return f"{n / 1_000:.0f} kB"
    return f"{n} B"


def _cache_targets(stage: hub.Stage) -> list[Path]:
    """What `models rm` deletes for a stage in the cache: its repository in the Hugging Face cache and
    the folder an older glmvoice filled, those that exist."""
    from glmvoice_cli.models import cache

    return [p for p in (cache.repo_dir(stage.repo_id), settings.stage_cache_dir(stage.name)) if p.exists()]


class _RichReporter:
    """progress.DownloadReporter feeding one overall Rich bar over every file of every stage fetched: files
    download in parallel, so one row per file (or per stage) would jump around; the total grows as
    each batch's sizes become known."""

    def __init__(self, progress: Progress, label: str) -> None:
        import threading

        self._progress = progress
        self._lock = threading.Lock()  # batches report from several download threads
        self._totals: dict[str, int] = {}
        self.task: TaskID = progress.add_task(label, total=None)

    def file_started(self, name: str, total: int | None, initial: int) -> None:
        self.file_total(name, total or 0)
        self._progress.advance(self.task, initial)

    def file_advanced(self, name: str, n: int) -> None:
        self._progress.advance(self.task, n)

    def file_total(self, name: str, total: int) -> None:
        with self._lock:
            self._totals[name] = total
            self._progress.update(self.task, total=sum(self._totals.values()) or None)

    def file_finished(self, name: str) -> None:
        pass  # the bar stays as drawn: full on success, partial on failure


def _progress(console: Console) -> Progress:
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
        console=console,
    )


def _download_stages(
    jobs: list[tuple[hub.Stage, Path | None]],
    *,
    revision: str = hub.DEFAULT_REVISION,
    force: bool = False,
    quiet: bool = False,
) -> Iterator[hub.StageStatus]:
    """Download each (stage, folder or None for the Hugging Face cache) in turn, yielding its status when
    done; one overall progress bar on stderr for all of them, unless quiet, -q or stderr is not a terminal."""
    from rich.console import Console

    from glmvoice_cli.commands.conventions import is_quiet

    console = Console(stderr=True)
    if quiet or is_quiet() or not console.is_terminal:
        for stage, dest in jobs:
            yield hub.download_stage(stage, dest, revision=revision, force=force)
        return
    if not hub.is_offline() and not (not force and all(hub.complete_copy(s, d) for s, d in jobs)):
        hub.check_reachable()  # before drawing a bar: an unreachable host is one line, nothing else
    with _progress(console) as progress:
        reporter = _RichReporter(progress, jobs[0][0].name if jobs else "")
        for stage, dest in jobs:
            progress.update(reporter.task, description=stage.name)
            yield hub.download_stage(stage, dest, revision=revision, force=force, reporter=reporter)


@models_app.command("download")
def download(
    which: Annotated[Which, typer.Argument(help="Which model to fetch.")] = Which.all,
    models: Annotated[
        Path | None,
        typer.Option("--models", "--dir", help="Download into DIR/<model> instead of the cache (for --models DIR)."),
    ] = None,
    revision: Annotated[str, typer.Option(help="Branch, tag or commit of the repositories.")] = "main",
    force: Annotated[bool, typer.Option("--force", help="Fetch every file again.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    no_weights: Annotated[bool, typer.Option(
        "--no-weights", help="For the LM, only its config and tokenizer (enough with --lm-url).")] = False,
) -> None:
    """Fetch model files from the Hugging Face Hub.

    Only the files each model needs; files already present and unchanged are kept, and a cut
    transfer resumes. Honours HF_ENDPOINT (a mirror), HF_TOKEN and HF_HUB_OFFLINE.
    """
    root = models  # --models DIR (or the older --dir): DIR/<model>
    jobs = [(hub.stage_files(chosen.name, weights=not no_weights), root / chosen.name if root is not None else None)
            for chosen in _stages(which)]
    done: list[hub.StageStatus] = []
    try:
        done.extend(_download_stages(jobs, revision=revision, force=force, quiet=quiet))
    finally:  # on stdout once the bar is gone, also for the stages done before a failure
        for status in done:
            typer.echo(f"{status.stage.name}: {status.state}, {human_size(status.size_bytes)} in {status.path}")


def ensure_models(
    stages: tuple[str, ...],
    *,
    models: str | Path | None = None,
    overrides: Mapping[str, str | Path | None] | None = None,
    offer: bool | None = None,
    memory: MemoryNeed | None = None,
    lm_weights: bool = True,
) -> dict[str, Path]:
    """Checked model folders for a command, offering to download what the cache lacks.

    The offer (one prompt on stderr, with the total size) is made only for stages that would
    come from the cache, online, and when `offer` is True or (None) stdin and stderr are
    terminals; otherwise the first missing stage raises its one-line ModelNotFoundError.
    `memory` (a glmvoice_cli.models.memory_need.MemoryNeed) that does not fit turns the offer into that advice.
    `lm_weights=False` (the LM on a server) needs and offers only the LM's config and tokenizer.
    """
    overrides = overrides or {}
    where = {s: settings.locate(s, models=models, override=overrides.get(s)) for s in stages}
    need = {s: hub.stage_files(s, weights=lm_weights) for s in stages}
    absent = [s for s in stages if where[s].source is None and not hub.inspect_stage(need[s], where[s].path).complete]
    if offer is None:
        offer = sys.stdin.isatty() and sys.stderr.isatty()
    if absent and offer and not hub.is_offline():
        if memory is not None and not memory.fits:  # say so before offering gigabytes that cannot load
            raise ModelNotFoundError(f"{memory.advice()} (to download anyway: glmvoice models download "
                                     f"{' '.join(absent) if len(absent) == 1 else 'all'})")
        total = sum(need[s].approx_bytes for s in absent)
        names = ", ".join(f"{s} ({human_size(need[s].approx_bytes)})" for s in absent)
        if typer.confirm(f"Not downloaded yet: {names}. Download {human_size(total)} now?", err=True):
            for status in _download_stages([(need[s], None) for s in absent]):
                where[status.stage.name] = settings.ModelLocation(status.stage.name, status.path, None)
    return {s: hub.require_complete(need[s], where[s].path, where[s].source) for s in stages}


def _inspect(stage: hub.Stage, root: Path | None) -> tuple[settings.ModelLocation, hub.StageStatus]:
    if root is not None:
        where = settings.ModelLocation(stage.name, root / stage.name, "--models")
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
    models: Annotated[
        Path | None,
        typer.Option("--models", "--dir", help="Inspect DIR/<model> instead.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per model, one per line.")] = False,
) -> None:
    """Show each model: complete or not, size on disk, folder, and which setting chose it."""
    root = models  # --models DIR (or the older --dir): DIR/<model>
    found = [_inspect(stage, root) for stage in hub.ALL_STAGES.values()]
    rows = [_row(where, status) for where, status in found]
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    from rich.console import Console
    from rich.table import Table

    from glmvoice_cli.models import cache

    table = Table(title=f"models (Hugging Face cache: {cache.hub_cache_dir()})", title_justify="left")
    for column in ("model", "state", "size", "from"):
        table.add_column(column, overflow="fold")
    for r in rows:
        state = str(r["state"])
        missing = r["missing"]
        if isinstance(missing, list) and missing and state != "absent":
            state += f" (missing {len(missing)})"
        style = "green" if r["complete"] else "yellow"
        size_bytes = r["size_bytes"]
        size = human_size(size_bytes if isinstance(size_bytes, int) else 0)
        table.add_row(str(r["model"]), f"[{style}]{state}[/]", size, str(r["source"]))
    Console(soft_wrap=True).print(table)
    for r in rows:  # whole, each on its own line: a path folded mid-word in a table cell cannot be copied
        typer.echo(f"{r['model']}: {r['path']}")
    # an optional model nobody fetched is not missing (the smart turn detector): only a partial one gets a hint
    for line in hub.describe_missing(status for _, status in found
                                     if status.stage.name in hub.STAGES or status.state == "incomplete"):
        typer.echo(f"hint: {line}")
    turn = next(status for _, status in found if status.stage.name == hub.TURN.name)
    bundled = None if turn.complete or root is not None else settings.turn_model_path()
    if bundled is not None:  # the detector runs from pipecat-ai's copy: "absent" alone would send people to download
        typer.echo(f"note: turn: not in the cache; chat and serve use the copy installed with pipecat-ai: {bundled}")
    lm_where, lm_status = next(item for item in found if item[1].stage.name == hub.LM.name)
    if not lm_status.complete and hub.inspect_stage(hub.LM_WITHOUT_WEIGHTS, lm_where.path).complete:
        typer.echo("hint: lm: its config and tokenizer are here, enough for --lm-url (the LM on a server)")


@models_app.command("path")
def path(
    which: Annotated[
        Which | None, typer.Argument(help="A model, or nothing for the cache root.", show_default=False)
    ] = None,
) -> None:
    """Print the Hugging Face cache glmvoice uses, or the folder a model is read from (flags aside)."""
    from glmvoice_cli.models import cache

    if which is None or which is Which.all:
        typer.echo(str(cache.hub_cache_dir()))
    else:
        typer.echo(str(settings.locate(which.value).path))


@models_app.command("rm")
def remove(
    which: Annotated[list[Which], typer.Argument(help="The models to delete from the cache (or all).",
                                                 show_default=False)],
    models: Annotated[
        Path | None,
        typer.Option("--models", "--dir", help="Delete DIR/<model> instead.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete the named models' files (only from the cache, or --models DIR; never folders set by env or
    config). The Hugging Face cache is shared with transformers, vLLM and `hf download`."""
    root = models  # --models DIR (or the older --dir): DIR/<model>
    stages = list({stage.name: stage for chosen in which for stage in _stages(chosen)}.values())
    for stage in stages:
        folders = [root / stage.name] if root is not None else _cache_targets(stage)
        folders = [f for f in folders if f.exists()]
        if not folders:
            elsewhere = settings.locate(stage.name) if root is None else None
            if elsewhere is not None and elsewhere.source is not None:
                typer.echo(f"{stage.name}: nothing to remove from the cache; the one in use is {elsewhere.path} "
                           f"(set by {elsewhere.source}), which glmvoice never deletes")
            else:
                typer.echo(f"{stage.name}: nothing to remove")
            continue
        size = human_size(sum(hub.folder_size(f) for f in folders))
        shared = "" if root is not None else (
            " Other tools that read the Hugging Face cache (transformers, vLLM, hf) share this copy.")
        where = ", ".join(map(str, folders))
        if not yes and not typer.confirm(f"Remove the {stage.name} model ({size}) at {where}?{shared}",
                                         default=False):
            typer.echo(f"{stage.name}: kept")
            continue
        freed = sum(hub.remove_stage(f) for f in folders)
        typer.echo(f"{stage.name}: removed {where} ({human_size(freed)} freed)")


@models_app.command("verify")
def verify(
    which: Annotated[Which, typer.Argument(help="Which model to check.")] = Which.all,
    models: Annotated[
        Path | None,
        typer.Option("--models", "--dir", help="Check DIR/<model> instead.")] = None,
) -> None:
    """Recompute the checksums of downloaded files and compare them with the Hub's."""
    root = models  # --models DIR (or the older --dir): DIR/<model>
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
