"""`transcribe --format txt|json|srt|vtt`, `--output-dir`, one progress bar for many files, and the segments."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.pipeline.segments import TOKEN_SAMPLES, Segment, speech_segments
from glmvoice_cli.pipeline.transcribe import Transcript, TranscriptSegment
from glmvoice_cli.pipeline.transcript_formats import render
from glmvoice_cli.tiny.modelset import TinyModelSet

RATE = 16_000
runner = CliRunner()
ARGS = ["--max-new-tokens", "6", "--seed", "1"]


def _burst(seconds: float) -> np.ndarray:
    """A voiced-sounding tone (220 Hz, with a syllable rhythm) that the VAD takes for speech."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.abs(np.sin(2 * np.pi * 2 * t + 0.3))).astype(np.float32)


def _quiet(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def _two_utterances() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Speech at 0.5-2.0 s and 4.0-5.0 s, silence around: the audio and where the speech is."""
    audio = np.concatenate([_quiet(0.5), _burst(1.5), _quiet(2.0), _burst(1.0), _quiet(0.5)])
    return audio, [(0.5, 2.0), (4.0, 5.0)]


@pytest.fixture(scope="module")
def models(tiny_models: TinyModelSet) -> Path:
    return tiny_models.root


@pytest.fixture()
def two(tmp_path: Path) -> Path:
    path = tmp_path / "two.wav"
    sf.write(path, _two_utterances()[0], RATE)
    return path


# --- the segments -------------------------------------------------------------------------------------


def test_one_segment_per_utterance_on_the_token_clock() -> None:
    audio, speech = _two_utterances()
    segments = speech_segments(audio, 30.0)
    assert len(segments) == len(speech)
    for segment, (start, end) in zip(segments, speech, strict=True):
        assert segment.start % TOKEN_SAMPLES == 0 and segment.end % TOKEN_SAMPLES == 0
        assert segment.start_s <= start and segment.end_s >= end  # the whole utterance is heard
        assert segment.start_s > start - 0.5 and segment.end_s < end + 0.5  # and little of the silence
    assert segments[0].end <= segments[1].start


def test_long_speech_is_cut_into_whole_windows_that_tile_it() -> None:
    audio = np.concatenate([_quiet(0.7), _burst(23.0), _quiet(0.5)])
    segments = speech_segments(audio, 10.0)
    window = 10 * RATE
    assert [s.end - s.start for s in segments[:-1]] == [window] * (len(segments) - 1)
    assert all(a.end == b.start for a, b in itertools.pairwise(segments))  # nothing between the pieces is lost
    assert segments[0].start_s <= 0.7 and segments[-1].end_s >= 23.7 and len(segments) == 3


def test_a_file_without_speech_for_the_vad_is_cut_into_plain_windows() -> None:
    assert speech_segments(_quiet(25.0), 10.0) == [Segment(0, 160_000), Segment(160_000, 320_000),
                                                   Segment(320_000, 400_000)]


# --- the formats --------------------------------------------------------------------------------------


def _transcript() -> Transcript:
    segments = (TranscriptSegment(0.16, 2.32, "Hello there."),
                TranscriptSegment(3661.68, 3665.4, "Two lines\n\nand an --> arrow"))
    return Transcript(text="Hello there. Two lines and an --> arrow", seconds=3670.0, speech_tokens=10,
                      generated_tokens=5, timings={"tokenize_s": 0.1}, segments=segments)


def test_srt_and_vtt_cues() -> None:
    srt = render(_transcript(), "srt", "a.wav")
    assert srt == ("1\n00:00:00,160 --> 00:00:02,320\nHello there.\n\n"
                   "2\n01:01:01,680 --> 01:01:05,400\nTwo lines and an -> arrow\n")
    vtt = render(_transcript(), "vtt", "a.wav")
    assert vtt == ("WEBVTT\n\n00:00:00.160 --> 00:00:02.320\nHello there.\n\n"
                   "01:01:01.680 --> 01:01:05.400\nTwo lines and an -> arrow\n")


def test_json_and_txt() -> None:
    record = json.loads(render(_transcript(), "json", "a.wav", load_s=1.23456))
    assert record["file"] == "a.wav" and record["timings"] == {"load_s": 1.235, "tokenize_s": 0.1}
    assert record["segments"][1] == {"start": 3661.68, "end": 3665.4, "text": "Two lines\n\nand an --> arrow"}
    assert render(_transcript(), "txt", "a.wav") == "Hello there. Two lines and an --> arrow\n"


# --- the command --------------------------------------------------------------------------------------


def test_every_format_tells_the_same_segments(models: Path, two: Path) -> None:
    outputs = {}
    for fmt in ("json", "srt", "vtt", "txt"):
        result = runner.invoke(app, ["transcribe", str(two), "--models", str(models), "--format", fmt, *ARGS])
        assert result.exit_code == 0, result.output
        outputs[fmt] = result.stdout
    record = json.loads(outputs["json"])
    segments = record["segments"]
    assert 1 <= len(segments) <= 2 and record["text"] == " ".join(s["text"] for s in segments)
    assert outputs["txt"] == record["text"] + "\n"
    srt_times = re.findall(r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)", outputs["srt"])
    vtt_times = re.findall(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)", outputs["vtt"])
    assert srt_times == vtt_times and len(srt_times) == len(segments)

    def seconds(h: str, m: str, s: str, ms: str) -> float:
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    for times, segment in zip(srt_times, segments, strict=True):
        assert (seconds(*times[:4]), seconds(*times[4:])) == (segment["start"], segment["end"])
    for segment in segments:  # each cue lies on one of the two utterances
        assert any(segment["start"] <= start and segment["end"] >= end for start, end in _two_utterances()[1])
    assert outputs["vtt"].startswith("WEBVTT\n")


def test_json_flag_is_the_json_format_and_a_clash_is_one_line(models: Path, two: Path) -> None:
    plain = runner.invoke(app, ["transcribe", str(two), "--models", str(models), "--json", *ARGS])
    named = runner.invoke(app, ["transcribe", str(two), "--models", str(models), "-f", "json", *ARGS])
    assert plain.exit_code == named.exit_code == 0
    assert json.loads(plain.stdout)["segments"] == json.loads(named.stdout)["segments"]
    clash = runner.invoke(app, ["transcribe", str(two), "--models", str(models), "--json", "-f", "srt"])
    assert clash.exit_code == 2 and "disagree" in clash.stderr
    unknown = runner.invoke(app, ["transcribe", str(two), "--models", str(models), "-f", "docx"])
    assert unknown.exit_code == 2 and "use txt, json, srt, vtt" in unknown.stderr


def test_many_files_into_an_output_dir_without_overwriting(models: Path, two: Path, tmp_path: Path) -> None:
    other = tmp_path / "sub" / "other.flac"
    other.parent.mkdir()
    sf.write(other, np.concatenate([_quiet(0.3), _burst(1.2), _quiet(0.3)]), RATE)
    to_stdout = runner.invoke(app, ["transcribe", str(two), str(other), "--models", str(models), "-f", "srt"])
    assert to_stdout.exit_code == 2 and "--output-dir" in to_stdout.stderr  # two subtitle files in one stream: no

    out = tmp_path / "subs"
    result = runner.invoke(app, ["transcribe", str(two), str(other), "--models", str(models), "-f", "srt",
                                 "-d", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["other.srt", "two.srt"] and result.stdout == ""
    single = runner.invoke(app, ["transcribe", str(two), "--models", str(models), "-f", "srt", *ARGS])
    assert (out / "two.srt").read_text() == single.stdout  # the same transcript as alone

    (out / "other.srt").write_text("my own edits")
    again = runner.invoke(app, ["transcribe", str(two), str(other), "--models", str(models), "-f", "srt",
                                "-d", str(out), *ARGS])
    assert again.exit_code == 2 and "2 transcripts exist" in again.stderr and "--overwrite" in again.stderr
    assert "other.srt" in again.stderr and "two.srt" in again.stderr
    assert (out / "other.srt").read_text() == "my own edits"  # refused before any work
    forced = runner.invoke(app, ["transcribe", str(other), "--models", str(models), "-f", "srt", "-d", str(out),
                                 "--overwrite", *ARGS])
    assert forced.exit_code == 0 and (out / "other.srt").read_text() != "my own edits"

    twin = tmp_path / "two.flac"
    sf.write(twin, _two_utterances()[0], RATE)
    clash = runner.invoke(app, ["transcribe", str(two), str(twin), "--models", str(models), "-d", str(tmp_path / "x")])
    assert clash.exit_code == 2 and "would both be written to" in clash.stderr


def test_many_files_show_one_progress_bar(models: Path, two: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.wav"
    sf.write(other, np.concatenate([_quiet(0.3), _burst(2.2), _quiet(0.5)]), RATE)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws as on a terminal
    result = runner.invoke(app, ["transcribe", str(two), str(other), "--models", str(models), *ARGS])
    assert result.exit_code == 0, result.output
    totals = set(re.findall(r"/(\d+) s of audio", result.stderr))
    assert totals == {"8"}, result.stderr  # 5.5 s + 3.0 s: one bar for both files
    assert "transcribing" in result.stderr
    assert [line.split(": ", 1)[0] for line in result.stdout.splitlines()] == [str(two), str(other)]
