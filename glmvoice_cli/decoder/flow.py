"""Flow model: speech tokens (12.5 Hz) -> 80-bin log-mel (22050/256 Hz) by conditional flow matching.

token embedding -> block-causal conformer -> Linear to 80 -> length regulator (nearest
interpolation to the mel rate + convs) = mu -> 10 Euler steps of the U-Net velocity field from
Gaussian noise, with classifier-free guidance. Prompt tokens and their mel frames condition a
continuation; only the new frames are returned. Eval mode only (the reference leaves dropout on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmvoice_cli.decoder.config import FlowConfig
from glmvoice_cli.decoder.conformer import BlockConformerEncoder
from glmvoice_cli.decoder.estimator import FlowEstimator

MEL_SAMPLE_RATE = 22050  # Hz; hard-coded in the reference flow, independent of config.yaml
MEL_HOP = 256  # samples per mel frame
N_TIMESTEPS = 10  # Euler steps (hard-coded upstream)
REFERENCE_NOISE_SEED = 42  # the reference re-seeds the global RNG with this on every flow call

# (step index, t, x before the step) -> None, or the rows of x to go on with (the others were cut: a
# barge-in in one stream of a batch drops its row, not the batch)
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], "list[int] | None"]


def mel_frames(n_tokens: int, frame_rate: float) -> int:
    """Mel frames for n tokens, truncated with the reference's int32/float32 torch arithmetic."""
    n = torch.tensor([n_tokens], dtype=torch.int32)
    return int((n / frame_rate * MEL_SAMPLE_RATE / MEL_HOP).int().item())


class InterpolateRegulator(nn.Module):
    """Nearest interpolation from token to mel rate, then (conv3 -> GroupNorm(1) -> Mish) x n -> conv1."""

    def __init__(self, channels: int, sampling_ratios: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in sampling_ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(1, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, n_frames: int) -> torch.Tensor:
        """h: (1, T_tok, C) -> (1, n_frames, C); an unpadded batch of one, so no mask is needed."""
        x = F.interpolate(h.transpose(1, 2).contiguous(), size=n_frames, mode="nearest")
        return self.model(x).transpose(1, 2).contiguous()


def time_span(n_steps: int, scheduler: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n_steps+1,) times from 0 to 1; the cosine schedule takes small steps near the noise end."""
    t = torch.linspace(0, 1, n_steps + 1, dtype=dtype)
    if scheduler == "cosine":
        t = 1 - torch.cos(t * 0.5 * torch.pi)
    return t


class ConditionalCFM(nn.Module):
    """Euler integration of the learned velocity field with classifier-free guidance."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg_rate = cfg.inference_cfg_rate
        self.scheduler = cfg.t_scheduler
        self.estimator = FlowEstimator(cfg.estimator)

    def velocity(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                 spks: torch.Tensor, cond: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """Guided velocity (1+w)*E(x|mu,spks,cond) - w*E(x|0,0,0); x, mu, cond: (B, 80, T), t: (1,) or (B,).

        `batched` runs both estimator passes as one batch of 2B (faster; the reference runs
        them one after the other, which `batched=False` reproduces bit for bit).
        """
        t = t.expand(x.shape[0])
        if self.cfg_rate <= 0:
            return self.estimator(x, mask, mu, t, spks, cond)
        if batched:
            both = self.estimator(
                torch.cat([x, x]), torch.cat([mask, mask]), torch.cat([mu, torch.zeros_like(mu)]),
                torch.cat([t, t]), torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, torch.zeros_like(cond)]),
            )
            est, uncond = both[: x.shape[0]], both[x.shape[0] :]
        else:
            est = self.estimator(x, mask, mu, t, spks, cond)
            uncond = self.estimator(x, mask, torch.zeros_like(mu), t, torch.zeros_like(spks), torch.zeros_like(cond))
        return (1.0 + self.cfg_rate) * est - self.cfg_rate * uncond

    def forward(self, noise: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                n_steps: int = N_TIMESTEPS, on_step: StepCallback | None = None, batched: bool = False
                ) -> torch.Tensor:
        """noise, mu, cond: (B, 80, T); spks: (B, 80) -> mel (B', 80, T) at t = 1.

        The rows are independent streams: where `on_step` returns the rows to go on with, the others are
        dropped (B' <= B; none left ends the integration). The integration (x, t) stays in float32 whatever
        the network's dtype (mu's): a bf16 or fp16 estimator gives each step's velocity, but summing ten
        steps in 16 bits would lose the mel's detail.
        """
        net = mu.dtype
        mask = torch.ones(mu.shape[0], 1, mu.shape[-1], dtype=net, device=mu.device)
        span = time_span(n_steps, self.scheduler, torch.float32).to(mu.device)
        x, t, dt = noise.float(), span[0].unsqueeze(0), span[1] - span[0]
        for step in range(1, len(span)):
            keep = on_step(step - 1, t, x) if on_step is not None else None
            if keep is not None:
                x, mask, mu, spks, cond = (v[keep] for v in (x, mask, mu, spks, cond))
                if not keep:
                    return x
            x = x + dt * self.velocity(x.to(net), mask, mu, t.to(net), spks, cond, batched).float()
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
        return x


