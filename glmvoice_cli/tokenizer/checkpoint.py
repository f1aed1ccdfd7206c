"""Strict loading of THUDM/glm-4-voice-tokenizer as published (config.json, model.safetensors,
preprocessor_config.json): every key and shape is checked, and errors name the file and key."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from glmvoice_cli.errors import CheckpointMismatchError, ModelNotFoundError
from glmvoice_cli.tokenizer.features import FeatureConfig
from glmvoice_cli.tokenizer.whisper_vq import TokenizerConfig, WhisperVQEncoder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE)

# A training-checkpoint layout prefixes every key; the published file does not. Accept both.
_OPTIONAL_PREFIX = "model.encoder."
# Stored but unused for token ids: EMA statistics of training and the post-quantizer positions.
_UNUSED = re.compile(r"^(ema_count|ema_weight|embed_positions2\.weight)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


def _require(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelNotFoundError(f"speech tokenizer folder not found: {folder}")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise ModelNotFoundError(f"speech tokenizer file missing: {folder / name}")


def _wanted(key: str, cfg: TokenizerConfig) -> bool:
    """False for keys the official file may hold that inference never uses."""
    if _UNUSED.match(key) or key.startswith("layer_norm."):
        return False
    layer = _LAYER.match(key)
    return not (layer and int(layer.group(1)) >= cfg.quantize_position)


def read_state_dict(path: Path, cfg: TokenizerConfig, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Tensors of `path` that inference needs, checked against `expected` names and shapes."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for raw_key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                key = raw_key.removeprefix(_OPTIONAL_PREFIX)
                if not _wanted(key, cfg):
                    continue
                if key not in expected:
                    raise CheckpointMismatchError(f"{path}: unexpected key {raw_key!r}")
                shape = tuple(f.get_slice(raw_key).get_shape())
                if shape != tuple(expected[key]):
                    raise CheckpointMismatchError(
                        f"{path}: key {raw_key!r} has shape {list(shape)}, config.json implies "
                        f"{list(expected[key])}")
                state[key] = f.get_tensor(raw_key)
    except (SafetensorError, OSError) as e:
        raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({e})") from e
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointMismatchError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing)")
    return state


def _check_size(cfg: TokenizerConfig, config_path: Path, weights: Path) -> None:
    """The weights the config implies must fit in memory and in the weights file (no fixed caps)."""
    from glmvoice_cli.memory import check_fits

    d = cfg.d_model
    n = cfg.quantize_position * (4 * d * d + 2 * d * cfg.encoder_ffn_dim)
    n += (cfg.quantize_vocab_size + cfg.max_source_positions + 3 * (cfg.num_mel_bins + d)) * d
    check_fits(n * 4, config_path, "the encoder (config sizes)")
    if weights.is_file() and n * 2 > weights.stat().st_size:  # a checkpoint stores at least half precision
        raise CheckpointMismatchError(
            f"{config_path}: its sizes imply at least {n:,} weights, more than {weights.name} holds")


def load_tokenizer_model(
    folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[WhisperVQEncoder, FeatureConfig]:
    """Build the encoder from `folder/config.json` and fill it from `model.safetensors`, strictly."""
    folder = Path(folder)
    _require(folder)
    cfg = TokenizerConfig.from_json(folder / CONFIG_FILE)
    features = FeatureConfig.from_file(folder / PREPROCESSOR_FILE)
    if features.feature_size != cfg.num_mel_bins:
        raise CheckpointMismatchError(
            f"{folder / PREPROCESSOR_FILE}: feature_size {features.feature_size} != num_mel_bins "
            f"{cfg.num_mel_bins} of config.json")
    _check_size(cfg, folder / CONFIG_FILE, folder / WEIGHTS_FILE)
    with torch.device("meta"):
        model = WhisperVQEncoder(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_state_dict(folder / WEIGHTS_FILE, cfg, expected)
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointMismatchError(f"{folder / WEIGHTS_FILE}: key {key!r} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointMismatchError(f"{folder / WEIGHTS_FILE}: key {key!r} holds NaN or infinite values")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), features
