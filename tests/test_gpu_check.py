"""benchmarks/gpu_check.py runs at a tiny size on CPU, with none of the packages a GPU machine lacks."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABSENT_ON_GPU_MACHINES = ("soxr", "sounddevice", "webrtcvad", "livekit", "bitsandbytes", "soundfile", "rich",
                          "typer", "platformdirs")


@pytest.mark.compiles
def test_gpu_check_tiny_runs_without_the_extras(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_GPU_MACHINES)  # import fails
    code = (f"import runpy, sys\n{blocked}sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            f"sys.argv = ['gpu_check.py', '--tiny', '--device', 'cpu', '--latency', '--conversations', '--realtime', '--speech-batch', '--out', {str(out)!r}]\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_check.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the session's compile cache (conftest): one compile
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    lm = result["lm"]
    assert lm["floor"]["tokens_per_s"] > 0 and lm["compile"]["mode"] == "default"
    assert lm["eager"]["decode_tokens_per_s"] > 0 and lm["compiled"]["decode_tokens_per_s"] > 0
    assert set(lm["fraction_of_floor"]) == {"eager", "compiled"}
    assert result["decoder"]["rtf"] > 0 and result["decoder"]["first_audio_s"] > 0
    assert result["tokenizer"]["rtf"] > 0 and result["tokenizer"]["tokens"] > 0
    assert result["lm_4bit"] == {"skipped": "bitsandbytes is not importable here"}
    assert "peak_gpu_gb_all_stages" in result
    # the latency comparison needs the chat's audio side: said in the JSON, checked before any model is built
    assert result["latency"] == {"skipped": "not importable here: webrtcvad, soundfile, soxr (carry their wheels)"}
    assert result["conversations"] == result["latency"]
    assert result["realtime"]["skipped"].startswith("not importable here: webrtcvad, soundfile, soxr")
    batch = result["speech_batch"]  # needs nothing beyond torch: it runs
    assert [row["streams"] for row in batch["decoder"]] == [1, 2] == [row["streams"] for row in batch["tokenizer"]]
    assert all(row["batched_s"] > 0 and row["one_by_one_s"] > 0 for row in batch["decoder"] + batch["tokenizer"])


def test_gpu_check_shell_wrapper_runs_the_module() -> None:
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--help"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0 and "--tiny" in done.stdout, done.stderr


def test_gpu_check_4bit_stage_on_the_cpu_backend(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The NF4 stage (run on GPU machines that have bitsandbytes) quantizes the in-memory model and decodes;
    here on bitsandbytes' CPU backend at the tiny size."""
    pytest.importorskip("bitsandbytes")
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    spec = gpu_check.SIZES["quick"]
    result = gpu_check.check_lm_4bit(spec, torch.device("cpu"), torch.float32, 8, allow_cpu=True)
    assert result["eager"]["decode_tokens_per_s"] > 0 and result["eager"]["new_tokens"] > 0
    assert 0 < result["weight_bytes_per_token"] < result["dense_weight_bytes_per_token"]  # packed 4-bit layers
    assert gpu_check.check_lm_4bit(spec, torch.device("cpu"), torch.float32, 8) == {"skipped": "4-bit needs CUDA"}
