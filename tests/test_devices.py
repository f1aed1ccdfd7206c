"""Playback buffer, fake devices on a virtual clock, and Microphone/Speaker over a fake sounddevice.

No test opens real audio hardware: the sounddevice module is replaced by `FakeSd` below.
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from glmvoice_cli.audio import devices
from glmvoice_cli.audio.devices import Microphone, Speaker, list_devices, resolve_device
from glmvoice_cli.audio.fakes import ArraySource, EchoLoop, FileSource, NullSink, RecordingSink
from glmvoice_cli.audio.playback import PlaybackBuffer, RealClock, VirtualClock
from glmvoice_cli.errors import AudioDeviceError

IN_RATE, OUT_RATE = 16_000, 22_050


# --- PlaybackBuffer -----------------------------------------------------------------------------


def test_playback_starts_with_the_first_block_and_plays_silence_when_the_next_is_late() -> None:
    buf = PlaybackBuffer(OUT_RATE)
    assert np.all(buf.pull(100) == 0) and buf.played == 0  # nothing written yet: silence
    buf.write(np.ones(150, dtype=np.float32))
    first = buf.pull(100)
    np.testing.assert_array_equal(first, np.ones(100))
    late = buf.pull(100)  # 50 samples left, then the decoder is late
    np.testing.assert_array_equal(late, np.r_[np.ones(50), np.zeros(50)])
    assert buf.underruns == 1 and buf.played == 150 and buf.position == 300
    buf.write(np.full(80, 0.5, dtype=np.float32))  # the next block resumes playback
    np.testing.assert_array_equal(buf.pull(100), np.r_[np.full(80, 0.5), np.zeros(20)])
    assert buf.played == 230 and buf.pending == 0


def test_pull_spans_several_blocks_in_order() -> None:
    buf = PlaybackBuffer(OUT_RATE)
    for value in (1, 2, 3):
        buf.write(np.full(30, value, dtype=np.float32))
    out = np.concatenate([buf.pull(40), buf.pull(40), buf.pull(40)])
    np.testing.assert_array_equal(out, np.r_[np.full(30, 1), np.full(30, 2), np.full(30, 3), np.zeros(30)])


def test_flush_drops_everything_queued_at_once() -> None:
    buf = PlaybackBuffer(OUT_RATE)
    buf.write(np.ones(1_000, dtype=np.float32))
    buf.pull(300)
    assert buf.flush() == 700
    assert buf.pending == 0 and buf.dropped == 700 and buf.played == 300
    assert np.all(buf.pull(50) == 0)
    assert buf.flush() == 0


def test_the_played_tap_sees_every_pulled_block() -> None:
    seen: list[tuple[int, int]] = []
    buf = PlaybackBuffer(OUT_RATE, on_played=lambda block, rate: seen.append((len(block), rate)))
    buf.write(np.ones(10, dtype=np.float32))
    buf.pull(64)
    buf.pull(64)
    assert seen == [(64, OUT_RATE), (64, OUT_RATE)]


# --- fakes on a virtual clock -------------------------------------------------------------------


def test_array_source_returns_blocks_on_the_clock_and_none_at_the_end() -> None:
    clock = VirtualClock()
    src = ArraySource(np.arange(1_000, dtype=np.float32), IN_RATE, clock=clock)
    blocks = []
    while (block := src.read(timeout=1.0)) is not None:
        blocks.append(block)
        assert clock.now() == pytest.approx(src.position / IN_RATE)
    assert [len(b) for b in blocks] == [480, 480, 40]
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(1_000))


def test_array_source_times_out_with_an_empty_block_in_real_time() -> None:
    src = ArraySource(np.zeros(16_000, dtype=np.float32), IN_RATE, clock=RealClock(), block_ms=500)
    assert len(src.read(timeout=0.01)) == 0  # the first block is due after 0.5 s
    src.close()
    assert src.read() is None


def test_file_source_reads_any_rate_as_16k(tmp_path: Path) -> None:
    path = tmp_path / "in.wav"
    sf.write(path, np.zeros(44_100, dtype=np.float32), 44_100)
    src = FileSource(path, clock=VirtualClock())
    assert src.sample_rate == IN_RATE and len(src.samples) == IN_RATE


def test_null_sink_counts_writes_as_played() -> None:
    sink = NullSink()
    sink.write(np.ones(100, dtype=np.float32))
    assert sink.played == 100 and sink.pending == 0 and sink.flush() == 0
    sink.close()


def test_recording_sink_puts_blocks_on_the_sample_timeline(tmp_path: Path) -> None:
    clock = VirtualClock()
    sink = RecordingSink(tmp_path / "out.wav", OUT_RATE, clock=clock)
    clock.advance_to(0.5)  # half a second of silence before the answer
    sink.write(np.full(OUT_RATE // 10, 0.25, dtype=np.float32))  # 100 ms of audio
    clock.advance_to(1.0)
    sink.write(np.full(1_000, 0.5, dtype=np.float32))
    clock.advance_to(1.01)
    assert sink.flush() == 1_000 - round(0.01 * OUT_RATE)  # barge-in at 1.01 s
    clock.advance_to(1.5)
    sink.close()
    rec, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == OUT_RATE and len(rec) == round(1.5 * OUT_RATE)
    loud = np.flatnonzero(np.abs(rec) > 0.1)
    assert loud[0] == OUT_RATE // 2  # the first block starts where it was written
    assert np.all(rec[OUT_RATE // 2 + OUT_RATE // 10 : OUT_RATE] == 0)  # late block: silence
    assert loud[-1] == OUT_RATE + round(0.01 * OUT_RATE) - 1  # cut at the flush
    assert sink.played == OUT_RATE // 10 + round(0.01 * OUT_RATE)
    np.testing.assert_array_equal(sink.recording(-2, 2), [0, 0, 0, 0])


def test_recording_sink_in_real_time_records_the_elapsed_time() -> None:
    clock = RealClock()
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock)
    sink.write(np.ones(100, dtype=np.float32))
    clock.wait_until(0.05)
    sink.close()
    assert sink.played == 100 and sink.length >= 0.05 * OUT_RATE


def test_echo_loop_feeds_the_speaker_back_into_the_microphone_with_delay_and_gain() -> None:
    clock = VirtualClock()
    user = np.zeros(IN_RATE, dtype=np.float32)
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock)
    mic = EchoLoop(ArraySource(user, IN_RATE, clock=clock), sink, delay_s=0.1, gain=0.5)
    t = np.arange(OUT_RATE // 5) / OUT_RATE
    tone = (0.8 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # 200 ms at 440 Hz
    heard = [mic.read()]  # 30 ms of nothing, then the assistant speaks
    sink.write(tone)
    while (block := mic.read()) is not None:
        heard.append(block)
    audio = np.concatenate(heard)
    onset = int(np.flatnonzero(np.abs(audio) > 0.05)[0])
    written_at = int(0.03 * OUT_RATE) / OUT_RATE  # the sink had played up to 30 ms when written
    expected_onset = (written_at + 0.1) * IN_RATE  # heard 100 ms later
    assert abs(onset - expected_onset) <= 3
    n = np.arange(len(audio))
    expected = 0.4 * np.sin(2 * np.pi * 440 * (n - expected_onset) / IN_RATE)
    middle = slice(int(expected_onset) + 50, int(expected_onset) + 3_150)
    np.testing.assert_allclose(audio[middle], expected[middle], atol=0.01)
    assert np.all(np.abs(audio[int(expected_onset) + 3_250 :]) < 1e-3)
    mic.close()
    sink.close()


# --- Microphone / Speaker over a fake sounddevice -----------------------------------------------


class FakeStream:
    def __init__(self, samplerate: int, blocksize: int, device: int, channels: int, dtype: str,
                 callback: Any) -> None:
        self.samplerate, self.blocksize, self.device, self.callback = samplerate, blocksize, device, callback
        self.active = False
        self.closed = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        self.closed = True


class FakeSd(types.ModuleType):
    """Two devices: 0 a USB microphone (48 kHz only), 1 built-in speakers (22.05 kHz ok)."""

    class PortAudioError(Exception):
        pass

    def __init__(self, devices_: list[dict] | None = None) -> None:
        super().__init__("sounddevice")
        self.devices = devices_ if devices_ is not None else [
            {"name": "USB Mic", "hostapi": 0, "max_input_channels": 1, "max_output_channels": 0,
             "default_samplerate": 48_000.0},
            {"name": "Built-in Speakers", "hostapi": 0, "max_input_channels": 0, "max_output_channels": 2,
             "default_samplerate": 44_100.0},
        ]
        self.default = types.SimpleNamespace(device=[0, 1])
        self.streams: list[FakeStream] = []

    def query_devices(self) -> list[dict]:
        return self.devices

    def query_hostapis(self) -> list[dict]:
        return [{"name": "ALSA"}]

    def check_input_settings(self, device: int, samplerate: int, **_: Any) -> None:
        if samplerate != 48_000:
            raise self.PortAudioError("Invalid sample rate")

    def check_output_settings(self, device: int, samplerate: int, **_: Any) -> None:
        pass

    def InputStream(self, **kw: Any) -> FakeStream:  # sounddevice's name
        self.streams.append(FakeStream(**kw))
        return self.streams[-1]

    OutputStream = InputStream


@pytest.fixture
def fake_sd(monkeypatch: pytest.MonkeyPatch) -> FakeSd:
    sd = FakeSd()
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    return sd


def test_no_portaudio_is_a_one_line_device_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_portaudio(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    for call in (list_devices, Microphone, Speaker):
        with pytest.raises(AudioDeviceError) as info:
            call()
        message = str(info.value)
        assert "PortAudio" in message and "apt install libportaudio2" in message and "\n" not in message


def test_list_and_resolve_devices(fake_sd: FakeSd) -> None:
    infos = list_devices()
    assert [(d.index, d.name, d.host_api, d.is_default_input, d.is_default_output) for d in infos] == [
        (0, "USB Mic", "ALSA", True, False), (1, "Built-in Speakers", "ALSA", False, True)]
    assert resolve_device(None, "input").name == "USB Mic"
    assert resolve_device("usb", "input").index == 0
    assert resolve_device("1", "output").name == "Built-in Speakers"
    with pytest.raises(AudioDeviceError, match=r"no microphone .* matches 'webcam'"):
        resolve_device("webcam", "input")
    with pytest.raises(AudioDeviceError, match="index 1"):
        resolve_device(1, "input")  # an output-only device


def test_no_microphone_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    sd = FakeSd([{"name": "HDMI", "hostapi": 0, "max_input_channels": 0, "max_output_channels": 2,
                  "default_samplerate": 48_000.0}])
    sd.default.device = [-1, 0]
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    with pytest.raises(AudioDeviceError, match=r"no microphone .* found .*glmvoice devices"):
        Microphone()


def test_microphone_resamples_to_16k_and_reports_a_lost_device(fake_sd: FakeSd) -> None:
    mic = Microphone("USB")
    stream = fake_sd.streams[-1]
    assert mic.device_rate == 48_000 and stream.blocksize == 1_440
    for _ in range(10):
        stream.callback(np.ones((1_440, 1), dtype=np.float32), 1_440, None, None)
    total = sum(len(mic.read(timeout=0.1)) for _ in range(10))
    assert abs(total - 4_800) <= 400  # the streaming resampler holds back its filter delay
    assert len(mic.read(timeout=0.01)) == 0  # nothing new, the device still runs
    stream.active = False  # unplugged
    with pytest.raises(AudioDeviceError, match="stopped delivering audio"):
        mic.read(timeout=0.01)
    mic.close()
    assert stream.closed


def test_a_microphone_whose_callbacks_stop_is_lost_too(fake_sd: FakeSd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "STALL_S", 0.0)  # the stream still claims to run, but is silent
    mic = Microphone()
    with pytest.raises(AudioDeviceError, match="unplugged"):
        mic.read(timeout=0.01)
    spk = Speaker()
    with pytest.raises(AudioDeviceError, match="unplugged"):
        spk.write(np.ones(10, dtype=np.float32))


def test_speaker_plays_from_the_buffer_and_counts_in_22k_samples(fake_sd: FakeSd) -> None:
    taps: list[int] = []
    spk = Speaker("speakers", on_played=lambda block, rate: taps.append(rate))
    stream = fake_sd.streams[-1]
    assert spk.device_rate == OUT_RATE and stream.blocksize == 441
    spk.write(np.ones(1_000, dtype=np.float32))
    out = np.zeros((441, 1), dtype=np.float32)
    stream.callback(out, 441, None, None)
    assert np.all(out == 1) and spk.played == 441 and spk.pending == 559
    assert spk.flush() == 559
    stream.callback(out, 441, None, None)
    assert np.all(out == 0) and taps == [OUT_RATE, OUT_RATE]
    stream.active = False
    with pytest.raises(AudioDeviceError, match="stopped playing"):
        spk.write(np.ones(10, dtype=np.float32))
    spk.close()


def test_speaker_resamples_when_the_device_cannot_play_22k(monkeypatch: pytest.MonkeyPatch,
                                                            fake_sd: FakeSd) -> None:
    def only_48k(device: int, samplerate: int, **_: Any) -> None:
        if samplerate != 48_000:
            raise fake_sd.PortAudioError("Invalid sample rate")

    monkeypatch.setattr(fake_sd, "check_output_settings", only_48k)
    monkeypatch.setattr(fake_sd, "devices", [dict(fake_sd.devices[1], default_samplerate=48_000.0)])
    fake_sd.default.device = [-1, 0]
    spk = Speaker()
    stream = fake_sd.streams[-1]
    assert spk.device_rate == 48_000 and stream.blocksize == 960
    spk.write(np.full(OUT_RATE // 10, 0.5, dtype=np.float32))  # 100 ms
    played = []
    for _ in range(10):  # 200 ms of callbacks
        out = np.zeros((960, 1), dtype=np.float32)
        stream.callback(out, 960, None, None)
        played.append(out[:, 0].copy())
    audio = np.concatenate(played)
    assert spk.played == OUT_RATE // 10 and spk.pending == 0  # the whole answer went out
    loud = np.flatnonzero(np.abs(audio) > 0.25)
    assert loud[0] < 0.01 * 48_000  # a fixed, small resampler latency
    assert abs(len(loud) - 4_800) < 50 and np.all(np.abs(audio[loud[-1] + 200 :]) < 1e-3)
    spk.close()


def test_the_protocols_are_met_by_every_implementation() -> None:
    for sink in (NullSink(), RecordingSink(clock=VirtualClock())):
        assert isinstance(sink.played, int) and callable(sink.write) and callable(sink.flush)
        sink.close()
    assert devices.AudioSource is not None and devices.AudioSink is not None


# --- `glmvoice devices` -------------------------------------------------------------------------


def _devices_app():  # type: ignore[no-untyped-def]
    import typer

    from glmvoice_cli.commands.devices import devices as devices_command

    app = typer.Typer()
    app.command()(devices_command)
    return app


def test_devices_command_lists_both_kinds(fake_sd: FakeSd) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(_devices_app(), [])
    assert result.exit_code == 0, result.output
    assert "USB Mic" in result.output and "Built-in Speakers" in result.output and "ALSA" in result.output
    result = CliRunner().invoke(_devices_app(), ["--json"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["name"] for r in rows] == ["USB Mic", "Built-in Speakers"] and rows[0]["is_default_input"]


def test_devices_command_without_portaudio_raises_the_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import sounddevice -> ImportError
    result = CliRunner().invoke(_devices_app(), [])
    assert isinstance(result.exception, AudioDeviceError)
    assert "sounddevice" in str(result.exception)


def test_the_devices_command_module_imports_neither_torch_nor_sounddevice() -> None:
    code = ("import sys, glmvoice_cli.commands.devices\n"
            "heavy = [m for m in ('torch', 'sounddevice', 'livekit') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_devices_json_with_no_device_is_an_empty_list_and_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from glmvoice_cli.cli import app
    from glmvoice_cli.commands import devices as devices_command

    monkeypatch.setattr(devices_command, "list_devices", list)
    result = CliRunner().invoke(app, ["devices", "--json"])
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.stdout.splitlines()] == []  # what a script reads: nothing
    assert result.stderr.strip() == "no audio devices found"
