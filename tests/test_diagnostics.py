"""`glmvoice selftest` and `glmvoice doctor`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glmvoice_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("selftest")
    result = runner.invoke(app, ["selftest", "--keep", str(folder)])
    assert result.exit_code == 0, result.output
    assert "selftest passed" in result.stdout
    for step in ("write tiny models", "load models", "tokenize", "decode", "tts", "transcribe", "chat turn", "total"):
        assert step in result.stdout
    return folder


def test_selftest_keep_gives_a_model_set_every_command_uses(kept: Path, tmp_path: Path) -> None:
    assert {p.name for p in kept.iterdir()} >= {"tokenizer", "lm", "decoder", "selftest_tts.wav", "selftest_chat.wav",
                                               "selftest_session"}
    tok = runner.invoke(app, ["tokenize", str(kept / "selftest_tts.wav"), "--models", str(kept)])
    assert tok.exit_code == 0 and len(tok.stdout.split()) > 0, tok.output
    tts = runner.invoke(app, ["tts", "Hi.", "--models", str(kept), "-o", str(tmp_path / "a.wav"),
                              "--max-new-tokens", "20"])
    assert tts.exit_code == 0, tts.output


def test_selftest_keep_twice_on_the_same_folder(kept: Path) -> None:
    """The second run replaces what the first made there (its session folder included)."""
    (kept / "selftest_session" / "stale.txt").write_text("from the first run")
    result = runner.invoke(app, ["selftest", "--keep", str(kept)], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    assert f"models kept in {kept} (use --models {kept})" in result.stdout  # a narrow terminal: never folded
    assert not (kept / "selftest_session" / "stale.txt").exists()
    assert (kept / "lm" / "config.json").is_file() and (kept / "selftest_session").is_dir()


def test_selftest_keep_never_writes_into_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "mine.txt").write_text("the user's")
    result = runner.invoke(app, ["selftest", "--keep", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --keep {tmp_path} already holds files that glmvoice selftest did not make: give a new or empty folder"]
    assert [p.name for p in tmp_path.iterdir()] == ["lm"] and (tmp_path / "lm" / "mine.txt").read_text() == "the user's"


@contextmanager
def _read_only_folder(path: Path) -> Iterator[Path]:
    """A folder nobody may write into: a read-only tmpfs as root (chmod binds no root), else mode 555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("root without permission to mount a read-only tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("below", ["", "sub"])
def test_selftest_keep_on_a_read_only_path_is_one_line(tmp_path: Path, below: str) -> None:
    with _read_only_folder(tmp_path / "ro") as folder:
        target = folder / below if below else folder
        result = runner.invoke(app, ["selftest", "--keep", str(target)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --keep {target}: cannot write there"), result.stderr


def test_selftest_without_keep_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    result = runner.invoke(app, ["selftest"])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []


def test_selftest_failure_names_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import glmvoice_cli.pipeline.transcribe as transcribe_mod

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(transcribe_mod, "transcribe", broken)
    result = runner.invoke(app, ["selftest", "--keep", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: selftest failed at 'transcribe': RuntimeError: boom"


def test_doctor_reports_models_and_missing_audio(kept: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio import devices

    monkeypatch.setenv("GLMVOICE_MODELS", str(kept))
    monkeypatch.setattr(devices, "import_sounddevice", lambda: (_ for _ in ()).throw(
        devices.AudioDeviceError("PortAudio library not found")))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1  # no audio devices is a problem for chat
    out = result.stdout
    for stage in ("tokenizer", "lm", "decoder"):
        line = next(line for line in out.splitlines() if f"model {stage}" in line)
        assert line.startswith("ok") and "GLMVOICE_MODELS" in line
    assert "PortAudio library not found" in out and "torch" in out


def test_doctor_names_the_download_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMVOICE_MODELS", str(tmp_path / "empty"))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1
    assert "glmvoice models download lm" in result.stdout


def test_doctor_with_models_set_elsewhere_does_not_place_them_in_the_cache(
        kept: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.models.cache import hub_cache_dir

    monkeypatch.setenv("GLMVOICE_MODELS", str(kept))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = runner.invoke(app, ["doctor"]).stdout
    hub_line = next(line for line in out.splitlines() if line.split()[1:2] == ["hub"])
    cache_line = next(line for line in out.splitlines() if line.split()[1:2] == ["cache"])
    assert "every model is present" in hub_line and "GLMVOICE_MODELS" in hub_line
    assert str(hub_cache_dir()) not in hub_line
    assert "unused: every model comes from GLMVOICE_MODELS" in cache_line


def test_doctor_states_one_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from glmvoice_cli.commands.doctor import check_device, check_threads

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    details = " ".join(c.detail for c in check_device() + check_threads())
    counts = re.findall(r"(\d+) threads|^(\d+) \(automatic", details)
    assert "thread" not in " ".join(c.detail for c in check_device())
    assert len(counts) <= 1
    assert check_threads()[0].detail.split()[0].isdigit()


def test_doctor_says_which_decode_loop_runs_and_what_it_means_for_the_ids() -> None:
    from glmvoice_cli.commands.doctor import check_decode_loop

    fp32 = check_decode_loop("cpu", None)[0]
    assert fp32.area == "LM decode loop" and "eager, dynamic cache, fp32" in fp32.detail
    assert "the same ids" in fp32.detail
    half = check_decode_loop("cpu", "bf16")[0]
    assert "bf16" in half.detail and "--compile (static cache) rounds differently" in half.detail
