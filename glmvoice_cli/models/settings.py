"""Where things are: the cache root, the config file, and the model folder each command uses.

A model folder is chosen, first match wins:

1. ``--tokenizer/--lm/--decoder PATH``, then ``--models DIR`` (``DIR/<stage>``)   command-line flags
2. ``GLMVOICE_TOKENIZER/_LM/_DECODER``, then ``GLMVOICE_MODELS``                  environment
3. ``[paths] tokenizer/lm/decoder``, then ``models`` in ``config.toml``            config file
4. the Hugging Face cache (a complete snapshot of the stage's repository), else
   ``<cache root>/models/<stage>`` (folders fetched by glmvoice before it used that cache)   cache

The Hugging Face cache is the one `hf download`, transformers and vLLM use (``HF_HUB_CACHE``,
``HF_HOME``; see `glmvoice_cli.models.cache`), or ``$GLMVOICE_HOME/hub`` when that is set.
The cache root is ``GLMVOICE_HOME``, else the platform cache folder. The config file is
``GLMVOICE_CONFIG``, else ``config.toml`` in the platform config folder; relative paths in it
are taken from its own folder. Everything is read when asked for, never at import.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmvoice_cli.errors import UsageError
from glmvoice_cli.models.cache import check_env_folder
from glmvoice_cli.models.hub import STAGES, get_stage, require_complete

APP_NAME = "glmvoice"
ENV_HOME = "GLMVOICE_HOME"
ENV_CONFIG = "GLMVOICE_CONFIG"
ENV_MODELS = "GLMVOICE_MODELS"
CONFIG_FILENAME = "config.toml"
MODELS_SUBDIR = "models"
CONFIG_PATHS_TABLE = "paths"  # [paths] tokenizer = "...", lm = "...", decoder = "..."
CONFIG_MODELS_KEY = "models"  # models = "DIR", a folder with tokenizer/, lm/, decoder/
CONFIG_MAX_BYTES = 1 << 20  # a settings file is a few hundred bytes; a bigger one was named by mistake


def stage_env(stage: str) -> str:
    """The environment variable that points one stage elsewhere, e.g. GLMVOICE_LM."""
    return f"GLMVOICE_{stage.upper()}"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def cache_root() -> Path:
    """GLMVOICE_HOME, else the platform cache folder (e.g. ~/.cache/glmvoice).

    GLMVOICE_HOME naming a file (not a folder, existing or yet to be made) is a one-line UsageError.
    """
    explicit = _env_path(ENV_HOME)
    if explicit is not None:
        return check_env_folder(ENV_HOME, explicit)
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME))


def models_root() -> Path:
    """The folder `glmvoice models download` fills: <cache root>/models."""
    return cache_root() / MODELS_SUBDIR


def stage_cache_dir(stage: str) -> Path:
    """The download cache folder of one stage: <cache root>/models/<stage>."""
    return models_root() / get_stage(stage).name


def config_path() -> Path:
    """GLMVOICE_CONFIG, else config.toml in the platform config folder (it need not exist)."""
    explicit = _env_path(ENV_CONFIG)
    if explicit is not None:
        return explicit
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_FILENAME


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The parsed config file, or {} when there is none.

    A folder, binary content, a file too large or nested too deeply to be a config file, or bad TOML
    is a one-line UsageError naming the file (and GLMVOICE_CONFIG when that chose it).
    """
    path = config_path() if path is None else path
    named = f" (from {ENV_CONFIG})" if path == _env_path(ENV_CONFIG) else ""
    if path == Path(os.devnull):
        return {}  # the documented way to run with no config file at all
    if path.is_dir():
        raise UsageError(f"config file {path}{named} is a folder, not a TOML file")
    if not path.exists():
        if named:
            # A name the user typed that matches nothing is a typo far more often than a wish for no config.
            raise UsageError(
                f"config file {path}{named} does not exist (set {ENV_CONFIG}={os.devnull} for no config file)"
            )
        return {}
    if not path.is_file():
        raise UsageError(f"config file {path}{named} is not a regular file")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:
            raise UsageError(f"config file {path}{named} is over {CONFIG_MAX_BYTES // 1024} KiB: not a config file")
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path}{named} is not UTF-8 text (byte {e.start}): not a TOML file") from e
    except RecursionError as e:
        raise UsageError(f"config file {path}{named} is nested too deeply to be a config file") from e
    except OSError as e:
        raise UsageError(f"cannot read config file {path}{named}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path}{named} is not valid TOML: {e}") from e


