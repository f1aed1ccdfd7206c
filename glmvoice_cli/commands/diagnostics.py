"""`glmvoice doctor` and `glmvoice selftest`: is this machine ready, and does the pipeline work."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from glmvoice_cli.commands.common import DeviceOpt, DtypeOpt, QuantizeOpt, ThreadsOpt

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per check: area, status, detail, fix."
                                          )] = False,
    threads: ThreadsOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None,
) -> None:
    """Check versions, device and memory, audio devices, models and settings, with a fix for each problem."""
    from rich.console import Console
    from rich.markup import escape

    from glmvoice_cli.commands.doctor import FAIL, run_checks

    checks = run_checks(threads=threads, device=device, dtype=dtype, quantize=quantize)
    if as_json:
        for c in checks:
            typer.echo(json.dumps(dataclasses.asdict(c)))
        if any(c.status == FAIL for c in checks):
            raise typer.Exit(1)
        return
    console = Console(soft_wrap=True, highlight=False)  # one line per check: long paths stay whole
    for c in checks:
        console.print(f"[{STATUS_STYLE[c.status]}]{c.status:<5}[/] {c.area:<17} {escape(c.detail)}")
        if c.fix and c.status != "ok":
            console.print(f"{'':23}[bold]->[/] {escape(c.fix)}")
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        typer.secho(f"{len(failed)} problem(s) found: see 'what to do' above", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


def selftest(
    keep: Annotated[Path | None, typer.Option(
        "--keep", help="Leave the tiny model set here, so that --models DIR works with every command.")] = None,
) -> None:
    """Run tokenize, decode, tts, transcribe and a chat turn end to end on tiny random models (offline, no audio)."""
    from rich.console import Console
    from rich.table import Table

    from glmvoice_cli.commands.selftest import Step, prepare_kept_folder, run_selftest

    console = Console(soft_wrap=True)  # paths stay whole (a terminal wraps them; rich would fold mid-word)

    def show(step: Step) -> None:
        console.print(f"[green]ok[/] {step.name:<18} {step.seconds:6.2f} s  {step.detail}", highlight=False)

    if keep is not None:
        steps = run_selftest(prepare_kept_folder(keep), show)
    else:
        with tempfile.TemporaryDirectory(prefix="glmvoice-selftest-") as tmp:
            steps = run_selftest(Path(tmp), show)
    table = Table("stage", "seconds", box=None)
    for step in steps:
        table.add_row(step.name, f"{step.seconds:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{sum(s.seconds for s in steps):.2f}[/]")
    console.print(table)
    console.print("selftest passed" + (f"; models kept in {keep} (use --models {keep})" if keep else ""))
    from glmvoice_cli.audio.devices import portaudio_problem

    problem = portaudio_problem()
    if problem is not None:  # the selftest needs no audio devices, but `glmvoice chat` does
        typer.secho(f"warning: glmvoice chat cannot use a microphone or speaker: {problem}",
                    fg=typer.colors.YELLOW, err=True)
