"""Audio file input/output: formats, channel mix-down, resampling quality and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from glmvoice_cli.audio.io import (
    TOKENIZER_SAMPLE_RATE,
    Audio,
    load_audio,
    read_audio,
    resample,
    write_audio,
)
from glmvoice_cli.errors import AudioError

AMPLITUDE = 0.5
SINE_RMS = AMPLITUDE / np.sqrt(2)


def tone(freq: float, sample_rate: int, seconds: float = 1.0, amplitude: float = AMPLITUDE) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(x: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sample_rate)[spectrum.argmax()])


def rms(x: np.ndarray) -> float:
    edge = len(x) // 10  # skip the filter's edge transients
    return float(np.sqrt(np.mean(x[edge:-edge].astype(np.float64) ** 2)))


def write(
    path: Path, data: np.ndarray, sample_rate: int, subtype: str | None = None, fmt: str | None = None
) -> Path:
    sf.write(path, data, sample_rate, subtype=subtype, format=fmt)
    return path


def assert_audio_error(path: Path, match: str) -> None:
    with pytest.raises(AudioError, match=match) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


# --- formats that just work ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subtype", "tolerance"),
    [
        ("PCM_U8", 2**-7),
        ("PCM_16", 2**-15),
        ("PCM_24", 2**-23),
        ("PCM_32", 2**-31),
        ("FLOAT", 0),
        ("DOUBLE", 0),
    ],
)
def test_sample_formats_read_as_float32(tmp_path: Path, subtype: str, tolerance: float) -> None:
    x = tone(440, TOKENIZER_SAMPLE_RATE)
    audio = read_audio(write(tmp_path / f"{subtype}.wav", x, TOKENIZER_SAMPLE_RATE, subtype))
    assert audio.samples.dtype == np.float32 and audio.samples.shape == x.shape
    assert np.abs(audio.samples - x).max() <= tolerance
    assert audio.sample_rate == TOKENIZER_SAMPLE_RATE and audio.warnings == ()
    assert audio.seconds == pytest.approx(1.0)


def test_mono_16k_passes_through_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32768, size=8000) / 32768  # exactly representable in 16 bits
    for name, data, subtype in [("pcm.wav", pcm, "PCM_16"), ("float.wav", rng.uniform(-1, 1, 8000), "FLOAT")]:
        expected = data.astype(np.float32)
        audio = load_audio(write(tmp_path / name, expected, TOKENIZER_SAMPLE_RATE, subtype))
        np.testing.assert_array_equal(audio.samples, expected)
        assert audio.sample_rate == TOKENIZER_SAMPLE_RATE


@pytest.mark.parametrize("sample_rate", [8_000, 22_050, 44_100, 48_000, 96_000])
def test_any_rate_resamples_to_16k_keeping_frequency_and_amplitude(tmp_path: Path, sample_rate: int) -> None:
    audio = load_audio(write(tmp_path / "x.wav", tone(1000, sample_rate), sample_rate, "PCM_16"))
    assert audio.sample_rate == TOKENIZER_SAMPLE_RATE and audio.samples.dtype == np.float32
    assert len(audio.samples) == TOKENIZER_SAMPLE_RATE
    assert dominant_frequency(audio.samples, TOKENIZER_SAMPLE_RATE) == pytest.approx(1000, abs=2)
    assert rms(audio.samples) == pytest.approx(SINE_RMS, rel=0.01)


def test_eight_bit_at_44k(tmp_path: Path) -> None:
    audio = load_audio(write(tmp_path / "u8.wav", tone(300, 44_100), 44_100, "PCM_U8"))
    assert dominant_frequency(audio.samples, TOKENIZER_SAMPLE_RATE) == pytest.approx(300, abs=2)
    assert rms(audio.samples) == pytest.approx(SINE_RMS, rel=0.02)


def test_six_channels_are_averaged(tmp_path: Path) -> None:
    channels = np.stack(
        [tone(200 * (c + 1), TOKENIZER_SAMPLE_RATE, amplitude=0.1 * (c + 1)) for c in range(6)], 1
    )
    audio = read_audio(write(tmp_path / "six.wav", channels, TOKENIZER_SAMPLE_RATE, "FLOAT"))
    assert audio.samples.shape == (TOKENIZER_SAMPLE_RATE,)
    np.testing.assert_allclose(audio.samples, channels.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize(("fmt", "subtype", "exact"), [("FLAC", "PCM_24", True), ("OGG", "VORBIS", False)])
def test_flac_and_ogg(tmp_path: Path, fmt: str, subtype: str, exact: bool) -> None:
    x = tone(1000, 44_100, seconds=2.0)
    path = write(tmp_path / f"x.{fmt.lower()}", x, 44_100, subtype, fmt)
    if exact:
        np.testing.assert_allclose(read_audio(path).samples, x, atol=2**-23)
    audio = load_audio(path)
    assert dominant_frequency(audio.samples, TOKENIZER_SAMPLE_RATE) == pytest.approx(1000, abs=2)
    assert rms(audio.samples) == pytest.approx(SINE_RMS, rel=0.05)


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile has no MP3 support")
def test_mp3(tmp_path: Path) -> None:
    path = write(tmp_path / "x.mp3", tone(1000, 44_100, seconds=2.0), 44_100, "MPEG_LAYER_III", "MP3")
    audio = load_audio(path)
    assert audio.warnings == ()
    assert audio.seconds == pytest.approx(2.0, abs=0.1)
    assert dominant_frequency(audio.samples, TOKENIZER_SAMPLE_RATE) == pytest.approx(1000, abs=2)
    assert rms(audio.samples) == pytest.approx(SINE_RMS, rel=0.1)


def test_silence_is_valid_audio(tmp_path: Path) -> None:
    audio = load_audio(write(tmp_path / "silence.wav", np.zeros(4410, np.float32), 44_100, "PCM_16"))
    assert len(audio.samples) == 1600 and not audio.samples.any() and audio.warnings == ()


def test_float_file_beyond_full_scale_is_kept_with_a_warning(tmp_path: Path) -> None:
    x = tone(440, TOKENIZER_SAMPLE_RATE, amplitude=2.0)
    audio = read_audio(write(tmp_path / "loud.wav", x, TOKENIZER_SAMPLE_RATE, "FLOAT"))
    np.testing.assert_array_equal(audio.samples, x)
    assert len(audio.warnings) == 1 and "peak" in audio.warnings[0]


# --- the resampler --------------------------------------------------------------------------------


def test_resample_same_rate_is_identity() -> None:
    x = np.random.default_rng(1).uniform(-1, 1, 1000).astype(np.float32)
    np.testing.assert_array_equal(resample(x, 16_000, 16_000), x)


def test_resample_removes_tones_above_the_new_nyquist_instead_of_folding_them() -> None:
    folded = resample(tone(12_000, 48_000), 48_000, 16_000)  # a naive decimator puts this at 4 kHz
    assert rms(folded) < 1e-4 * SINE_RMS
    kept = resample(tone(7_000, 48_000), 48_000, 16_000)  # inside the passband
    assert rms(kept) == pytest.approx(SINE_RMS, rel=0.01)


# --- bad inputs -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert_audio_error(tmp_path / "nope.wav", "not found")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "folder.wav").mkdir()
    assert_audio_error(tmp_path / "folder.wav", "directory")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    assert_audio_error(tmp_path / "empty.wav", "empty")


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("OGG", "VORBIS")])
def test_zero_length_audio(tmp_path: Path, fmt: str, subtype: str) -> None:
    path = write(
        tmp_path / f"zero.{fmt.lower()}", np.zeros(0, np.float32), TOKENIZER_SAMPLE_RATE, subtype, fmt
    )
    assert_audio_error(path, "no samples")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    assert_audio_error(path, "not a readable audio file")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(seed).bytes(20_000))
    assert_audio_error(path, "not a readable audio file")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path: Path, bad: float) -> None:
    x = tone(440, TOKENIZER_SAMPLE_RATE)
    x[1234] = bad
    assert_audio_error(write(tmp_path / "bad.wav", x, TOKENIZER_SAMPLE_RATE, "FLOAT"), "NaN or infinite")


def truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("FLAC", "PCM_16")])
def test_truncated_file_gives_the_readable_part_and_a_warning(tmp_path: Path, fmt: str, subtype: str) -> None:
    x = tone(440, TOKENIZER_SAMPLE_RATE, seconds=4.0)
    path = truncate(write(tmp_path / f"cut.{fmt.lower()}", x, TOKENIZER_SAMPLE_RATE, subtype, fmt), 0.6)
    audio = read_audio(path)
    assert 0 < len(audio.samples) < len(x)
    np.testing.assert_allclose(audio.samples, x[: len(audio.samples)], atol=2**-15)
    assert len(audio.warnings) == 1 and "truncated" in audio.warnings[0] and str(path) in audio.warnings[0]


def test_truncated_to_the_header_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "head.wav", tone(440, TOKENIZER_SAMPLE_RATE), TOKENIZER_SAMPLE_RATE, "PCM_16")
    path.write_bytes(path.read_bytes()[:44])  # the canonical 44-byte header, no data
    assert_audio_error(path, "truncated")


# --- writing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg"])
def test_write_round_trip(tmp_path: Path, suffix: str) -> None:
    x = tone(1000, 22_050)
    write_audio(tmp_path / f"out{suffix}", x, 22_050)
    audio = read_audio(tmp_path / f"out{suffix}")
    assert audio.sample_rate == 22_050 and isinstance(audio, Audio)
    if suffix == ".ogg":
        assert rms(audio.samples) == pytest.approx(SINE_RMS, rel=0.05)
    else:
        np.testing.assert_allclose(audio.samples, x, atol=2**-15)


def test_write_clips_instead_of_wrapping(tmp_path: Path) -> None:
    write_audio(tmp_path / "loud.wav", np.array([2.0, -2.0, 0.5], np.float32), 16_000)
    np.testing.assert_allclose(read_audio(tmp_path / "loud.wav").samples, [1.0, -1.0, 0.5], atol=2**-15)


def test_write_to_stdout_as_wav(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    write_audio("-", tone(440, 16_000), 16_000)
    out = capfdbinary.readouterr().out
    assert out[:4] == b"RIFF" and out[8:12] == b"WAVE"


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="unknown audio extension"):
        write_audio(tmp_path / "out.xyz", np.zeros(10, np.float32), 16_000)
    with pytest.raises(AudioError, match="cannot write") as info:
        write_audio(tmp_path / "no" / "such" / "dir.wav", np.zeros(10, np.float32), 16_000)
    assert "dir.wav" in str(info.value)


def test_chunked_writing_keeps_an_existing_file_when_the_producer_fails(tmp_path: Path) -> None:
    from glmvoice_cli.audio.chunk_writer import write_audio_chunks

    out = tmp_path / "out.wav"
    out.write_bytes(b"earlier take")

    def chunks():  # type: ignore[no-untyped-def]
        yield np.zeros(1000, dtype=np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_audio_chunks(out, chunks(), 22_050)
    assert out.read_bytes() == b"earlier take" and [p.name for p in tmp_path.iterdir()] == ["out.wav"]
    assert write_audio_chunks(out, [np.ones(10), np.zeros(5)], 22_050) == 15
    data, rate = sf.read(out)
    assert rate == 22_050 and len(data) == 15 and [p.name for p in tmp_path.iterdir()] == ["out.wav"]
