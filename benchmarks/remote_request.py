"""What one `--lm-url` request costs: the bytes sent and the time to the first token, with the vocabulary mask
sent as the allowed ids (before) or as the forbidden ids through `logit_bias` (after), on the real vLLM CPU
build, both in the same run, alternating.

The server runs a random checkpoint in the official format with the real vocabulary's rows (168,960, 16,384
audio tokens) and a small transformer, so the model costs little and the request's own handling shows. The
masks have the real vocabulary's sizes: the real tokenizer names every id below `<|audio_16383|>` (168,736)
but the 1,008 reserved slots before `<|audio_0|>`; 224 padded rows follow. So the spoken turn allows 167,729
ids, or forbids 1,232; a transcription (text only) allows 151,345, or forbids those 1,232 and the 16,384 audio
ids. Each request is a first spoken turn (150 audio tokens) and asks for one token, greedy.

    GLMVOICE_VLLM_PYTHON=/path/to/vllm/bin/python python benchmarks/remote_request.py [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from latency import emit, envelope  # benchmarks/latency.py (this folder is on sys.path)
from serving import prompts, start_server, stop_server  # benchmarks/serving.py

from glmvoice_cli.lm.http_client import HttpClient, ServerURL
from glmvoice_cli.lm.prompts import turn_ids
from glmvoice_cli.lm.remote import BIAS_FLOOR, RemoteVoiceLM
from glmvoice_cli.lm.serving import ENV_VLLM_PYTHON
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.options import LMServer
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

REAL_VOCAB = 168_960
AUDIO = 16_384
AUDIO_0 = 152_353  # the real <|audio_0|>
RESERVED = range(151_345, AUDIO_0)  # the unnamed reserved slots before it (1,008)
NAMED_END = AUDIO_0 + AUDIO  # 168,737: the padded rows start here
SPEC = TinyLMSpec(hidden_size=128, num_layers=2, num_heads=2, kv_groups=2, ffn_hidden_size=256,
                  n_audio_tokens=AUDIO, n_reserved=1_008, padded_vocab_size=REAL_VOCAB, dtype="float32")


def real_masks() -> dict[str, dict[str, object]]:
    """The mask part of a request, both ways, for both modes, at the real vocabulary's sizes."""
    unnamed = [*RESERVED, *range(NAMED_END, REAL_VOCAB)]
    spoken_allowed = [i for i in range(NAMED_END) if i not in set(RESERVED)]
    text_allowed = list(range(RESERVED.start))
    audio = list(range(AUDIO_0, NAMED_END))

    def bias(ids: list[int]) -> dict[str, int]:
        return {str(i): BIAS_FLOOR for i in ids}

    return {
        "spoken": {"before": {"allowed_token_ids": spoken_allowed}, "after": {"logit_bias": bias(unnamed)}},
        "text_only": {"before": {"allowed_token_ids": text_allowed}, "after": {"logit_bias": bias(unnamed + audio)}},
    }


def first_token_s(client: HttpClient, body: bytes) -> float:
    """Seconds from sending the request to its first token event."""
    start = time.perf_counter()
    stream = client.open_events("completions", body)
    try:
        for event in stream.events():
            choices = event.get("choices") or []
            if choices and choices[0].get("token_ids"):
                return time.perf_counter() - start
    finally:
        stream.close()
    raise RuntimeError("the server sent no token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="requests of each kind, alternating")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    python = os.environ.get(ENV_VLLM_PYTHON, "").strip()
    if not python:
        sys.exit(f"set {ENV_VLLM_PYTHON} to the Python of a vLLM (CPU) install")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_lm(Path(tmp) / "lm", SPEC)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        process, startup_s = start_server(python, folder, port, Path(tmp) / "server.log")
        try:
            url = f"http://127.0.0.1:{port}"
            remote = RemoteVoiceLM.connect(folder, LMServer(url, timeout_s=120.0))
            client = HttpClient(ServerURL.parse(url), read_timeout_s=120.0)
            user = prompts(1, AUDIO)[0]
            prompt = turn_ids(remote.text_tokenizer, user, None)
            results: dict[str, dict[str, object]] = {}
            for mode, masks in real_masks().items():
                options = GenerationOptions(temperature=0.0, max_new_tokens=1, text_only=mode == "text_only")
                base = json.loads(remote.request_body(prompt, options, 1))
                base.pop("allowed_token_ids", None)
                base.pop("logit_bias", None)
                bodies = {way: json.dumps({**base, **mask}, separators=(",", ":")).encode()
                          for way, mask in masks.items()}
                times: dict[str, list[float]] = {way: [] for way in bodies}
                first_token_s(client, bodies["after"])  # warm the server's paths once, untimed
                first_token_s(client, bodies["before"])
                for _ in range(args.rounds):
                    for way, body in bodies.items():
                        times[way].append(first_token_s(client, body))
                medians = {way: statistics.median(t) for way, t in times.items()}
                results[mode] = {
                    "request_bytes": {way: len(body) for way, body in bodies.items()},
                    "first_token_s_median": {way: round(m, 4) for way, m in medians.items()},
                    "first_token_s_all": {way: [round(t, 4) for t in ts] for way, ts in times.items()},
                    "bytes_ratio_before_over_after": round(len(bodies["before"]) / len(bodies["after"]), 1),
                    "first_token_saved_s": round(medians["before"] - medians["after"], 4),
                }
        finally:
            stop_server(process)
    emit({"benchmark": "remote_request", "device": "cpu", "vllm_python": python, "server_startup_s": startup_s,
          "rounds": args.rounds, "prompt_tokens": len(prompt), "vocabulary_rows": REAL_VOCAB, "results": results,
          **envelope(load_before)}, args.out)


if __name__ == "__main__":
    main()
