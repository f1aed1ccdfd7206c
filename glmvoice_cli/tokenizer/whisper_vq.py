"""GLM-4-Voice speech tokenizer: a Whisper encoder cut at its vector quantizer.

Data flow (one 30 s window, T mel frames, T a multiple of 8):
    log-mel (B, n_mels, T) -> causal conv1 (k3) -> GELU -> causal conv2 (k3, stride 2) -> GELU
    -> + positions (B, T/2, D) -> `quantize_position` pre-LN layers with a block-causal mask
    -> average pool x4 (B, T/8, D) -> nearest codebook row -> ids (B, T/8), 12.5 per second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmvoice_cli.errors import CheckpointMismatchError
from glmvoice_cli.files import read_limited

CONV_KERNEL = 3  # both front-end convolutions
CONV2_STRIDE = 2


@dataclass(frozen=True)
class TokenizerConfig:
    """The fields of the official `config.json` (model_type whisper, WhisperVQEncoder) we use."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500  # positions after conv2 (30 s)
    quantize_position: int = 16  # layers built and run before the quantizer
    quantize_vocab_size: int = 16384  # codebook rows
    quantize_causal_block_size: int | None = 200  # frames after conv2 (4 s); None: no block-causal mask
    pooling_position: int = 16  # pool after this many layers (0: never)
    pooling_kernel_size: int | None = 4  # None: no pooling
    pooling_type: str = "avg"  # "avg" | "max"
    encoder_causal_convolution: bool = True
    encoder_causal_attention: bool = False

    @classmethod
    def from_json(cls, path: Path) -> TokenizerConfig:
        """Read config.json; a missing field takes the reference class's own default (WhisperVQConfig)."""
        try:
            raw = json.loads(read_limited(path, 16 << 20).decode("utf-8"))  # a config is a few KiB
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointMismatchError(f"{path}: unreadable config ({type(e).__name__})") from e
        if not isinstance(raw, dict):
            raise CheckpointMismatchError(f"{path}: expected a JSON object")
        if raw.get("quantize_vocab_size") is None:  # the reference builds no quantizer: no tokens at all
            raise CheckpointMismatchError(f"{path}: field 'quantize_vocab_size' is missing (no quantizer)")
        values = {name: raw.get(name, default) for name, default in REFERENCE_DEFAULTS.items()}
        values["quantize_vocab_size"] = raw["quantize_vocab_size"]
        _check_fields(values, path)
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def pools(self) -> bool:
        """Whether the encoder pools at all (the reference pools after layer `pooling_position` >= 1)."""
        return self.pooling_kernel_size is not None and 1 <= self.pooling_position <= self.quantize_position

    @property
    def frames_per_token(self) -> int:
        """Mel frames (10 ms each) per speech token."""
        return CONV2_STRIDE * (self.pooling_kernel_size if self.pools and self.pooling_kernel_size else 1)


# What WhisperVQConfig (and the WhisperConfig it extends) uses for a field config.json leaves out.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "num_mel_bins": 80, "d_model": 384, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
    "max_source_positions": 1500, "quantize_position": 16, "quantize_causal_block_size": None,
    "pooling_position": 0, "pooling_kernel_size": None, "pooling_type": "max",
    "encoder_causal_convolution": False, "encoder_causal_attention": False,
}  # fmt: skip
_POSITIVE = ("num_mel_bins", "d_model", "encoder_attention_heads", "encoder_ffn_dim", "max_source_positions",
             "quantize_position", "quantize_vocab_size")
_POSITIVE_OR_NONE = ("quantize_causal_block_size", "pooling_kernel_size")
_FLAGS = ("encoder_causal_convolution", "encoder_causal_attention")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(values: dict[str, Any], path: Path) -> None:
    """Type and range of every field the encoder uses; CheckpointMismatchError naming the field."""
    def bad(name: str, want: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"{path}: field '{name}' must be {want}, got {values[name]!r}")

    for name in _POSITIVE:
        if not _is_int(values[name]) or values[name] <= 0:
            raise bad(name, "a positive integer")
    for name in _POSITIVE_OR_NONE:
        if values[name] is not None and (not _is_int(values[name]) or values[name] <= 0):
            raise bad(name, "a positive integer or null")
    for name in _FLAGS:
        if not isinstance(values[name], bool):
            raise bad(name, "true or false")
    if not _is_int(values["pooling_position"]) or not 0 <= values["pooling_position"] <= values["quantize_position"]:
        raise bad("pooling_position", f"an integer in [0, quantize_position={values['quantize_position']}]")
    if values["pooling_type"] not in ("avg", "max"):
        raise bad("pooling_type", "'avg' or 'max'")
    if values["d_model"] % values["encoder_attention_heads"]:
        raise bad("encoder_attention_heads", f"a divisor of d_model ({values['d_model']})")
    if values["encoder_causal_attention"]:  # the one variant we do not implement
        raise CheckpointMismatchError(f"{path}: field 'encoder_causal_attention' true is not supported")


