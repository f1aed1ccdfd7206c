"""Inputs that used to print a traceback or pass unnoticed: each is now one line naming what is wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.errors import UsageError
from glmvoice_cli.tiny.modelset import TinyModelSet

runner = CliRunner()
FAST = ["--max-new-tokens", "5", "--seed", "1"]


@pytest.fixture(scope="module")
def models(tiny_models: TinyModelSet) -> Path:
    return tiny_models.root


@pytest.fixture()
def copy(models: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(models, target)
    return target


def _one_line(result, code: int | None, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0 and (code is None or result.exit_code == code), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("device", ["meta", "cuda:99"])
def test_a_device_that_cannot_run_the_models(device: str) -> None:
    from glmvoice_cli.device import pick_device

    with pytest.raises(UsageError, match=f"(?i){device.split(':')[0]}"):
        pick_device(device)


def test_tts_on_the_meta_device_is_one_line(models: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tts", "hi", "-o", str(tmp_path / "x.wav"), "--models", str(models),
                                 "--device", "meta", *FAST])
    _one_line(result, None, "'meta' cannot run the models")


def test_a_decoder_rate_no_audio_file_takes_is_refused_before_decoding(copy: Path, tmp_path: Path) -> None:
    config = copy / "decoder" / "config.yaml"
    config.write_text(config.read_text().replace("sample_rate: 22050", "sample_rate: 1000000000000"))
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3 4 5 6 7 8 9 10 11 12")
    result = runner.invoke(app, ["decode", str(tokens), "-o", str(tmp_path / "x.wav"), "--models", str(copy)])
    _one_line(result, None, "config.sample_rate must be an audio rate")
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize(("field", "value", "said"), [
    ("eos_token_id", "abc", "'eos_token_id' must be a token id"),
    ("eos_token_id", [1, "x"], "'eos_token_id' must be a token id"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings' must be true or false"),
    ("add_qkv_bias", 1, "'add_qkv_bias' must be true or false"),
])
def test_lm_config_fields_of_the_wrong_type(copy: Path, tmp_path: Path, field: str, value: object,
                                            said: str) -> None:
    path = copy / "lm" / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    result = runner.invoke(app, ["tts", "hi", "-o", str(tmp_path / "x.wav"), "--models", str(copy), *FAST])
    _one_line(result, None, said)


def test_integer_lm_weights_are_refused_like_the_other_stages(copy: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = copy / "lm" / "model.safetensors"
    tensors = load_file(path)
    name = min(tensors)
    tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, path)
    result = runner.invoke(app, ["tts", "hi", "-o", str(tmp_path / "x.wav"), "--models", str(copy), *FAST])
    _one_line(result, None, f"key '{name}' has dtype I64, expected floating point")


def test_a_switch_where_a_value_belongs_in_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text("threads = true\n")
    monkeypatch.setenv("GLMVOICE_CONFIG", str(config))
    result = runner.invoke(app, ["tts", "hi", "-o", str(tmp_path / "x.wav"), "--models", str(tmp_path)])
    _one_line(result, None, str(config), "'threads' takes a value, not true")


def test_a_model_folder_closed_to_us_is_not_called_missing(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, for whom modes do not apply: the permission check is what is stubbed."""
    from glmvoice_cli.errors import ModelNotFoundError
    from glmvoice_cli.models import hub

    closed = copy / "tokenizer"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != closed and real_access(path, mode))
    with pytest.raises(ModelNotFoundError, match=r"cannot be read: .*tokenizer \(permission denied\)"):
        hub.require_complete(hub.get_stage("tokenizer"), closed)


def test_a_session_folder_held_by_a_starting_chat_is_called_in_use(tmp_path: Path) -> None:
    from glmvoice_cli.sessions.lock import SessionLock
    from glmvoice_cli.sessions.store import resolve_session

    folder = tmp_path / "starting"
    folder.mkdir()
    lock = SessionLock.acquire(folder)  # a chat holds it before its first file (in another process, in life)
    try:
        if not lock.held:
            pytest.skip("no file locks on this file system")
        import subprocess
        import sys

        probe = (f"from glmvoice_cli.sessions.store import resolve_session\n"
                 f"resolve_session({str(folder)!r})\n")
        done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
        assert "SessionBusyError" in done.stderr and "in use by another glmvoice chat" in done.stderr
    finally:
        lock.release()
    with pytest.raises(Exception, match="not a glmvoice session folder"):  # released: an empty folder again
        resolve_session(str(folder))


def test_serve_lm_passes_the_api_key_in_the_environment_not_the_command_line() -> None:
    from glmvoice_cli.lm.serving import VllmServerConfig, server_command, server_env

    config = VllmServerConfig(model_dir=Path("/m"), max_model_len=2048, api_key="s3cret")
    assert "s3cret" not in " ".join(server_command("python", config))
    assert server_env(config)["VLLM_API_KEY"] == "s3cret"


def test_a_weights_file_cut_after_its_check_is_one_line_while_loading(copy: Path) -> None:
    from glmvoice_cli.errors import CheckpointMismatchError
    from glmvoice_cli.lm.checkpoint import iter_official_tensors, weight_files

    files = weight_files(copy / "lm")  # what the checks saw
    path = copy / "lm" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # then the download in another terminal rewrote it
    with pytest.raises(CheckpointMismatchError, match=r"unreadable while loading.*replaced or cut during the load"):
        list(iter_official_tensors(files))
