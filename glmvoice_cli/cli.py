"""The `glmvoice` command line: a thin adapter from flags to library calls.

Nothing heavy is imported here: torch, transformers and sounddevice are imported inside the
commands, so `glmvoice --help` and `--version` stay instant and work without PortAudio.
Library errors (GlmVoiceError) become one line on stderr and an exit code; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, NoReturn

import typer
from typer.core import TyperGroup

from glmvoice_cli import __version__
from glmvoice_cli.commands import chat as _chat
from glmvoice_cli.commands import decode as _decode
from glmvoice_cli.commands import devices as _devices
from glmvoice_cli.commands import diagnostics as _diagnostics
from glmvoice_cli.commands import tokenize as _tokenize
from glmvoice_cli.commands import transcribe as _transcribe
from glmvoice_cli.commands import tts as _tts
from glmvoice_cli.commands.models import models_app
from glmvoice_cli.errors import GlmVoiceError

_DEBUG_ENV = "GLMVOICE_DEBUG"


def _debug() -> bool:
    return "--debug" in sys.argv[1:] or os.environ.get(_DEBUG_ENV) == "1"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit: the only place errors are formatted."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class _Group(TyperGroup):
    """Turns library errors into one line and an exit code, for every command."""

    # typer passes its own Context (a click Context subclass; recent typer vendors click as typer._click)
    def invoke(self, ctx: typer.Context) -> object:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except GlmVoiceError as e:
            if _debug():
                raise
            fail(str(e) or type(e).__name__, e.exit_code)
        except KeyboardInterrupt:
            if _debug():
                raise
            fail("interrupted", 130)


app = typer.Typer(
    cls=_Group,
    name="glmvoice",
    help="A local, streaming voice assistant around GLM-4-Voice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _version(value: bool) -> None:
    if value:
        typer.echo(f"glmvoice {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """A local, streaming voice assistant around GLM-4-Voice."""
    if debug:
        os.environ[_DEBUG_ENV] = "1"


app.command("chat")(_chat.chat)
app.command("tts")(_tts.tts)
app.command("transcribe")(_transcribe.transcribe)
app.command("tokenize")(_tokenize.tokenize)
app.command("decode")(_decode.decode)
app.command("devices")(_devices.devices)
app.add_typer(models_app, name="models")
app.command("doctor")(_diagnostics.doctor)
app.command("selftest")(_diagnostics.selftest)



def main() -> None:
    """Console-script entry point."""
    app()
