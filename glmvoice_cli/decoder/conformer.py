"""The flow model's token encoder: a block-causal conformer with ESPnet relative positions.

Pre-LN layers of relative-position self-attention and a SiLU feed-forward (no convolution
module, no macaron). A query sees every earlier key and every key of its own block of
`block_size` tokens, so the encoding of a finished block never depends on later tokens.
Parameter names follow the official `flow.pt` (`encoder.embed.out.0`, `encoders.N.self_attn...`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glmvoice_cli.decoder.config import EncoderConfig

LAYER_NORM_EPS = 1e-5
POSITION_BASE = 10000.0  # sinusoid wavelength base of the relative-position table


def relative_position_table(length: int, dim: int) -> torch.Tensor:
    """ESPnet relative sinusoids: row k holds relative position (length-1)-k.

    Returns (1, 2*length-1, dim); sin on even and cos on odd channels, computed in float32.
    """
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(POSITION_BASE) / dim))
    positive = torch.zeros(length, dim)
    negative = torch.zeros(length, dim)
    positive[:, 0::2] = torch.sin(position * div_term)
    positive[:, 1::2] = torch.cos(position * div_term)
    negative[:, 0::2] = torch.sin(-1 * position * div_term)
    negative[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(positive, [0]), negative[1:]], dim=0).unsqueeze(0)


def block_attention_mask(lengths: torch.Tensor, total: int, block_size: int) -> torch.Tensor:
    """Key j is visible to query i iff j is real and (j <= i or both lie in the same block).

    lengths: (B,) valid tokens per row -> (B, total, total) bool.
    """
    idx = torch.arange(total, device=lengths.device)
    causal = idx[None, :] <= idx[:, None]
    same_block = (idx[None, :] // block_size) == (idx[:, None] // block_size)
    pad = idx[None, :] < lengths[:, None]  # (B, T) real keys
    return pad[:, None, :] & (causal | same_block)[None]


def _rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) scores against the position table -> (B, H, T, T) with out[i, j] = x[i, T-1-i+j]."""
    b, h, t, n = x.shape
    padded = torch.cat([x.new_zeros(b, h, t, 1), x], dim=-1).view(b, h, n + 1, t)
    return padded[:, :, 1:].view_as(x)[:, :, :, : n // 2 + 1]


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with learned content (u) and position (v) biases."""

    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.heads, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), mask: (B, T, T) bool, pos_emb: (1, 2T-1, D) -> (B, T, D)."""
        b = x.shape[0]
        q = self.linear_q(x).view(b, -1, self.heads, self.d_k)  # (B, T, H, dk)
        k = self.linear_k(x).view(b, -1, self.heads, self.d_k).transpose(1, 2)  # (B, H, T, dk)
        v = self.linear_v(x).view(b, -1, self.heads, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.heads, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, dk)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, T, T)
        position = _rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))  # (B, H, T, T)
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = mask.unsqueeze(1).eq(0)  # (B, 1, T, T)
        scores = scores.masked_fill(blocked, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).contiguous().view(b, -1, self.heads * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-LN: x += attn(LN(x)); x += ff(LN(x))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(cfg.attention_heads, cfg.output_size)
        self.feed_forward = FeedForward(cfg.output_size, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(cfg.output_size, eps=LAYER_NORM_EPS)
        self.norm_mha = nn.LayerNorm(cfg.output_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class _LinearEmbed(nn.Module):
    """Linear -> LayerNorm, then scaled by sqrt(d) (the ESPnet rel-pos input scaling)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.out = nn.Sequential(
            nn.Linear(cfg.input_size, cfg.output_size), nn.LayerNorm(cfg.output_size, eps=LAYER_NORM_EPS)
        )
        self.xscale = math.sqrt(cfg.output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class BlockConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = _LinearEmbed(cfg)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: (B, T, input_size) embedded tokens, lengths: (B,) -> (B, T, output_size)."""
        t = x.size(1)
        mask = block_attention_mask(lengths.to(x.device), t, self.cfg.block_size)
        x = self.embed(x)
        pos_emb = relative_position_table(t, self.cfg.output_size).to(device=x.device, dtype=x.dtype)
        for layer in self.encoders:
            x = layer(x, mask, pos_emb)
        return self.after_norm(x)
