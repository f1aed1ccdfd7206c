"""Nothing the user named is lost: files are replaced whole or not at all, and `tts` and `chat` keep what was
said when a signal (Ctrl-C, SIGTERM, SIGHUP, a second Ctrl-C) or a lost audio device ends them.

The signal tests run the real CLI in a process of its own (forked by the warm Python of conftest, which has
torch and transformers imported already) on the tiny model set; a small wrapper script holds the
answer mid-way (after its first audio block) so that the signal always lands mid-answer, and every wait
has a timeout so nothing can hang the suite.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.files import replace_file, write_file
from glmvoice_cli.tiny.modelset import TinyModelSet

from .warm_python import WarmProcess, WarmPython

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-new-tokens", "30", "--seed", "1"]
START_TIMEOUT_S = 300  # a fresh process loads torch and the tiny models on a busy 2-core machine
EXIT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def models(tiny_models: TinyModelSet) -> Path:
    return tiny_models.root


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- the one helper: replace whole or not at all -------------------------------------------------


def test_replace_file_keeps_the_old_file_on_any_failure_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.wav"
    target.write_bytes(b"old")
    target.chmod(0o600)
    for failure in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(failure)), replace_file(target) as fh:
            fh.write(b"new, half written")
            raise failure
        assert target.read_bytes() == b"old" and _temp_files(tmp_path) == []
    write_file(target, b"new")
    assert target.read_bytes() == b"new" and _temp_files(tmp_path) == []
    assert target.stat().st_mode & 0o777 == 0o600  # a private file stays private


def test_replace_file_writes_through_a_symbolic_link(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_bytes(b"old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_file(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


# --- tts -o: a failure leaves an existing file untouched --------------------------------------------


def _existing(tmp_path: Path) -> tuple[Path, bytes]:
    out = tmp_path / "out.wav"
    sf.write(out, np.full(1000, 0.5, np.float32), 22_050)
    return out, out.read_bytes()


def test_a_failing_tts_leaves_an_existing_output_untouched(models: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import glmvoice_cli.pipeline.speak as speak_mod
    from glmvoice_cli.errors import CheckpointError
    from glmvoice_cli.events import AudioChunk

    def failing(*args: Any, **kwargs: Any) -> Any:
        yield AudioChunk(np.full(2205, 0.25, np.float32))
        raise CheckpointError("decoder weights hold NaN")

    monkeypatch.setattr(speak_mod, "speak", failing)
    out, before = _existing(tmp_path)
    result = runner.invoke(app, ["tts", "Some text.", "--models", str(models), "-o", str(out), *FAST])
    assert result.exit_code == 3 and result.stderr.strip().splitlines()[-1] == "error: decoder weights hold NaN"
    assert out.read_bytes() == before and _temp_files(tmp_path) == []


def test_a_full_disk_while_writing_the_tts_output_keeps_the_old_file(models: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli import files

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    out, before = _existing(tmp_path)
    result = runner.invoke(app, ["tts", "Some text.", "--models", str(models), "-o", str(out), *FAST])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: cannot write audio file {out}: No space left on device"]
    assert out.read_bytes() == before and _temp_files(tmp_path) == []


def test_an_interrupt_before_any_speech_leaves_an_existing_output_untouched(
        models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import glmvoice_cli.pipeline.speak as speak_mod

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt
        yield  # a generator, like the real one

    monkeypatch.setattr(speak_mod, "speak", interrupted)
    out, before = _existing(tmp_path)
    result = runner.invoke(app, ["tts", "Some text.", "--models", str(models), "-o", str(out), *FAST])
    assert result.exit_code == 130
    assert "nothing was spoken yet" in result.stderr and "unchanged" in result.stderr
    assert out.read_bytes() == before and _temp_files(tmp_path) == []


def test_audio_written_block_by_block_to_a_full_disk_is_one_error(tmp_path: Path) -> None:
    """decode -o's streaming writer on a small tmpfs (where mounting is permitted; else an injected ENOSPC)."""
    import shutil

    from glmvoice_cli.audio import chunk_writer
    from glmvoice_cli.errors import AudioError

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
        check=False).returncode == 0
    blocks = (np.zeros(22_050, np.float32) for _ in range(10))  # 430 kB of 16-bit WAV
    try:
        if mounted:
            (disk / "out.wav").write_bytes(b"old")
            with pytest.raises(AudioError) as info:
                chunk_writer.write_audio_chunks(disk / "out.wav", blocks, 22_050)
            assert (disk / "out.wav").read_bytes() == b"old" and _temp_files(disk) == []
        else:
            with pytest.raises(AudioError) as info, chunk_writer._writing(disk / "out.wav"):
                raise OSError(errno.ENOSPC, "No space left on device")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    assert str(info.value) == f"cannot write audio file {disk / 'out.wav'}: No space left on device"


