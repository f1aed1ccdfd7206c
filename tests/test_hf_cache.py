"""Models in the standard Hugging Face cache: found without any path flag, true sizes, verify, rm, offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.models import cache, hub, settings
from glmvoice_cli.tiny.modelset import write_tiny_model_set

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_layout(source: Path, hub_cache: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """Lay `source`'s files out as huggingface_hub does: blobs named by ETag, snapshot links, refs/main."""
    repo = cache.repo_dir(repo_id, hub_cache)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest()  # as for an LFS file
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", etag))
    return snapshot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), codebook=64).root


@pytest.fixture()
def hf_home(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME holding the three stages in the hub layout; GLMVOICE_HOME unset; offline."""
    home = tmp_path / "hf_home"
    for name, stage in hub.STAGES.items():
        hf_layout(tiny / name, home / "hub", stage.repo_id)
    monkeypatch.delenv("GLMVOICE_HOME")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # sessions: never the user's folder
    return home


def test_list_shows_every_stage_present_with_true_sizes(hf_home: Path, tiny: Path) -> None:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in map(json.loads, result.stdout.splitlines())}
    for name, stage in hub.STAGES.items():
        expected = sum(p.stat().st_size for p in (tiny / name).iterdir())
        assert rows[name]["complete"] is True
        assert rows[name]["size_bytes"] == expected > 0
        assert rows[name]["path"] == str(hf_home / "hub" / f"models--{stage.repo_id.replace('/', '--')}"
                                         / "snapshots" / COMMIT)


def test_tts_transcribe_and_scripted_chat_need_no_path_flag(hf_home: Path, tmp_path: Path) -> None:
    speech = tmp_path / "speech.wav"
    fast = ["--max-new-tokens", "30", "--seed", "1"]
    result = runner.invoke(app, ["tts", "Hello there.", "-o", str(speech), *fast])
    assert result.exit_code == 0, result.output
    assert sf.info(speech).frames > 0
    noise = np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1
    sf.write(tmp_path / "q.wav", noise, 16_000)
    result = runner.invoke(app, ["transcribe", str(tmp_path / "q.wav"), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["chat", "--input-file", str(tmp_path / "q.wav"), "--output", str(tmp_path / "o.wav"),
                                 "--session-dir", str(tmp_path / "S"), "--no-live", *fast])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "S" / "transcript.jsonl").is_file()


def test_verify_checks_snapshot_links_against_their_blob_names(hf_home: Path) -> None:
    result = runner.invoke(app, ["models", "verify", "decoder"])
    assert result.exit_code == 0, result.output
    assert "decoder: 3 ok" in result.stdout
    snapshot = settings.locate("decoder").path
    blob = (snapshot / "flow.pt").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # corrupt the content the link points to
    result = runner.invoke(app, ["models", "verify", "decoder"])
    assert result.exit_code == 3 and "flow.pt" in result.stderr


def test_rm_removes_only_the_named_stage_after_a_warning_about_sharing(hf_home: Path) -> None:
    result = runner.invoke(app, ["models", "rm", "decoder"], input="n\n")
    assert "transformers, vLLM" in result.output and "decoder: kept" in result.stdout
    result = runner.invoke(app, ["models", "rm", "decoder"], input="y\n")
    assert result.exit_code == 0, result.output
    assert not cache.repo_dir(hub.DECODER.repo_id, hf_home / "hub").exists()
    assert cache.repo_dir(hub.LM.repo_id, hf_home / "hub").exists()
    assert cache.repo_dir(hub.TOKENIZER.repo_id, hf_home / "hub").exists()


def test_glmvoice_home_chooses_the_store_and_old_folders_still_work(tiny: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "gv"
    monkeypatch.setenv("GLMVOICE_HOME", str(home))
    assert cache.hub_cache_dir() == home / "hub"
    shutil.copytree(tiny / "lm", home / "models" / "lm")  # what glmvoice wrote before the hub layout
    assert settings.locate("lm").path == home / "models" / "lm"
    snapshot = hf_layout(tiny / "lm", home / "hub", hub.LM.repo_id)
    assert settings.locate("lm").path == snapshot  # a complete snapshot wins


def test_hub_cache_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GLMVOICE_HOME")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert cache.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert cache.hub_cache_dir() == tmp_path / "hc"


def test_offline_with_models_present_never_says_unset_offline(hf_home: Path) -> None:
    from glmvoice_cli.commands.doctor import check_hub

    check = check_hub()
    assert check.status == "ok" and "unset" not in check.detail + check.fix
    status = hub.download_stage(hub.LM)  # offline: the cached snapshot is the answer
    assert status.complete


def test_unreachable_host_fails_in_one_line_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["models", "download", "decoder"])
    assert result.exit_code == 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}")
    assert "refused" in lines[0].lower()
    from glmvoice_cli.commands.doctor import check_hub

    assert check_hub().detail.startswith("unreachable")


def test_true_size_counts_linked_files_once(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"x" * 10)
    folder = tmp_path / "snap"
    folder.mkdir()
    os.symlink(tmp_path / "blob", folder / "a")
    os.symlink(tmp_path / "blob", folder / "b")
    os.symlink(tmp_path / "gone", folder / "dangling")
    assert cache.true_size(folder) == 10
