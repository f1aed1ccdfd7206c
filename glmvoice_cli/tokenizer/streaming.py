"""Tokenize speech while it is still being spoken, with ids exactly those of the whole utterance.

`StreamingTokenizer.push(samples)` takes capture blocks of any size. Whenever a causal block of
`quantize_causal_block_size` positions (4 s) of a 30 s window is complete, it is encoded at once with
`block_encoder.encode_span`, keeping every layer's keys and values; `finish(n)` then encodes only the
last partial block of the utterance `audio[:n]`, padded exactly as `SpeechTokenizer.encode` pads it.

What reaches across blocks, and how it is handled:

- Look-ahead: a mel frame is centred on its hop, so it reads half an STFT window (n_fft // 2 samples)
  past its own end. A block is complete once those samples have arrived, or once its window is closed
  (audio went past the window's 30 s, whose own edge is reflected, as in the reference).
- The clamp: log-mel values are floored at (the window's maximum - 8), so a louder sound later can
  change quiet frames earlier. Each time blocks complete, every `RECHECK_S` of audio in between, and at
  `finish`, the features of the window are recomputed and compared, block by block, with those each
  encoded block used; from the first block that differs on, blocks are encoded again. The periodic
  check moves the recompute a loud sound in the last partial block causes to while the turn is still
  going (its end-of-turn silence is longer than `RECHECK_S`), so `finish` is left with the partial block
  only. The same check catches the end of the utterance (padding, reflection and a final length inside
  an encoded block).
- Windows: each 30 s window has its own blocks and caches; no state crosses a window.
- Rounding: a span's states equal the whole window's up to float rounding. An id whose nearest code
  wins by less than `tie_margin` (relative) could flip, so `finish` then returns the whole-utterance
  path's ids (`SpeechTokenizer.encode`); `stats.fallbacks` counts it. With real weights this is rare.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from glmvoice_cli.errors import CheckpointMismatchError
from glmvoice_cli.tokenizer.block_encoder import LayerCache, Span, SpanResult, encode_span, encode_spans
from glmvoice_cli.tokenizer.speech_tokenizer import REFERENCE_BATCH, SpeechTokenizer, _Window
from glmvoice_cli.tokenizer.whisper_vq import CONV2_STRIDE

RECHECK_S = 0.25  # audio between clamp checks when no block completes: well under the end-of-turn silence
DEFAULT_TIE_MARGIN = 2e-5  # relative gap under which an id might flip: span vs whole-window rounding measured ~7e-7


@dataclass
class _Block:
    frames: tuple[int, int]  # mel frames [a, b) of its window
    features: torch.Tensor  # (n_mels, b - a) the features it was encoded from
    ids: list[int]
    fragile: bool  # some id won by less than the tie margin
    caches: list[LayerCache]  # per layer, this block's keys and values


@dataclass
class _WindowState:
    blocks: list[_Block] = field(default_factory=list)
    checked_at: int = 0  # pushed samples when its features were last recomputed


@dataclass
class StreamStats:
    blocks_encoded: int = 0  # blocks encoded while audio arrived (re-encodings included)
    blocks_redone: int = 0  # encoded blocks dropped because their features changed (clamp, end)
    fallbacks: int = 0  # finish() calls answered by the whole-utterance path (near-tie ids)
    last_span_frames: int = 0  # mel frames the last finish() encoded (the partial tail)


class StreamingTokenizer:
    """Incremental front of a `SpeechTokenizer` for one utterance at a time (see module docstring)."""

    def __init__(self, tokenizer: SpeechTokenizer, tie_margin: float = DEFAULT_TIE_MARGIN) -> None:
        self.tokenizer = tokenizer
        self.model = tokenizer.model
        self.tie_margin = tie_margin
        cfg, feat = tokenizer.model.cfg, tokenizer.feature_config
        self.hop = feat.hop_length
        self.lookahead = feat.n_fft // 2  # samples past a frame's hop that its STFT window reads
        self.window_samples = feat.samples_per_window
        self.window_frames = self.window_samples // self.hop
        if cfg.quantize_causal_block_size is None or not cfg.pools:
            raise CheckpointMismatchError(
                "streaming tokenization needs a block-causal, pooled tokenizer (quantize_causal_block_size, "
                "pooling_kernel_size in config.json)")
        self.block_frames = cfg.quantize_causal_block_size * CONV2_STRIDE
        self.recheck_samples = int(RECHECK_S * feat.sampling_rate)
        self.stats = StreamStats()
        self.reset()

    def reset(self) -> None:
        """Forget the utterance (the statistics are kept)."""
        self._audio = np.zeros(0, dtype=np.float32)
        self._length = 0
        self._windows: list[_WindowState] = []

    @property
    def samples(self) -> int:
        """Samples pushed since the last reset."""
        return self._length

    @property
    def audio(self) -> np.ndarray:
        return self._audio[: self._length]

    @property
    def ids(self) -> list[int]:
        """Ids of the blocks encoded so far (a later push may still revise them: see the docstring)."""
        out: list[int] = []
        for window in self._windows:
            for block in window.blocks:
                out.extend(block.ids)
        return out

    def push(self, samples: np.ndarray) -> bool:
        """Add (n,) float32 16 kHz samples; encode the blocks they complete. True if `ids` changed."""
        return drive(self.push_steps(samples), lambda span: encode_spans(self.model, [span])[0])

    def push_steps(self, samples: np.ndarray) -> Generator[Span, SpanResult, bool]:
        """`push`, with each block to encode handed out (`yield span`) and its result sent back in, so that
        a batcher can encode several conversations' blocks in one call (`drive` runs it alone)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(samples) == 0:
            return False
        need = self._length + len(samples)
        if need > len(self._audio):
            grown = np.zeros(max(need, 2 * len(self._audio), self.window_samples // 8), dtype=np.float32)
            grown[: self._length] = self._audio[: self._length]
            self._audio = grown
        self._audio[self._length : need] = samples
        self._length = need
        before = self.ids
        first = len(self._windows) - 1 if self._windows else 0
        for w in range(max(first, 0), self._length // self.window_samples + 1):
            yield from self._advance(w)
        return self.ids != before

    # ------------------------------------------------------------------ while speaking

    def _complete_frames(self, w: int) -> int:
        """Mel frames of window w whose blocks are complete (a block boundary or the window's end)."""
        start = w * self.window_samples
        if self._length >= start + self.window_samples:
            return self.window_frames
        ready = (self._length - start - self.lookahead) // self.hop
        return max(0, ready - ready % self.block_frames)

    def _advance(self, w: int) -> Generator[Span, SpanResult, None]:
        while len(self._windows) <= w:
            self._windows.append(_WindowState())
        window, limit = self._windows[w], self._complete_frames(w)
        done = window.blocks[-1].frames[1] if window.blocks else 0
        due = bool(window.blocks) and self._length - window.checked_at >= self.recheck_samples
        if limit <= done and not due:
            return
        window.checked_at = self._length
        start = w * self.window_samples
        audio = torch.from_numpy(self._audio[start : min(self._length, start + self.window_samples)].copy())
        feats = self.tokenizer.logmel(audio[None])[0]
        keep = self._matching(window.blocks, feats, len(audio))
        self.stats.blocks_redone += len(window.blocks) - keep
        del window.blocks[keep:]
        valid = torch.ones(feats.shape[1], dtype=torch.bool)
        a = window.blocks[-1].frames[1] if window.blocks else 0
        while a < limit:
            b = min(a + self.block_frames, limit)
            span = yield Span(feats, valid, a // CONV2_STRIDE, b // CONV2_STRIDE, self._past(window.blocks))
            window.blocks.append(_Block((a, b), feats[:, a:b].clone(), span.ids, self._fragile(span), span.caches))
            self.stats.blocks_encoded += 1
            a = b

    def _matching(self, blocks: list[_Block], feats: torch.Tensor, real_samples: int) -> int:
        """How many leading blocks still hold: features unchanged and wholly inside the real audio."""
        for i, block in enumerate(blocks):
            a, b = block.frames
            if b * self.hop > real_samples or b > feats.shape[1] or not torch.equal(block.features, feats[:, a:b]):
                return i
        return len(blocks)

    def _past(self, blocks: list[_Block]) -> list[LayerCache] | None:
        if not blocks:
            return None
        layers = len(blocks[0].caches)
        return [(torch.cat([b.caches[i][0] for b in blocks], 2), torch.cat([b.caches[i][1] for b in blocks], 2))
                for i in range(layers)]

    def _fragile(self, span: SpanResult) -> bool:
        close = span.margin <= self.tie_margin * span.scale
        return bool((close & torch.tensor(span.valid, dtype=torch.bool)).any())

    # ------------------------------------------------------------------ end of the utterance

    def finish(self, n_samples: int | None = None) -> list[int]:
        """The ids of `audio[:n_samples]` (default: all pushed), exactly as `SpeechTokenizer.encode` gives them.

        Encodes only what the completed blocks do not cover; the stored blocks are left as they are,
        so pushing may go on afterwards (a speculative end of turn that the user talks over).
        """
        n = self._length if n_samples is None else max(0, min(n_samples, self._length))
        audio = self._audio[:n]
        tok = self.tokenizer
        windows = list(tok._windows(0, audio))
        if not windows:
            return []
        if len(windows) > REFERENCE_BATCH:  # over an hour in one turn: nothing streamed would match
            self.stats.fallbacks += 1
            return tok.encode([audio])[0]
        padded = tok._padded_length(max(len(win.samples) for win in windows))
        out: list[int] = []
        fragile, self.stats.last_span_frames = False, 0
        for first in range(0, len(windows), tok.micro_batch):  # features computed per micro-batch, as encode does
            group = windows[first : first + tok.micro_batch]
            feats, mask = tok._batch(group, padded)
            for row, win in enumerate(group):
                ids, weak = self._finish_window(first + row, win, feats[row], mask[row])
                out.extend(ids)
                fragile = fragile or weak
        if fragile:
            self.stats.fallbacks += 1
            return tok.encode([audio])[0]
        return out

    def _finish_window(self, w: int, win: _Window, feats: torch.Tensor, mask: torch.Tensor,
                       ) -> tuple[list[int], bool]:
        stored = self._windows[w].blocks if w < len(self._windows) else []
        kept = stored[: self._matching(stored, feats, len(win.samples))]
        ids = [i for block in kept for i in block.ids]
        a = kept[-1].frames[1] if kept else 0
        frames = feats.shape[1]
        if a >= frames:
            return ids, any(block.fragile for block in kept)
        span = encode_span(self.model, feats, mask.bool(), a // CONV2_STRIDE, frames // CONV2_STRIDE,
                           self._past(kept))
        self.stats.last_span_frames += frames - a
        ids += [i for i, ok in zip(span.ids, span.valid, strict=True) if ok]
        return ids, self._fragile(span) or any(block.fragile for block in kept)


_Result = TypeVar("_Result")


def drive(steps: Generator[Span, SpanResult, _Result], encode: Callable[[Span], SpanResult]) -> _Result:
    """Run a `push_steps` generator to its end, encoding each span it hands out with `encode`."""
    try:
        span = next(steps)
        while True:
            span = steps.send(encode(span))
    except StopIteration as stop:
        return stop.value
