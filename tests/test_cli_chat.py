"""`glmvoice chat` end to end: scripted conversations from a wav file (virtual clock), typed turns,
resume, Ctrl-C and lost or missing devices. Tiny random models, capped answers, espeak-ng speech."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.cli import app
from glmvoice_cli.tiny.modelset import TinyModelSet

runner = CliRunner()
RATE, OUT_RATE = 16_000, 22_050
FAST = ["--max-new-tokens", "40", "--seed", "1", "--no-live"]
BARGE_IN_LIMIT_S = 0.2
SPEECH_LEVEL = 0.01  # |sample| above this in the espeak input marks where speech begins
AUDIBLE = 1e-4


@pytest.fixture(scope="module")
def models(tiny_models: TinyModelSet) -> Path:
    return tiny_models.root


@pytest.fixture(scope="module")
def phrases(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("speech")
    out = []
    for name, text in (("q1", "What is the weather like today?"), ("q2", "Tell me a joke please.")):
        subprocess.run([exe, "-w", str(folder / f"{name}.wav"), text], check=True, timeout=60)
        out.append(load_audio(folder / f"{name}.wav", RATE).samples)
    return out[0], out[1]


def _pause(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def _wav(path: Path, *parts: np.ndarray) -> Path:
    sf.write(path, np.concatenate(parts), RATE)
    return path


def _lines(session: Path) -> list[dict]:
    return [json.loads(line) for line in (session / "transcript.jsonl").read_text().splitlines()]


def _chat(models: Path, *args: str, extra: list[str] = FAST, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["chat", "--models", str(models), *args, *extra], input=input)


def test_two_spoken_turns_and_a_barge_in_from_a_file(models: Path, phrases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The wiring of --input-file, --output-file, --session-dir and --max-new-tokens, on real speech and the
    real VAD; the engine tests (test_session.py) check turn-taking and barge-in in detail."""
    q1, q2 = phrases
    head = np.concatenate([_pause(0.5), q1, _pause(1.1)])
    wav = _wav(tmp_path / "barge.wav", head, q2, _pause(4.0))
    onset = (len(head) + int(np.argmax(np.abs(q2) > SPEECH_LEVEL))) / RATE
    out, session = tmp_path / "out.wav", tmp_path / "S"
    result = _chat(models, "--input-file", str(wav), "--output-file", str(out), "--session-dir", str(session),
                   extra=["--max-new-tokens", "60", "--seed", "1", "--no-live"])
    assert result.exit_code == 0, result.output
    lines = _lines(session)
    assert [(line["role"], line["interrupted"]) for line in lines] == [
        ("user", False), ("assistant", True), ("user", False), ("assistant", False)]
    assert "[interrupted]" in result.stdout
    assert 0 < len(lines[1]["token_ids"]) < 60  # the history keeps only what was heard
    assert all((session / line["audio"]).is_file() for line in lines)
    assert all(line["token_ids"] for line in lines) and lines[3]["timings"]["tokens"] == 60
    assert result.stdout.count("you: (") == 2 and result.stdout.count("assistant:") == 2
    recording, rate = sf.read(out)
    assert rate == OUT_RATE and len(recording) / rate >= sf.info(wav).duration - 0.1
    assert np.abs(recording).max() > AUDIBLE
    end_of_q2 = (len(head) + len(q2)) / RATE
    first_answer = recording[: int(end_of_q2 * OUT_RATE)]
    heard = np.flatnonzero(np.abs(first_answer) > AUDIBLE)
    assert heard.size and heard[-1] / OUT_RATE <= onset + BARGE_IN_LIMIT_S


@pytest.mark.parametrize("headphones", [True, False])
def test_simulated_echo_interrupts_only_without_the_canceller(models: Path, phrases, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                              headphones: bool) -> None:
    """--simulate-echo and --headphones reach the engine (its own echo tests cover the canceller)."""
    wav = _wav(tmp_path / "one.wav", _pause(0.5), phrases[0], _pause(5.0))
    session = tmp_path / "S"
    args = ["--input-file", str(wav), "--session-dir", str(session), "--simulate-echo", "0.6"]
    result = _chat(models, *args, *(["--headphones"] if headphones else []),
                   extra=["--max-new-tokens", "60", "--seed", "1", "--no-live"])
    assert result.exit_code == 0, result.output
    answers = [line for line in _lines(session) if line["role"] == "assistant"]
    if headphones:  # the echo path is off: the assistant's own voice interrupts it
        assert answers[0]["interrupted"], "the simulated echo must be loud enough to trigger barge-in"
    else:
        assert [a["interrupted"] for a in answers] == [False]


