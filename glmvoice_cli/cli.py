"""The `glmvoice` command line: a thin adapter from flags to library calls.

Nothing heavy is imported here: torch, transformers and sounddevice are imported inside the
commands, so `glmvoice --help` and `--version` stay instant and work without PortAudio.
Library errors (GlmVoiceError) become one line on stderr and an exit code; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer import _click as click  # typer >= 0.29 carries its own Click
from typer.core import TyperGroup

from glmvoice_cli import __version__
from glmvoice_cli.commands import chat as _chat
from glmvoice_cli.commands import conventions, signals
from glmvoice_cli.commands import decode as _decode
from glmvoice_cli.commands import devices as _devices
from glmvoice_cli.commands import diagnostics as _diagnostics
from glmvoice_cli.commands import serve as _serve
from glmvoice_cli.commands import serve_lm as _serve_lm
from glmvoice_cli.commands import tokenize as _tokenize
from glmvoice_cli.commands import transcribe as _transcribe
from glmvoice_cli.commands import tts as _tts
from glmvoice_cli.commands.models import models_app
from glmvoice_cli.commands.sessions import sessions_app
from glmvoice_cli.errors import GlmVoiceError

_DEBUG_ENV = "GLMVOICE_DEBUG"


def _debug() -> bool:
    return "--debug" in sys.argv[1:] or os.environ.get(_DEBUG_ENV) == "1"


def _print_error(message: str) -> None:
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit: the only place errors are formatted."""
    _print_error(message)
    raise typer.Exit(code)


class _Group(TyperGroup):
    """The root: settings from flag/env/config for every option, -v/-q, and every error as one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conventions.add_verbosity(self)
        conventions.install_envvars(self)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        if parent is None:
            conventions.reset_verbosity()
            if "default_map" not in extra:
                extra["default_map"] = conventions.default_map_for(self)
        return super().make_context(info_name, args, parent=parent, **extra)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        def run() -> Any:
            return super(_Group, self).main(args, prog_name, complete_var, False, windows_expand_args, **extra)

        if not standalone_mode:
            return run()
        try:
            code = run()
        except click.exceptions.NoArgsIsHelpError:  # `glmvoice`, `glmvoice models`: the help was the answer
            sys.exit(0)
        except click.ClickException as e:  # usage errors: one line, like every other error
            _print_error(conventions.one_line(e))
            sys.exit(e.exit_code)
        except click.core.Abort as e:  # click's word for a Ctrl-C while it parses (or a declined prompt)
            if isinstance(e.__cause__, KeyboardInterrupt):
                _print_error("interrupted")
                sys.exit(signals.exit_code(e.__cause__))
            _print_error("aborted")
            sys.exit(1)
        except GlmVoiceError as e:  # raised while reading the config file, before any command
            if _debug():
                raise
            _print_error(str(e) or type(e).__name__)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    # typer passes its own Context (a click Context subclass; recent typer vendors click as typer._click)
    def invoke(self, ctx: typer.Context) -> object:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except GlmVoiceError as e:
            if _debug():
                raise
            fail(str(e) or type(e).__name__, e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP in chat and tts (commands.signals)
            if _debug():
                raise
            fail(signals.describe(e), signals.exit_code(e))


app = typer.Typer(
    cls=_Group,
    name="glmvoice",
    help="A local, streaming voice assistant around GLM-4-Voice.",
    epilog="Every option can also be set by the environment variable GLMVOICE_<NAME> (GLMVOICE_TOP_P for "
    "--top-p) or as the key <name> in config.toml; a flag beats the environment, which beats the file.",
    no_args_is_help=True,
    add_completion=True,
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
app.add_typer(sessions_app, name="sessions")
app.command("doctor")(_diagnostics.doctor)
app.command("selftest")(_diagnostics.selftest)
app.command("serve")(_serve.serve)
app.command("serve-lm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    _serve_lm.serve_lm)



def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:  # how every run ends: the job's own status, whatever signal arrives while exiting
        signals.ignore_while_exiting()
        raise
