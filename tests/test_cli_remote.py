"""`chat`, `tts` and `transcribe --lm-url` end to end against an in-test LM server: the same output as
in-process, only the LM's config and tokenizer needed locally, settings from env and config.toml,
one-line errors, and a chat that survives a failing server. Also `serve-lm` and `models --no-weights`."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.lm.voice_lm import VoiceLM
from glmvoice_cli.tiny.lm import TinyLMSpec
from glmvoice_cli.tiny.modelset import write_tiny_model_set

from .fake_lm_server import FakeLMServer, FakeState, Fault

runner = CliRunner()
FAST = ["--max-new-tokens", "30", "--seed", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_set(tmp_path_factory.mktemp("models"), codebook=64, lm=TinyLMSpec()).root  # square: servable


@pytest.fixture(scope="module")
def local(models: Path) -> VoiceLM:
    return VoiceLM.from_folder(models / "lm")


@pytest.fixture
def server(local: VoiceLM):  # type: ignore[no-untyped-def]
    with FakeLMServer(local) as fake:
        yield fake


@pytest.fixture
def light_models(models: Path, tmp_path: Path) -> Path:
    """The model set with the LM's weights removed: what a --lm-url client needs."""
    root = tmp_path / "light"
    shutil.copytree(models, root)
    for weights in (root / "lm").glob("*.safetensors"):
        weights.unlink()
    return root


@pytest.fixture
def speech(tmp_path: Path) -> Path:
    t = np.arange(int(2.5 * 16_000)) / 16_000
    path = tmp_path / "speech.wav"
    sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 2 * t), 16_000)
    return path


def test_transcribe_through_the_server_equals_in_process(models: Path, light_models: Path, server: FakeLMServer,
                                                         speech: Path) -> None:
    here = runner.invoke(app, ["transcribe", str(speech), "--models", str(models), "--json"])
    there = runner.invoke(app, ["transcribe", str(speech), "--models", str(light_models), "--json",
                                "--lm-url", server.url])
    assert here.exit_code == 0 and there.exit_code == 0, there.output
    assert json.loads(here.stdout)["text"] == json.loads(there.stdout)["text"]
    forbidden = {int(i) for i in server.completions[-1]["logit_bias"]}
    tok = server.lm.text_tokenizer
    assert all(tok.audio_offset + i in forbidden for i in range(tok.n_audio_tokens))  # text only


def test_tts_through_the_server_writes_the_same_speech(models: Path, light_models: Path, server: FakeLMServer,
                                                       tmp_path: Path) -> None:
    here, there = tmp_path / "here.wav", tmp_path / "there.wav"
    a = runner.invoke(app, ["tts", "Hello there.", "--models", str(models), "-o", str(here), *FAST])
    b = runner.invoke(app, ["tts", "Hello there.", "--models", str(light_models), "-o", str(there), *FAST,
                            "--lm-url", server.url])
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    assert np.array_equal(sf.read(here)[0], sf.read(there)[0]) and a.stdout == b.stdout


def test_chat_keeps_going_when_one_turn_fails_on_the_server(light_models: Path, local: VoiceLM,
                                                             tmp_path: Path) -> None:
    state = FakeState(vocab_size=local.model.config.vocab_size, faults={1: Fault(cut_after=3)})
    session = tmp_path / "session"
    with FakeLMServer(local, state) as fake:
        result = runner.invoke(app, ["chat", "--text", "--no-live", "--models", str(light_models), *FAST,
                                     "--lm-url", fake.url, "--session-dir", str(session),
                                     "--output-file", str(tmp_path / "o.wav")], input="first\nsecond\nthird\n")
    assert result.exit_code == 0, result.output
    assert "(the conversation goes on)" in result.stdout
    lines = [json.loads(line) for line in (session / "transcript.jsonl").read_text().splitlines()]
    assert [line["role"] for line in lines] == ["user", "assistant"] * 3
    assert [line["interrupted"] for line in lines[1::2]] == [False, True, False]
    history = [i for line in lines for i in line["token_ids"]]
    assert fake.completions[-1]["prompt"] == history[: len(fake.completions[-1]["prompt"])]


def test_chat_whose_last_turn_failed_exits_with_the_error(light_models: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["chat", "--text", "--no-live", "--models", str(light_models), *FAST,
                                 "--lm-url", "http://127.0.0.1:9", "--session-dir", str(tmp_path / "s"),
                                 "--output-file", str(tmp_path / "o.wav")], input="hello\n")
    assert result.exit_code == 5
    assert result.output.strip().splitlines()[-1].startswith("error: cannot reach the LM server")


