"""glmvoice_cli.models.settings: cache root, config file and the precedence of model locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from glmvoice_cli.errors import ModelNotFoundError, UsageError
from glmvoice_cli.models import hub, settings

ENV_NAMES = ("GLMVOICE_MODELS", "GLMVOICE_TOKENIZER", "GLMVOICE_LM", "GLMVOICE_DECODER", "GLMVOICE_CONFIG")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    _write_config(tmp_path, "")  # an empty config file until a test writes one
    monkeypatch.setenv("GLMVOICE_CONFIG", str(tmp_path / "cfg" / "config.toml"))


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _complete(folder: Path, stage: hub.Stage) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(stage.files) + ([stage.single_weights] if stage.single_weights else [])
    for n in names:
        (folder / n).write_bytes(b"x")
    return folder


def test_cache_root_from_env_else_platformdirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GLMVOICE_HOME", str(tmp_path / "home"))
    assert settings.cache_root() == tmp_path / "home"
    assert settings.stage_cache_dir("lm") == tmp_path / "home" / "models" / "lm"
    monkeypatch.delenv("GLMVOICE_HOME")
    import platformdirs

    assert settings.cache_root() == Path(platformdirs.user_cache_dir("glmvoice"))


def test_config_path_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    monkeypatch.delenv("GLMVOICE_CONFIG")
    assert settings.config_path() == Path(platformdirs.user_config_dir("glmvoice")) / "config.toml"


# Each case: which settings are present, and which one must win for the lm stage.
PRECEDENCE = [
    ({"flag", "models_flag", "env", "env_models", "cfg", "cfg_models"}, "flag"),
    ({"models_flag", "env", "env_models", "cfg", "cfg_models"}, "models_flag"),
    ({"env", "env_models", "cfg", "cfg_models"}, "env"),
    ({"env_models", "cfg", "cfg_models"}, "env_models"),
    ({"cfg", "cfg_models"}, "cfg"),
    ({"cfg_models"}, "cfg_models"),
    (set(), "cache"),
]


@pytest.mark.parametrize(("present", "winner"), PRECEDENCE)
def test_flag_beats_env_beats_config_beats_cache(
    present: set[str], winner: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    places = {k: tmp_path / k for k in ("flag", "models_flag", "env", "env_models", "cfg", "cfg_models")}
    expected = {
        "flag": (places["flag"], "--lm"),
        "models_flag": (places["models_flag"] / "lm", "--models"),
        "env": (places["env"], "GLMVOICE_LM"),
        "env_models": (places["env_models"] / "lm", "GLMVOICE_MODELS"),
        "cfg": (places["cfg"], "config.toml [paths] lm"),
        "cfg_models": (places["cfg_models"] / "lm", "config.toml models"),
        "cache": (settings.cached_stage_dir("lm"), None),
    }
    if "env" in present:
        monkeypatch.setenv("GLMVOICE_LM", str(places["env"]))
    if "env_models" in present:
        monkeypatch.setenv("GLMVOICE_MODELS", str(places["env_models"]))
    lines = []
    if "cfg_models" in present:
        lines.append(f'models = "{places["cfg_models"]}"')
    if "cfg" in present:
        lines += ["[paths]", f'lm = "{places["cfg"]}"']
    _write_config(tmp_path, "\n".join(lines) + "\n")
    where = settings.locate(
        "lm",
        models=places["models_flag"] if "models_flag" in present else None,
        override=places["flag"] if "flag" in present else None,
    )
    assert (where.path, where.source) == expected[winner]
    assert settings.locate("decoder").stage == "decoder"  # other stages resolve independently


def test_config_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = _write_config(tmp_path, 'models = "weights"\n[paths]\ndecoder = "~/dec"\n')
    assert settings.locate("tokenizer").path == config.parent / "weights" / "tokenizer"
    assert settings.locate("decoder").path == Path("~/dec").expanduser()


@pytest.mark.parametrize("text", ["models = [1, 2\n", "models = 3\n", '[paths]\nlm = ""\n'])
def test_bad_config_is_a_one_line_usage_error(tmp_path: Path, text: str) -> None:
    config = _write_config(tmp_path, text)
    with pytest.raises(UsageError) as info:
        settings.locate("lm")
    message = str(info.value)
    assert str(config) in message and "\n" not in message


def test_flags_do_not_read_a_broken_config(tmp_path: Path) -> None:
    _write_config(tmp_path, "not toml at all [")
    assert settings.locate("lm", override=tmp_path / "x").path == tmp_path / "x"


def test_resolve_model_dir_checks_the_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        settings.resolve_model_dir("lm")
    message = str(info.value)
    assert "\n" not in message and "`glmvoice models download lm`" in message
    _complete(settings.stage_cache_dir("lm"), hub.LM)
    assert settings.resolve_model_dir("lm") == settings.stage_cache_dir("lm")

    monkeypatch.setenv("GLMVOICE_TOKENIZER", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelNotFoundError, match="GLMVOICE_TOKENIZER"):
        settings.resolve_model_dir("tokenizer")


def test_resolve_models_with_a_models_folder(tmp_path: Path) -> None:
    root = tmp_path / "M"
    for stage in hub.STAGES.values():
        _complete(root / stage.name, stage)
    paths = settings.resolve_models(models=root)
    assert paths == {"tokenizer": root / "tokenizer", "lm": root / "lm", "decoder": root / "decoder"}
    other_lm = _complete(tmp_path / "other_lm", hub.LM)
    assert settings.resolve_models(models=root, lm=other_lm, stages=("lm",)) == {"lm": other_lm}


def test_only_the_requested_stages_are_checked(tmp_path: Path) -> None:
    root = tmp_path / "M"
    _complete(root / "tokenizer", hub.TOKENIZER)
    _complete(root / "lm", hub.LM)
    found = settings.resolve_models(models=root, stages=("tokenizer", "lm"))
    assert set(found) == {"tokenizer", "lm"}
    with pytest.raises(ModelNotFoundError, match="decoder"):
        settings.resolve_models(models=root)


@pytest.mark.parametrize(("content", "said"), [
    (bytes(range(256)) * 4, "is not UTF-8 text"),
    ("a = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("a = " + "{x=" * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ("# padding\n" * 200_000, "KiB: not a config file"),
])
def test_a_config_file_that_is_no_config_is_one_line(tmp_path: Path, content: bytes | str, said: str) -> None:
    path = tmp_path / "cfg" / "config.toml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UsageError) as caught:
        settings.load_config()
    assert str(caught.value).startswith(f"config file {path} (from GLMVOICE_CONFIG) ") and said in str(caught.value)


def test_config_pointing_at_a_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "folder.toml").mkdir()
    monkeypatch.setenv("GLMVOICE_CONFIG", str(tmp_path / "folder.toml"))
    with pytest.raises(UsageError, match=r"GLMVOICE_CONFIG.* is a folder"):
        settings.load_config()


def test_glmvoice_config_naming_a_missing_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GLMVOICE_CONFIG", str(tmp_path / "cofnig.toml"))
    with pytest.raises(UsageError) as caught:
        settings.load_config()
    message = str(caught.value)
    assert "cofnig.toml (from GLMVOICE_CONFIG) does not exist" in message and os.devnull in message


def test_no_config_file_at_all_through_devnull_or_the_absent_platform_file(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GLMVOICE_CONFIG", os.devnull)
    assert settings.load_config() == {}
    # The platform file is optional: its absence is no error.
    assert settings.load_config(tmp_path / "never-written.toml") == {}


@pytest.mark.parametrize("below", ["", "home"])
def test_glmvoice_home_on_a_file_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    below: str) -> None:
    (tmp_path / "afile").write_bytes(b"\x00\xff")
    monkeypatch.setenv("GLMVOICE_HOME", str(tmp_path / "afile" / below))
    for where in (settings.cache_root, settings.models_root, lambda: settings.locate("lm")):
        with pytest.raises(UsageError, match=r"^GLMVOICE_HOME=.*afile.* is not a folder"):
            where()
    from glmvoice_cli.sessions.store import sessions_root

    with pytest.raises(UsageError, match=r"^GLMVOICE_HOME="):
        sessions_root()
