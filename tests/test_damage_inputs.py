"""A corpus of damaged inputs: token files, config files, environment variables and option values.

The companion of test_damage_corpus.py (damaged model folders). Every case runs the real CLI and must
end in ONE line naming its file, option or variable, never a traceback, within a 4 GB address space and
60 s. All cases run in one process of their own (tests/damage_cli_runner.py, forked by conftest's warm
Python, which has torch imported already).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from .warm_python import WarmPython

RUNNER = Path(__file__).with_name("damage_cli_runner.py")
MILLIONS = 2_000_000  # tokens on one line: parsed and checked without gigabytes

Build = Callable[[Path], dict]  # case folder -> {"args", "env", "stdin_file"}


def _file(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    return write


def _decode(content: bytes | str, *extra: str, name: str = "tokens.txt") -> Build:
    def build(folder: Path) -> dict:
        path = _file(name, content)(folder)
        return {"args": ["decode", str(path), "-o", str(folder / "out.wav"), *extra]}

    return build


def _decode_tiny(content: str) -> Build:
    def build(folder: Path) -> dict:
        path = _file("tokens.txt", content)(folder)
        tiny = folder.parent / "models" / "decoder"
        return {"args": ["decode", str(path), "-o", str(folder / "out.wav"), "--decoder", str(tiny)]}

    return build


def _stdin(content: bytes) -> Build:
    def build(folder: Path) -> dict:
        path = _file("stdin.bin", content)(folder)
        return {"args": ["decode", "-", "-o", str(folder / "out.wav")], "stdin_file": str(path)}

    return build


def _config(content: bytes | str | None, *args: str) -> Build:
    """GLMVOICE_CONFIG pointing at `content` (None: at a folder)."""

    def build(folder: Path) -> dict:
        path = folder / "config.toml"
        if content is None:
            path.mkdir()
        else:
            _file("config.toml", content)(folder)
        return {"args": list(args or ("models", "list")), "env": {"GLMVOICE_CONFIG": str(path)}}

    return build


def _env(name: str, target: str, *args: str, **more: str) -> Build:
    """`name` pointing at `target` under the case folder (made a file with some binary content)."""

    def build(folder: Path) -> dict:
        _file("afile", bytes(range(256)))(folder)
        return {"args": list(args), "env": {name: str(folder / target), **more}}

    return build


def _args(*args: str, env: dict[str, str] | None = None) -> Build:
    def build(folder: Path) -> dict:
        return {"args": [a.replace("{case}", str(folder)) for a in args], "env": env or {}}

    return build


DEEP_JSON = "[" * 200_000 + "]" * 200_000
NOWHERE = ("--models", "{case}/none")

# (case name, builder, fragments the one-line error must contain)
CASES: list[tuple[str, Build, tuple[str, ...]]] = [
    ("tokens 100,000 digits", _decode("1" * 100_000), ("tokens.txt", "100000 digits")),
    ("tokens JSON 100,000 digits", _decode("[" + "7" * 100_000 + "]", name="t.json"), ("t.json", "100000 digits")),
    ("tokens deep JSON", _decode(DEEP_JSON, name="t.json"), ("t.json", "nested too deeply")),
    ("tokens deep JSON lines", _decode('{"tokens": ' + DEEP_JSON + "}\n", name="t.jsonl"), ("t.jsonl", "nested")),
    ("tokens JSON string", _decode('{"tokens": "123"}', name="t.jsonl"), ("t.jsonl", "JSON")),
    ("tokens binary", _decode(bytes(range(256)) * 4), ("tokens.txt",)),
    ("tokens stdin binary", _stdin(bytes(range(256)) * 4), ("stdin", "UTF-8")),
    ("tokens millions then junk", _decode("5 " * MILLIONS + "x" * 100_000), ("tokens.txt", "100000 characters")),
    ("tokens millions out of range", _decode_tiny("5 " * MILLIONS + "99999"), ("speech token 99999", "out of range")),
    ("tokens negative", _decode("1 2 -3"), ("tokens.txt", "'-3'")),
    ("config binary", _config(bytes(range(256)) * 4), ("config.toml", "GLMVOICE_CONFIG", "UTF-8")),
    ("config deep arrays", _config("a = " + "[" * 100_000 + "]" * 100_000), ("config.toml", "nested")),
    ("config deep tables", _config("a = " + "{x=" * 100_000 + "1" + "}" * 100_000), ("config.toml", "nested")),
    ("config folder", _config(None), ("config.toml", "GLMVOICE_CONFIG", "folder")),
    ("config huge", _config("# padding\n" * 200_000), ("config.toml", "KiB")),
    ("config bad TOML", _config("temperature = = 1\n"), ("config.toml", "TOML")),
    ("config bad value", _config('temperature = "hot"\n', "tts", "hi", "-o", "x.wav"), ("temperature", "config file")),
    ("config models number", _config("models = 5\n", "tts", "hi", "-o", "x.wav"), ("config.toml", "models")),
    ("GLMVOICE_HOME file", _env("GLMVOICE_HOME", "afile", "models", "list"), ("GLMVOICE_HOME", "afile")),
    ("GLMVOICE_HOME under a file", _env("GLMVOICE_HOME", "afile/home", "tts", "hi", "-o", "x.wav"),
     ("GLMVOICE_HOME", "afile")),
    ("GLMVOICE_HOME file, sessions", _env("GLMVOICE_HOME", "afile", "sessions", "list"), ("GLMVOICE_HOME",)),
    ("GLMVOICE_CONFIG binary", _env("GLMVOICE_CONFIG", "afile", "models", "list"), ("afile", "GLMVOICE_CONFIG")),
    ("HF_HUB_CACHE file", _env("HF_HUB_CACHE", "afile", "models", "list", GLMVOICE_HOME=""), ("HF_HUB_CACHE",)),
    ("GLMVOICE_SEED huge", _args("tts", "hi", *NOWHERE, env={"GLMVOICE_SEED": str(2**64)}), ("GLMVOICE_SEED",)),
    ("tts --seed 2**64", _args("tts", "hi", "--seed", str(2**64), *NOWHERE), ("--seed",)),
    ("transcribe --window inf", _args("transcribe", "x.wav", "--window", "inf", *NOWHERE), ("--window",)),
    ("transcribe --window nan", _args("transcribe", "x.wav", "--window", "nan", *NOWHERE), ("--window",)),
    ("chat --simulate-echo inf", _args("chat", "--input-file", "x.wav", "--simulate-echo", "inf", *NOWHERE),
     ("--simulate-echo",)),
    ("chat --simulate-echo nan", _args("chat", "--input-file", "x.wav", "--simulate-echo", "nan", *NOWHERE),
     ("--simulate-echo",)),
    ("chat --simulate-echo -1", _args("chat", "--input-file", "x.wav", "--simulate-echo", "-1", *NOWHERE),
     ("--simulate-echo",)),
    ("selftest --keep under a file", _args("selftest", "--keep", "{case}/../afile/x"), ("--keep", "afile")),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, warm_python: WarmPython) -> dict[str, dict]:
    from glmvoice_cli.tiny.decoder import TinyDecoderSpec, write_tiny_decoder

    root = tmp_path_factory.mktemp("inputs")
    write_tiny_decoder(root / "models" / "decoder", TinyDecoderSpec(vocab_size=64))
    (root / "afile").write_bytes(b"not a folder")
    cases = []
    for index, (name, build, _) in enumerate(CASES):
        folder = root / f"case{index:03d}"
        folder.mkdir()
        cases.append({"name": name, "env": {}, **build(folder)})
    (root / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    runner = warm_python.popen([str(RUNNER), str(root / "cases.json"), str(root / "results.json")], env, cwd=root)
    _, err = runner.communicate(timeout=60 * len(CASES))
    assert runner.returncode == 0, err[-3000:]
    return {r["name"]: r for r in json.loads((root / "results.json").read_text(encoding="utf-8"))}


@pytest.mark.parametrize(("name", "fragments"), [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_input_gives_one_line(results: dict[str, dict], name: str, fragments: tuple[str, ...]) -> None:
    result = results[name]
    assert result["outcome"] == "exit", result["detail"] or result["stderr"]
    assert result["code"] not in (0, None), result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"][-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result["seconds"] < 60
