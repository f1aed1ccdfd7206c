"""`glmvoice models download|list|path|rm` against a local fake hub (typer's CliRunner)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from glmvoice_cli.commands.models import ensure_models, human_size, models_app
from glmvoice_cli.errors import CheckpointError, ModelNotFoundError
from glmvoice_cli.models import cache, hub, settings
from tests.fake_hub import FakeHub, serving

runner = CliRunner()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with serving(monkeypatch, tmp_path) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _no_user_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GLMVOICE_MODELS", "GLMVOICE_TOKENIZER", "GLMVOICE_LM", "GLMVOICE_DECODER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLMVOICE_CONFIG", os.devnull)


def _listing(*args: str) -> dict[str, dict]:
    result = runner.invoke(models_app, ["list", "--json", *args])
    assert result.exit_code == 0, result.output
    return {row["model"]: row for row in map(json.loads, result.stdout.splitlines())}


def test_download_all_then_list(fake_hub: FakeHub) -> None:
    result = runner.invoke(models_app, ["download", "all"])
    assert result.exit_code == 0, result.output
    for name in hub.STAGES:
        assert f"{name}: complete" in result.stdout
    rows = _listing()
    assert rows.pop("turn")["state"] == "absent"  # optional: `download all` is the pipeline's three
    for name, row in rows.items():
        assert row["complete"] and row["missing"] == []
        assert row["path"] == str(settings.cached_stage_dir(name)) and row["source"] == "cache"
        assert Path(row["path"]).parent == cache.repo_dir(hub.STAGES[name].repo_id) / "snapshots"
        assert row["size_bytes"] > 0
    table = runner.invoke(models_app, ["list"])
    assert table.exit_code == 0 and table.stdout.count("complete") == 3 and "hint" not in table.stdout
    bundled = settings.turn_model_path()  # pipecat-ai (the dev extra) bundles the detector's model
    assert bundled is not None and "pipecat" in str(bundled)
    note = f"note: turn: not in the cache; chat and serve use the copy installed with pipecat-ai: {bundled}"
    assert note in table.stdout


def test_a_downloaded_turn_detector_needs_no_note(fake_hub: FakeHub) -> None:
    assert runner.invoke(models_app, ["download", "turn", "--quiet"]).exit_code == 0
    table = runner.invoke(models_app, ["list"])
    assert table.exit_code == 0 and "note:" not in table.stdout


def test_download_the_turn_detector_and_find_it_first(fake_hub: FakeHub, tmp_path: Path) -> None:
    result = runner.invoke(models_app, ["download", "turn", "--quiet"])
    assert result.exit_code == 0, result.output
    assert fake_hub.fetched() == {f"{hub.TURN.repo_id}/{hub.TURN.files[0]}"}
    found = settings.turn_model_path()
    assert found is not None and found.parent == settings.cached_stage_dir("turn")  # before pipecat-ai's copy
    assert _listing()["turn"]["complete"]
    path = runner.invoke(models_app, ["path", "turn"])
    assert path.exit_code == 0 and path.stdout.strip() == str(found.parent)


def test_download_one_stage_into_a_models_folder(fake_hub: FakeHub, tmp_path: Path) -> None:
    result = runner.invoke(models_app, ["download", "decoder", "--dir", str(tmp_path / "M"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert {n.rsplit("/", 1)[0] for n in fake_hub.fetched()} == {hub.DECODER.repo_id}
    assert settings.resolve_model_dir("decoder", models=tmp_path / "M") == tmp_path / "M" / "decoder"
    rows = _listing("--dir", str(tmp_path / "M"))
    assert rows["decoder"]["complete"] and rows["lm"]["state"] == "absent"


def _as_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich treats stderr as a terminal that is not redrawn: the bar is printed once, as it ends."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "0")


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_download_shows_rich_progress_on_stderr(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    _as_terminal(monkeypatch)
    result = runner.invoke(models_app, ["download", "tokenizer"])
    assert result.exit_code == 0, result.output
    bars = [line for line in _plain(result.stderr).splitlines() if line.startswith("tokenizer")]
    assert bars and "━" in bars[-1]  # one overall bar for the stage's parallel files
    assert "━" not in result.stdout  # stdout keeps the summary only


def test_download_all_is_one_bar_over_every_byte(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    _as_terminal(monkeypatch)
    result = runner.invoke(models_app, ["download", "all"])
    assert result.exit_code == 0, result.output
    bars = [line for line in _plain(result.stderr).splitlines() if "━" in line]
    assert len(bars) == 1, result.stderr  # not one per model
    total = sum(len(data) for name in fake_hub.fetched() for data in [_served(fake_hub, name)])
    assert f"{total / 1000:.1f}/{total / 1000:.1f} kB" in bars[0]  # bytes over all files of all stages


def _served(fake: FakeHub, name: str) -> bytes:
    repo, _, filename = name.rpartition("/")
    return fake.repos[repo][filename]


@pytest.mark.parametrize("args", [["-q"], []])
def test_download_progress_is_quiet_with_q_or_when_piped(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                                         args: list[str]) -> None:
    if args:
        _as_terminal(monkeypatch)
    result = runner.invoke(models_app, ["download", "decoder", *args])  # CliRunner's stderr is no terminal
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and "decoder: complete" in result.stdout


def test_download_offline_without_cache_fails_in_one_line(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(models_app, ["download", "lm"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ModelNotFoundError)
    message = str(result.exception)
    assert "\n" not in message and "`glmvoice models download lm`" in message
    assert fake_hub.seen == []


def test_list_shows_incomplete_and_the_fix(tmp_path: Path) -> None:
    folder = cache.repo_dir(hub.DECODER.repo_id) / "snapshots" / "c0ffee"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("x: 1\n")
    rows = _listing()
    assert rows["decoder"]["state"] == "incomplete"
    assert rows["decoder"]["missing"] == ["flow.pt", "hift.pt"]
    table = runner.invoke(models_app, ["list"])
    assert "incomplete (missing 2)" in table.stdout
    assert "run `glmvoice models download decoder`" in table.stdout


def test_list_and_path_follow_env_and_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GLMVOICE_LM", str(tmp_path / "my_lm"))
    config = tmp_path / "config.toml"
    config.write_text('[paths]\ndecoder = "dec"\n')
    monkeypatch.setenv("GLMVOICE_CONFIG", str(config))
    rows = _listing()
    assert (rows["lm"]["path"], rows["lm"]["source"]) == (str(tmp_path / "my_lm"), "GLMVOICE_LM")
    assert rows["decoder"]["path"] == str(tmp_path / "dec")
    assert runner.invoke(models_app, ["path", "lm"]).stdout.strip() == str(tmp_path / "my_lm")
    assert runner.invoke(models_app, ["path", "tokenizer"]).stdout.strip() == str(
        settings.cached_stage_dir("tokenizer")
    )


def test_path_prints_the_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GLMVOICE_HOME", str(tmp_path / "home"))
    assert runner.invoke(models_app, ["path"]).stdout.strip() == str(tmp_path / "home" / "hub")
    assert runner.invoke(models_app, ["path", "all"]).stdout.strip() == str(tmp_path / "home" / "hub")


def _fake_stage(name: str) -> Path:
    folder = cache.repo_dir(hub.STAGES[name].repo_id) / "snapshots" / "c0ffee"
    folder.mkdir(parents=True)
    for n in hub.STAGES[name].files:
        (folder / n).write_bytes(b"0123456789")
    return folder


def test_rm_asks_unless_yes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = _fake_stage("decoder")
    kept = runner.invoke(models_app, ["rm", "decoder"], input="n\n")
    assert kept.exit_code == 0 and "kept" in kept.stdout and folder.is_dir()
    assert "transformers, vLLM" in kept.output  # the cache is shared: the question says so
    removed = runner.invoke(models_app, ["rm", "decoder"], input="y\n")
    assert removed.exit_code == 0 and not folder.exists()
    assert "30 B freed" in removed.stdout
    _fake_stage("tokenizer")
    _fake_stage("lm")
    everything = runner.invoke(models_app, ["rm", "all", "--yes"])
    assert everything.exit_code == 0
    assert not any(cache.repo_dir(s.repo_id).exists() for s in hub.STAGES.values())


def test_rm_never_touches_folders_chosen_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mine = tmp_path / "my_decoder"
    mine.mkdir()
    (mine / "flow.pt").write_bytes(b"keep me")
    monkeypatch.setenv("GLMVOICE_DECODER", str(mine))
    result = runner.invoke(models_app, ["rm", "decoder", "--yes"])
    assert result.exit_code == 0 and "nothing to remove" in result.stdout
    assert f"the one in use is {mine} (set by GLMVOICE_DECODER)" in result.stdout  # says where, and why it stays
    assert (mine / "flow.pt").read_bytes() == b"keep me"


def test_rm_takes_several_models() -> None:
    folders = [_fake_stage("tokenizer"), _fake_stage("decoder")]
    lm = _fake_stage("lm")
    result = runner.invoke(models_app, ["rm", "tokenizer", "decoder", "--yes"])
    assert result.exit_code == 0, result.output
    assert not any(f.exists() for f in folders) and lm.is_dir()


def test_unknown_model_is_a_usage_error() -> None:
    result = runner.invoke(models_app, ["download", "vocoder"])
    assert result.exit_code == 2


def test_registers_under_a_root_app() -> None:
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        """Stand-in for the glmvoice root app."""

    root.add_typer(models_app, name="models")
    result = runner.invoke(root, ["models", "path"])
    assert result.exit_code == 0 and result.stdout.strip() == str(cache.hub_cache_dir())


def test_models_commands_do_not_import_torch() -> None:
    code = (
        "import sys\nfrom glmvoice_cli.commands.models import models_app\n"
        "try:\n    models_app(['list'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (12_345, "12 kB"), (445_000_000, "445.0 MB"), (1_458_349_056, "1.46 GB")],
)
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


def test_verify_command(fake_hub: FakeHub) -> None:
    assert runner.invoke(models_app, ["download", "decoder", "-q"]).exit_code == 0
    good = runner.invoke(models_app, ["verify", "decoder"])
    assert good.exit_code == 0 and "decoder: 3 ok" in good.stdout
    (settings.cached_stage_dir("decoder") / "hift.pt").write_bytes(b"garbage")  # through the link: the blob
    bad = runner.invoke(models_app, ["verify", "decoder"])
    assert isinstance(bad.exception, CheckpointError)
    assert "hift.pt" in str(bad.exception) and "glmvoice models download decoder" in str(bad.exception)


def test_ensure_models_offers_the_missing_download(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[str] = []

    def confirm(text: str, **kwargs: object) -> bool:
        answers.append(text)
        return True

    monkeypatch.setattr(typer, "confirm", confirm)
    found = ensure_models(("tokenizer", "decoder"), offer=True)
    assert found == {n: settings.cached_stage_dir(n) for n in ("tokenizer", "decoder")}
    assert len(answers) == 1 and "tokenizer (" in answers[0] and "decoder (" in answers[0]
    assert ensure_models(("decoder",), offer=True) == {"decoder": settings.cached_stage_dir("decoder")}
    assert len(answers) == 1  # nothing missing: no second question


def test_ensure_models_without_offer_raises_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="`glmvoice models download lm`"):
        ensure_models(("lm",), offer=False)
    with pytest.raises(ModelNotFoundError, match="--lm"):
        ensure_models(("lm",), overrides={"lm": tmp_path / "nowhere"}, offer=True)


def test_download_from_a_scrambling_mirror_fails_without_saying_complete(fake_hub: FakeHub, tmp_path: Path) -> None:
    from glmvoice_cli.cli import app as root

    fake_hub.scramble.add(f"{hub.DECODER.repo_id}/hift.pt")
    result = runner.invoke(root, ["models", "download", "decoder", "--dir", str(tmp_path)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "hift.pt" in lines[-1] and "checksum" in lines[-1]
    assert "complete" not in result.stdout and not (tmp_path / "decoder" / "hift.pt").exists()


def test_download_with_everything_present_and_no_network_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                  tiny_models: Any) -> None:
    import logging
    import socket

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger(hub.__name__).addHandler(handler)
    monkeypatch.setattr(logging.getLogger(hub.__name__), "disabled", False)

    with socket.socket() as closed:  # a port nothing listens on: the Hub cannot be reached
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    kept = runner.invoke(models_app, ["download", "all", "--models", str(tiny_models.root)])
    assert kept.exit_code == 0, kept.output
    logging.getLogger(hub.__name__).removeHandler(handler)
    assert kept.stdout.count(": complete,") == 3 and sum("kept as it is" in m for m in said) == 3, said
    forced = runner.invoke(models_app, ["download", "tokenizer", "--models", str(tiny_models.root), "--force"])
    assert forced.exit_code != 0 and "cannot reach" in str(forced.exception)  # --force needs the Hub


def test_list_prints_each_path_whole_on_its_own_line(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "models"
    deep.mkdir(parents=True)
    result = runner.invoke(models_app, ["list", "--models", str(deep)], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    for name in ("tokenizer", "lm", "decoder"):
        assert f"{name}: {deep / name}" in result.stdout.splitlines()