def test_typed_turns_and_resume(models: Path, tmp_path: Path) -> None:
    session = tmp_path / "S"
    result = _chat(models, "--text", "--session-dir", str(session), "--output-file", str(tmp_path / "o.wav"),
                   extra=["--max-new-tokens", "20", "--seed", "1", "--no-live"], input="Hello there.\n")
    assert result.exit_code == 0, result.output
    assert "you (typed): Hello there." in result.stdout
    result = _chat(models, "--text", "--resume", str(session), "--output-file", str(tmp_path / "o2.wav"),
                   extra=["--max-new-tokens", "20", "--seed", "1", "--no-live"], input="And again?\n")
    assert result.exit_code == 0, result.output
    lines = _lines(session)
    assert [line["role"] for line in lines] == ["user", "assistant", "user", "assistant"]
    assert [line["text"] for line in lines if line["role"] == "user"] == ["Hello there.", "And again?"]
    assert lines[0]["audio"] is None and lines[1]["audio"] is not None


def test_chat_with_the_reference_schedule_decodes_the_demos_blocks(models: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.decoder.speech_decoder import REFERENCE_SCHEDULE, SpeechDecoder

    blocks: list[int] = []
    decode_blocks = SpeechDecoder.decode_blocks

    def spy(self, requests):  # type: ignore[no-untyped-def]
        blocks.extend(len(r.tokens) for r in requests if not r.finalize)
        return decode_blocks(self, requests)

    monkeypatch.setattr(SpeechDecoder, "decode_blocks", spy)
    result = _chat(models, "--text", "--output-file", str(tmp_path / "o.wav"), "--schedule", "reference",
                   "--session-dir", str(tmp_path / "S"),
                   extra=["--max-new-tokens", "120", "--seed", "1", "--no-live"], input="Hello there.\n")
    assert result.exit_code == 0, result.output
    assert blocks and blocks == list(REFERENCE_SCHEDULE.block_sizes[: len(blocks)])


def test_ctrl_c_mid_answer_saves_the_session(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.events import TextDelta
    from glmvoice_cli.ui.view import PlainView

    show = PlainView.show

    def impatient(self, event):  # type: ignore[no-untyped-def]
        show(self, event)
        if isinstance(event, TextDelta):
            raise KeyboardInterrupt

    monkeypatch.setattr(PlainView, "show", impatient)
    session = tmp_path / "S"
    result = _chat(models, "--text", "--session-dir", str(session), "--output-file", str(tmp_path / "o.wav"),
                   extra=["--max-new-tokens", "400", "--seed", "1", "--no-live"], input="Talk for long.\n")
    assert result.exit_code == 130
    assert "interrupted; session saved" in result.stderr
    lines = _lines(session)
    assert [line["role"] for line in lines] == ["user", "assistant"] and lines[1]["interrupted"]


def test_no_portaudio_is_one_line(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio import devices

    def no_portaudio():  # type: ignore[no-untyped-def]
        raise devices.AudioDeviceError("PortAudio library not found (install it: apt install libportaudio2)")

    monkeypatch.setattr(devices, "import_sounddevice", no_portaudio)
    result = _chat(models)
    assert result.exit_code == 4
    assert "PortAudio" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_microphone_lost_mid_session_ends_with_one_line(models: Path, phrases, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio import fakes
    from glmvoice_cli.errors import AudioDeviceError

    class Unplugged(fakes.FileSource):
        reads = 0

        def read(self, timeout: float | None = None) -> np.ndarray | None:
            Unplugged.reads += 1
            if Unplugged.reads > 100:  # 3 s in: the first answer is playing
                raise AudioDeviceError("microphone 'USB' stopped delivering audio (unplugged?)")
            return super().read(timeout)

    monkeypatch.setattr(fakes, "FileSource", Unplugged)
    wav = _wav(tmp_path / "in.wav", _pause(0.5), phrases[0], _pause(5.0))
    session = tmp_path / "S"
    result = _chat(models, "--input-file", str(wav), "--session-dir", str(session),
                   extra=["--max-new-tokens", "60", "--seed", "1", "--no-live"])
    assert result.exit_code == 4
    assert "error: microphone 'USB' stopped delivering audio" in result.stderr
    lines = _lines(session)
    assert [line["role"] for line in lines] == ["user", "assistant"]


@pytest.mark.parametrize("args, message", [
    (["--text", "--input-file", "x.wav"], "cannot be used with --input-file"),
    (["--realtime"], "--input-file runs only"),
    (["--session-dir", "a", "--resume", "b"], "not both"),
    (["--input-file", "/no/such.wav"], "does not exist"),
    (["--simulate-echo", "5"], "--simulate-echo"),  # an echo five times louder than the voice is no room
])
def test_bad_options_are_one_line(models: Path, args: list[str], message: str) -> None:
    result = _chat(models, *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_realtime_file_starts_playing_when_the_models_are_ready(models: Path, phrases, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`--realtime` used to start its clock before loading: the file played during the load, so the first
    question was lost under the second and the recording grew by the load time."""
    import time as _time

    from glmvoice_cli.commands import chat as chat_command

    slow = 3.0
    real_load = chat_command.load_assistant

    def slow_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        _time.sleep(slow)  # a 9B checkpoint takes this and more
        return real_load(*args, **kwargs)

    monkeypatch.setattr(chat_command, "load_assistant", slow_load)
    q1, _ = phrases
    wav = _wav(tmp_path / "in.wav", _pause(0.5), q1, _pause(5.0))
    out = tmp_path / "out.wav"
    result = _chat(models, "--input-file", str(wav), "--realtime", "--output", str(out),
                   "--session-dir", str(tmp_path / "S"))
    assert result.exit_code == 0, result.output
    input_s = sf.info(str(wav)).duration
    recorded_s = sf.info(str(out)).duration
    assert recorded_s < input_s + slow / 2, (recorded_s, input_s)  # the load is not in the recording
    lines = _lines(tmp_path / "S")
    assert [line["role"] for line in lines] == ["user", "assistant"]
    assert lines[1]["token_ids"] and not lines[1]["interrupted"]  # the question was heard and answered whole


def test_the_resume_hint_works_from_any_directory_and_sessions_list_reads_a_session_dir(
        models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    first = _chat(models, "--text", "--session-dir", "mine", "--output-file", str(tmp_path / "o1.wav"),
                  input="Hello there\n")
    assert first.exit_code == 0, first.output
    hint = re.search(r"continue with --resume (\S+)\)", first.stderr)
    assert hint is not None, first.stderr
    monkeypatch.chdir(elsewhere)  # the hint must work from here too
    again = _chat(models, "--text", "--resume", hint.group(1), "--output-file", str(tmp_path / "o2.wav"),
                  input="And again\n")
    assert again.exit_code == 0, again.output
    assert [line["role"] for line in _lines(here / "mine")] == ["user", "assistant", "user", "assistant"]
    listed = runner.invoke(app, ["sessions", "list", "--json", "--dir", str(here)])
    assert listed.exit_code == 0 and json.loads(listed.stdout.splitlines()[0])["turns"] == 4


def test_silero_vad_and_the_smart_detector_through_a_chat(models: Path, phrases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--vad silero (the real Silero net) finds both spoken turns; --turn-detector smart (the real Smart Turn model,
    from the pipecat-ai wheel) judges their pauses; each turn is answered once and saved."""
    q1, q2 = phrases
    wav = _wav(tmp_path / "two.wav", _pause(0.5), q1, _pause(2.5), q2, _pause(3.0))
    session = tmp_path / "S"
    result = _chat(models, "--input-file", str(wav), "--session-dir", str(session), "--vad", "silero",
                   "--turn-detector", "smart", "--end-of-turn-threshold", "0.5", "--max-pause-ms", "1200", "--no-barge-in")
    assert result.exit_code == 0, result.output
    assert [(line["role"], line["interrupted"]) for line in _lines(session)] == [
        ("user", False), ("assistant", False), ("user", False), ("assistant", False)]


def test_the_smart_detector_without_its_model_is_one_line(models: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.models import settings

    monkeypatch.setattr(settings, "turn_model_path", lambda models=None: None)
    wav = _wav(tmp_path / "quiet.wav", _pause(1.0))
    result = _chat(models, "--input-file", str(wav), "--turn-detector", "smart")
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        "error: --turn-detector smart needs the Smart Turn model: glmvoice models download turn")