class CausalConv1d(nn.Conv1d):
    """Conv1d padded only on the left, so no frame sees the future (`causal=False`: centred, Whisper's)."""

    def __init__(self, *args: Any, causal: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.kernel_size[0]
        self.pads = (k - 1, 0) if causal else ((k - 1) // 2, (k - 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))


class Attention(nn.Module):
    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.encoder_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)  # Whisper's key projection has no bias
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), mask: additive (B, 1, T, T) -> (B, T, D)."""
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-LN Whisper encoder layer."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class Embedding(nn.Module):
    """A bare `weight` table (stored in the checkpoint, sinusoidal for positions)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))


def block_causal_mask(key_valid: torch.Tensor, block: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, T): query i sees key j iff (j <= i or same block) and j is real audio.

    `block` None: every real key is seen (the reference's plain padding mask).
    """
    t = key_valid.shape[1]
    if block is None:
        allowed = torch.ones(1, t, t, dtype=torch.bool, device=key_valid.device) & key_valid[:, None, :]
    else:
        pos = torch.arange(t, device=key_valid.device)
        allowed = (pos[None, :] <= pos[:, None]) | (pos[None, :] // block == pos[:, None] // block)
        allowed = allowed[None] & key_valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def code_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (N, K) between x (N, D) and codebook rows (K, D), in float32.

    Written as |c|^2 + |x|^2 - 2 x.c, the reference's formula, so near-ties break the same way.
    """
    x, codebook = x.float(), codebook.float()
    return torch.addmm((codebook**2).sum(1) + (x**2).sum(1, keepdim=True), x, codebook.T, beta=1.0, alpha=-2.0)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (N,) of the nearest codebook row for each x (N, D); the first index on ties."""
    return code_distances(x, codebook).min(dim=1).indices


class WhisperVQEncoder(nn.Module):
    """The encoder up to the quantizer; parameter names match the official checkpoint."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        causal = cfg.encoder_causal_convolution
        self.conv1 = CausalConv1d(cfg.num_mel_bins, d, CONV_KERNEL, causal=causal)
        self.conv2 = CausalConv1d(d, d, CONV_KERNEL, stride=CONV2_STRIDE, causal=causal)
        self.embed_positions = Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.quantize_position))
        self.codebook = Embedding(cfg.quantize_vocab_size, d)

    def encode(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, n_mels, T), frame_mask (B, T) -> pooled states (B, T/8, D), token mask (B, T/8)."""
        cfg = self.cfg
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T/2, D)
        if x.shape[1] > cfg.max_source_positions:
            raise ValueError(f"window of {x.shape[1]} positions exceeds {cfg.max_source_positions}")
        x = x + self.embed_positions.weight[: x.shape[1]]
        valid = frame_mask[:, ::CONV2_STRIDE].bool()
        block = cfg.quantize_causal_block_size
        mask = block_causal_mask(valid, block, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if cfg.pools and cfg.pooling_kernel_size and i + 1 == cfg.pooling_position:
                k = cfg.pooling_kernel_size
                x, valid = self._pool(x), valid[:, ::k]
                block = None if block is None else max(1, block // k)
                mask = block_causal_mask(valid, block, x.dtype)
        return x, valid

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average- or max-pool time by the kernel, zero-padding the right end: (B, T, D) -> (B, ceil(T/k), D)."""
        k = self.cfg.pooling_kernel_size or 1
        x = F.pad(x.transpose(1, 2), (0, -x.shape[1] % k))
        pool = F.max_pool1d if self.cfg.pooling_type == "max" else F.avg_pool1d
        return pool(x, k).transpose(1, 2)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, n_mels, T), frame_mask (B, T) -> ids (B, T/8) int64, token mask (B, T/8) bool."""
        pooled, valid = self.encode(features, frame_mask)
        ids = nearest_code(pooled.reshape(-1, pooled.shape[-1]), self.codebook.weight)
        return ids.view(pooled.shape[:2]), valid
