"""The turn segmenter: onsets, pre-roll, hangover, max turn length, reset; webrtcvad on real speech."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.audio.vad import (
    Segmenter,
    SpeechDiscarded,
    SpeechStarted,
    Utterance,
    VadConfig,
    WebRtcClassifier,
)
from glmvoice_cli.errors import UsageError

RATE = 16_000
FRAME = 480  # 30 ms at 16 kHz, the default frame
LOUD = 0.5  # amplitude of a "voiced" frame for the scripted classifier


def loud(frame: np.ndarray) -> bool:
    """Scripted classifier: a frame is speech when it is loud (int16 in)."""
    return bool(np.abs(frame.astype(np.int32)).max() > 1_000)


def signal(pattern: str, frame: int = FRAME) -> np.ndarray:
    """'.' = a silent frame, 'x' = a voiced frame; each voiced frame holds its index as a marker."""
    out = np.zeros(len(pattern) * frame, dtype=np.float32)
    for i, c in enumerate(pattern):
        if c == "x":
            out[i * frame : (i + 1) * frame] = LOUD
    return out


def segment(pattern: str, config: VadConfig, chunk: int | None = None) -> list:
    seg = Segmenter(config, classifier=loud)
    audio = signal(pattern, config.frame_samples)
    if chunk is None:
        return seg.push(audio) + seg.finish()
    events = []
    for start in range(0, len(audio), chunk):
        events += seg.push(audio[start : start + chunk])
    return events + seg.finish()


CFG = VadConfig(start_frames=3, hangover_ms=150, pre_roll_ms=90, post_roll_ms=30, min_turn_ms=60, max_turn_s=1.5)


def test_onset_needs_start_frames_in_a_row() -> None:
    assert segment("..xx..xx..x.", CFG) == []
    events = segment("....xxx", CFG)
    assert events[0] == SpeechStarted(at_sample=4 * FRAME, confirmed_at=7 * FRAME)


def test_pre_roll_keeps_the_first_syllable_and_post_roll_the_ending() -> None:
    events = segment("......xxxxxx.......", CFG)
    started, utt = events
    assert isinstance(utt, Utterance) and not utt.truncated
    assert utt.start_sample == started.at_sample - 3 * FRAME  # 90 ms of pre-roll
    assert utt.end_sample == 12 * FRAME + FRAME  # 30 ms after the last voiced frame
    assert len(utt.samples) == utt.end_sample - utt.start_sample
    voiced = np.flatnonzero(utt.samples > 0)
    assert voiced[0] == 3 * FRAME  # the very first voiced sample is in the utterance
    assert len(voiced) == 6 * FRAME
    assert utt.seconds == pytest.approx(len(utt.samples) / RATE)


def test_pre_roll_is_limited_by_what_was_heard() -> None:
    _, utt = segment(".xxxx......", CFG)
    assert utt.start_sample == 0


def test_hangover_ends_the_turn_and_shorter_gaps_do_not() -> None:
    one = segment("xxxx....xxxx......", CFG)  # a 4-frame gap (120 ms) is below the 150 ms hangover
    assert [type(e) for e in one] == [SpeechStarted, Utterance]
    two = segment("xxxx.....xxxx......", CFG)  # a 5-frame gap (150 ms) ends the turn
    assert [type(e) for e in two] == [SpeechStarted, Utterance, SpeechStarted, Utterance]
    assert two[1].end_sample <= two[3].start_sample


def test_utterance_is_emitted_when_the_hangover_completes() -> None:
    seg = Segmenter(CFG, classifier=loud)
    assert [type(e) for e in seg.push(signal("xxxx....")) ] == [SpeechStarted]
    assert seg.in_turn
    (utt,) = seg.push(signal("."))  # the 5th silent frame completes 150 ms
    assert isinstance(utt, Utterance)
    assert not seg.in_turn


def test_max_turn_length_splits_into_contiguous_truncated_pieces() -> None:
    events = segment("x" * 120 + "......", CFG)  # 3.6 s of speech, 1.5 s max
    assert sum(isinstance(e, SpeechStarted) for e in events) == 1
    utts = [e for e in events if isinstance(e, Utterance)]
    assert [u.truncated for u in utts] == [True, True, False]
    assert all(len(u.samples) == 50 * FRAME for u in utts[:2])
    for a, b in itertools.pairwise(utts):
        assert a.end_sample == b.start_sample
    assert utts[-1].end_sample == 121 * FRAME
    whole = np.concatenate([u.samples for u in utts])
    np.testing.assert_array_equal(whole, signal("x" * 120 + ".")[: len(whole)])


def test_cut_exactly_at_the_end_of_speech_closes_with_a_discard() -> None:
    events = segment("x" * 50 + "......", CFG)
    assert [type(e) for e in events] == [SpeechStarted, Utterance, SpeechDiscarded]
    assert events[1].truncated


def test_short_bursts_are_discarded() -> None:
    cfg = VadConfig(start_frames=2, hangover_ms=90, min_turn_ms=120)
    events = segment("..xxx......", cfg)
    assert [type(e) for e in events] == [SpeechStarted, SpeechDiscarded]


def test_chunking_and_int16_input_do_not_change_the_events() -> None:
    pattern = "...xxxxx....xx.xxxxxxx........x...xxxx"
    whole = segment(pattern, CFG)
    for chunk in (1, 160, 333, 4_800):
        chunked = segment(pattern, CFG, chunk=chunk)
        assert [(type(e), getattr(e, "start_sample", None)) for e in chunked] == [
            (type(e), getattr(e, "start_sample", None)) for e in whole
        ]
    seg = Segmenter(CFG, classifier=loud)
    as_int = (signal(pattern) * 32_767).astype(np.int16)
    events = seg.push(as_int) + seg.finish()
    assert [type(e) for e in events] == [type(e) for e in whole]


def test_finish_closes_a_turn_in_progress() -> None:
    seg = Segmenter(CFG, classifier=loud)
    seg.push(signal("..xxxxxx"))
    (utt,) = seg.finish()
    assert isinstance(utt, Utterance) and utt.end_sample == 8 * FRAME
    assert seg.finish() == []


def test_reset_forgets_the_turn_and_restarts_the_timeline() -> None:
    seg = Segmenter(CFG, classifier=loud)
    seg.push(signal("..xxxxx"))
    assert seg.in_turn
    seg.reset()
    assert not seg.in_turn and seg.state.position == 0
    assert seg.push(signal("xx")) == []  # the earlier voiced frames no longer count
    (started,) = seg.push(signal("x"))
    assert started == SpeechStarted(0, 3 * FRAME)
    seg.reset(at_sample=10 * FRAME)
    (started,) = seg.push(signal("xxx"))
    assert started.at_sample == 10 * FRAME


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_frame_lengths(frame_ms: int) -> None:
    cfg = VadConfig(frame_ms=frame_ms, start_frames=2, hangover_ms=3 * frame_ms, pre_roll_ms=0,
                    post_roll_ms=0, min_turn_ms=0)
    events = segment("..xxxx.....", cfg)
    assert events[1].start_sample == 2 * cfg.frame_samples
    assert events[1].end_sample == 6 * cfg.frame_samples


@pytest.mark.parametrize(
    "kwargs",
    [{"aggressiveness": 4}, {"frame_ms": 25}, {"start_frames": 0}, {"hangover_ms": 5},
     {"pre_roll_ms": -1}, {"max_turn_s": 0.05}, {"sample_rate": 22_050}],
)
def test_bad_configs_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError, match="VAD"):
        VadConfig(**kwargs)


# --- webrtcvad itself ---------------------------------------------------------------------------


def test_webrtcvad_hears_no_speech_in_silence_or_hum() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(3 * RATE) / RATE
    quiet = 1e-4 * rng.standard_normal(len(t)).astype(np.float32)
    seg = Segmenter(VadConfig(aggressiveness=3))
    assert seg.push(quiet) + seg.finish() == []
    assert WebRtcClassifier(3)(np.zeros(FRAME, dtype=np.int16)) == 0.0


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """'hello there...' from espeak-ng at 16 kHz, or a skip where espeak-ng is missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed")
    path = Path(tmp_path_factory.mktemp("speech")) / "hello.wav"
    subprocess.run([exe, "-w", str(path), "hello there, how are you today"], check=True, timeout=60)
    return load_audio(path).samples


