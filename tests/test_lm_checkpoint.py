"""The ChatGLM -> GlmForCausalLM loader: mapping, sharding and one-line errors on bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmvoice_cli.errors import CheckpointMismatchError, ModelNotFoundError, UsageError
from glmvoice_cli.lm.checkpoint import load_lm_config, map_official_tensor
from glmvoice_cli.lm.loader import load_lm
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

SPEC = TinyLMSpec(hidden_size=32, num_layers=2, num_heads=4, kv_groups=2, kv_channels=12, ffn_hidden_size=48, seed=3)
CPU32 = LoadOptions(device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "single", SPEC)


@pytest.fixture
def copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[300, 302, 5, 77, 9, 310]])).logits


def test_config_mapping(tiny_dir: Path) -> None:
    cfg = load_lm_config(tiny_dir)
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert cfg.vocab_size == raw["padded_vocab_size"]
    assert cfg.intermediate_size == raw["ffn_hidden_size"]
    assert cfg.num_key_value_heads == raw["multi_query_group_num"]
    assert cfg.head_dim == raw["kv_channels"]
    assert cfg.attention_bias is True
    assert cfg.tie_word_embeddings is False
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert cfg.eos_token_id == raw["eos_token_id"]


def test_qkv_split_is_contiguous() -> None:
    from transformers import GlmConfig

    glm = GlmConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    fused = torch.arange(16 * 8).reshape(16, 8)
    parts = dict(
        map_official_tensor("transformer.encoder.layers.3.self_attention.query_key_value.weight", fused, glm)
    )
    assert torch.equal(parts["model.layers.3.self_attn.q_proj.weight"], fused[:8])
    assert torch.equal(parts["model.layers.3.self_attn.k_proj.weight"], fused[8:12])
    assert torch.equal(parts["model.layers.3.self_attn.v_proj.weight"], fused[12:])


def test_rope_ratio_sets_theta_and_the_stored_inv_freq_is_ignored(copy: Path) -> None:
    _edit_config(copy, rope_ratio=2)
    model = load_lm(copy, CPU32)
    head_dim = model.config.head_dim
    rotary = head_dim // 2
    expected = 1.0 / (20_000.0 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_sharded_equals_single_file(tiny_dir: Path, tmp_path: Path) -> None:
    sharded = write_tiny_lm(tmp_path / "sharded", TinyLMSpec(**{**SPEC.__dict__, "n_shards": 3}))
    assert (sharded / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(load_lm(sharded, CPU32)), _logits(load_lm(tiny_dir, CPU32)))


def test_dtype_choice(tiny_dir: Path) -> None:
    model = load_lm(tiny_dir, LoadOptions(device="cpu", dtype="bf16"))
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_missing_config(copy: Path) -> None:
    (copy / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"config.json"):
        load_lm(copy, CPU32)


def test_missing_weights(copy: Path) -> None:
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"model.safetensors"):
        load_lm(copy, CPU32)


def test_missing_shard(tmp_path: Path) -> None:
    folder = write_tiny_lm(tmp_path / "sharded", TinyLMSpec(**{**SPEC.__dict__, "n_shards": 2}))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"model-00002-of-00002.safetensors"):
        load_lm(folder, CPU32)


@pytest.mark.parametrize(
    ("field", "value"),
    [("rmsnorm", False), ("add_bias_linear", True), ("original_rope", False), ("post_layer_norm", False)],
)
def test_unsupported_flag(copy: Path, field: str, value: bool) -> None:
    _edit_config(copy, **{field: value})
    with pytest.raises(CheckpointMismatchError, match=rf"config\.json.*'{field}'") as info:
        load_lm(copy, CPU32)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_layers": None}, "num_layers"),
        ({"model_type": "llama"}, "model_type"),
        ({"kv_channels": 7}, "kv_channels"),
        ({"multi_query_group_num": 3}, "multi_query_group_num"),
        ({"rope_ratio": -1}, "rope_ratio"),
    ],
)
def test_bad_config(copy: Path, changes: dict, field: str) -> None:
    _edit_config(copy, **changes)
    with pytest.raises(CheckpointMismatchError, match=field):
        load_lm(copy, CPU32)


def test_wrong_key_names_file_and_key(copy: Path) -> None:
    old = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    _edit_weights(copy, lambda w: w.__setitem__("transformer.encoder.layers.1.mlp.renamed", w.pop(old)))
    with pytest.raises(
        CheckpointMismatchError, match=r"model\.safetensors.*transformer\.encoder\.layers\.1\.mlp"
    ):
        load_lm(copy, CPU32)


def test_missing_key(copy: Path) -> None:
    _edit_weights(copy, lambda w: w.pop("transformer.output_layer.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'transformer.output_layer.weight'"):
        load_lm(copy, CPU32)


def test_wrong_shape_names_file_and_key(copy: Path) -> None:
    key = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    _edit_weights(copy, lambda w: w.__setitem__(key, w[key][:-1].clone()))
    with pytest.raises(CheckpointMismatchError, match=rf"model\.safetensors: key '{key}' has shape") as info:
        load_lm(copy, CPU32)
    assert "\n" not in str(info.value)


def test_config_disagreeing_with_weights(copy: Path) -> None:
    _edit_config(copy, ffn_hidden_size=SPEC.ffn_hidden_size * 2)
    with pytest.raises(CheckpointMismatchError, match=r"mlp\.dense_.*config implies"):
        load_lm(copy, CPU32)


def test_truncated_file(copy: Path) -> None:
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointMismatchError, match=r"model.safetensors"):
        load_lm(copy, CPU32)


def test_unknown_device_and_dtype(tiny_dir: Path) -> None:
    with pytest.raises(UsageError):
        load_lm(tiny_dir, LoadOptions(device="tpu"))
    with pytest.raises(UsageError):
        load_lm(tiny_dir, LoadOptions(device="cpu", dtype="int3"))


def test_quantization_needs_cuda(tiny_dir: Path) -> None:
    with pytest.raises(UsageError, match="CUDA"):
        load_lm(tiny_dir, LoadOptions(device="cpu", quantize_bits=4))
