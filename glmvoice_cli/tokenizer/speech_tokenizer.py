"""Speech to 12.5 Hz token ids: 30 s windows, batched feature extraction and encoding.

Windows are batched the way the reference does it (up to 128 windows per call, each padded with
zeros to the longest of its batch, then to a multiple of 1280 samples), because the padding
changes the last frames' features; the encoder itself runs in smaller micro-batches to bound
memory, which does not change any result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glmvoice_cli.device import pick_device, pick_dtype
from glmvoice_cli.tokenizer.checkpoint import load_tokenizer_model
from glmvoice_cli.tokenizer.features import FeatureConfig, LogMel
from glmvoice_cli.tokenizer.whisper_vq import WhisperVQEncoder

REFERENCE_BATCH = 128  # windows padded together by the reference
DEFAULT_MICRO_BATCH = 8  # windows encoded at once (memory bound, not a result-changing choice)


@dataclass(frozen=True)
class _Window:
    item: int  # which input it came from
    samples: np.ndarray  # (n,) float32, n <= samples_per_window


class SpeechTokenizer:
    """Loads the official tokenizer folder and turns 16 kHz mono audio into token ids."""

    def __init__(self, model: WhisperVQEncoder, features: FeatureConfig, micro_batch: int = DEFAULT_MICRO_BATCH):
        self.model = model
        self.feature_config = features
        self.device = next(model.parameters()).device
        self.logmel = LogMel(features, self.device)
        self.micro_batch = max(1, micro_batch)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | None = None, dtype: str | None = None,
                        micro_batch: int = DEFAULT_MICRO_BATCH) -> SpeechTokenizer:
        dev = pick_device(device)
        model, features = load_tokenizer_model(Path(folder), dev, pick_dtype(dtype, dev) if dtype else torch.float32)
        return cls(model, features, micro_batch)

    @property
    def sample_rate(self) -> int:
        return self.feature_config.sampling_rate

    @property
    def samples_per_token(self) -> int:
        return self.feature_config.hop_length * self.model.cfg.frames_per_token

    def encode(self, audios: Sequence[np.ndarray]) -> list[list[int]]:
        """Token ids of each (n,) float32 mono signal at `sample_rate`, all windows batched together."""
        windows = [w for i, a in enumerate(audios) for w in self._windows(i, a)]
        out: list[list[int]] = [[] for _ in audios]
        for start in range(0, len(windows), REFERENCE_BATCH):
            group = windows[start : start + REFERENCE_BATCH]
            padded_len = self._padded_length(max(len(w.samples) for w in group))
            for ids, w in zip(self._encode_group(group, padded_len), group, strict=True):
                out[w.item].extend(ids)
        return out

    def _windows(self, item: int, audio: np.ndarray) -> Iterator[_Window]:
        step = self.feature_config.samples_per_window
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        for start in range(0, len(audio), step):
            yield _Window(item, audio[start : start + step])

    def _padded_length(self, n: int) -> int:
        return -(-n // self.samples_per_token) * self.samples_per_token

    def features(self, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel (W, n_mels, T) and frame mask (W, T) of one signal's windows, padded as `encode` pads them
        when the signal is encoded alone (at most 128 windows)."""
        windows = list(self._windows(0, audio))[:REFERENCE_BATCH]
        return self._batch(windows, self._padded_length(max(len(w.samples) for w in windows)))

    def _batch(self, windows: list[_Window], padded_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        audio = torch.zeros(len(windows), padded_len)
        sample_mask = torch.zeros(len(windows), padded_len, dtype=torch.int32)
        for row, w in enumerate(windows):
            audio[row, : len(w.samples)] = torch.from_numpy(w.samples)
            sample_mask[row, : len(w.samples)] = 1
        return self.logmel(audio), sample_mask[:, :: self.feature_config.hop_length].to(self.device)

    @torch.inference_mode()
    def _encode_group(self, group: list[_Window], padded_len: int) -> Iterator[list[int]]:
        for start in range(0, len(group), self.micro_batch):
            chunk = group[start : start + self.micro_batch]
            ids, valid = self.model(*self._batch(chunk, padded_len))
            for row in range(len(chunk)):
                yield ids[row][valid[row]].tolist()
