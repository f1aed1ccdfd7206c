"""`glmvoice tts` and `glmvoice transcribe` end to end on a tiny random model set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.tiny.modelset import TinyModelSet

runner = CliRunner()
FAST = ["--max-new-tokens", "30", "--seed", "1"]


@pytest.fixture(scope="module")
def models(tiny_models: TinyModelSet) -> Path:
    return tiny_models.root


@pytest.fixture()
def speech(tmp_path: Path) -> Path:
    t = np.arange(int(2.5 * 16_000)) / 16_000
    path = tmp_path / "speech.wav"
    sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 2 * t), 16_000)
    return path


def test_tts_writes_speech_and_prints_text(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    result = runner.invoke(app, ["tts", "Hello there. How are you?", "--models", str(models), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out)
    assert rate == 22_050 and len(audio) > 0 and np.abs(audio).max() > 0
    assert result.stdout.endswith("\n")


def test_the_flag_knows_the_decoders_schedules() -> None:
    from glmvoice_cli.commands.common import SCHEDULE_NAMES
    from glmvoice_cli.decoder.speech_decoder import SCHEDULES

    assert tuple(SCHEDULES) == SCHEDULE_NAMES  # the CLI's copy of the names (no torch at start-up) stays in step


@pytest.mark.parametrize("schedule", ["default", "reference"])
def test_tts_schedule_sets_the_decoders_blocks(models: Path, tmp_path: Path, schedule: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.decoder.speech_decoder import SpeechDecoder, schedule_named

    blocks: list[tuple[int, bool]] = []
    decode_blocks = SpeechDecoder.decode_blocks

    def spy(self, requests):  # type: ignore[no-untyped-def]
        blocks.extend((len(r.tokens), r.finalize) for r in requests)
        return decode_blocks(self, requests)

    monkeypatch.setattr(SpeechDecoder, "decode_blocks", spy)
    out = tmp_path / "out.wav"
    result = runner.invoke(app, ["tts", "Hello there.", "--models", str(models), "-o", str(out), "--schedule", schedule,
                                 "--max-new-tokens", "200", "--seed", "1"])
    assert result.exit_code == 0, result.output
    sizes = schedule_named(schedule).block_sizes
    streamed = [n for n, final in blocks if not final]
    assert streamed and streamed == [sizes[min(i, len(sizes) - 1)] for i in range(len(streamed))]


def test_tts_reads_stdin_and_writes_wav_to_stdout(models: Path) -> None:
    result = runner.invoke(app, ["tts", "-", "--models", str(models), "-o", "-", *FAST], input="Hi from stdin.")
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(io.BytesIO(result.stdout_bytes))
    assert rate == 22_050 and len(audio) > 0


def test_tts_reads_a_file_and_styles(models: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("今天天气很好。我们去公园吧。")
    out = tmp_path / "o.flac"
    result = runner.invoke(app, ["tts", "--file", str(text), "--emotion", "happy", "--speed", "slow",
                                 "--dialect", "cantonese", "--models", str(models), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert sf.info(out).format == "FLAC"


@pytest.mark.parametrize("args, message", [
    (["tts", "", "-o", "x.wav"], "empty"),
    (["tts", "hi", "-o", "x.mp4"], "use one of"),
    (["tts", "hi", "-o", "/no/such/dir/x.wav"], "does not exist"),
    (["tts", "hi", "--emotion", "grumpy", "-o", "x.wav"], "unknown emotion"),
    (["tts", "hi", "--file", "nofile.txt"], "not both"),
    (["tts", "hi", "--schedule", "fast", "-o", "x.wav"], "not one of default, reference"),
])
def test_tts_bad_input_is_one_line(models: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, [*args, "--models", str(models)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_tts_missing_models_names_the_fetch_command(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tts", "hi", "-o", str(tmp_path / "x.wav")])
    assert result.exit_code != 0
    assert "glmvoice models download" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_tts_without_audio_output_device_is_one_line(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio import devices

    def no_portaudio():  # as on a machine without libportaudio2
        raise devices.AudioDeviceError("PortAudio library not found (install it: apt install libportaudio2)")

    monkeypatch.setattr(devices, "import_sounddevice", no_portaudio)
    result = runner.invoke(app, ["tts", "hi", "--models", str(models)])
    assert result.exit_code == 4
    assert "PortAudio" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_tts_plays_on_the_speaker(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio.fakes import RecordingSink
    from glmvoice_cli.commands import tts as tts_cmd

    sink = RecordingSink()
    monkeypatch.setattr(tts_cmd, "open_speaker", lambda device: sink)
    result = runner.invoke(app, ["tts", "Play me.", "--models", str(models), *FAST])
    assert result.exit_code == 0, result.output
    assert sink.pending == 0 and sink.played > 0


def test_tts_ctrl_c_keeps_what_was_spoken(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import glmvoice_cli.pipeline.speak as speak_mod
    from glmvoice_cli.events import AudioChunk

    def interrupted(*args, **kwargs):
        yield AudioChunk(np.full(2205, 0.25, np.float32))
        raise KeyboardInterrupt

    monkeypatch.setattr(speak_mod, "speak", interrupted)
    out = tmp_path / "partial.wav"
    result = runner.invoke(app, ["tts", "Long text.", "--models", str(models), "-o", str(out), *FAST])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    audio, _ = sf.read(out)
    assert len(audio) == 2205


def test_transcribe_json_and_plain(models: Path, speech: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.flac"
    sf.write(other, 0.1 * np.random.default_rng(3).standard_normal(8000), 8000)
    result = runner.invoke(app, ["transcribe", str(speech), str(other), "--models", str(models), "--json",
                                 "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(speech), str(other)]
    assert rows[0]["seconds"] == 2.5 and rows[0]["tokens"] == 32  # ceil(2.5 s * 12.5)
    assert all(0 < r["generated_tokens"] <= 12 and isinstance(r["text"], str) for r in rows)
    assert set(rows[0]["timings"]) == {"load_s", "tokenize_s", "generate_s"}
    plain = runner.invoke(app, ["transcribe", str(speech), "--models", str(models), "--max-new-tokens", "12"])
    assert plain.exit_code == 0 and plain.stdout.strip() == rows[0]["text"].strip()


def test_transcribe_cuts_long_audio_into_windows(assistant: Assistant) -> None:
    from glmvoice_cli.pipeline.transcribe import transcribe

    seen: list[tuple[int, int]] = []
    samples = np.random.default_rng(0).standard_normal(16_000 * 25).astype(np.float32) * 0.1
    result = transcribe(assistant, samples, window_s=10, max_new_tokens=4, on_window=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert result.speech_tokens == 125 + 125 + 63 and result.generated_tokens <= 12


def test_transcribe_bad_file_is_one_line(models: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    result = runner.invoke(app, ["transcribe", str(bad), "--models", str(models)])
    assert result.exit_code == 2 and "not a readable audio file" in result.stderr


def _one_line_error(result, code: int, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.mark.parametrize("kind", ["missing", "empty", "silent"])
def test_transcribe_missing_empty_or_silent_file_is_one_line(models: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "silent":
        sf.write(path, np.zeros(16_000), 16_000)
    result = runner.invoke(app, ["transcribe", str(path), "--models", str(models)])
    _one_line_error(result, 2, str(path), {"missing": "not found", "empty": "empty", "silent": "silent"}[kind])


def test_transcribe_long_file_hears_each_utterance_once_and_skips_the_silence(models: Path, tmp_path: Path) -> None:
    """A beep each 30 s in 2.5 minutes of digital silence: five model calls, one per beep, and none of the
    silence between them (the windowing of long speech itself: test_transcribe_cuts_long_audio_into_windows)."""
    minutes = 2.5
    path = tmp_path / "long.flac"  # at 8 kHz: resampled like any file
    tone = (3000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    with sf.SoundFile(path, "w", 8000, 1, subtype="PCM_16") as f:
        window = np.zeros(8000 * 30, np.int16)
        window[:8000] = tone
        for _ in range(int(minutes * 2)):
            f.write(window)
    result = runner.invoke(app, ["transcribe", str(path), "--models", str(models), "--json",
                                 "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["seconds"] == minutes * 60
    assert row["generated_tokens"] == minutes * 2  # one call per beep
    beeps = int(minutes * 2)
    assert beeps * 12.5 <= row["tokens"] < beeps * 2 * 12.5  # each 1 s beep with a little margin, not 30 s


@pytest.mark.parametrize("stage, target", [("lm", "model.safetensors"), ("decoder", "flow.pt"),
                                           ("tokenizer", "model.safetensors")])
def test_corrupt_checkpoint_is_one_line(models: Path, tmp_path: Path, stage: str, target: str, speech: Path) -> None:
    import shutil

    broken = tmp_path / "models"
    shutil.copytree(models, broken)
    data = (broken / stage / target).read_bytes()
    (broken / stage / target).write_bytes(data[: len(data) // 2])  # a download cut in half
    if stage == "tokenizer":
        args = ["transcribe", str(speech)]
    else:
        args = ["tts", "Hello.", "-o", str(tmp_path / "x.wav")]
    result = runner.invoke(app, [*args, "--models", str(broken), "--max-new-tokens", "5"])
    _one_line_error(result, 3, target)


def test_acceptance_selftest_models_tts_then_transcribe(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    tts = runner.invoke(app, ["tts", "Hello there", "--emotion", "happy", "--models", str(models), "-o", str(out),
                              "--max-new-tokens", "40"])
    assert tts.exit_code == 0, tts.output
    info = sf.info(out)
    assert info.samplerate == 22_050 and info.channels == 1 and info.frames > 0
    result = runner.invoke(app, ["transcribe", str(out), "--models", str(models), "--json", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1 and json.loads(result.stdout)["file"] == str(out)


def test_transcribe_takes_a_seed_that_makes_a_sampled_transcript_repeatable(models: Path, speech: Path) -> None:
    args = ["transcribe", str(speech), "--models", str(models), "--max-new-tokens", "12", "--temperature", "1.5",
            "--top-p", "1"]
    runs = {seed: [runner.invoke(app, [*args, "--seed", str(seed)]) for _ in range(2)] for seed in (1, 2)}
    for results in runs.values():
        assert all(r.exit_code == 0 for r in results), results[0].output
        assert results[0].stdout == results[1].stdout  # the same seed, the same transcript
    assert runs[1][0].stdout != runs[2][0].stdout  # and the seed is what decides it


def test_tts_debug_lines_say_what_was_sent_and_how_long_each_piece_took(models: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["-vv", "tts", "Hello there.", "--models", str(models), "-o", str(tmp_path / "x.wav"),
                                 "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    debug = [line for line in result.stderr.splitlines() if line.startswith("debug: piece 1")]
    assert any("instruction sent to the model" in line and "Hello there." in line for line in debug), debug
    assert any("prompt" in line and "first audio" in line for line in debug), debug
    quiet = runner.invoke(app, ["-q", "tts", "Hello there.", "--models", str(models), "-o", str(tmp_path / "y.wav"),
                                "--max-new-tokens", "12"])
    assert quiet.exit_code == 0 and quiet.stderr.strip() == ""  # -q: no `wrote ...` either
