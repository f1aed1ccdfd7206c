"""Where the speech decoder's random numbers come from; never torch's global RNG.

Per block the decoder needs the flow's start noise (1, 80, T) and the vocoder source's draws
(start phases and per-sample noise). Three sources:
- `ReferenceNoise`: what the reference draws on CPU: a generator re-seeded with 42 for every
  flow call, then the HiFT draws from the same generator (MANIFEST section 3 shortcut).
- `SeededNoise`: noise indexed by absolute frame / sample position, generated in fixed chunks
  from one seed, and start phases fixed per stream; a streamed decode therefore sees the same
  numbers as a one-shot decode of the same tokens.
- `ReplayNoise`: recorded draws handed back in order (golden tests).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch

from glmvoice_cli.decoder.vocoder import SourceDraws

REFERENCE_SEED = 42
MEL_BINS = 80
FLOW_CHUNK_FRAMES = 64  # frames of start noise generated per seeded chunk
SOURCE_CHUNK_SAMPLES = 8192  # source-noise samples generated per seeded chunk
_CACHE_CHUNKS = 32
_KIND_FLOW, _KIND_PHASE, _KIND_SOURCE = 1, 2, 3


class NoiseSource(Protocol):
    def flow_noise(self, n_frames: int, start_frame: int) -> torch.Tensor:
        """Start noise (1, 80, n_frames) for absolute frames [start_frame, start_frame + n_frames)."""
        ...

    def source_draws(self, n_samples: int, start_sample: int) -> SourceDraws:
        """Vocoder draws for absolute samples [start_sample, start_sample + n_samples)."""
        ...


class ReferenceNoise:
    """The reference's CPU draws: re-seed 42 per flow call; HiFT continues the same stream."""

    def __init__(self, harmonics: int = 9) -> None:
        self.harmonics = harmonics
        self.generator = torch.Generator().manual_seed(REFERENCE_SEED)

    def flow_noise(self, n_frames: int, start_frame: int) -> torch.Tensor:
        self.generator.manual_seed(REFERENCE_SEED)
        return torch.randn(1, MEL_BINS, n_frames, generator=self.generator)

    def source_draws(self, n_samples: int, start_sample: int) -> SourceDraws:
        phase_u = torch.rand(1, self.harmonics, 1, generator=self.generator)
        noise = torch.randn(1, self.harmonics, n_samples, generator=self.generator)
        return SourceDraws(phase_u, noise)


class SeededNoise:
    """Position-indexed noise from one seed (streamed == one-shot), fixed start phases."""

    def __init__(self, seed: int, harmonics: int = 9) -> None:
        self.seed, self.harmonics = int(seed), harmonics
        self._chunks: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def _generator(self, kind: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + kind * 7_919 + index * 104_729) % 2**63)

    def _chunk(self, kind: int, index: int, rows: int, size: int) -> torch.Tensor:
        key = (kind, index)
        if key not in self._chunks:
            self._chunks[key] = torch.randn(rows, size, generator=self._generator(kind, index))
            while len(self._chunks) > _CACHE_CHUNKS:
                self._chunks.popitem(last=False)
        return self._chunks[key]

    def _span(self, kind: int, rows: int, size: int, start: int, n: int) -> torch.Tensor:
        """(rows, n) columns [start, start + n) of an endless chunked noise bank."""
        first, last = start // size, (start + n - 1) // size if n else start // size
        bank = torch.cat([self._chunk(kind, c, rows, size) for c in range(first, last + 1)], dim=1)
        offset = start - first * size
        return bank[:, offset : offset + n]

    def flow_noise(self, n_frames: int, start_frame: int) -> torch.Tensor:
        return self._span(_KIND_FLOW, MEL_BINS, FLOW_CHUNK_FRAMES, start_frame, n_frames).unsqueeze(0).contiguous()

    def source_draws(self, n_samples: int, start_sample: int) -> SourceDraws:
        phase_u = torch.rand(1, self.harmonics, 1, generator=self._generator(_KIND_PHASE, 0))
        noise = self._span(_KIND_SOURCE, self.harmonics, SOURCE_CHUNK_SAMPLES, start_sample, n_samples)
        return SourceDraws(phase_u, noise.unsqueeze(0).contiguous())


class ReplayNoise:
    """Hands back recorded (flow noise, source draws) pairs, one pair per decoder call."""

    def __init__(self, calls: list[tuple[torch.Tensor, SourceDraws]]) -> None:
        self.calls, self.index = calls, 0

    def flow_noise(self, n_frames: int, start_frame: int) -> torch.Tensor:
        noise = self.calls[self.index][0]
        if noise.shape[-1] != n_frames:
            raise ValueError(f"recorded flow noise has {noise.shape[-1]} frames, call needs {n_frames}")
        return noise

    def source_draws(self, n_samples: int, start_sample: int) -> SourceDraws:
        draws = self.calls[self.index][1]
        self.index += 1
        if draws.noise.shape[-1] != n_samples:
            raise ValueError(f"recorded source noise has {draws.noise.shape[-1]} samples, call needs {n_samples}")
        return SourceDraws(draws.phase_u, draws.noise)
