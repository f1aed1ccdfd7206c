"""What every command shares: settings from flag, environment and config file, logging, one-line errors.

Every option of every command can be set three ways besides its default; the first found wins:

1. the flag on the command line (``--temperature 0.5``)
2. the environment variable ``GLMVOICE_<NAME>`` (``GLMVOICE_TEMPERATURE=0.5``; ``GLMVOICE_TOP_P``)
3. the key ``<name>`` in ``config.toml`` (``temperature = 0.5``), at the top (every command that has the
   option) or in a table named after one command (``[chat]``), which wins over the top

This is Click's own order (command line > ``envvar`` > ``default_map`` > default): we only give every
option its ``envvar`` and build the ``default_map`` from the config file. An option added to a command
is covered with nothing more to write. The model folder options (``--models``, ``--tokenizer``,
``--lm``, ``--decoder``) keep their own order in `glmvoice_cli.models.settings`, with the ``[paths]``
table; their names are still known keys of the file.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import _click as click  # typer >= 0.29 carries its own Click; its classes are these
from typer.core import TyperGroup, TyperOption

ENV_PREFIX = "GLMVOICE_"
# Options resolved by glmvoice_cli.models.settings.locate (a per-stage setting beats the shared one there).
MODEL_PATH_OPTIONS = frozenset({"models", "tokenizer", "lm", "decoder"})
# Parameters that are actions, not settings.
NOT_SETTINGS = frozenset({"help", "version", "install_completion", "show_completion"})
KNOWN_TABLES = frozenset({"paths"})  # [paths] tokenizer/lm/decoder: see models.settings
KNOWN_KEYS = frozenset({"models"})  # models = "DIR": see models.settings
LOGGER_NAME = "glmvoice_cli"

log = logging.getLogger(LOGGER_NAME)


def env_name(setting: str) -> str:
    """GLMVOICE_TOP_P for the setting top_p (the option --top-p)."""
    return ENV_PREFIX + setting.upper()


def setting_name(option: Any) -> str:
    """The name users see: the option's first long flag without dashes (--top-p: top_p; --json: json,
    whatever the Python parameter is called)."""
    flags = [o for o in getattr(option, "opts", []) if o.startswith("--")]
    return _normalise(flags[0][2:]) if flags else str(option.name)


def _leaf_commands(group: TyperGroup, prefix: str = "") -> dict[str, click.Command]:
    """Every runnable command by its path ('chat', 'models download')."""
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, TyperGroup):
            found.update(_leaf_commands(command, path + " "))
        else:
            found[path] = command
    return found


def _settings(command: click.Command) -> list[Any]:
    return [p for p in command.params if isinstance(p, TyperOption) and p.name
            and p.name not in NOT_SETTINGS and p.name not in MODEL_PATH_OPTIONS]


def install_envvars(root: TyperGroup) -> None:
    """Give every option of every command (and the root's) its GLMVOICE_<NAME> variable."""
    for command in [root, *_leaf_commands(root).values()]:
        for option in _settings(command):
            if option.envvar is None and option.name:
                option.envvar = env_name(setting_name(option))
                option.show_envvar = False  # one sentence in the root --help says it for all
            if getattr(option, "is_flag", False) and not getattr(option, "count", False) and option.metavar is None:
                option.metavar = ""  # a flag takes no value: show no "<bool>" type in --help


def _normalise(key: str) -> str:
    return key.strip().replace("-", "_")


def _config_value(option: Any, value: Any, base: Path) -> Any:
    """Relative paths in the file are taken from the file's folder, as for [paths]."""
    descriptor = getattr(option, "type_descriptor", None)
    if descriptor is not None and descriptor.is_path and isinstance(value, str) and value.strip():
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)
    return value


