"""Echo cancellation: a synthetic delayed echo of the played signal is removed, the user's voice is not.

Why 30 dB: a loud echo (gain 0.5 of a -20 dBFS voice, about -26 dBFS at the microphone) must fall
below about -50 dBFS, where webrtcvad no longer hears a synthetic voice at all (checked below);
that takes 24 dB, and 30 dB leaves a margin. Measured on this synthetic echo (linear path, 30 ms
delay, seconds 2-6): WebRTC AEC3 41 dB (30 dB already in the first second), the NLMS fallback
45 dB (but 4 dB in the first second and 20 dB in the second: it converges more slowly). With
the reference at 22.05 kHz (resampled inside), seconds 3-6: AEC3 39 dB, NLMS 44 dB. These are the
cancellers alone (gate=False); the residual-echo gate after them removes another 60 dB from
frames that hold echo only, so it is tested apart (and in the barge-in loop).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soxr

from glmvoice_cli.audio.echo import (
    NlmsEchoCanceller,
    NullEchoCanceller,
    WebRtcEchoCanceller,
    make_echo_canceller,
    webrtc_available,
)
from glmvoice_cli.audio.echo_gate import GATE_ATTENUATION_DB, EchoGate
from glmvoice_cli.audio.fakes import ArraySource, EchoLoop, RecordingSink
from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.audio.playback import VirtualClock
from glmvoice_cli.audio.stream_resample import HALF_TAPS, StreamResampler
from glmvoice_cli.audio.vad import Segmenter, SpeechStarted, Utterance, VadConfig
from glmvoice_cli.errors import GlmVoiceError, UsageError

RATE, OUT_RATE = 16_000, 22_050
BLOCK = 480  # 30 ms capture blocks
MIN_SUPPRESSION_DB = 30.0  # see the module docstring
ECHO_DELAY_S = 0.03
needs_webrtc = pytest.mark.skipif(not webrtc_available(), reason="livekit is not installed")
MODES = ["nlms", pytest.param("webrtc", marks=needs_webrtc)]


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def far_end(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Speech-like noise: low-pass coloured, with a 4 Hz syllable envelope, -20 dBFS."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    x = np.convolve(rng.standard_normal(n), 0.9 ** np.arange(120))[:n]  # AR(1) low-pass colouring
    x *= 0.55 + 0.45 * np.sin(2 * np.pi * 4 * np.arange(n) / rate)
    return (0.1 * x / np.std(x)).astype(np.float32)


def voice(seconds: float, level: float = 0.05, f0: float = 130.0) -> np.ndarray:
    """A synthetic voiced sound: gliding pitch, 11 harmonics, a syllable envelope."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(f0 + 20 * np.sin(2 * np.pi * 1.3 * t)) / RATE
    v = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * t) ** 2)
    return (level * v / np.std(v)).astype(np.float32)


def room(x: np.ndarray, seed: int = 1) -> np.ndarray:
    """The echo path: 30 ms delay, then a 12 ms decaying response, gain 0.5."""
    rng = np.random.default_rng(seed)
    delay = int(ECHO_DELAY_S * RATE)
    ir = np.zeros(delay + 200)
    ir[delay:] = rng.standard_normal(200) * np.exp(-np.arange(200) / 40)
    ir *= 0.5 / np.sqrt(np.sum(ir**2))
    return np.convolve(x, ir)[: len(x)].astype(np.float32)


