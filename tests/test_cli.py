"""The CLI shell: instant --help/--version without torch, one-line errors, `tokenize`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli import __version__
from glmvoice_cli.cli import app
from glmvoice_cli.tiny.tokenizer import write_tiny_tokenizer

runner = CliRunner()


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "glmvoice_cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["tokenize", "--help"]])
def test_help_and_version_import_neither_torch_nor_sounddevice(args: list[str]) -> None:
    code = ("import sys; from glmvoice_cli.cli import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'sounddevice', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"glmvoice {__version__}"


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def wavs(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (seconds, rate, channels) in enumerate([(1.0, 16_000, 1), (2.0, 44_100, 2)]):
        path = tmp_path / f"a{i}.wav"
        sf.write(path, 0.2 * rng.standard_normal((int(seconds * rate), channels)), rate, subtype="PCM_16")
        paths.append(path)
    return paths


def test_tokenize_plain_and_json(tiny_tok: Path, wavs: list[Path]) -> None:
    single = runner.invoke(app, ["tokenize", str(wavs[0]), "--tokenizer", str(tiny_tok)])
    assert single.exit_code == 0, single.output
    ids = [int(x) for x in single.stdout.split()]
    assert len(ids) == 13  # ceil(16000 / 1280)

    result = runner.invoke(app, ["tokenize", *map(str, wavs), "--tokenizer", str(tiny_tok), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(w) for w in wavs]
    assert [len(r["tokens"]) for r in rows] == [13, 25]
    assert [r["seconds"] for r in rows] == [1.0, 2.0]
    assert rows[0]["tokens"] == ids

    multi = runner.invoke(app, ["tokenize", *map(str, wavs), "--tokenizer", str(tiny_tok)])
    assert multi.stdout.splitlines()[0] == f"{wavs[0]}: {' '.join(map(str, ids))}"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tok, tmp: ["tokenize", str(tmp / "missing.wav"), "--tokenizer", str(tok)], "not found"),
        (lambda tok, tmp: ["tokenize", str(tmp / "a0.wav")], "glmvoice models download tokenizer"),
        (lambda tok, tmp: ["tokenize", str(tmp / "a0.wav"), "--tokenizer", str(tmp / "nowhere")], "folder does not exist"),
        (lambda tok, tmp: ["tokenize", str(tmp / "junk.wav"), "--tokenizer", str(tok)], "not a readable audio"),
        (lambda tok, tmp: ["tokenize", str(tmp / "a0.wav"), "--tokenizer", str(tok), "--device", "cuda:7"], "CUDA"),
    ],
)
def test_tokenize_errors_are_one_line(tiny_tok: Path, wavs: list[Path], tmp_path: Path, make_args, message) -> None:
    (tmp_path / "junk.wav").write_text("this is not audio\n")
    result = runner.invoke(app, make_args(tiny_tok, tmp_path))
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_errors_via_the_real_entry_point_have_no_traceback(tmp_path: Path) -> None:
    done = run_module("tokenize", str(tmp_path / "missing.wav"), "--tokenizer", str(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: audio file not found")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = run_module("--debug", "tokenize", str(tmp_path / "missing.wav"), "--tokenizer", str(tmp_path))
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "AudioError" in done.stderr


def _write(path: Path, data: np.ndarray, rate: int, subtype: str) -> Path:
    sf.write(path, data, rate, subtype=subtype)
    return path


GOOD_FILES = {  # name -> (seconds, rate, channels, subtype): these just work
    "u8.wav": (1.0, 16_000, 1, "PCM_U8"),
    "hi_rate.wav": (1.0, 96_000, 1, "PCM_24"),
    "six_channels.wav": (1.0, 48_000, 6, "FLOAT"),
    "stereo.flac": (1.0, 44_100, 2, "PCM_16"),
}


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_tokenize_accepts_any_format(tiny_tok: Path, tmp_path: Path, name: str) -> None:
    seconds, rate, channels, subtype = GOOD_FILES[name]
    data = 0.3 * np.random.default_rng(1).standard_normal((int(seconds * rate), channels))
    path = _write(tmp_path / name, data, rate, subtype)
    result = runner.invoke(app, ["tokenize", str(path), "--tokenizer", str(tiny_tok), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["tokens"]) == 13


def test_tokenize_silence_gives_tokens(tiny_tok: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "silence.wav", np.zeros(32_000), 16_000, "PCM_16")
    result = runner.invoke(app, ["tokenize", str(path), "--tokenizer", str(tiny_tok)])
    assert result.exit_code == 0 and len(result.stdout.split()) == 25


def _bad_files(tmp: Path) -> dict[str, Path]:
    empty = tmp / "empty.wav"
    empty.write_bytes(b"")
    zero = _write(tmp / "zero.wav", np.zeros((0, 1)), 16_000, "PCM_16")
    nan = np.zeros(16_000, np.float32)
    nan[100] = np.nan
    nan_file = _write(tmp / "nan.wav", nan, 16_000, "FLOAT")
    text = tmp / "text.wav"
    text.write_text("hello, I am not audio")
    return {"empty": empty, "zero-length": zero, "nan": nan_file, "non-audio": text}


@pytest.mark.parametrize("kind,message", [("empty", "empty"), ("zero-length", "no samples"),
                                          ("nan", "NaN"), ("non-audio", "not a readable audio file")])
def test_tokenize_bad_audio_is_one_line(tiny_tok: Path, tmp_path: Path, kind: str, message: str) -> None:
    path = _bad_files(tmp_path)[kind]
    result = runner.invoke(app, ["tokenize", str(path), "--tokenizer", str(tiny_tok)])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], result.stderr


def test_tokenize_truncated_file_warns_and_keeps_the_readable_part(tiny_tok: Path, tmp_path: Path) -> None:
    full = _write(tmp_path / "full.wav", 0.2 * np.random.default_rng(2).standard_normal(64_000), 16_000, "PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + 2 * 32_000])  # header + the first 2 s of 4 s
    result = runner.invoke(app, ["tokenize", str(cut), "--tokenizer", str(tiny_tok)])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == 25
    assert result.stderr.startswith("warning: ") and "cut.wav" in result.stderr


@pytest.mark.parametrize("words", [[], ["models"], ["sessions"]])
def test_a_bare_group_prints_its_help_and_succeeds(words: list[str]) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "glmvoice_cli", *words], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "Usage:" in done.stdout and done.stderr == ""


def test_chat_help_is_grouped_into_panels() -> None:
    result = runner.invoke(app, ["chat", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    panels = [line.split("─")[1].strip() for line in result.stdout.splitlines() if line.startswith("╭─")]
    assert {"Audio", "Turn-taking", "Sessions", "Models", "Sampling", "LM server"} <= set(panels), panels


@pytest.mark.parametrize(("words", "expected"), [
    ("glmvoice tts --emotion ha", ["happy"]),
    ("glmvoice sessions export x --format js", ["jsonl"]),
    ("glmvoice sessions show la", ["last"]),
    ("glmvoice chat --resume la", ["last"]),
])
def test_shell_completion_offers_values(words: str, expected: list[str]) -> None:
    import os
    import shutil
    import subprocess

    exe = shutil.which("glmvoice")
    if exe is None:
        pytest.skip("the glmvoice script is not installed (pip install -e .)")
    env = {**os.environ, "_GLMVOICE_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}
    done = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.split() == expected, (done.stdout, done.stderr)
