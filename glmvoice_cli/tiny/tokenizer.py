"""A random speech tokenizer of any size, written exactly as THUDM/glm-4-voice-tokenizer is on disk."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glmvoice_cli.config import WINDOW_TOKENS
from glmvoice_cli.tokenizer.features import FeatureConfig
from glmvoice_cli.tokenizer.whisper_vq import TokenizerConfig

_WHISPER_FIELDS = {  # fields of the official config.json that inference ignores, written for fidelity
    "architectures": ["WhisperVQEncoder"], "model_type": "whisper", "activation_function": "gelu",
    "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "scale_embedding": False,
    "quantize_causal_encoder": False, "quantize_encoder_only": True, "quantize_ema_decay": 0.99,
    "quantize_commit_coefficient": 0.25, "quantize_loss_scale": 10.0, "quantize_restart_interval": 100,
    "skip_language_detection": True, "torch_dtype": "float32", "vocab_size": 51866,
}
POSITIONS2 = WINDOW_TOKENS  # post-quantizer position table rows (one 30 s window of tokens)


@dataclass(frozen=True)
class TinyTokenizerSpec:
    d_model: int = 32
    heads: int = 2
    ffn: int = 64
    layers: int = 2
    codebook: int = 64
    mel_bins: int = 128
    seed: int = 0


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal position table (length, dim): sin half then cos half."""
    scales = torch.exp(-math.log(10_000) / (dim // 2 - 1) * torch.arange(dim // 2))
    angles = torch.arange(length)[:, None] * scales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def tiny_state_dict(cfg: TokenizerConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f = cfg.d_model, cfg.encoder_ffn_dim

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        # A large first-conv gain makes the tokens follow the audio rather than the positions.
        "conv1.weight": rand(d, cfg.num_mel_bins, 3, scale=4.0 / math.sqrt(3 * cfg.num_mel_bins)),
        "conv1.bias": rand(d, scale=0.1),
        "conv2.weight": rand(d, d, 3, scale=1.0 / math.sqrt(3 * d)), "conv2.bias": rand(d, scale=0.1),
        "embed_positions.weight": sinusoids(cfg.max_source_positions, d),
        "embed_positions2.weight": sinusoids(POSITIONS2, d),
        "codebook.weight": rand(cfg.quantize_vocab_size, d),
        "ema_count": torch.ones(cfg.quantize_vocab_size),
        "ema_weight": rand(cfg.quantize_vocab_size, d),
    }
    for i in range(cfg.quantize_position):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[p + f"self_attn.{name}.weight"] = rand(d, d, scale=1.0 / math.sqrt(d))
            if name != "k_proj":
                state[p + f"self_attn.{name}.bias"] = rand(d, scale=0.1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            state[p + f"{norm}.weight"] = 1.0 + rand(d, scale=0.1)
            state[p + f"{norm}.bias"] = rand(d, scale=0.1)
        state[p + "fc1.weight"], state[p + "fc1.bias"] = rand(f, d, scale=1 / math.sqrt(d)), rand(f, scale=0.1)
        state[p + "fc2.weight"], state[p + "fc2.bias"] = rand(d, f, scale=1 / math.sqrt(f)), rand(d, scale=0.1)
    return state


def _calibrated_codebook(cfg: TokenizerConfig, features: FeatureConfig, state: dict[str, torch.Tensor],
                         seed: int) -> torch.Tensor:
    """Codes drawn from the encoder's own pooled states on a chirp-plus-noise signal, so that
    different sounds map to different tokens (random codes would all collapse onto one)."""
    from glmvoice_cli.tokenizer.features import LogMel
    from glmvoice_cli.tokenizer.whisper_vq import WhisperVQEncoder

    g = torch.Generator().manual_seed(seed + 1)
    seconds = 8
    t = torch.arange(seconds * features.sampling_rate) / features.sampling_rate
    chirp = torch.sin(2 * math.pi * (100 + 400 * t) * t) * (0.5 + 0.5 * torch.sin(2 * math.pi * 0.7 * t))
    signal = 0.3 * chirp + 0.05 * torch.randn(t.shape, generator=g)
    model = WhisperVQEncoder(cfg)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    with torch.no_grad():
        feats = LogMel(features)(signal[None])
        pooled, _ = model.encode(feats, torch.ones(feats.shape[0], feats.shape[-1], dtype=torch.bool))
    pooled = pooled[0]
    rows = torch.randint(0, pooled.shape[0], (cfg.quantize_vocab_size,), generator=g)
    noise = torch.randn(cfg.quantize_vocab_size, cfg.d_model, generator=g) * pooled.std(0) * 0.3
    return pooled[rows] + noise


def write_tiny_tokenizer(folder: str | Path, spec: TinyTokenizerSpec = TinyTokenizerSpec()) -> Path:
    """Write config.json, preprocessor_config.json and model.safetensors of a random tokenizer."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TokenizerConfig(num_mel_bins=spec.mel_bins, d_model=spec.d_model, encoder_attention_heads=spec.heads,
                          encoder_ffn_dim=spec.ffn, quantize_position=spec.layers, pooling_position=spec.layers,
                          quantize_vocab_size=spec.codebook)
    config = {**_WHISPER_FIELDS, **asdict(cfg), "encoder_layers": spec.layers, "num_hidden_layers": spec.layers,
              "encoder_ffn_dim": spec.ffn}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    features = FeatureConfig(feature_size=spec.mel_bins)
    preprocessor = {**asdict(features), "feature_extractor_type": "WhisperFeatureExtractor",
                    "n_samples": features.samples_per_window, "nb_max_frames": 3000, "padding_side": "right",
                    "padding_value": 0.0, "processor_class": "WhisperProcessor", "return_attention_mask": False}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True))
    state = tiny_state_dict(cfg, spec.seed)
    state["codebook.weight"] = _calibrated_codebook(cfg, features, state, spec.seed)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
