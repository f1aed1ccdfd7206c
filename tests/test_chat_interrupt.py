"""Ctrl-C in a voice chat (microphone and speaker over a driven fake sounddevice, in a real process):
the only output is the one-line message; native resources (soxr's nanobind streams) are released first."""

from __future__ import annotations

import os
import pty
import signal
import time
from pathlib import Path

import pytest

from glmvoice_cli.tiny.modelset import write_tiny_model_set

from .warm_python import WarmPython

READY_TIMEOUT_S = 300  # loading tiny models in a fresh process on a busy 2-core machine
SETTLE_S = 2.0  # let the microphone and speaker callbacks run before the interrupt

SCRIPT = r'''
import sys, threading, time, types
import numpy as np
sys.path.insert(0, {tests!r})
from test_devices import FakeSd, FakeStream

class DrivenStream(FakeStream):
    """Calls its callback from its own thread, as PortAudio does."""
    def start(self):
        self.active = True
        def pump():
            while self.active:
                if self.callback.__name__ == "_callback" and "Microphone" in type(self.callback.__self__).__name__:
                    block = (np.random.default_rng().standard_normal((self.blocksize, 1)) * 1e-3).astype(np.float32)
                    self.callback(block, self.blocksize, None, None)
                else:
                    out = np.zeros((self.blocksize, 1), np.float32)
                    self.callback(out, self.blocksize, None, None)
                time.sleep(self.blocksize / self.samplerate)
        threading.Thread(target=pump, daemon=True).start()
    def stop(self):
        self.active = False
    def close(self):
        self.active = False
        self.closed = True

sd = FakeSd()
def only_48k(device, samplerate, **_):
    if samplerate != 48_000:
        raise sd.PortAudioError("Invalid sample rate")
sd.check_output_settings = only_48k  # both directions resample (soxr streams, nanobind objects)
sd.InputStream = lambda **kw: DrivenStream(**kw)
sd.OutputStream = sd.InputStream
sys.modules["sounddevice"] = sd
from glmvoice_cli.cli import main
sys.argv = ["glmvoice"] + sys.argv[1:]
main()
'''


@pytest.mark.slow
def test_ctrl_c_in_a_voice_chat_prints_only_the_message(tmp_path: Path, warm_python: WarmPython) -> None:
    models = write_tiny_model_set(tmp_path / "models", codebook=64).root
    session = tmp_path / "S"
    script = tmp_path / "run_chat.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # stdin a terminal, as for a user: the thread reading typed turns is blocked on it at Ctrl-C
    leader, follower = pty.openpty()
    proc = warm_python.popen(  # a process of its own, torch and transformers imported (conftest)
        [str(script), "chat", "--models", str(models), "--session-dir", str(session), "--no-live",
         "--max-new-tokens", "5"], env, stdin=follower)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        # the folder is made (and locked) before the models load; its transcript once the chat is running
        while not (session / "transcript.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        time.sleep(SETTLE_S)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "nanobind" not in err, err
    assert len(lines) == 1 and lines[0].startswith("interrupted; session saved in"), err
