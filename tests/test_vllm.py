"""The remote LM backend against the real engine: vLLM's CPU build, started once per test session with
`glmvoice serve-lm` on a tiny official-format checkpoint (head_dim 64, square, as vLLM's ChatGLM needs).

Greedy answers through the server equal the in-process ones token for token, a scripted spoken chat with a
barge-in ends with the same session history, a cancelled turn stops generating on the server (its own
metrics say so), and the prefix cache serves the history resent each turn. GLMVOICE_VLLM_PYTHON names
the Python that has vLLM (`.ci/run` installs it); without it these tests skip, except in CI where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from glmvoice_cli.cli import app
from glmvoice_cli.errors import LMServerError
from glmvoice_cli.lm.http_client import HttpClient, ServerURL
from glmvoice_cli.lm.prompts import SpeechInput, TextInput
from glmvoice_cli.lm.remote import RemoteVoiceLM
from glmvoice_cli.lm.serving import ENV_VLLM_PYTHON, wait_until_serving
from glmvoice_cli.lm.voice_lm import GenerationOptions, StopReason, TurnEnd, VoiceLM
from glmvoice_cli.options import LMServer, LoadOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.pipeline.speak import speak
from glmvoice_cli.pipeline.transcribe import transcribe
from glmvoice_cli.tiny.lm import TinyLMSpec
from glmvoice_cli.tiny.modelset import write_tiny_model_set

from .chat_helpers import burst, make_rig, run_rig, silence

pytestmark = pytest.mark.vllm

SQUARE_LM = TinyLMSpec(hidden_size=128, num_heads=2, kv_groups=2, ffn_hidden_size=256)  # head_dim 64
STARTUP_TIMEOUT_S = 900.0  # 1-2 minutes on 2 idle cores; a busy CI machine is slower
CONTEXT_TOKENS = 2048
GREEDY = GenerationOptions(temperature=0.0, max_new_tokens=60)
# Tokens a full greedy answer runs to in the cancellation test: long enough that the tiny model cannot finish
# it before the abort reaches vLLM's engine (at 400 a slow machine once saw the whole answer generated).
LONG_ANSWER = 1600
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_set(tmp_path_factory.mktemp("vllm_models"), codebook=64, lm=SQUARE_LM).root


@pytest.fixture(scope="session")
def vllm_url(vllm_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One vLLM server for the whole session, started through `glmvoice serve-lm`."""
    python = os.environ.get(ENV_VLLM_PYTHON, "").strip()
    if not python:
        if os.environ.get("CI"):
            pytest.fail(f"{ENV_VLLM_PYTHON} is not set in CI: .ci/run installs vLLM and sets it")
        pytest.skip(f"set {ENV_VLLM_PYTHON} to the Python of a vLLM (CPU) install to run these tests")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    argv = [sys.executable, "-m", "glmvoice_cli", "serve-lm", "--lm", str(vllm_models / "lm"), "--python", python,
            "--port", str(port), "--dtype", "float32", "--max-model-len", str(CONTEXT_TOKENS),
            "--cpu-kv-cache-gib", "1"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = wait_until_serving(url, process, STARTUP_TIMEOUT_S)
    except LMServerError:
        _stop(process)
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        pytest.fail("vLLM did not start:\n" + "\n".join(tail))
    print(f"\nvLLM server ready in {seconds:.1f} s")
    yield url
    _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the server's process group (serve-lm and the vLLM processes it started)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def local(vllm_models: Path) -> VoiceLM:
    return VoiceLM.from_folder(vllm_models / "lm")


@pytest.fixture(scope="session")
def remote(vllm_models: Path, vllm_url: str) -> RemoteVoiceLM:
    return RemoteVoiceLM.connect(vllm_models / "lm", LMServer(vllm_url, timeout_s=120.0))


def _metric(url: str, name: str) -> float:
    text = HttpClient(ServerURL.parse(url)).get_text("/metrics")
    pattern = rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
    assert values, f"{name} not in the server's metrics"
    return sum(values)


def test_the_server_was_checked_when_connecting(remote: RemoteVoiceLM) -> None:
    assert remote.masks_ids and remote.served.max_model_len == CONTEXT_TOKENS
    # vLLM honours logit_bias: requests forbid the few unnamed ids instead of listing every allowed one
    body = json.loads(remote.request_body([1, 2, 3], GREEDY, 5))
    assert "logit_bias" in body and "allowed_token_ids" not in body


def test_greedy_answers_equal_the_in_process_ones(remote: RemoteVoiceLM, local: VoiceLM) -> None:
    mine, theirs = remote.new_conversation(), local.new_conversation()
    turns = (SpeechInput((5, 9, 2, 7, 7, 1, 30)), TextInput("What is the weather today?"), SpeechInput((3, 3, 8)))
    for user in turns:
        got, want = list(remote.stream(mine, user, GREEDY)), list(local.stream(theirs, user, GREEDY))
        assert got == want
    assert mine.ids == theirs.ids
    spoken = sum(remote.text_tokenizer.is_audio(i) for i in mine.ids[mine.last_output_start:])
    text_only = GenerationOptions(temperature=0.0, max_new_tokens=40, text_only=True)
    user = SpeechInput((1, 2, 3, 4), instruction="Transcribe")
    assert list(remote.stream(remote.new_conversation(), user, text_only)) == list(
        local.stream(local.new_conversation(), user, text_only))
    assert spoken or mine.ids  # the tiny model speaks; what matters is the equality above


def test_the_prefix_cache_serves_the_resent_history(remote: RemoteVoiceLM) -> None:
    conv = remote.new_conversation()
    list(remote.stream(conv, TextInput("Hello there, how are you?"), GREEDY))
    list(remote.stream(conv, TextInput("And then?"), GREEDY))
    prompt = conv.last_output_start or 0
    assert conv.last_prefill_tokens < prompt // 2  # most of the history came from the server's cache


def test_turns_of_a_conversation_share_one_connection(remote: RemoteVoiceLM) -> None:
    """The client keeps the connection a finished answer came on, and serve-lm keeps idle connections open
    past vLLM's 5 s default, so a pause between turns does not cost a new connection."""
    conv = remote.new_conversation()
    list(remote.stream(conv, TextInput("Hello there!"), GREEDY))
    opened = remote.client.connections_opened
    time.sleep(6.0)  # longer than vLLM's own keep-alive
    for text in ("And then?", "Really?"):
        ended = list(remote.stream(conv, TextInput(text), GREEDY))[-1]
        assert isinstance(ended, TurnEnd) and ended.reason is not StopReason.CANCELLED
    assert remote.client.connections_opened == opened  # both turns on the connection the first one used


def _long_prompt(local: VoiceLM) -> TextInput:
    """A question whose full greedy answer runs to LONG_ANSWER tokens (no early stop to hide behind)."""
    options = GenerationOptions(temperature=0.0, max_new_tokens=LONG_ANSWER)
    for words in ("Tell me a story.", "Sing along!", "Why is the sky blue?", "Count to a hundred.", "Hi", "Go"):
        ended = list(local.stream(local.new_conversation(), TextInput(words), options))[-1]
        if isinstance(ended, TurnEnd) and ended.reason is StopReason.MAX_TOKENS:
            return TextInput(words)
    pytest.skip("no prompt with a long greedy answer on this tiny model")


def test_a_cancelled_turn_stops_generating_on_the_server(remote: RemoteVoiceLM, local: VoiceLM,
                                                         vllm_url: str) -> None:
    user = _long_prompt(local)
    options = GenerationOptions(temperature=0.0, max_new_tokens=LONG_ANSWER)
    counts = []
    # The prompt's whole answer is LONG_ANSWER tokens, so an answer the server cut short can only be the cancel's
    # doing. A client starved of CPU for the answer's whole length (CI's two cores, shared with vLLM and the other
    # test worker) may cancel after the server has finished: that try proves nothing either way and is run again.
    for _ in range(3):
        before = _metric(vllm_url, "vllm:generation_tokens_total")
        cancel, events = threading.Event(), []
        for event in remote.stream(remote.new_conversation(), user, options, cancel):
            events.append(event)
            if len(events) == 5:
                cancel.set()
        assert events[-1] == TurnEnd(StopReason.CANCELLED, 5)
        deadline = time.monotonic() + 30
        while _metric(vllm_url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric(vllm_url, "vllm:num_requests_running") == 0
        settled = _metric(vllm_url, "vllm:generation_tokens_total") - before
        time.sleep(1.0)
        assert _metric(vllm_url, "vllm:generation_tokens_total") - before == settled  # and it stays stopped
        counts.append(settled)
        if settled < LONG_ANSWER:
            break
    assert counts[-1] < LONG_ANSWER // 2, f"the server generated {counts} tokens after each cancel"


def _barge_in_chat(assistant: Assistant, tmp_path: Path) -> list[dict]:
    first = np.concatenate([silence(0.5), burst(1.0)])
    user = np.concatenate([first, silence(0.9), burst(0.8), silence(4.0), burst(1.0), silence(4.0)])
    rig = make_rig(assistant, user, tmp_path=tmp_path, max_new_tokens=80)
    rig.engine.config = replace(rig.engine.config, generation=GenerationOptions(temperature=0.0, max_new_tokens=80))
    run_rig(rig)
    assert rig.engine.error is None and rig.store is not None
    assert any(r.interrupted for r in rig.engine.reports), "the scripted barge-in must cut an answer"
    return [json.loads(line) for line in rig.store.transcript_path.read_text().splitlines()]


def test_a_spoken_chat_with_barge_in_keeps_the_same_history(vllm_models: Path, vllm_url: str,
                                                            tmp_path: Path) -> None:
    dirs = {s: vllm_models / s for s in ("tokenizer", "lm", "decoder")}
    here = Assistant.load(dirs, LoadOptions(device="cpu", seed=0))
    there = Assistant.load(dirs, LoadOptions(device="cpu", seed=0, lm_server=LMServer(vllm_url)))
    want, got = _barge_in_chat(here, tmp_path / "here"), _barge_in_chat(there, tmp_path / "there")
    keys = ("role", "token_ids", "interrupted", "text")
    assert [{k: line[k] for k in keys} for line in got] == [{k: line[k] for k in keys} for line in want]


def test_the_commands_work_through_the_server(vllm_models: Path, vllm_url: str, tmp_path: Path) -> None:
    dirs = {s: vllm_models / s for s in ("tokenizer", "lm", "decoder")}
    here = Assistant.load(dirs, LoadOptions(device="cpu", seed=0))
    there = Assistant.load(dirs, LoadOptions(device="cpu", seed=0, lm_server=LMServer(vllm_url)))
    greedy = GenerationOptions(temperature=0.0, max_new_tokens=80, seed=0)
    spoken = [[e.samples for e in speak(a, "Hello there.", options=greedy) if hasattr(e, "samples")]
              for a in (here, there)]
    assert np.array_equal(np.concatenate(spoken[0]), np.concatenate(spoken[1]))
    samples = (0.3 * np.sin(2 * np.pi * 220 * np.arange(40_000) / 16_000)).astype(np.float32)
    assert transcribe(here, samples).text == transcribe(there, samples).text
    wav = tmp_path / "q.wav"
    sf.write(wav, samples, 16_000)
    models = ["--models", str(vllm_models), "--lm-url", vllm_url, "--max-new-tokens", "40"]
    result = runner.invoke(app, ["transcribe", str(wav), *models, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == transcribe(here, samples, max_new_tokens=40).text
    out = tmp_path / "a.wav"
    models += ["--seed", "1"]
    result = runner.invoke(app, ["tts", "Hello there.", "-o", str(out), *models])
    assert result.exit_code == 0 and len(sf.read(out)[0]) > 0, result.output
    session = tmp_path / "s"
    result = runner.invoke(app, ["chat", "--text", "--no-live", "--session-dir", str(session), "--output-file",
                                 str(tmp_path / "o.wav"), *models], input="Hi there.\nAnd then?\n")
    assert result.exit_code == 0, result.output
    assert len((session / "transcript.jsonl").read_text().splitlines()) == 4
