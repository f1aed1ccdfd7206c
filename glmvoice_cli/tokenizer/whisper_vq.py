"""GLM-4-Voice speech tokenizer: a Whisper encoder cut at its vector quantizer.

Data flow (one 30 s window, T mel frames, T a multiple of 8):
    log-mel (B, n_mels, T) -> causal conv1 (k3) -> GELU -> causal conv2 (k3, stride 2) -> GELU
    -> + positions (B, T/2, D) -> `quantize_position` pre-LN layers with a block-causal mask
    -> average pool x4 (B, T/8, D) -> nearest codebook row -> ids (B, T/8), 12.5 per second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glmvoice_cli.errors import CheckpointMismatchError

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
    quantize_causal_block_size: int = 200  # frames after conv2 (4 s)
    pooling_position: int = 16  # pool after this many layers
    pooling_kernel_size: int = 4
    pooling_type: str = "avg"
    encoder_causal_convolution: bool = True
    encoder_causal_attention: bool = False

    @classmethod
    def from_json(cls, path: Path) -> TokenizerConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointMismatchError(f"{path}: unreadable config ({e})") from e
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        cfg = cls(**values)
        if cfg.pooling_type != "avg" or not cfg.encoder_causal_convolution or cfg.encoder_causal_attention:
            raise CheckpointMismatchError(
                f"{path}: unsupported tokenizer variant (pooling_type={cfg.pooling_type}, "
                f"causal conv={cfg.encoder_causal_convolution}, causal attn={cfg.encoder_causal_attention})")
        if cfg.pooling_position > cfg.quantize_position:
            raise CheckpointMismatchError(f"{path}: pooling_position is past quantize_position")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def frames_per_token(self) -> int:
        """Mel frames (10 ms each) per speech token."""
        return CONV2_STRIDE * self.pooling_kernel_size


class CausalConv1d(nn.Conv1d):
    """Conv1d padded only on the left, so no frame sees the future."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


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


def block_causal_mask(key_valid: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, T): query i sees key j iff (j <= i or same block) and j is real audio."""
    t = key_valid.shape[1]
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
        self.conv1 = CausalConv1d(cfg.num_mel_bins, d, CONV_KERNEL)
        self.conv2 = CausalConv1d(d, d, CONV_KERNEL, stride=CONV2_STRIDE)
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
            if i + 1 == cfg.pooling_position:
                x, valid = self._pool(x), valid[:, :: cfg.pooling_kernel_size]
                block = max(1, block // cfg.pooling_kernel_size)
                mask = block_causal_mask(valid, block, x.dtype)
        return x, valid

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pool time by the kernel, zero-padding the right end: (B, T, D) -> (B, ceil(T/k), D)."""
        k = self.cfg.pooling_kernel_size
        x = F.pad(x.transpose(1, 2), (0, -x.shape[1] % k))
        return F.avg_pool1d(x, k).transpose(1, 2)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, n_mels, T), frame_mask (B, T) -> ids (B, T/8) int64, token mask (B, T/8) bool."""
        pooled, valid = self.encode(features, frame_mask)
        ids = nearest_code(pooled.reshape(-1, pooled.shape[-1]), self.codebook.weight)
        return ids.view(pooled.shape[:2]), valid