def _config_value(config: dict[str, Any], path: Path, keys: tuple[str, ...]) -> Path | None:
    """A path-valued key of the config file, relative to the file's folder; a non-string is an error."""
    node: Any = config
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if not isinstance(node, str) or not node.strip():
        raise UsageError(f"config file {path}: key {'.'.join(keys)!r} must be a non-empty path string")
    value = Path(node.strip()).expanduser()
    return value if value.is_absolute() else path.parent / value


@dataclass(frozen=True)
class ModelLocation:
    """Where one stage's folder is and which setting chose it."""

    stage: str
    path: Path
    source: str | None  # e.g. "--lm", "GLMVOICE_MODELS", "config.toml [paths] lm"; None: the cache

    @property
    def source_label(self) -> str:
        return self.source or "cache"


def locate(
    stage: str,
    *,
    models: str | Path | None = None,
    override: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> ModelLocation:
    """The folder `stage` is read from, following the precedence in this module's docstring.

    `override` is the per-stage flag (--tokenizer/--lm/--decoder), `models` the --models flag.
    `config` is the parsed config file (read from disk when None). Nothing is checked on disk.
    """
    name = get_stage(stage).name
    if override is not None and str(override).strip():
        return ModelLocation(name, Path(override).expanduser(), f"--{name}")
    if models is not None and str(models).strip():
        return ModelLocation(name, Path(models).expanduser() / name, "--models")
    for env, sub in ((stage_env(name), None), (ENV_MODELS, name)):
        value = _env_path(env)
        if value is not None:
            return ModelLocation(name, value / sub if sub else value, env)
    path = config_path()
    config = load_config(path) if config is None else config
    label = path.name
    direct = _config_value(config, path, (CONFIG_PATHS_TABLE, name))
    if direct is not None:
        return ModelLocation(name, direct, f"{label} [{CONFIG_PATHS_TABLE}] {name}")
    shared = _config_value(config, path, (CONFIG_MODELS_KEY,))
    if shared is not None:
        return ModelLocation(name, shared / name, f"{label} {CONFIG_MODELS_KEY}")
    return ModelLocation(name, cached_stage_dir(name), None)


def cached_stage_dir(stage: str) -> Path:
    """Where the cache holds `stage`: a complete Hugging Face snapshot, else a complete folder of an older
    glmvoice, else the newest (incomplete) snapshot, else the repository folder still to be filled."""
    from glmvoice_cli.models import cache
    from glmvoice_cli.models.hub import inspect_stage

    spec = get_stage(stage)
    snapshots = cache.snapshots(spec.repo_id)
    for snapshot in snapshots:
        if inspect_stage(spec, snapshot).complete:
            return snapshot
    legacy = stage_cache_dir(spec.name)
    if inspect_stage(spec, legacy).complete:
        return legacy
    return snapshots[0] if snapshots else cache.repo_dir(spec.repo_id)


def resolve_model_dir(
    stage: str,
    *,
    models: str | Path | None = None,
    override: str | Path | None = None,
) -> Path:
    """The folder of `stage` that a command should load, checked to hold every file it needs.

    Raises ModelNotFoundError with one line naming what is missing and, for the cache, the
    exact command that fetches it (``glmvoice models download lm``).
    """
    where = locate(stage, models=models, override=override)
    return require_complete(get_stage(where.stage), where.path, where.source)


def turn_model_path(models: str | Path | None = None) -> Path | None:
    """The Smart Turn model file: the `turn` stage's folder when complete (flag, environment, config, cache, as
    for the other stages), else the copy inside an installed `pipecat-ai`, else None."""
    import importlib.util

    from glmvoice_cli.models.hub import TURN, inspect_stage

    where = locate(TURN.name, models=models)
    if inspect_stage(TURN, where.path).complete:
        return where.path / TURN.files[0]
    spec = importlib.util.find_spec("pipecat")  # found without importing it (its import logs and is slow)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        bundled = Path(folder) / "audio" / "turn" / "smart_turn" / "data" / TURN.files[0]
        if bundled.is_file():
            return bundled
    return None


def resolve_models(
    *,
    models: str | Path | None = None,
    tokenizer: str | Path | None = None,
    lm: str | Path | None = None,
    decoder: str | Path | None = None,
    stages: tuple[str, ...] = tuple(STAGES),
) -> dict[str, Path]:
    """Checked folders for `stages` (all three by default), keyed by stage name.

    A command that needs only some stages (transcribe needs no decoder) passes them, so a
    missing decoder does not stop it.
    """
    overrides = {"tokenizer": tokenizer, "lm": lm, "decoder": decoder}
    return {s: resolve_model_dir(s, models=models, override=overrides[s]) for s in stages}

