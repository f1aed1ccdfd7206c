"""Load the official ChatGLM-format GLM-4-Voice checkpoint into `transformers.GlmForCausalLM`.

The official folder (THUDM/glm-4-voice-9b) holds a `model_type: chatglm` config.json, safetensors
shards with `transformer.*` keys and `auto_map` entries pointing at Python files we never run. We map
the config fields onto `GlmConfig` and each official tensor onto its native key(s) while the shards
stream in: the model is built on the meta device and every parameter is filled in place, so a 9B
model never holds a second full copy in memory.

Every file, key and shape is checked against the config before the first weight is read, and every
problem is a one-line `CheckpointError` naming the file and the key or field.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmvoice_cli.errors import CheckpointMismatchError, ModelNotFoundError
from glmvoice_cli.files import loads_json, read_limited

if TYPE_CHECKING:
    import torch
    from transformers import GlmConfig, GlmForCausalLM

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
JSON_MAX_BYTES = 16 << 20  # config.json and the shard index are a few KiB
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names; the official weights are BF16

ROPE_BASE = 10_000.0  # ChatGLM: theta = 10000 * rope_ratio
ROTARY_FRACTION = 0.5  # ChatGLM rotates the first half of each head's dims (interleaved pairs)

# Fields GlmForCausalLM hard-wires: a checkpoint that sets them otherwise computes something else.
REQUIRED_FLAGS: dict[str, bool] = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "original_rope": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
}
OPTIONAL_FLAGS = ("tie_word_embeddings", "add_qkv_bias", "multi_query_attention")  # read as booleans
REQUIRED_INTS = (
    "padded_vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "num_layers",
    "num_attention_heads",
    "kv_channels",
)
DEFAULT_SEQ_LENGTH = 8192  # positions; the real voice config's seq_length is unconfirmed


OFFICIAL_PREFIX = "transformer."
DROPPED_KEYS = frozenset({"transformer.rotary_pos_emb.inv_freq"})  # recomputed from rope_ratio


# --------------------------------------------------------------------------- config


def read_chatglm_config(folder: Path) -> dict[str, Any]:
    """The raw config.json of an official checkpoint folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: not found (expected a ChatGLM-format GLM-4-Voice checkpoint)")
    return read_json_object(path)