def test_settings_come_from_env_then_config(light_models: Path, server: FakeLMServer, speech: Path,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'lm_url = "{server.url}"\n')
    monkeypatch.setenv("GLMVOICE_CONFIG", str(config))
    result = runner.invoke(app, ["transcribe", str(speech), "--models", str(light_models)])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("GLMVOICE_LM_URL", "http://127.0.0.1:9")  # env beats the config file
    result = runner.invoke(app, ["transcribe", str(speech), "--models", str(light_models)])
    assert result.exit_code == 5 and "127.0.0.1:9" in result.output
    result = runner.invoke(app, ["transcribe", str(speech), "--models", str(light_models), "--lm-url", server.url])
    assert result.exit_code == 0, result.output  # and the flag beats both


def test_remote_errors_are_one_line(light_models: Path, models: Path, speech: Path) -> None:
    result = runner.invoke(app, ["transcribe", str(speech), "--models", str(light_models)])
    assert result.exit_code != 0 and "--no-weights" not in result.output and "lm" in result.output
    result = runner.invoke(app, ["tts", "hi", "-o", "-", "--models", str(models), "--lm-url", "http://127.0.0.1:9"])
    assert result.exit_code == 5 and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["tts", "hi", "-o", "-", "--models", str(models), "--lm-url", "ftp://x",
                                 "--quantize", "4"])
    assert result.exit_code == 2 and "--quantize" in result.output


# ------------------------------------------------------------------ serve-lm


def _fake_vllm_python(tmp_path: Path) -> Path:
    """An interpreter wrapper whose `vllm` records how the server was started."""
    package = tmp_path / "site" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'kv': os.environ.get('VLLM_CPU_KVCACHE_SPACE')},"
        f" open({str(tmp_path / 'started.json')!r}, 'w'))\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


@pytest.mark.skipif(os.name != "posix", reason="a shell-script interpreter wrapper")
def test_serve_lm_starts_vllm_with_the_flags_a_token_client_needs(models: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMVOICE_VLLM_PYTHON", str(_fake_vllm_python(tmp_path)))
    result = runner.invoke(app, ["serve-lm", "--models", str(models), "--port", "8123", "--cpu-kv-cache-gib", "1",
                                 "--tensor-parallel-size", "2", "--quantization", "fp8", "--", "--enforce-eager"])
    assert result.exit_code == 0, result.output
    started = json.loads((tmp_path / "started.json").read_text())
    argv = started["argv"]
    assert argv[argv.index("--model") + 1] == str((models / "lm").resolve())
    for flag in ("--skip-tokenizer-init", "--enable-prompt-tokens-details", "--enforce-eager"):
        assert flag in argv
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--port"] == "8123" and pairs["--max-model-len"] == "4096" and pairs["--generation-config"] == "vllm"
    assert pairs["--tensor-parallel-size"] == "2" and pairs["--quantization"] == "fp8" and started["kv"] == "1"


def test_serve_lm_without_vllm_says_how_to_install_it(models: Path) -> None:
    result = runner.invoke(app, ["serve-lm", "--models", str(models), "--python", sys.executable])
    if result.exit_code == 0:  # pragma: no cover - vLLM installed into the test interpreter
        pytest.skip("vLLM is importable here")
    assert result.exit_code == 2 and "pip install vllm" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_serve_lm_refuses_a_checkpoint_vllm_would_compute_differently(models: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(models / "lm", root)
    config = json.loads((root / "config.json").read_text())
    config["kv_channels"] *= 2
    (root / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["serve-lm", "--lm", str(root), "--dry-run"])
    assert result.exit_code == 3 and "kv_channels" in result.output


def test_models_download_no_weights_fetches_config_and_tokenizer_only(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fake_hub import serving

    with serving(monkeypatch, tmp_path) as fake:
        result = runner.invoke(app, ["models", "download", "lm", "--no-weights", "--dir", str(tmp_path / "M"), "-q"])
        fetched = {name.rsplit("/", 1)[1] for name in fake.fetched()}
    assert result.exit_code == 0, result.output
    assert not any("safetensors" in name for name in fetched) and "tokenizer.model" in fetched
