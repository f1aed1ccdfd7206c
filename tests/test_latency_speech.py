"""benchmarks/latency.py's conversations: rendered once by espeak-ng, read back where there is none (a lent GPU)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _latency():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    import latency

    return latency


def test_speech_saved_once_is_read_back_without_espeak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    latency = _latency()
    speech = tmp_path / "speech"
    first = latency.espeak("Good morning | to you.", tmp_path, speech)
    assert len(list(speech.glob("*.npy"))) == 2  # one file per piece, named by its text
    pause = int(latency.PAUSE_S * latency.RATE)
    assert first.dtype == np.float32 and len(first) > pause and np.abs(first).max() > 0.01

    monkeypatch.setattr(latency.shutil, "which", lambda name: None)  # a machine without espeak-ng
    again = latency.espeak("Good morning | to you.", tmp_path, speech)
    np.testing.assert_array_equal(again, first)
    with pytest.raises(SystemExit, match="--render-only --speech-dir"):
        latency.espeak("A sentence never rendered.", tmp_path, speech)
