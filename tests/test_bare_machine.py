"""A bare machine: no PortAudio, too little memory, no livekit; what the user is told, and what still works."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.models.memory_need import GB, MemoryNeed, estimate
from glmvoice_cli.tiny.modelset import write_tiny_model_set

runner = CliRunner()
FAST = ["--max-new-tokens", "30", "--seed", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_set(tmp_path_factory.mktemp("models"), codebook=64).root


@pytest.fixture()
def no_portaudio(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a stock Linux box: the sounddevice module is there, libportaudio2 is not."""
    from glmvoice_cli.audio import devices

    def missing():  # type: ignore[no-untyped-def]
        raise devices.AudioDeviceError(f"PortAudio library not found ({devices.PORTAUDIO_HINT})")

    monkeypatch.setattr(devices, "import_sounddevice", missing)


def test_file_commands_work_without_portaudio(no_portaudio: None, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.wav"
    result = runner.invoke(app, ["tts", "Hello.", "--models", str(models), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (" in result.stderr  # tts says what it wrote
    assert "loading" not in result.stderr  # piped: no progress
    result = runner.invoke(app, ["tts", "Hello.", "--models", str(models), "-o", str(out), "-v", *FAST])
    assert f"info: loading the lm from {models / 'lm'}" in result.stderr  # -v: each stage as a log line
    sf.write(tmp_path / "q.wav", np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1, 16_000)
    result = runner.invoke(app, ["transcribe", str(tmp_path / "q.wav"), "--models", str(models),
                                 "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["chat", "--models", str(models), "--input-file", str(tmp_path / "q.wav"),
                                 "--output", str(tmp_path / "o.wav"), "--session-dir", str(tmp_path / "S"),
                                 "--no-live", *FAST])
    assert result.exit_code == 0, result.output


def test_doctor_and_selftest_name_the_portaudio_package(no_portaudio: None, tmp_path: Path) -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    rows = {r["area"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["portaudio"]["status"] == "fail"
    assert "libportaudio2" in rows["portaudio"]["detail"] and "brew install portaudio" in rows["portaudio"]["detail"]
    assert rows["threads"]["status"] == "ok"
    assert rows["threads"]["detail"].startswith("1 (set by --threads")  # conftest's GLMVOICE_THREADS
    assert {"memory", "echo canceller", "hub"} <= set(rows)


def test_selftest_warns_without_portaudio(no_portaudio: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("glmvoice_cli.commands.selftest.run_selftest", lambda root, show: [])
    result = runner.invoke(app, ["selftest"])
    assert result.exit_code == 0, result.output
    assert "selftest passed" in result.stdout
    assert "warning: glmvoice chat cannot use a microphone or speaker: PortAudio library not found" in result.stderr


def test_memory_estimate_follows_the_dtype() -> None:
    fp32 = estimate({"lm": None}, "cpu", "fp32", available=100 * GB)
    bf16 = estimate({"lm": None}, "cpu", "bf16", available=100 * GB)
    assert fp32.needed_bytes == pytest.approx(2 * bf16.needed_bytes, rel=1e-6)
    assert 38 * GB < fp32.needed_bytes < 50 * GB  # the 9B model: 19 GB of bf16 shards, twice that in fp32
    nf4 = estimate({"lm": None}, "cuda", "bf16", quantize=4, available=12 * GB)
    assert nf4.fits and nf4.needed_bytes < 12 * GB


def test_too_little_memory_is_said_before_any_download_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from glmvoice_cli.commands.models import ensure_models
    from glmvoice_cli.errors import ModelNotFoundError

    asked: list[str] = []
    monkeypatch.setattr(typer, "confirm", lambda text, **kw: asked.append(text) or True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    tight = MemoryNeed(46 * GB, 20 * GB, "RAM", "fp32")
    with pytest.raises(ModelNotFoundError, match="--dtype bf16") as info:
        ensure_models(("lm",), offer=True, memory=tight)
    assert "46 GB of RAM in fp32 and 20.0 GB is available" in str(info.value)
    assert "glmvoice models download lm" in str(info.value)
    assert asked == []
    with pytest.raises(ModelNotFoundError, match="is not downloaded"):  # no offer: the usual message
        ensure_models(("lm",), offer=False, memory=tight)


def test_chat_warns_when_present_models_do_not_fit(models: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("glmvoice_cli.models.memory_need.available_ram", lambda: 1000)
    sf.write(tmp_path / "q.wav", np.zeros(8000, np.float32), 16_000)
    result = runner.invoke(app, ["chat", "--models", str(models), "--input-file", str(tmp_path / "q.wav"),
                                 "--output", str(tmp_path / "o.wav"), "--session-dir", str(tmp_path / "S"),
                                 "--no-live", *FAST])
    assert result.exit_code == 0, result.output
    assert "warning: the models need about" in result.stderr and "--dtype bf16" in result.stderr


def test_echo_canceller_is_the_numpy_one_without_livekit(monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio import echo
    from glmvoice_cli.commands.doctor import check_echo
    from glmvoice_cli.errors import GlmVoiceError

    def no_livekit():  # type: ignore[no-untyped-def]
        raise GlmVoiceError("WebRTC echo cancellation is unavailable: No module named 'livekit'")

    monkeypatch.setattr(echo, "_import_livekit_rtc", no_livekit)
    assert isinstance(echo.make_echo_canceller("auto"), echo.NlmsEchoCanceller)
    check = check_echo()
    assert check.status == "warn" and "numpy" in check.detail and "glmvoice[aec]" in check.fix


def test_livekit_is_an_optional_extra() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    assert not any(d.startswith("livekit") for d in project["dependencies"])
    assert any(d.startswith("livekit") for d in project["optional-dependencies"]["aec"])


def test_serve_without_its_extra_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from glmvoice_cli.cli import app
    from glmvoice_cli.commands import doctor

    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda dist: None if dist == "uvicorn" else real(dist))
    check = doctor.check_server()
    assert check.status == "warn" and "uvicorn" in check.detail and "glmvoice[server]" in check.fix
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails, as without the extra
    result = CliRunner().invoke(app, ["serve", "--models", str(tmp_path)])
    assert result.exit_code != 0
    assert "pip install 'glmvoice[server]'" in result.output and "Traceback" not in result.output


def test_the_readme_quotes_the_memory_the_check_asks_for() -> None:
    """One number from one place: the README's figures are the memory check's own."""
    from glmvoice_cli.models.memory_need import published_needs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    need = published_needs()
    quoted = (f"{need['cuda bf16']} GB of GPU memory in bf16, {need['cuda 8-bit']} GB with `--quantize 8`, "
              f"{need['cuda 4-bit']} GB with `--quantize 4`; on a CPU about {need['cpu fp32']} GB of RAM\nin fp32, "
              f"{need['cpu bf16']} GB with `--dtype bf16`")
    assert quoted in readme


def test_short_memory_advice_names_the_choice_that_fits() -> None:
    from glmvoice_cli.models.memory_need import GB, estimate

    every = {"tokenizer": None, "lm": None, "decoder": None}
    assert "--dtype bf16 fits" in estimate(every, "cpu", "fp32", available=30 * GB).advice()
    assert "--quantize 4 fits" in estimate(every, "cuda", "bf16", available=10 * GB).advice()
    assert "even --dtype bf16 needs" in estimate(every, "cpu", "fp32", available=5 * GB).advice()
