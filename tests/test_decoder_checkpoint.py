"""Decoder files: safe YAML (nothing named in it is imported or called) and strict checkpoints."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from glmvoice_cli.decoder.checkpoint import FLOW_FILE, HIFT_FILE, load_decoder, read_state_dict
from glmvoice_cli.decoder.config import (
    CONFIG_FILE,
    Tagged,
    load_decoder_config,
    parse_hyperpyyaml,
)
from glmvoice_cli.errors import CheckpointError, CheckpointMismatchError, ModelNotFoundError
from glmvoice_cli.tiny.decoder import TinyDecoderSpec, decoder_yaml, write_tiny_decoder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("decoder"), TinyDecoderSpec(vocab_size=48))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tiny_roundtrip(tiny_dir: Path) -> None:
    models = load_decoder(tiny_dir)
    assert models.config.flow.vocab_size == 48
    assert models.flow.input_embedding.weight.shape[0] == 48
    assert not models.flow.training and not models.hift.training
    assert all(m.folded for m in models.hift.modules() if hasattr(m, "folded"))
    assert not any(k.endswith(("weight_g", "weight_v")) for k in models.hift.state_dict())


def test_config_values_and_yaml11_float() -> None:
    data = parse_hyperpyyaml(decoder_yaml(TinyDecoderSpec()))
    assert isinstance(data["flow"], Tagged) and data["flow"].kind == "new"
    assert data["hift"].args["sampling_rate"] == 22050  # !ref resolved
    cfm = data["flow"].args["decoder"].args["cfm_params"].args["content"]
    assert cfm["sigma_min"] == "1e-06"  # YAML 1.1: a string, converted by the config reader
    assert isinstance(data["__set_seed3"], Tagged) and data["__set_seed3"].kind == "apply"


def test_hostile_yaml_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = decoder_yaml(TinyDecoderSpec()) + (
        f"evil: !new:os.system ['touch {marker}']\n"
        f"evil2: !apply:os.system ['touch {marker}']\n"
        f"evil3: !name:subprocess.call ['touch', '{marker}']\n"
        f"evil4: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    (tmp_path / CONFIG_FILE).write_text(text)
    modules_before = set(sys.modules)
    with pytest.raises(CheckpointError, match="unreadable YAML"):
        load_decoder_config(tmp_path)  # the python/ tag is refused outright by the safe loader
    (tmp_path / CONFIG_FILE).write_text(text.rsplit("evil4", 1)[0])
    cfg = load_decoder_config(tmp_path)  # the hyperpyyaml tags are read as inert data
    assert cfg.flow.vocab_size == TinyDecoderSpec().vocab_size
    assert not marker.exists()
    assert "cosyvoice" not in sys.modules and not (set(sys.modules) - modules_before) & {"subprocess"}


def test_unsupported_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_decoder_config(tmp_path)
    text = decoder_yaml(TinyDecoderSpec()).replace("block_rel_selfattn", "rel_selfattn")
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match="selfattention_layer_type"):
        load_decoder_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(decoder_yaml(TinyDecoderSpec()).replace("    vocab_size: 64\n", ""))
    with pytest.raises(CheckpointError, match=r"missing key config\.flow\.vocab_size"):
        load_decoder_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("x: !ref <nope>\n")
    with pytest.raises(CheckpointError, match="nope"):
        load_decoder_config(tmp_path)


@pytest.mark.parametrize("name", [CONFIG_FILE, FLOW_FILE, HIFT_FILE])
def test_missing_file(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    folder = _copy(tiny_dir, tmp_path / "d")
    (folder / name).unlink()
    with pytest.raises(ModelNotFoundError, match=name):
        load_decoder(folder)
    with pytest.raises(ModelNotFoundError):
        load_decoder(tmp_path / "nowhere")


def test_wrong_key_and_shape(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path / "d")
    state = torch.load(folder / HIFT_FILE, weights_only=True)
    state["conv_pre.weight"] = state.pop("conv_pre.weight_v")
    torch.save(state, folder / HIFT_FILE)
    with pytest.raises(CheckpointMismatchError, match=r"hift\.pt: missing key 'conv_pre\.weight_v'") as err:
        load_decoder(folder)
    assert "\n" not in str(err.value)

    folder = _copy(tiny_dir, tmp_path / "e")
    state = torch.load(folder / FLOW_FILE, weights_only=True)
    state["encoder_proj.weight"] = torch.zeros(3, 3)
    torch.save(state, folder / FLOW_FILE)
    with pytest.raises(CheckpointMismatchError, match=r"flow\.pt: key 'encoder_proj\.weight' has shape \[3, 3\]"):
        load_decoder(folder)

    state.pop("encoder_proj.weight")
    state["encoder_proj.weight"] = torch.zeros(80, 32)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, folder / FLOW_FILE)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'extra.weight'"):
        load_decoder(folder)


def test_not_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("unpickled!",))

    path = tmp_path / FLOW_FILE
    torch.save({"a": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"something other than weights.*refused for safety") as info:
        read_state_dict(path)
    assert "weights_only=False" not in str(info.value)  # never advise the unsafe retry
    for content in (b"garbage", b"hello, a text file\n"):
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="not a PyTorch weights file"):
            read_state_dict(path)


def test_non_finite_weights_are_reported_at_load(tmp_path: Path) -> None:
    path = tmp_path / FLOW_FILE
    torch.save({"a.weight": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}, path)
    with pytest.raises(CheckpointMismatchError, match=r"'a.weight' holds NaN"):
        read_state_dict(path)


def _shape_of(node: object, path: str = "") -> set[str]:
    """Every key path with its tag (kind:target), values left out: the layout of a config."""
    from glmvoice_cli.decoder.config import Tagged

    out: set[str] = set()
    if isinstance(node, Tagged):
        out.add(f"{path}@{node.kind}:{node.target}")
        node = node.args
    if isinstance(node, dict):
        for key, value in node.items():
            out |= _shape_of(value, f"{path}.{key}")
    return out


@pytest.mark.golden
def test_tiny_config_has_the_official_layout(golden: Path) -> None:
    official = parse_hyperpyyaml((golden / "decoder" / CONFIG_FILE).read_text())
    ours = parse_hyperpyyaml(decoder_yaml(TinyDecoderSpec()))
    assert _shape_of(ours) == _shape_of(official)