def cancel(ec, reference: np.ndarray, ref_rate: int, mic: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Feed reference and microphone in 30 ms steps, the reference first (it is played first)."""
    edges = [round(k * BLOCK * ref_rate / RATE) for k in range(len(mic) // BLOCK + 1)]
    out = []
    for k in range(len(mic) // BLOCK):
        ec.reference(reference[edges[k] : edges[k + 1]], ref_rate)
        out.append(ec.process(mic[k * BLOCK : (k + 1) * BLOCK]))
    return np.concatenate(out)


@pytest.mark.parametrize("mode", MODES)
def test_a_delayed_echo_of_the_played_signal_is_suppressed(mode: str) -> None:
    far = far_end(6.0)
    echo = room(far)
    out = cancel(make_echo_canceller(mode, gate=False), far, RATE, echo)  # the canceller alone
    assert len(out) == len(echo)
    settled = slice(2 * RATE, 6 * RATE)
    assert db(echo[settled]) - db(out[settled]) >= MIN_SUPPRESSION_DB


@pytest.mark.parametrize("mode", MODES)
def test_the_reference_may_come_at_the_speaker_rate(mode: str) -> None:
    far22 = far_end(6.0, OUT_RATE)
    echo = room(soxr.resample(far22, OUT_RATE, RATE))
    out = cancel(make_echo_canceller(mode, gate=False), far22, OUT_RATE, echo)
    settled = slice(3 * RATE, 6 * RATE)
    assert db(echo[settled]) - db(out[settled]) >= MIN_SUPPRESSION_DB


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_the_users_voice_survives_double_talk_and_the_filter_does_not_diverge(mode: str, gate: bool) -> None:
    far = far_end(8.0)
    echo = room(far)
    near = np.zeros_like(echo)
    near[5 * RATE : 6 * RATE] = voice(1.0)
    out = cancel(make_echo_canceller(mode, gate=gate), far, RATE, echo + near)
    talk = slice(5 * RATE, 6 * RATE)
    assert abs(db(out[talk]) - db(near[talk])) <= 3.0  # the user is still heard at full level
    if mode == "nlms":  # the two-path guard keeps the foreground filter intact
        after = slice(6 * RATE, 8 * RATE)
        assert db(echo[after]) - db(out[after]) >= MIN_SUPPRESSION_DB


def test_the_null_canceller_passes_the_microphone_through() -> None:
    ec = make_echo_canceller("off")
    assert isinstance(ec, NullEchoCanceller)
    mic = room(far_end(1.0))
    ec.reference(far_end(1.0), RATE)
    np.testing.assert_array_equal(ec.process(mic), mic)


@pytest.mark.parametrize("mode", MODES)
def test_frames_are_buffered_to_10_ms(mode: str) -> None:
    ec = make_echo_canceller(mode)
    sizes = []
    for n in (480, 100, 100, 100, 333):
        ec.reference(np.zeros(n, dtype=np.float32), RATE)
        sizes.append(len(ec.process(np.zeros(n, dtype=np.float32))))
    assert sizes == [480, 0, 160, 0, 320]
    ec.reset()
    assert len(ec.process(np.zeros(100, dtype=np.float32))) == 0  # the partial frame was forgotten


def test_nlms_holds_the_microphone_while_its_reference_lags() -> None:
    ec = NlmsEchoCanceller()
    assert len(ec.process(np.zeros(480, dtype=np.float32))) == 480  # no speaker at all: no wait
    ec.reference(np.zeros(160, dtype=np.float32), RATE)
    assert len(ec.process(np.zeros(480, dtype=np.float32))) == 160  # one frame has its reference
    ec.reference(np.zeros(320, dtype=np.float32), RATE)
    assert len(ec.process(np.zeros(0, dtype=np.float32))) == 320  # the held frames follow
    assert len(ec.process(np.zeros(960, dtype=np.float32))) == 160  # 50 ms at most are held back


def test_unknown_mode_and_missing_livekit(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="echo cancellation mode"):
        make_echo_canceller("loud")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "livekit", None)  # import livekit -> ImportError
    assert not webrtc_available()
    assert isinstance(make_echo_canceller("auto"), NlmsEchoCanceller)
    with pytest.raises(GlmVoiceError, match=r"pip install 'glmvoice\[aec\]', or use --headphones"):
        make_echo_canceller("webrtc")


@needs_webrtc
def test_webrtc_needs_an_apm_rate() -> None:
    with pytest.raises(UsageError, match="Hz"):
        WebRtcEchoCanceller(sample_rate=22_050)


def test_webrtcvad_does_not_hear_the_voice_50_db_down() -> None:
    """The premise of MIN_SUPPRESSION_DB: at -50 dBFS the synthetic voice is no speech to the VAD."""
    quiet = voice(2.0, level=0.003)
    seg = Segmenter(VadConfig())
    assert seg.push(quiet) + seg.finish() == []
    seg = Segmenter(VadConfig())
    assert isinstance(seg.push(voice(2.0, level=0.05))[0], SpeechStarted)


@pytest.mark.parametrize("mode", ["off", *MODES])
def test_own_voice_through_the_fake_room_triggers_the_vad_only_without_cancellation(mode: str) -> None:
    """The assistant plays 2 s of warm-up noise, then speaks 4 s; the microphone hears it 30 ms later
    at gain 0.6, through the fakes on a virtual clock. Onsets count from the speech on: an
    adaptive filter needs its first ~0.2 s of reference to converge at all."""
    clock = VirtualClock()
    ec = make_echo_canceller(mode)
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock, on_played=ec.reference)
    silence = np.zeros(7 * RATE, dtype=np.float32)  # the user says nothing
    mic = EchoLoop(ArraySource(silence, RATE, clock=clock), sink, delay_s=ECHO_DELAY_S, gain=0.6)
    sink.write(soxr.resample(far_end(2.0) * 0.5, RATE, OUT_RATE))
    sink.write(soxr.resample(voice(4.0, level=0.1, f0=180.0), RATE, OUT_RATE))
    cleaned = []
    while (block := mic.read()) is not None:
        cleaned.append(ec.process(block))
    sink.close()
    seg = Segmenter(VadConfig())
    events = seg.push(np.concatenate(cleaned)[2 * RATE :]) + seg.finish()
    onsets = [e for e in events if isinstance(e, SpeechStarted)]
    if mode == "off":
        assert onsets, "the simulated echo must be loud enough to trigger barge-in"
    else:
        assert onsets == []


# --- the residual-echo gate ---------------------------------------------------------------------


def test_the_gate_is_open_while_nothing_plays() -> None:
    gate = EchoGate()
    frame = voice(0.01)
    assert gate(frame, [np.zeros(160, dtype=np.float32)]) is frame
    assert gate(frame, []) is frame and gate.gated == 0


def test_the_gate_silences_the_leak_and_passes_a_louder_talker() -> None:
    gate = EchoGate()
    rng = np.random.default_rng(0)
    frames = (0.1 * rng.standard_normal((101, 160))).astype(np.float32)  # a steady reference
    for f in frames[:100]:  # a leak 10 dB under the reference: gated
        out = gate(0.3 * f, [f])
        np.testing.assert_allclose(db(out), db(0.3 * f) - GATE_ATTENUATION_DB, atol=0.1)
    assert gate.gated == 100 and gate.coupling < 0.2  # it learned how much leaks
    talker = voice(0.01, level=0.1)  # as loud as the reference, 10 dB over the leak: the user
    assert gate(talker, [frames[100]]) is talker


def _spoken(text: str, tmp_path: Path, rate: int = RATE) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "say.wav"
    subprocess.run([exe, "-w", str(path), text], check=True, timeout=60)
    return load_audio(path, rate).samples


@pytest.mark.parametrize("mode", ["off", *MODES])
def test_barge_in_on_the_fakes_fires_on_the_user_and_never_on_the_echo(mode: str, tmp_path: Path) -> None:
    """The whole loop on a virtual clock: the user asks, the assistant answers into a room that
    echoes it back at gain 0.6 after 30 ms, the user interrupts. Without cancellation the echo
    itself interrupts the answer at once; with it, only the user does, and the answer is cut
    within 200 ms of the detected onset on the recorded output's timeline."""
    question, interruption = _spoken("What is the weather like today?", tmp_path), _spoken("Wait, stop.", tmp_path)
    answer = _spoken("Sure. The weather today is sunny with a light breeze from the west, and it will "
                     "be warm in the afternoon, so it is a good day for a walk.", tmp_path, OUT_RATE)
    pause = np.zeros(3 * RATE, dtype=np.float32)
    user = np.concatenate([pause[: RATE // 2], question, pause, interruption, pause])
    user_onset = (RATE // 2 + len(question) + len(pause)) / RATE  # seconds
    clock = VirtualClock()
    ec = make_echo_canceller(mode)
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock, on_played=ec.reference)
    mic = EchoLoop(ArraySource(user, RATE, clock=clock), sink, delay_s=ECHO_DELAY_S, gain=0.6)
    seg = Segmenter(VadConfig())
    barge_ins, answered = [], 0
    while (block := mic.read()) is not None:
        for event in seg.push(ec.process(block)):
            if isinstance(event, Utterance) and sink.pending == 0 and answered == 0:
                sink.write(answer)
                answered = sink.length  # where the answer starts on the output timeline
            elif isinstance(event, SpeechStarted) and sink.pending > 0:
                sink.flush()
                barge_ins.append((event.at_sample / RATE, sink.length / OUT_RATE))
    sink.close()
    assert answered
    if mode == "off":
        assert barge_ins and barge_ins[0][0] < user_onset - 1.0  # the assistant interrupted itself
        return
    assert len(barge_ins) == 1
    onset, cut = barge_ins[0]
    assert user_onset - 0.05 <= onset <= user_onset + 0.3
    heard = np.flatnonzero(np.abs(sink.recording()) > 1e-3)
    assert heard[-1] / OUT_RATE <= onset + 0.2  # nothing of the answer plays 200 ms after the onset
    assert cut <= onset + 0.2


def test_the_reference_resampler_is_causal_accurate_and_blocking_invariant() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(2 * OUT_RATE) / OUT_RATE
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    resampler = StreamResampler(OUT_RATE, RATE)
    pieces, start = [], 0
    while start < len(tone):  # random block sizes, as an audio callback delivers them
        n = int(rng.integers(1, 900))
        pieces.append(resampler(tone[start : start + n]))
        start += n
    out = np.concatenate(pieces)
    assert len(out) == 2 * RATE  # every input block yields its outputs at once
    np.testing.assert_array_equal(out, StreamResampler(OUT_RATE, RATE)(tone))
    delay = HALF_TAPS / OUT_RATE  # the fixed latency, 1.5 ms
    ideal = np.sin(2 * np.pi * 440 * (np.arange(len(out)) / RATE - delay))
    assert db(out[100:] - ideal[100:]) - db(ideal) < -60
    alias = StreamResampler(OUT_RATE, RATE)(np.sin(2 * np.pi * 10_000 * t).astype(np.float32))
    assert db(alias[100:]) < -90  # 10 kHz cannot fold back into the 16 kHz band