# --- signals against the real CLI ---------------------------------------------------------------------

TTS_SCRIPT = r'''
import os, sys, time
from pathlib import Path
import glmvoice_cli.audio.io as audio_io
import glmvoice_cli.pipeline.speak as speak_mod
from glmvoice_cli.events import AudioChunk

real_speak, real_write = speak_mod.speak, audio_io.write_file
work = Path(os.environ["TEST_WORK"])

def speak(*args, **kwargs):
    """The real answer, held after its first audio block: the signal lands mid-answer."""
    for event in real_speak(*args, **kwargs):
        yield event
        if isinstance(event, AudioChunk):
            (work / "spoken.tmp").write_text(str(len(event.samples)))
            os.replace(work / "spoken.tmp", work / "spoken")  # the test signals as soon as it appears
            while True:
                time.sleep(0.05)

def write_file(path, data):
    """With TEST_HOLD_WRITE, wait for the test's second signal while the output is being written."""
    if os.environ.get("TEST_HOLD_WRITE"):
        (work / "writing").touch()
        deadline = time.monotonic() + 60
        while not (work / "second-sent").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    real_write(path, data)

speak_mod.speak, audio_io.write_file = speak, write_file
from glmvoice_cli.cli import main
sys.argv = ["glmvoice"] + sys.argv[1:]
main()
'''


def _start(warm: WarmPython, script_text: str, args: list[str], work: Path, **extra_env: str) -> WarmProcess:
    script = work / "run.py"
    script.write_text(script_text)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TEST_WORK": str(work), **extra_env}
    return warm.popen([str(script), *args], env, stdin=subprocess.PIPE)


