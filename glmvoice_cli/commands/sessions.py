"""`glmvoice sessions list|show|export|rm`: the saved conversations. No torch here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

sessions_app = typer.Typer(name="sessions", help="List, show, export and remove saved chat sessions.",
                           no_args_is_help=True, add_completion=False)

def complete_session(incomplete: str) -> list[str]:
    """Shell completion: 'last' and the saved sessions' IDs that start with what was typed."""
    from glmvoice_cli.sessions.store import list_sessions

    try:
        ids = ["last", *(s.id for s in list_sessions())]
    except Exception:  # noqa: BLE001 - completion must never print a traceback into the shell
        return []
    return [i for i in ids if i.startswith(incomplete)]


RefArg = Annotated[str, typer.Argument(help="A session ID, a unique start of one, 'last', or a folder.",
                                       show_default=False, autocompletion=complete_session)]


@sessions_app.command("list")
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per session.")] = False,
             folder: Annotated[Path | None, typer.Option(
                 "--dir", help="List the sessions in this folder (e.g. the --session-dir of `serve`).")] = None,
             ) -> None:
    """The saved sessions, oldest first, with their turn counts."""
    from glmvoice_cli.errors import UsageError
    from glmvoice_cli.sessions.store import list_sessions
    from glmvoice_cli.sessions.store import sessions_root as default_root

    if folder is not None and not folder.is_dir():
        raise UsageError(f"--dir {folder} is not a folder")

    def sessions_root() -> Path:
        return folder if folder is not None else default_root()

    found = list_sessions(sessions_root())
    for s in found:
        if s.problem:  # shown without its date or mode; the others are unaffected
            typer.secho(f"warning: {s.problem}", fg=typer.colors.YELLOW, err=True)
    if as_json:
        for s in found:
            typer.echo(json.dumps({"id": s.id, "created": s.created, "mode": s.mode, "turns": s.turns,
                                   "path": str(s.path)}))
        return
    if not found:
        typer.echo(f"no saved sessions in {sessions_root()}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sessions ({sessions_root()})", title_justify="left")
    for column in ("id", "created", "mode", "turns"):
        table.add_column(column)
    for s in found:
        table.add_row(s.id, (s.created or "?")[:19].replace("T", " "), s.mode or "?", str(s.turns))
    Console(soft_wrap=True).print(table)


@sessions_app.command("show")
def show(ref: RefArg, as_json: Annotated[bool, typer.Option("--json", help="One JSON object per turn.")] = False,
         ) -> None:
    """Print a session's conversation."""
    from glmvoice_cli.sessions.catalog import export_text, load

    session = load(ref)
    for warning in session.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(export_text(session, "jsonl" if as_json else "txt"), nl=False)


@sessions_app.command("export")
def export(
    ref: RefArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="md (Markdown), txt or jsonl (default: from the -o file's extension, else md).",
        autocompletion=lambda incomplete: [f for f in ("md", "txt", "jsonl") if f.startswith(incomplete)])] = None,
) -> None:
    """Export a session's conversation as Markdown, plain text or JSON lines."""
    from glmvoice_cli.errors import UsageError
    from glmvoice_cli.files import write_file
    from glmvoice_cli.sessions.catalog import export_text, load

    if fmt is None:
        by_suffix = {".md": "md", ".markdown": "md", ".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl"}
        fmt = by_suffix.get(output.suffix.lower(), "md") if output is not None else "md"
    text = export_text(load(ref), fmt)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        write_file(output, text.encode("utf-8"))  # whole or not at all: a failure keeps an existing file
    except OSError as e:
        raise UsageError(f"cannot write {output}: {e.strerror or e}") from e
    from glmvoice_cli.commands.conventions import note

    note(f"wrote {output}")


@sessions_app.command("rm")
def rm(
    refs: Annotated[list[str], typer.Argument(help="Sessions to delete (IDs, unique starts, 'last').")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete saved sessions (their transcript and audio)."""
    from glmvoice_cli.sessions.catalog import find_session, remove

    paths = list(dict.fromkeys(find_session(r) for r in refs))  # every name checked before deleting any
    for path in paths:
        if not yes and not typer.confirm(f"Delete session {path.name} ({path})?", default=False):
            typer.echo(f"{path.name}: kept")
            continue
        remove(path)
        typer.echo(f"{path.name}: deleted")