@dataclass
class FlowTrace:
    """Intermediates of one flow call, for tests and inspection."""

    encoder: torch.Tensor | None = None  # (1, N, D)
    encoder_proj: torch.Tensor | None = None  # (1, N, 80)
    mu: torch.Tensor | None = None  # (1, T, 80), the length-regulator output
    spks: torch.Tensor | None = None  # (1, 80)


class FlowModel(nn.Module):
    """MaskedDiffWithXvec inference. Parameter names follow the official `flow.pt`."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = BlockConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.regulator_channels, cfg.regulator_sampling_ratios)
        self.decoder = ConditionalCFM(cfg)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.input_embedding.weight.device

    def n_frames(self, n_tokens: int) -> int:
        return mel_frames(n_tokens, self.cfg.input_frame_rate)

    def condition(self, tokens: torch.Tensor, trace: FlowTrace | None = None) -> torch.Tensor:
        """tokens: (B, N) int -> mu (B, 80, T) with T = n_frames(N) (rows of equal length: no padding)."""
        n = tokens.shape[1]
        x = self.input_embedding(torch.clamp(tokens.long(), min=0).to(self.device))
        h = self.encoder(x, torch.full((tokens.shape[0],), n, device=self.device))
        proj = self.encoder_proj(h)
        mu = self.length_regulator(proj, self.n_frames(n))
        if trace is not None:
            trace.encoder, trace.encoder_proj, trace.mu = h, proj, mu
        return mu.transpose(1, 2).contiguous()

    def speaker(self, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """(1, spk_embed_dim) x-vector (GLM-4-Voice passes zeros) -> (1, 80)."""
        if embedding is None:
            embedding = torch.zeros(1, self.cfg.spk_embed_dim)
        weight = self.spk_embed_affine_layer.weight  # normalised in fp32: its eps (1e-12) is 0 in fp16
        unit = F.normalize(embedding.to(weight.device, torch.float32), dim=1)
        return self.spk_embed_affine_layer(unit.to(weight.dtype))

    @torch.inference_mode()
    def inference(
        self,
        tokens: torch.Tensor,
        prompt_tokens: torch.Tensor | None = None,
        prompt_feat: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        trace: FlowTrace | None = None,
        on_step: StepCallback | None = None,
        batch_guidance: bool = False,
    ) -> torch.Tensor:
        """tokens: (1, N); prompt_tokens: (1, P); prompt_feat: (1, F, 80) -> new mel (1, 80, T - F).

        The start noise (1, 80, T) is `noise` if given, else drawn from `generator` (a fresh
        generator seeded like the reference when None); the global RNG is never touched.
        """
        if prompt_tokens is not None and prompt_tokens.shape[1] > 0:
            tokens = torch.cat([prompt_tokens.to(tokens.dtype), tokens], dim=1)
        feat = prompt_feat if prompt_feat is not None else torch.zeros(1, 0, self.cfg.output_size)
        if noise is None:
            noise = reference_noise((1, self.cfg.output_size, self.n_frames(tokens.shape[1])), generator)
        mel = self.inference_rows(tokens, [feat], noise, embedding=embedding, trace=trace, on_step=on_step,
                                  batch_guidance=batch_guidance)
        return mel[:, :, feat.shape[1]:]

    @torch.inference_mode()
    def inference_rows(
        self,
        tokens: torch.Tensor,
        prompt_feats: list[torch.Tensor],
        noise: torch.Tensor,
        *,
        embedding: torch.Tensor | None = None,
        trace: FlowTrace | None = None,
        on_step: StepCallback | None = None,
        batch_guidance: bool = False,
    ) -> torch.Tensor:
        """B streams at once: tokens (B, N) (prompt tokens included), each row's prompt mel (1, F_i, 80),
        noise (B, 80, T) -> the whole mel (B', 80, T), prompt frames included (B' < B where `on_step` cut
        rows). A row's result does not depend on the other rows (up to float rounding): no padding.
        """
        mu = self.condition(tokens, trace)
        rows, total = mu.shape[0], mu.shape[-1]
        cond = torch.zeros(rows, total, self.cfg.output_size, device=mu.device, dtype=mu.dtype)
        for row, feat in enumerate(prompt_feats):
            if feat.shape[1]:
                cond[row, : feat.shape[1]] = feat[0].to(mu.device, mu.dtype)
        spks = self.speaker(embedding).expand(rows, -1)
        if trace is not None:
            trace.spks = spks
        if noise.shape != mu.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != {tuple(mu.shape)}")
        return self.decoder(noise.to(mu.device), mu, spks, cond.transpose(1, 2), on_step=on_step,
                            batched=batch_guidance)


def reference_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal start noise; with no generator, what the reference draws after seeding 42."""
    if generator is None:
        generator = torch.Generator().manual_seed(REFERENCE_NOISE_SEED)
    return torch.randn(tuple(shape), generator=generator)

