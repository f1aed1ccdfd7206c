"""HiFT vocoder: 80-bin mel (22050/256 Hz) -> 22.05 kHz waveform by a neural source filter + iSTFT.

An F0 predictor drives a harmonic sine source (SineGen, 9 harmonics, random start phases and
noise); the filter network upsamples the mel x64, fuses the source's STFT at each stage and
predicts a magnitude/phase spectrogram that an iSTFT (n_fft 16, hop 4) turns into samples.
A cached source lets a streaming call continue seamlessly from the previous one. Randomness
comes from a caller generator or from injected draws (golden replay), never the global RNG.
Parameter names follow the official `hift.pt`, weight-norm pairs included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmvoice_cli.decoder.config import HiFTConfig

SNAKE_EPS = 1e-9  # keeps 1/alpha finite
F0_OUT_SLOPE = 0.01  # the reference's final leaky_relu uses torch's default slope, not lrelu_slope
MAX_MAGNITUDE = 100.0  # spectral magnitude clip before the iSTFT


class WNConv1d(nn.Module):
    """Conv1d (or ConvTranspose1d) with old-style weight norm: w = g * v / ||v|| (norm over dims != 0).

    Loads the published `weight_g`/`weight_v`; `fold()` then replaces them by the plain `weight`
    (like torch's remove_weight_norm), so inference holds one copy and skips the norm.
    """

    weight: torch.Tensor | None

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, transpose: bool = False) -> None:
        super().__init__()
        shape = (c_in, c_out, kernel) if transpose else (c_out, c_in, kernel)
        self.weight_g: nn.Parameter | None = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.weight_v: nn.Parameter | None = nn.Parameter(torch.randn(shape) * 0.01)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.weight = None
        self.stride, self.padding, self.dilation, self.transpose = stride, padding, dilation, transpose

    @property
    def folded(self) -> bool:
        return self.weight is not None

    def fold(self) -> None:
        """Replace g and v by w (torch's own weight-norm kernel, for bit parity with the reference)."""
        if self.weight_v is None or self.weight_g is None:
            return
        with torch.no_grad():
            weight = torch._weight_norm(self.weight_v, self.weight_g, 0)
        del self.weight_g, self.weight_v
        self.weight_g = self.weight_v = None
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            w = self.weight
        else:
            assert self.weight_v is not None and self.weight_g is not None
            w = torch._weight_norm(self.weight_v, self.weight_g, 0)
        if self.transpose:
            return F.conv_transpose1d(x, w, self.bias, self.stride, self.padding)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation)


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    """Three residual (Snake -> dilated conv -> Snake -> conv) units."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel, padding=(kernel * d - d) // 2, dilation=d) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2, strict=True):
            x = c2(a2(c1(a1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    """5 x (weight-normed conv3 -> ELU) -> Linear -> |.|: mel (B, 80, T) -> f0 in Hz (B, T)."""

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.f0_in_channels
        for _ in range(5):
            layers += [WNConv1d(c_in, cfg.f0_cond_channels, 3, padding=1), nn.ELU()]
            c_in = cfg.f0_cond_channels
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.f0_cond_channels, cfg.f0_num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


@dataclass
class SourceDraws:
    """The random numbers of one source generation (to replay a recorded run).

    phase_u: (B, H+1, 1) raw U[0, 1) draws for the start phases; noise: (B, H+1, L) N(0, 1);
    cycle_offset: (B, H+1, 1) harmonic phase, in cycles, carried over from a previous call so
    that a streamed source continues its sines (None restarts them at 0, as the reference does).
    """

    phase_u: torch.Tensor
    noise: torch.Tensor
    cycle_offset: torch.Tensor | None = None


class SourceModule(nn.Module):
    """Harmonic-plus-noise source: SineGen then a Linear merge of the harmonics and tanh."""

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.harmonics = cfg.nb_harmonics + 1
        self.rate = cfg.sampling_rate
        self.sine_amp, self.noise_std = cfg.nsf_alpha, cfg.nsf_sigma
        self.threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def draw(self, length: int, generator: torch.Generator | None) -> SourceDraws:
        device = generator.device if generator is not None else None
        phase_u = torch.rand(1, self.harmonics, 1, generator=generator, device=device)
        noise = torch.randn(1, self.harmonics, length, generator=generator, device=device)
        return SourceDraws(phase_u, noise)

    def sine_waves(self, f0: torch.Tensor, draws: SourceDraws, trace: dict[str, torch.Tensor] | None = None
                   ) -> torch.Tensor:
        """f0: (B, 1, L) Hz per sample -> harmonics with noise (B, H+1, L)."""
        freq = torch.cat([f0 * (i + 1) / self.rate for i in range(self.harmonics)], dim=1)
        cycles = torch.cumsum(freq, dim=-1)
        if draws.cycle_offset is not None:
            cycles = cycles + draws.cycle_offset.to(f0.device)
        if trace is not None:
            trace["cycles"] = cycles
        theta = 2 * np.pi * (cycles % 1)
        low = torch.tensor(-np.pi, dtype=torch.float32, device=f0.device)
        high = torch.tensor(np.pi, dtype=torch.float32, device=f0.device)
        phase = low + draws.phase_u.to(f0.device) * (high - low)  # torch Uniform(-pi, pi), in float32
        phase[:, 0, :] = 0
        sines = self.sine_amp * torch.sin(theta + phase)
        uv = (f0 > self.threshold).type(torch.float32)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        return sines * uv + noise_amp * draws.noise.to(f0.device)

    def forward(self, f0: torch.Tensor, draws: SourceDraws, trace: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """f0: (B, 1, L) -> merged source (B, L, 1)."""
        waves = self.sine_waves(f0, draws, trace).transpose(1, 2)
        return torch.tanh(self.l_linear(waves))


class HiFTGenerator(nn.Module):
    stft_window: torch.Tensor

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        base, n_fft = cfg.base_channels, cfg.n_fft
        self.m_source = SourceModule(cfg)
        self.conv_pre = WNConv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConv1d(base // 2**i, base // 2 ** (i + 1), k, u, (k - u) // 2, transpose=True)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        down_rates = np.cumprod([1, *cfg.upsample_rates[::-1][:-1]])[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(down_rates, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes, strict=True)
        ):
            ch, u = base // 2 ** (i + 1), int(u)
            conv = nn.Conv1d(n_fft + 2, ch, 1, 1) if u == 1 else nn.Conv1d(n_fft + 2, ch, u * 2, u, u // 2)
            self.source_downs.append(conv)
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = WNConv1d(base // 2 ** len(self.ups), n_fft + 2, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(cfg)
        self.register_buffer("stft_window", _hann_periodic(n_fft), persistent=False)
        self.eval()

    def fold_weight_norm(self) -> None:
        for module in self.modules():
            if isinstance(module, WNConv1d):
                module.fold()

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: (B, 80, T) -> f0 (B, T) in Hz, each row computed on its own.

        The source integrates f0 over every sample (its sines' phase), so a one-ulp change in f0, which
        a convolution's kernel choice for another batch size gives, moves the samples by ~1e-4: computed
        row by row, a stream's source is the same whoever shares its batch.
        """
        return torch.cat([self.f0_predictor(mel[row : row + 1]) for row in range(mel.shape[0])])

    def source(self, mel: torch.Tensor, generator: torch.Generator | None = None,
               draws: SourceDraws | None = None, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """mel: (B, 80, T) -> NSF source (B, 1, T * samples_per_frame)."""
        f0 = self.f0(mel)
        f0_up = torch.repeat_interleave(f0[:, None], self.samples_per_frame, dim=-1)  # nearest upsampling
        if draws is None:
            draws = self.m_source.draw(f0_up.shape[-1], generator)
        if trace is not None:
            trace["f0"] = f0
        merged = self.m_source(f0_up, draws, trace)  # (B, L, 1)
        if trace is not None:
            trace["sine_merge"] = merged
        return merged.transpose(1, 2)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """(1, L) -> (1, n_fft + 2, L / hop + 1) as [real | imag]."""
        n_fft, hop = self.cfg.n_fft, self.cfg.hop_len
        spec = torch.view_as_real(torch.stft(x, n_fft, hop, n_fft, window=self.stft_window, return_complex=True))
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.cfg.n_fft, self.cfg.hop_len
        magnitude = torch.clip(magnitude, max=MAX_MAGNITUDE)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window)

    def decode(self, mel: torch.Tensor, source: torch.Tensor, trace: dict[str, torch.Tensor] | None = None
               ) -> torch.Tensor:
        """mel: (1, 80, T), source: (1, 1, T * 256) -> waveform (1, T * 256) in [-limit, limit]."""
        s_stft = self._stft(source.squeeze(1))
        x = self.conv_pre(mel)
        n_kernels = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_kernels](x)
            for j in range(1, n_kernels):
                xs += self.resblocks[i * n_kernels + j](x)
            x = xs / n_kernels
        x = self.conv_post(F.leaky_relu(x, F0_OUT_SLOPE))
        if trace is not None:
            trace["conv_post"] = x
        half = self.cfg.n_fft // 2 + 1
        wave = self._istft(torch.exp(x[:, :half, :]), torch.sin(x[:, half:, :]))
        return torch.clamp(wave, -self.cfg.audio_limit, self.cfg.audio_limit)

    @torch.inference_mode()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        draws: SourceDraws | None = None,
        trace: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel: (1, 80, T) -> (waveform (1, T*256), source (1, 1, T*256)).

        `cache_source` (1, 1, S) replaces the first S source samples (the previous call's tail).
        """
        mel = mel.to(self.stft_window.device)
        s = self.source(mel, generator, draws, trace)
        if cache_source is not None and cache_source.shape[-1] > 0:
            s[:, :, : cache_source.shape[-1]] = cache_source.to(s.device)
        return self.decode(mel, s, trace), s


def _hann_periodic(n: int) -> torch.Tensor:
    """scipy get_window('hann', n, fftbins=True) computed the way scipy does, then float32."""
    fac = np.linspace(-np.pi, np.pi, n + 1)[:-1]
    window = np.zeros(n + 1)[:-1]
    for k, a in enumerate((0.5, 0.5)):
        window += a * np.cos(k * fac)
    return torch.from_numpy(window.astype(np.float32))