def read_json_object(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON file holding one object; anything else (unreadable, too big, nested past recursion, a list)
    is one CheckpointMismatchError naming the file."""
    try:
        raw = loads_json(read_limited(path, max_bytes or JSON_MAX_BYTES))
    except OSError as exc:  # unreadable, or past the cap (the message says which)
        raise CheckpointMismatchError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from exc
    except ValueError as exc:  # not UTF-8, not JSON, nested past the parser
        raise CheckpointMismatchError(f"{path}: unreadable JSON ({type(exc).__name__})") from exc
    if not isinstance(raw, dict):
        raise CheckpointMismatchError(f"{path}: expected a JSON object")
    return raw


def _field(raw: dict[str, Any], name: str, source: Path, kind: type) -> Any:
    if name not in raw:
        raise CheckpointMismatchError(f"{source}: missing field '{name}'")
    value = raw[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise CheckpointMismatchError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
    return value


def validate_chatglm_config(raw: dict[str, Any], source: Path) -> None:
    """Raise CheckpointMismatchError for any field GlmForCausalLM cannot represent."""
    model_type = raw.get("model_type")
    if model_type != "chatglm":
        raise CheckpointMismatchError(f"{source}: field 'model_type' is {model_type!r}, expected 'chatglm'")
    for name in (*REQUIRED_FLAGS, *OPTIONAL_FLAGS):  # "no" or 1 is not a flag: bool("no") would read as True
        if name in raw and not isinstance(raw[name], bool):
            raise CheckpointMismatchError(f"{source}: field '{name}' must be true or false, got {raw[name]!r}"[:200])
    eos = raw.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointMismatchError(f"{source}: field 'eos_token_id' must be a token id or a list of them, "
                                      f"got {eos!r}"[:200])
    for name, expected in REQUIRED_FLAGS.items():
        if name in raw and bool(raw[name]) != expected:
            raise CheckpointMismatchError(
                f"{source}: field '{name}' is {raw[name]!r}; only {expected} is supported"
            )
    for name in REQUIRED_INTS:
        _field(raw, name, source, int)
    # kv_channels x heads may differ from hidden_size: the attention is that wide (GlmConfig.head_dim).
    heads, head_dim = raw["num_attention_heads"], raw["kv_channels"]
    if head_dim % 4:  # the rotary half of each head is rotated in pairs
        raise CheckpointMismatchError(
            f"{source}: field 'kv_channels' must be a multiple of 4 (rotary pairs), got {head_dim}"
        )
    if raw.get("multi_query_attention", False):
        groups = _field(raw, "multi_query_group_num", source, int)
        if heads % groups:
            raise CheckpointMismatchError(
                f"{source}: field 'multi_query_group_num' ({groups}) does not divide num_attention_heads ({heads})"
            )
    for name, default in (("rope_ratio", 1), ("layernorm_epsilon", 1e-5)):
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise CheckpointMismatchError(f"{source}: field '{name}' must be a positive number, got {value!r}")
    seq = raw.get("seq_length")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0):
        raise CheckpointMismatchError(f"{source}: field 'seq_length' must be a positive integer, got {seq!r}")
    if raw.get("num_hidden_layers", raw["num_layers"]) != raw["num_layers"]:
        raise CheckpointMismatchError(f"{source}: field 'num_hidden_layers' disagrees with 'num_layers'")


def glm_config_from_chatglm(raw: dict[str, Any], source: Path) -> GlmConfig:
    """Map a validated ChatGLM config dict onto the native `GlmConfig`."""
    from transformers import GlmConfig

    validate_chatglm_config(raw, source)
    heads = raw["num_attention_heads"]
    kv_heads = raw["multi_query_group_num"] if raw.get("multi_query_attention", False) else heads
    vocab = raw["padded_vocab_size"]
    pad = raw.get("pad_token_id")
    eos = raw.get("eos_token_id")
    return GlmConfig(
        vocab_size=vocab,
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"],
        num_hidden_layers=raw["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=raw["kv_channels"],
        hidden_act="silu",
        rms_norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),
        attention_bias=bool(raw.get("add_qkv_bias", False)),
        max_position_embeddings=int(raw.get("seq_length") or DEFAULT_SEQ_LENGTH),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_BASE * float(raw.get("rope_ratio", 1)),
            "partial_rotary_factor": ROTARY_FRACTION,
        },
        eos_token_id=eos,
        # nn.Embedding(padding_idx) only matters for training; keep it only when it is in range.
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < vocab else None,
        use_cache=True,
    )


# --------------------------------------------------------------------------- keys


def official_shapes(cfg: GlmConfig) -> dict[str, tuple[int, ...]]:
    """Every official key the config implies, with its shape (the inv_freq buffer is optional)."""
    hidden, head_dim = cfg.hidden_size, int(cfg.head_dim or 0)
    qkv = (cfg.num_attention_heads + 2 * int(cfg.num_key_value_heads or 0)) * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (cfg.vocab_size, hidden),
        "transformer.encoder.final_layernorm.weight": (hidden,),
        "transformer.output_layer.weight": (cfg.vocab_size, hidden),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attention.query_key_value.weight"] = (qkv, hidden)
        if cfg.attention_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (qkv,)
        shapes[p + "self_attention.dense.weight"] = (hidden, cfg.num_attention_heads * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * cfg.intermediate_size, hidden)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (hidden, cfg.intermediate_size)
    return shapes


_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate | up] in both layouts
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def map_official_tensor(key: str, tensor: torch.Tensor, cfg: GlmConfig) -> list[tuple[str, torch.Tensor]]:
    """One official tensor -> its native (key, tensor) pairs; the fused qkv splits in three.

    query_key_value rows are [q: nh*hd | k: ng*hd | v: ng*hd], a plain contiguous split.
    """
    if key in _TOP_RENAMES:
        return [(_TOP_RENAMES[key], tensor)]
    layer_prefix = "transformer.encoder.layers."
    index, _, rest = key[len(layer_prefix) :].partition(".")
    native = f"model.layers.{index}."
    if rest in _LAYER_RENAMES:
        return [(native + _LAYER_RENAMES[rest], tensor)]
    kind = rest.rsplit(".", 1)[-1]  # "weight" | "bias"
    head_dim = int(cfg.head_dim or 0)  # always set by glm_config_from_chatglm
    q_rows = cfg.num_attention_heads * head_dim
    kv_rows = int(cfg.num_key_value_heads or 0) * head_dim
    q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
    return [
        (f"{native}self_attn.q_proj.{kind}", q),
        (f"{native}self_attn.k_proj.{kind}", k),
        (f"{native}self_attn.v_proj.{kind}", v),
    ]


# --------------------------------------------------------------------------- files


def weight_files(folder: Path) -> dict[str, Path]:
    """Official key -> the safetensors file holding it (sharded index or a single file)."""
    folder = Path(folder)
    index = folder / SHARD_INDEX_FILE
    if index.is_file():
        try:
            weight_map = loads_json(read_limited(index, JSON_MAX_BYTES).decode("utf-8"))["weight_map"]
            files = {str(key): folder / str(name) for key, name in weight_map.items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointMismatchError(f"{index}: not a safetensors index with a 'weight_map'") from exc
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ModelNotFoundError(f"{path}: shard listed in {index.name} is missing")
        return files
    single = folder / SINGLE_WEIGHTS_FILE
    if not single.is_file():
        raise ModelNotFoundError(f"{single}: not found (and no {SHARD_INDEX_FILE})")
    return {key: single for key in _file_keys(single)}


def _file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise CheckpointMismatchError(f"{path}: unreadable safetensors file ({exc})") from exc


def check_weight_files(files: dict[str, Path], cfg: GlmConfig) -> None:
    """Compare every file's keys and shapes with the config, reading only the headers."""
    from safetensors import safe_open

    expected = official_shapes(cfg)
    seen: set[str] = set()
    for path in sorted(set(files.values())):
        try:
            with safe_open(str(path), framework="pt") as handle:
                present = set(handle.keys())
                listed = [key for key, where in files.items() if where == path and key not in present]
                if listed:
                    raise CheckpointMismatchError(f"{path}: key '{listed[0]}' listed in the index is absent")
                for key in sorted(present):
                    if key in DROPPED_KEYS:
                        continue
                    if key not in expected:
                        raise CheckpointMismatchError(f"{path}: unexpected key '{key}'")
                    tensor = handle.get_slice(key)
                    if tensor.get_dtype() not in FLOAT_DTYPES:  # an integer tensor would be cast, not refused
                        raise CheckpointMismatchError(
                            f"{path}: key '{key}' has dtype {tensor.get_dtype()}, expected floating point")
                    shape = tuple(tensor.get_shape())
                    if shape != expected[key]:
                        raise CheckpointMismatchError(
                            f"{path}: key '{key}' has shape {list(shape)}, config implies {list(expected[key])}"
                        )
                    seen.add(key)
        except CheckpointMismatchError:
            raise
        except Exception as exc:
            raise CheckpointMismatchError(f"{path}: unreadable safetensors file ({exc})") from exc
    missing = sorted(set(expected) - seen)
    if missing:
        where = files.get(missing[0], min(set(files.values())))
        raise CheckpointMismatchError(f"{where}: missing key '{missing[0]}' ({len(missing)} missing in all)")



def check_lm_size(cfg: GlmConfig, files: dict[str, Path], config_path: Path) -> None:
    """The weights the config implies (arithmetic, no per-layer loop) against memory and the files' sizes."""
    from glmvoice_cli.memory import check_fits

    h, heads, kv = cfg.hidden_size, cfg.num_attention_heads, int(cfg.num_key_value_heads or 0)
    head_dim = int(cfg.head_dim or 0)
    per_layer = (heads + 2 * kv) * head_dim * h + h * heads * head_dim + 3 * cfg.intermediate_size * h + 2 * h
    n_weights = cfg.num_hidden_layers * per_layer + 2 * cfg.vocab_size * h + h
    check_fits(n_weights * 2, config_path, "the LM in bf16 (config sizes)")
    on_disk = sum(path.stat().st_size for path in set(files.values()))
    if n_weights * 2 > on_disk:  # the official weights are bf16: 2 bytes each at least
        raise CheckpointMismatchError(
            f"{config_path}: its sizes imply {n_weights:,} weights, more than the weight files ({on_disk:,} bytes) hold"
        )


def iter_official_tensors(files: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (official key, tensor) one at a time, shard by shard (the dropped buffer is skipped)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    for path in sorted(by_file):
        try:
            handle_context = safe_open(str(path), framework="pt")
        except Exception as exc:
            raise _changed(path, "", exc) from exc
        with handle_context as handle:
            for key in by_file[path]:
                if key in DROPPED_KEYS:
                    continue
                try:
                    tensor = handle.get_tensor(key)
                except Exception as exc:  # checked moments ago: the file changed (or broke) since
                    raise _changed(path, key, exc) from exc
                if not tensor.is_floating_point():
                    raise CheckpointMismatchError(f"{path}: key '{key}' has dtype {tensor.dtype}, expected floating point")
                if not bool(tensor.isfinite().all()):
                    raise CheckpointMismatchError(f"{path}: key '{key}' holds NaN or infinite values")
                yield key, tensor


def _changed(path: Path, key: str, exc: Exception) -> CheckpointMismatchError:
    what = f" key '{key}'" if key else ""
    return CheckpointMismatchError(f"{path}: unreadable while loading{what} ({type(exc).__name__}); "
                                   "was it replaced or cut during the load?")


# --------------------------------------------------------------------------- loading


def load_lm_config(folder: Path) -> GlmConfig:
    """Read, validate and map the config of an official checkpoint folder."""
    folder = Path(folder)
    return glm_config_from_chatglm(read_chatglm_config(folder), folder / CONFIG_FILE)


def rebuild_rotary(model: GlmForCausalLM, device: torch.device) -> None:
    """The rotary tables are non-persistent buffers left on meta: recompute them in fp32 on `device`."""
    import torch

    rotary_cls = type(model.model.rotary_emb)
    with torch.device(device):
        model.model.rotary_emb = rotary_cls(model.config)