def build_default_map(root: TyperGroup, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Click's default_map (nested by command) from a parsed config file; unknown keys are logged."""
    commands = _leaf_commands(root)
    top_names = {setting_name(o) for c in [root, *commands.values()] for o in c.params if o.name}
    default_map: dict[str, Any] = {}
    top = {_normalise(k): v for k, v in config.items() if not isinstance(v, dict)}
    tables = {_normalise(k): v for k, v in config.items() if isinstance(v, dict)}
    for name in top:
        if name not in KNOWN_KEYS and (name not in top_names or name in NOT_SETTINGS):
            warn_unknown(path, name, (set(KNOWN_KEYS) | top_names) - set(NOT_SETTINGS))
    for name, table in tables.items():
        if name in KNOWN_TABLES:
            continue
        if name not in commands:
            warn_unknown(path, f"[{name}]", set(commands) | set(KNOWN_TABLES), brackets=True)
            continue
        names = {setting_name(o) for o in _settings(commands[name])}
        for key in table:
            if _normalise(key) not in names:
                warn_unknown(path, f"{name}.{key}", names, prefix=f"{name}.")
    for command_path, command in [("", root), *commands.items()]:
        values: dict[str, Any] = {}
        table = tables.get(command_path, {}) if command_path else {}
        table = {_normalise(k): v for k, v in table.items()}
        for option in _settings(command):
            key = setting_name(option)
            for source in (table, top):
                if key in source:
                    if isinstance(source[key], bool) and not getattr(option, "is_flag", False):
                        # Click would read `threads = true` as 1: a switch where a value belongs is a mistake
                        from glmvoice_cli.errors import UsageError

                        raise UsageError(f"config file {path}: key {key!r} takes a value, not "
                                         f"{str(source[key]).lower()}")
                    values[option.name] = _config_value(option, source[key], path.parent)
                    break
        node = default_map
        for part in command_path.split():
            node = node.setdefault(part, {})
        node.update(values)
    return default_map


def warn_unknown(path: Path, key: str, known: set[str] | None = None, brackets: bool = False,
                 prefix: str = "") -> None:
    """One line per unknown key, with the nearest known one (`prefix` + name) when there is a close match."""
    import difflib

    bare = key.strip("[]").removeprefix(prefix)
    close = difflib.get_close_matches(bare, sorted(known or ()), n=1, cutoff=0.75)
    hint = f"; did you mean {f'[{close[0]}]' if brackets else prefix + close[0]!r}?" if close else ""
    typer.secho(f"warning: {path}: unknown key {key!r} (ignored){hint}", fg=typer.colors.YELLOW, err=True)


def default_map_for(root: TyperGroup) -> dict[str, Any]:
    """The default_map from the user's config file (GLMVOICE_CONFIG or the platform one)."""
    from glmvoice_cli.models.settings import config_path, load_config

    path = config_path()
    return build_default_map(root, load_config(path), path)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _LowerLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def configure_logging(verbose: int, quiet: bool) -> None:
    """-q: errors only; default: warnings; -v: info; -vv: debug. Messages read 'warning: ...'."""
    if quiet:
        level = logging.ERROR
    elif verbose >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO if verbose == 1 else logging.WARNING
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LowerLevel())
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def is_quiet() -> bool:
    """True after -q: progress displays stay hidden."""
    return log.getEffectiveLevel() > logging.WARNING


def note(text: str) -> None:
    """A line on stderr that says what was done (`wrote out.wav`): shown unless -q (errors only)."""
    if not is_quiet():
        import typer

        typer.echo(text, err=True)


@dataclass
class _Verbosity:
    """The root's and the command's -v/-q add up."""

    verbose: int = 0
    quiet: bool = False


_verbosity = _Verbosity()


def _set_verbose(_ctx: click.Context, _param: click.Parameter, value: int) -> None:
    _verbosity.verbose = max(_verbosity.verbose, value or 0)
    configure_logging(_verbosity.verbose, _verbosity.quiet)


def _set_quiet(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    _verbosity.quiet = _verbosity.quiet or bool(value)
    configure_logging(_verbosity.verbose, _verbosity.quiet)


def reset_verbosity() -> None:
    """A fresh run (a test runner invokes the app many times in one process)."""
    _verbosity.verbose, _verbosity.quiet = 0, False
    configure_logging(0, False)


def verbosity_options() -> list[Any]:
    """-v/--verbose (repeatable) and -q/--quiet, for the root and every command (built by typer itself).

    Fresh copies each call (install_envvars sets attributes on each command's own options); typer builds
    the originals once per process, as a probe app costs milliseconds and every command of every start
    asks for them.
    """
    return [copy.copy(option) for option in _verbosity_templates()]


@functools.cache
def _verbosity_templates() -> tuple[Any, ...]:
    probe = typer.Typer()

    @probe.command()
    def _probe(
        verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, expose_value=False, metavar="",
                                             callback=_set_verbose,
                                             help="More messages on stderr; repeat for more (-vv: debug).")
                           ] = 0,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", expose_value=False, callback=_set_quiet,
                                            help="Only errors on stderr: no progress or warnings.")] = False,
    ) -> None:
        pass

    return tuple(p for p in typer.main.get_command(probe).params if p.name in ("verbose", "quiet"))


def add_verbosity(root: TyperGroup) -> None:
    """Give every command -v/-q, unless it already has a flag of that name."""
    for command in [root, *_leaf_commands(root).values()]:
        taken = {o for p in command.params for o in getattr(p, "opts", [])}
        command.params += [o for o in verbosity_options() if not taken.intersection(o.opts)]


def one_line(error: click.ClickException) -> str:
    """A usage error as one line, naming the command's --help."""
    message = error.format_message().strip().splitlines()
    line = message[0] if message else type(error).__name__
    ctx = getattr(error, "ctx", None)
    param = getattr(error, "param", None)
    if ctx is not None and param is not None and param.name:
        source = ctx.get_parameter_source(param.name)
        if source is click.core.ParameterSource.ENVIRONMENT:
            return f"{line} (from the environment variable {param.envvar})"
        if source is click.core.ParameterSource.DEFAULT_MAP:
            from glmvoice_cli.models.settings import config_path

            return f"{line} (from the key {setting_name(param)!r} of the config file {config_path()})"
    if isinstance(error, click.exceptions.UsageError) and ctx is not None:
        line += f" (see {ctx.command_path} --help)"
    return line