def _wait_for(path: Path, proc: WarmProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not path.exists():
        proc.kill()
        pytest.fail(f"{path.name} never appeared: {proc.communicate(timeout=EXIT_TIMEOUT_S)}")


def _finish(proc: WarmProcess) -> str:
    try:
        return proc.communicate(timeout=EXIT_TIMEOUT_S)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_tts_killed_by_a_signal_writes_what_was_spoken(models: Path, tmp_path: Path, signum: int,
                                                      warm_python: WarmPython) -> None:
    out, _ = _existing(tmp_path)
    proc = _start(warm_python, TTS_SCRIPT, ["tts", "Hello there.", "--models", str(models), "-o", str(out), *FAST], tmp_path)
    _wait_for(tmp_path / "spoken", proc)
    proc.send_signal(signum)
    err = _finish(proc)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert "Traceback" not in err and f"error: interrupted ({name})" in err, err
    assert f"wrote {out} with the" in err and "spoken so far" in err, err
    assert len(sf.read(out)[0]) == int((tmp_path / "spoken").read_text())
    assert _temp_files(tmp_path) == []


def _cli_script(patch: str) -> str:
    """A script that runs the glmvoice command line (sys.argv) after `patch`; `work` is the test's folder."""
    return ("import os, sys, time\nfrom pathlib import Path\nwork = Path(os.environ['TEST_WORK'])\n" + patch
            + "\nfrom glmvoice_cli.cli import main\nsys.argv = ['glmvoice'] + sys.argv[1:]\nmain()\n")


def _signalled(warm: WarmPython, script: str, args: list[str], work: Path, marker: str, signum: int) -> str:
    """Start the script, send `signum` once it has written `marker`, and return its stderr once it has ended."""
    proc = _start(warm, script, args, work)
    _wait_for(work / marker, proc)
    proc.send_signal(signum)
    err = _finish(proc)
    assert proc.returncode == 128 + signum, err
    return err


DECODE_SCRIPT = _cli_script(r'''
import glmvoice_cli.decoder.speech_decoder as decoder_mod

real = decoder_mod.synthesize_blocks

def synthesize_blocks(*args, **kwargs):
    """The real decoding, held after its first block: the signal lands while the file is half written."""
    chunks, rate = real(*args, **kwargs)

    def held():
        for chunk in chunks:
            yield chunk
            (work / "decoded").touch()
            while True:
                time.sleep(0.05)

    return held(), rate

decoder_mod.synthesize_blocks = synthesize_blocks
''')


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_decode_killed_by_a_signal_keeps_the_old_file_and_leaves_no_temporary(
        models: Path, tmp_path: Path, signum: int, warm_python: WarmPython) -> None:
    out, before = _existing(tmp_path)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(" ".join(str(i % 50) for i in range(120)))
    err = _signalled(warm_python, DECODE_SCRIPT, ["decode", str(tokens), "--models", str(models), "--stream",
                                                  "-o", str(out)], tmp_path, "decoded", signum)
    name = signal.Signals(signum).name
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"error: interrupted ({name})", err
    assert out.read_bytes() == before and _temp_files(tmp_path) == []


LOADING_SCRIPT = _cli_script(r'''
import glmvoice_cli.commands.common as common

def load_assistant(*args, **kwargs):
    """The models never finish loading: the signal lands during the load."""
    (work / "loading").touch()
    while True:
        time.sleep(0.05)

common.load_assistant = load_assistant
''')


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_chat_stopped_while_loading_keeps_an_existing_output_file(
        models: Path, tmp_path: Path, signum: int, warm_python: WarmPython) -> None:
    out, before = _existing(tmp_path)
    question = tmp_path / "question.wav"
    sf.write(question, np.zeros(16_000, np.float32), 16_000)
    err = _signalled(warm_python, LOADING_SCRIPT, ["chat", "--input-file", str(question), "-o", str(out),
                                                   "--models", str(models), "--no-live",
                                                   "--session-dir", str(tmp_path / "S")], tmp_path, "loading", signum)
    assert "Traceback" not in err and f"nothing was played: {out} not written (the existing file is unchanged)" \
        in err, err
    assert out.read_bytes() == before and _temp_files(tmp_path) == []


EXITING_SCRIPT = _cli_script(r'''
import atexit

def slow_exit():
    """The interpreter's shutdown after the job (thread joins, library teardown), made long enough to signal."""
    (work / "exiting").touch()
    deadline = time.monotonic() + 60
    while not (work / "signalled").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)

atexit.register(slow_exit)
''')


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_while_exiting_after_a_finished_job_keeps_the_jobs_status(
        tmp_path: Path, signum: int, warm_python: WarmPython) -> None:
    proc = _start(warm_python, EXITING_SCRIPT, ["sessions", "list", "--dir", str(tmp_path)], tmp_path)
    _wait_for(tmp_path / "exiting", proc)
    proc.send_signal(signum)
    (tmp_path / "signalled").touch()
    err = _finish(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_second_ctrl_c_during_tts_exits_as_cleanly_as_the_first(models: Path, tmp_path: Path,
                                                                  warm_python: WarmPython) -> None:
    out = tmp_path / "out.wav"
    proc = _start(warm_python, TTS_SCRIPT, ["tts", "Hello there.", "--models", str(models), "-o", str(out), *FAST], tmp_path,
                  TEST_HOLD_WRITE="1")
    _wait_for(tmp_path / "spoken", proc)
    proc.send_signal(signal.SIGINT)
    _wait_for(tmp_path / "writing", proc)  # the first Ctrl-C is being handled: the file is being written
    proc.send_signal(signal.SIGINT)
    (tmp_path / "second-sent").touch()
    err = _finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "error: interrupted", err
    assert len(sf.read(out)[0]) == int((tmp_path / "spoken").read_text())  # the cleanup ran to its end


CHAT_SCRIPT = r'''
import os, sys, time
from pathlib import Path
from glmvoice_cli.audio.fakes import RecordingSink
from glmvoice_cli.events import AudioChunk
from glmvoice_cli.pipeline.assistant import Assistant

real_respond = Assistant.respond_in_steps
work = Path(os.environ["TEST_WORK"])

def respond(self, conv, user, options=None, cancel=None, speak=True, noise=None, on_ready=None, blocks=None):
    """The real answer, held after its first audio block until the turn is cut."""
    for event in real_respond(self, conv, user, options, cancel, speak, noise, on_ready, blocks):
        yield event
        if isinstance(event, AudioChunk):
            while not cancel.is_set():
                time.sleep(0.05)
            return

def advance_to(self, t):
    """The speaker's clock tick; "speaking" once some of the answer has really been played (a signal before
    that would cut an answer nobody heard: nothing of it is kept, and the test would assert on nothing)."""
    real_advance(self, t)
    if self.buffer.played > 0:
        (work / "speaking").touch()

Assistant.respond_in_steps = respond
real_advance = RecordingSink.advance_to
RecordingSink.advance_to = advance_to
from glmvoice_cli.cli import main
sys.argv = ["glmvoice"] + sys.argv[1:]
main()
'''


@pytest.mark.slow
def test_sigterm_during_a_chat_answer_saves_it_as_interrupted(models: Path, tmp_path: Path,
                                                              warm_python: WarmPython) -> None:
    session = tmp_path / "S"
    proc = _start(warm_python, CHAT_SCRIPT, ["chat", "--text", "--models", str(models), "--session-dir", str(session),
                                "--output-file", str(tmp_path / "o.wav"), "--no-live", *FAST], tmp_path)
    assert proc.stdin is not None
    proc.stdin.write("Talk for long.\n")
    proc.stdin.flush()  # stdin stays open: the chat would otherwise end at its end
    _wait_for(tmp_path / "speaking", proc)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "interrupted (SIGTERM); session saved in" in err, err
    lines = [json.loads(line) for line in (session / "transcript.jsonl").read_text().splitlines()]
    assert [line["role"] for line in lines] == ["user", "assistant"]
    assert lines[1]["interrupted"] is True and lines[1]["token_ids"]


# --- a lost audio device: closing never blocks --------------------------------------------------------


class _StuckStream:
    """A PortAudio stream on a device that vanished: no callbacks, and stop/close never return."""

    release = threading.Event()

    def __init__(self, **kw: Any) -> None:
        self.samplerate, self.blocksize, self.callback = kw["samplerate"], kw["blocksize"], kw["callback"]
        self.active = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.release.wait()

    def close(self) -> None:
        self.release.wait()


@pytest.fixture
def stuck_sd(monkeypatch: pytest.MonkeyPatch) -> Any:
    from glmvoice_cli.audio import devices

    from .test_devices import FakeSd

    sd = FakeSd()
    sd.InputStream = sd.OutputStream = lambda **kw: _StuckStream(**kw)  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    monkeypatch.setattr(devices, "STALL_S", 0.0)  # the first block written finds the device gone
    monkeypatch.setattr(devices, "CLOSE_TIMEOUT_S", 0.5)
    yield sd
    _StuckStream.release.set()  # let the abandoned closer threads end


def test_closing_a_stuck_stream_returns(stuck_sd: Any) -> None:
    from glmvoice_cli.audio.devices import Speaker, _close_stream

    speaker = Speaker()
    done = threading.Event()
    threading.Thread(target=lambda: (speaker.close(), done.set()), daemon=True).start()
    # returns once CLOSE_TIMEOUT_S (0.5 s here) has passed instead of blocking forever; the bound is generous
    assert done.wait(EXIT_TIMEOUT_S), "closing a stuck stream never returned"
    assert _close_stream(_StuckStream(samplerate=16_000, blocksize=160, callback=None)) is False  # left behind


def test_a_speaker_lost_mid_answer_ends_the_chat_with_the_device_code(models: Path, tmp_path: Path,
                                                                      stuck_sd: Any) -> None:
    session = tmp_path / "S"
    results: list[Any] = []
    run = threading.Thread(target=lambda: results.append(runner.invoke(
        app, ["chat", "--text", "--models", str(models), "--session-dir", str(session), "--no-live", *FAST],
        input="Hello.\n")), daemon=True)
    run.start()
    run.join(EXIT_TIMEOUT_S)
    assert results, "the chat never exited after losing its speaker"
    result = results[0]
    assert result.exit_code == 4, result.output
    err = result.stderr.strip().splitlines()
    assert err[-2] == f"session saved in {session}" and err[-1].startswith("error: speaker "), err
    lines = [json.loads(line) for line in (session / "transcript.jsonl").read_text().splitlines()]
    assert [line["role"] for line in lines] == ["user", "assistant"]


def test_ctrl_c_while_python_loads_the_command_line_is_one_line() -> None:
    """A Ctrl-C before any command runs (here: raised by the import of the CLI itself) ends like any other."""
    script = (
        "import sys\n"
        "class Interrupting:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'glmvoice_cli.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupting())\n"
        "from glmvoice_cli.entry import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 130 and result.stderr == "error: interrupted\n", result.stderr