def test_webrtcvad_finds_one_turn_in_real_speech_between_silences(spoken: np.ndarray) -> None:
    gap = np.zeros(RATE, dtype=np.float32)
    audio = np.concatenate([gap, spoken, gap])
    seg = Segmenter(VadConfig(aggressiveness=2))
    events = seg.push(audio) + seg.finish()
    assert [type(e) for e in events] == [SpeechStarted, Utterance]
    started, utt = events
    speech_start = RATE + int(np.flatnonzero(np.abs(spoken) > 0.01)[0])
    speech_end = RATE + int(np.flatnonzero(np.abs(spoken) > 0.01)[-1])
    assert speech_start - 0.1 * RATE <= started.at_sample <= speech_start + 0.15 * RATE
    assert utt.start_sample <= speech_start  # the pre-roll reaches back over the first syllable
    assert utt.end_sample >= speech_end - 0.1 * RATE
    assert utt.end_sample < len(audio)


def test_webrtcvad_splits_two_sentences(spoken: np.ndarray) -> None:
    gap = np.zeros(RATE, dtype=np.float32)
    audio = np.concatenate([gap, spoken, gap, spoken, gap])
    seg = Segmenter(VadConfig())
    utts = [e for e in seg.push(audio) + seg.finish() if isinstance(e, Utterance)]
    assert len(utts) == 2
    assert utts[0].end_sample <= RATE + len(spoken) + RATE // 2 <= utts[1].start_sample
