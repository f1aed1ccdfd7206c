"""A corpus of damaged model folders, built at run time from the tiny model set.

Every case must end in ONE line naming its file (and field), never in a traceback, within a 4 GB
address space and 60 s per case. All cases load in one process of their own (tests/damage_runner.py,
forked by conftest's warm Python, which has torch imported already).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from glmvoice_cli.tiny.modelset import write_tiny_model_set

from .warm_python import WarmPython

RUNNER = Path(__file__).with_name("damage_runner.py")
Mutation = Callable[[Path], None]


def _json_edit(name: str, **changes: object) -> Mutation:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        data.update(changes)
        (folder / name).write_text(json.dumps(data), encoding="utf-8")  # NaN/Infinity are written as such

    return mutate


def _write(name: str, content: bytes | str) -> Mutation:
    def mutate(folder: Path) -> None:
        data = content.encode("utf-8") if isinstance(content, str) else content
        (folder / name).write_bytes(data)

    return mutate


def _ranks(edit: Callable[[list[str]], list[str]]) -> Mutation:
    def mutate(folder: Path) -> None:
        lines = (folder / "tokenizer.model").read_text(encoding="ascii").splitlines()
        (folder / "tokenizer.model").write_text("\n".join(edit(lines)) + "\n", encoding="ascii")

    return mutate


def _yaml_line(key: str, value: str, extra: tuple[str, str] | None = None) -> Mutation:
    def mutate(folder: Path) -> None:
        lines = (folder / "config.yaml").read_text(encoding="utf-8").splitlines()
        for k, v in ((key, value), *([extra] if extra else [])):
            i = max(i for i, line in enumerate(lines) if line.strip().startswith(f"{k}:"))
            lines[i] = lines[i].split(":")[0] + ": " + v
        (folder / "config.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    return mutate


def _weights(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    def mutate(folder: Path) -> None:
        path = folder / name
        if name.endswith(".pt"):
            state = torch.load(path, weights_only=True)
            edit(state)
            torch.save(state, path)
        else:
            from safetensors.torch import load_file, save_file

            state = load_file(str(path))
            edit(state)
            save_file(state, str(path), metadata={"format": "pt"})

    return mutate


def _nan_first(state: dict[str, torch.Tensor]) -> None:
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")


def _added_huge(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens_decoder"]["1000000"] = {"content": "<|reserved_x|>"}
    path.write_text(json.dumps(data), encoding="utf-8")


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("unpickled!",))


def _evil_pickle(folder: Path) -> None:
    torch.save({"weight": _Evil()}, folder / "hift.pt")


LAUGHS = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)])
DEEP_JSON = "[" * 200_000 + "]" * 200_000

# (case name, stage, mutation, fragments the one-line error must contain)
CASES: list[tuple[str, str, Mutation, tuple[str, ...]]] = [
    ("lm rope_ratio NaN", "lm", _json_edit("config.json", rope_ratio=float("nan")), ("config.json", "rope_ratio")),
    ("lm epsilon string", "lm", _json_edit("config.json", layernorm_epsilon="1e-5"), ("config.json", "layernorm_epsilon")),
    ("lm hidden 0", "lm", _json_edit("config.json", hidden_size=0), ("config.json", "hidden_size")),
    ("lm seq_length -5", "lm", _json_edit("config.json", seq_length=-5), ("config.json", "seq_length")),
    ("lm kv_channels 6", "lm", _json_edit("config.json", kv_channels=6), ("config.json", "kv_channels")),
    ("lm huge layers", "lm", _json_edit("config.json", num_layers=10**7, num_hidden_layers=10**7), ("config.json",)),
    ("lm config list", "lm", _write("config.json", "[1, 2]"), ("config.json",)),
    ("lm config deep", "lm", _write("config.json", DEEP_JSON), ("config.json",)),
    ("lm config binary", "lm", _write("config.json", bytes(range(256)) * 4), ("config.json",)),
    ("ranks non-ascii", "lm", _write("tokenizer.model", "w6k= 0\n\u00e9\u00e9 1\n"), ("tokenizer.model", "ASCII")),
    ("ranks binary", "lm", _write("tokenizer.model", bytes(range(256))), ("tokenizer.model",)),
    ("ranks duplicate", "lm", _ranks(lambda ls: [*ls, ls[-1].split()[0][:-4] + "YWFh " + ls[-1].split()[1]]),
     ("tokenizer.model",)),
    ("ranks huge", "lm", _ranks(lambda ls: [*ls[:-1], ls[-1].split()[0] + " 1000000000000000000"]), ("tokenizer.model",)),
    ("ranks negative", "lm", _ranks(lambda ls: [*ls[:-1], ls[-1].split()[0] + " -3"]), ("tokenizer.model",)),
    ("ranks missing byte", "lm", _ranks(lambda ls: ls[:65] + ls[66:]), ("tokenizer.model",)),
    ("ranks whitespace", "lm", _write("tokenizer.model", "  \n\t\n"), ("tokenizer.model", "no ranks")),
    ("added id huge", "lm", _added_huge, ("tokenizer_config.json", "beyond the model")),
    ("added id 2**40", "lm", _json_edit("tokenizer_config.json", added_tokens_decoder={
        str(2**40): {"content": "<|endoftext|>"}}), ("tokenizer_config.json", "added_tokens_decoder")),
    ("generation do_sample", "lm", _write("generation_config.json", '{"do_sample": "yes"}'),
     ("generation_config.json", "do_sample")),
    ("lm weights NaN", "lm", _weights("model.safetensors", _nan_first), ("model.safetensors", "NaN")),
    ("lm weights text", "lm", _write("model.safetensors", "hello\n"), ("model.safetensors",)),
    ("decoder heads 0", "decoder", _yaml_line("attention_heads", "0"), ("config.yaml", "attention_heads")),
    ("decoder hop 0", "decoder", _yaml_line("hop_len", "0"), ("config.yaml", "hop_len")),
    ("decoder channels empty", "decoder", _yaml_line("channels", "[]"), ("config.yaml", "channels")),
    ("decoder channels scalar", "decoder", _yaml_line("channels", "32"), ("config.yaml", "channels")),
    ("decoder size inf", "decoder", _yaml_line("num_blocks", ".inf"), ("config.yaml", "num_blocks")),
    ("decoder size string", "decoder", _yaml_line("output_size", "big"), ("config.yaml", "output_size")),
    ("decoder upsample 1000", "decoder", _yaml_line("upsample_rates", "[1000, 8]"), ("config.yaml", "upsample")),
    ("decoder upsample 1e8", "decoder",
     _yaml_line("upsample_rates", "[100000000, 8]", ("upsample_kernel_sizes", "[100000000, 16]")), ("config.yaml", "GiB")),
    ("decoder blocks 1e6", "decoder", _yaml_line("num_blocks", "1000000"), ("config.yaml",)),
    ("decoder !!int 1.5", "decoder", _yaml_line("vocab_size", "!!int 1.5"), ("config.yaml", "line")),
    ("decoder bad timestamp", "decoder", _yaml_line("vocab_size", "2001-13-45"), ("config.yaml", "timestamp")),
    ("decoder python tag", "decoder", _write("config.yaml", "a: !!python/object/apply:os.system ['true']\n"),
     ("config.yaml",)),
    ("decoder laughs", "decoder", _write("config.yaml", LAUGHS), ("config.yaml",)),
    ("decoder deep", "decoder", _write("config.yaml", "a: " + "[" * 100_000 + "]" * 100_000), ("config.yaml",)),
    ("decoder binary", "decoder", _write("config.yaml", bytes(range(256)) * 8), ("config.yaml",)),
    ("flow.pt text", "decoder", _write("flow.pt", "just some text\n" * 10_000), ("flow.pt", "not a PyTorch weights file")),
    ("flow.pt too small", "decoder", _write("flow.pt", "x"), ("flow.pt", "config.flow")),
    ("hift.pt pickle", "decoder", _evil_pickle, ("hift.pt", "refused for safety")),
    ("flow.pt NaN", "decoder", _weights("flow.pt", _nan_first), ("flow.pt", "NaN")),
    ("tokenizer d_model 0", "tokenizer", _json_edit("config.json", d_model=0), ("config.json", "d_model")),
    ("tokenizer heads 0", "tokenizer", _json_edit("config.json", encoder_attention_heads=0),
     ("config.json", "encoder_attention_heads")),
    ("tokenizer pooling 0", "tokenizer", _json_edit("config.json", pooling_kernel_size=0),
     ("config.json", "pooling_kernel_size")),
    ("tokenizer block 0", "tokenizer", _json_edit("config.json", quantize_causal_block_size=0),
     ("config.json", "quantize_causal_block_size")),
    ("tokenizer string", "tokenizer", _json_edit("config.json", d_model="64"), ("config.json", "d_model")),
    ("tokenizer inf", "tokenizer", _json_edit("config.json", encoder_ffn_dim=float("inf")), ("config.json", "encoder_ffn_dim")),
    ("tokenizer list", "tokenizer", _write("config.json", "[]"), ("config.json",)),
    ("tokenizer huge", "tokenizer", _json_edit("config.json", d_model=2**20, encoder_attention_heads=1), ("config.json",)),
    ("preprocessor n_fft 0", "tokenizer", _json_edit("preprocessor_config.json", n_fft=0),
     ("preprocessor_config.json", "n_fft")),
    ("preprocessor hop 0", "tokenizer", _json_edit("preprocessor_config.json", hop_length=0),
     ("preprocessor_config.json", "hop_length")),
    ("preprocessor rate 0", "tokenizer", _json_edit("preprocessor_config.json", sampling_rate=0),
     ("preprocessor_config.json", "sampling_rate")),
    ("preprocessor list", "tokenizer", _write("preprocessor_config.json", "[1]"), ("preprocessor_config.json",)),
    ("preprocessor n_fft huge", "tokenizer", _json_edit("preprocessor_config.json", n_fft=2**31, hop_length=2**31),
     ("preprocessor_config.json", "GiB")),
    ("codebook int", "tokenizer", _weights("model.safetensors", lambda s: s.update(
        {"codebook.weight": s["codebook.weight"].to(torch.int32)})), ("model.safetensors", "codebook")),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, warm_python: WarmPython) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("corpus")
    models = write_tiny_model_set(root / "models", codebook=32)
    cases = []
    for index, (name, stage, mutate, _) in enumerate(CASES):
        folder = root / f"case{index:03d}"
        shutil.copytree(models.dirs[stage], folder)
        mutate(folder)
        cases.append({"name": name, "stage": stage, "path": str(folder)})
    (root / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    runner = warm_python.popen([str(RUNNER), str(root / "cases.json"), str(root / "results.json")], env)
    _, err = runner.communicate(timeout=60 * len(CASES))
    assert runner.returncode == 0, err[-3000:]
    return {r["name"]: r for r in json.loads((root / "results.json").read_text(encoding="utf-8"))}


@pytest.mark.parametrize(("name", "fragments"), [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_folder_gives_one_line(results: dict[str, dict], name: str, fragments: tuple[str, ...]) -> None:
    result = results[name]
    assert result["outcome"] == "error", result["message"]
    message = result["message"]
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert result["seconds"] < 60
