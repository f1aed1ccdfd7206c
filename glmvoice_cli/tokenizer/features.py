"""Whisper-compatible log-mel features in torch (CPU or GPU).

Matches `transformers.WhisperFeatureExtractor` (its torch branch) value for value: periodic Hann
window, centred reflect-padded STFT, power spectrum without the last frame, Slaney mel filters,
log10 with a floor 8 decades below each example's maximum, then (x + 4) / 4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glmvoice_cli.config import SAMPLE_RATE_IN, WINDOW_SECONDS
from glmvoice_cli.errors import CheckpointMismatchError
from glmvoice_cli.files import read_limited

LOG_FLOOR = 1e-10  # power floor before log10
DYNAMIC_RANGE = 8.0  # decades kept below each example's maximum


@dataclass(frozen=True)
class FeatureConfig:
    """The fields of Whisper's `preprocessor_config.json` that shape the features."""

    sampling_rate: int = SAMPLE_RATE_IN  # Hz
    n_fft: int = 400  # samples (25 ms)
    hop_length: int = 160  # samples (10 ms)
    feature_size: int = 128  # mel bins
    chunk_length: int = int(WINDOW_SECONDS)  # seconds per window

    @property
    def samples_per_window(self) -> int:
        return self.sampling_rate * self.chunk_length

    @classmethod
    def from_file(cls, path: Path) -> FeatureConfig:
        """Read preprocessor_config.json, checking every field used for type and range."""
        try:
            raw = json.loads(read_limited(path, 16 << 20).decode("utf-8"))  # a config is a few KiB
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointMismatchError(f"{path}: not a Whisper preprocessor config ({type(e).__name__})") from e
        if not isinstance(raw, dict):
            raise CheckpointMismatchError(f"{path}: expected a JSON object")
        values = {}
        for name in ("sampling_rate", "n_fft", "hop_length", "feature_size", "chunk_length"):
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CheckpointMismatchError(f"{path}: field '{name}' must be a positive integer, got {value!r}")
            values[name] = value
        cfg = cls(**values)
        cfg.check(path)
        return cfg

    def check(self, path: Path) -> None:
        """What the extractor needs: 16 kHz input (the reference refuses others), a hop within the window,
        and an STFT of one window that fits in memory."""
        from glmvoice_cli.config import SAMPLE_RATE_IN
        from glmvoice_cli.memory import check_fits

        if self.sampling_rate != SAMPLE_RATE_IN:
            raise CheckpointMismatchError(f"{path}: field 'sampling_rate' must be {SAMPLE_RATE_IN}, got {self.sampling_rate}")
        if self.hop_length > self.n_fft:
            raise CheckpointMismatchError(f"{path}: field 'hop_length' ({self.hop_length}) exceeds 'n_fft' ({self.n_fft})")
        bins = self.n_fft // 2 + 1
        frames = self.samples_per_window // self.hop_length + 1
        stft_bytes = bins * frames * (8 + 4 + 4) + bins * self.feature_size * 8 + self.n_fft * 4
        check_fits(stft_bytes, path, "the STFT of one window (n_fft, hop_length, chunk_length)")


def mel_filters(cfg: FeatureConfig) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, shape (n_fft // 2 + 1, n_mels), float64: the
    transformers implementation Whisper's own feature extractor uses (identical to our former one in float32)."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(num_frequency_bins=cfg.n_fft // 2 + 1, num_mel_filters=cfg.feature_size,
                           min_frequency=0.0, max_frequency=cfg.sampling_rate / 2, sampling_rate=cfg.sampling_rate,
                           norm="slaney", mel_scale="slaney")


class LogMel:
    """Callable turning (B, n_samples) float32 audio into (B, n_mels, n_samples // hop) features."""

    def __init__(self, cfg: FeatureConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.window = torch.hann_window(cfg.n_fft, device=self.device)
        self.filters = torch.from_numpy(mel_filters(cfg)).to(self.device, torch.float32)

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: (B, N) float32 at cfg.sampling_rate -> log-mel (B, n_mels, N // hop)."""
        audio = audio.to(self.device, torch.float32)
        spec = torch.stft(audio, self.cfg.n_fft, self.cfg.hop_length, window=self.window, return_complex=True)
        power = spec[..., :-1].abs() ** 2  # (B, n_freqs, frames)
        mel = self.filters.T @ power  # (B, n_mels, frames)
        log = torch.clamp(mel, min=LOG_FLOOR).log10()
        peak = log.amax(dim=(1, 2), keepdim=True)
        log = torch.maximum(log, peak - DYNAMIC_RANGE)
        return (log + 4.0) / 4.0
