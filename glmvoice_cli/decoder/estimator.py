"""The velocity estimator of the conditional flow matching: a 1-D U-Net with transformer blocks.

Input channels are [x | mu | speaker | prompt cond] (4 x 80); a sinusoidal time embedding
conditions every resnet block. The down path halves the time axis once, the up path restores
it with a transposed convolution. Parameter names follow `flow.pt` (`decoder.estimator.*`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glmvoice_cli.decoder.config import EstimatorConfig

GROUP_NORM_GROUPS = 8
NORM_EPS = 1e-5
TIME_SCALE = 1000.0  # t in [0, 1] is scaled before the sinusoids
TIME_BASE = 10000.0
FF_MULT = 4  # transformer feed-forward expansion


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: (B,) in [0, 1] -> (B, dim) as [sin | cos] of 1000*t at geometric frequencies."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    step = math.log(TIME_BASE) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
    emb = TIME_SCALE * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimeMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class Mish(nn.Module):
    """x * tanh(softplus(x)), written out as Matcha-TTS does (torch's fused mish rounds differently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(F.softplus(x))


class Block1D(nn.Module):
    """Masked conv3 -> GroupNorm -> Mish."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(GROUP_NORM_GROUPS, dim_out, eps=NORM_EPS), Mish()
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T), mask: (B, 1, T) float, t: (B, time_dim) -> (B, C_out, T)."""
        h = self.block1(x, mask)
        h += self.mlp(t).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Attention(nn.Module):
    """Bidirectional multi-head attention; the float 0/1 mask is *added* to the logits (upstream quirk)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C), bias: (B, T, T) additive -> (B, T, C)."""
        b = x.shape[0]
        bias = bias.repeat_interleave(self.heads, dim=0).view(b, self.heads, -1, bias.shape[-1])
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        head_dim = k.shape[-1] // self.heads
        q = q.view(b, -1, self.heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(b, -1, self.heads, head_dim).transpose(1, 2)
        v = v.view(b, -1, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * head_dim).to(q.dtype)
        return self.to_out[0](out)


class _GeluProj(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class TransformerFeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, dim * FF_MULT), nn.Identity(), nn.Linear(dim * FF_MULT, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-LN self-attention + GELU feed-forward (diffusers BasicTransformerBlock, no cross-attention)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.ff = TransformerFeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


class Downsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _stage(resnet: nn.Module, dim: int, cfg: EstimatorConfig, resample: nn.Module) -> nn.ModuleList:
    blocks = nn.ModuleList(TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks))
    return nn.ModuleList([resnet, blocks, resample])


class FlowEstimator(nn.Module):
    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        time_dim = cfg.time_embed_dim
        self.time_mlp = TimeMLP(cfg.in_channels, time_dim)
        chans = cfg.channels
        self.down_blocks = nn.ModuleList()
        dim_in = cfg.in_channels
        for i, dim_out in enumerate(chans):
            last = i == len(chans) - 1
            resample: nn.Module = nn.Conv1d(dim_out, dim_out, 3, padding=1) if last else Downsample1D(dim_out)
            self.down_blocks.append(_stage(ResnetBlock1D(dim_in, dim_out, time_dim), dim_out, cfg, resample))
            dim_in = dim_out
        mid = chans[-1]
        self.mid_blocks = nn.ModuleList(
            _stage(ResnetBlock1D(mid, mid, time_dim), mid, cfg, nn.Identity())[:2] for _ in range(cfg.num_mid_blocks)
        )
        up = (*reversed(chans), chans[0])
        self.up_blocks = nn.ModuleList()
        for i in range(len(up) - 1):
            last = i == len(up) - 2
            dim_out = up[i + 1]
            resample = nn.Conv1d(dim_out, dim_out, 3, padding=1) if last else Upsample1D(dim_out)
            self.up_blocks.append(_stage(ResnetBlock1D(2 * up[i], dim_out, time_dim), dim_out, cfg, resample))
        self.final_block = Block1D(up[-1], up[-1])
        self.final_proj = nn.Conv1d(up[-1], cfg.out_channels, 1)

    @staticmethod
    def _run_stage(stage: nn.Module, x: torch.Tensor, mask: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """resnet then transformer blocks of one stage: x (B, C_in, T), mask (B, 1, T) -> (B, C, T)."""
        resnet, blocks = stage[0], stage[1]  # type: ignore[index]
        x = resnet(x, mask, temb).transpose(1, 2).contiguous()
        bias = torch.matmul(mask.transpose(1, 2).contiguous(), mask)  # (B, T, T) float 0/1, added
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """x, mu, cond: (B, 80, T); mask: (B, 1, T) float; t: (B,); spks: (B, 80) -> velocity (B, 80, T)."""
        temb = self.time_mlp(timestep_embedding(t, self.cfg.in_channels).to(t.dtype))
        spk = spks.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([x, mu, spk, cond], dim=1)
        hiddens, masks = [], [mask]
        for stage in self.down_blocks:
            m = masks[-1]
            x = self._run_stage(stage, x, m, temb)
            hiddens.append(x)
            x = stage[2](x * m)  # type: ignore[index]
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        for stage in self.mid_blocks:
            x = self._run_stage(stage, x, m, temb)
        for stage in self.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = self._run_stage(stage, x, m, temb)
            x = stage[2](x * m)  # type: ignore[index]
        x = self.final_block(x, m)
        return self.final_proj(x * m) * mask
