"""N conversations at once: one model worker serving them all, against N separate processes, side by side.

Models (random weights, as in `benchmarks/latency.py`): the real-size speech tokenizer and decoder and
the scaled LM of `benchmarks/lm.py`. Each conversation is one of latency.py's espeak-ng scripts, fed
at real-time pace (a RealClock source), through the real conversation core and webrtcvad. For each N:

- worker: N `ChatEngine`s in this process sharing one `ModelWorker` (every torch call on one thread,
  units ordered by need: the conversation whose speaker runs dry first goes first);
- processes: N copies of this script in `--single` mode started together, each with its own models and
  model thread: what a user can do today by starting N `glmvoice chat`s.

Per conversation turn it records end of voice -> first answer sample, and the audio underruns (the
speaker running dry inside an answer); per run the aggregate LM tokens per second. JSON to stdout and --out.

    python benchmarks/conversations.py [--counts 1 2 4] [--max-new-tokens 30] [--out benchmarks/results/conversations-cpu.json]
    python benchmarks/conversations.py --quick    # tiny random models: the scheduling overheads only
    python benchmarks/conversations.py --batching --counts 4   # the speech batchers' trade, on one worker

`--batching` compares, on one worker and instead of the processes, the speech stages unbatched, batched
with the decoder batch never waiting for another stream, and batched with the default `BatchPolicy`: first
sample, underruns, tokens per second and the rows per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from glmvoice_cli.audio.fakes import ArraySource, RecordingSink
from glmvoice_cli.audio.playback import RealClock
from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
from glmvoice_cli.chat.speech_batch import batcher_for, tokenizer_batcher_for
from glmvoice_cli.chat.worker import ModelWorker
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.pipeline.speech_batch import BatchPolicy
from glmvoice_cli.threads import on_passing_thread

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import OUT_RATE, RATE, build, conversations, emit, envelope, stats

RUN_SLACK_S = 300.0  # a run may take this long past the end of its input


def _engine(assistant: Assistant, user: np.ndarray, worker: ModelWorker | None, max_new_tokens: int,
            seed: int, batch_speech: bool = True) -> tuple[ChatEngine, RecordingSink]:
    clock = RealClock()
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock)
    config = EngineConfig(vad=VadConfig(), generation=GenerationOptions(max_new_tokens=max_new_tokens, seed=seed),
                          batch_speech=batch_speech)
    return ChatEngine(assistant, ArraySource(user, RATE, clock=clock), sink, config=config, clock=clock,
                      worker=worker), sink


def _rows(engine: ChatEngine) -> list[dict]:
    if engine.error is not None:
        raise SystemExit(f"error: {engine.error}")
    rows = []
    for report in engine.reports:
        t = report.timings
        rows.append({"first_sample_s": None if t is None or t.first_sample_s is None else round(t.first_sample_s, 4),
                     "underruns": report.underruns, "tokens": report.generated_tokens,
                     "interrupted": report.interrupted})
    return rows


def run_worker(assistant: Assistant, users: list[np.ndarray], max_new_tokens: int, seed: int,
               batch_speech: bool = True, policy: BatchPolicy | None = None) -> dict:
    """Every conversation on one worker in this process, started together."""
    worker = ModelWorker(prepare=assistant.lm.prepare_thread)
    decoder_batch, tokenizer_batch = batcher_for(worker, assistant), tokenizer_batcher_for(worker, assistant)
    if decoder_batch is not None and policy is not None:
        decoder_batch.policy = policy
    pairs = [_engine(assistant, user, worker, max_new_tokens, seed + n, batch_speech) for n, user in enumerate(users)]
    worker.start()
    start = time.perf_counter()
    for engine, _ in pairs:
        engine.start()
    longest = max(len(u) for u in users) / RATE
    for engine, sink in pairs:
        if not engine.wait(longest + RUN_SLACK_S):
            engine.stop()
        engine.join()
        sink.close()
    wall = time.perf_counter() - start
    worker.stop()
    worker.join()
    batches = {name: {"rows_per_batch": b.stats.batches, "holds": getattr(b.stats, "holds", 0)}
               for name, b in (("decoder", decoder_batch), ("tokenizer", tokenizer_batch)) if b is not None}
    return {"conversations": [_rows(engine) for engine, _ in pairs], "wall_s": round(wall, 2), "units": worker.units,
            "batches": batches if batch_speech else None}


def run_single(assistant: Assistant, user: np.ndarray, max_new_tokens: int, seed: int) -> dict:
    engine, sink = _engine(assistant, user, None, max_new_tokens, seed)
    start = time.perf_counter()
    engine.start()
    if not engine.wait(len(user) / RATE + RUN_SLACK_S):
        engine.stop()
    engine.join()
    sink.close()
    return {"conversations": [_rows(engine)], "wall_s": round(time.perf_counter() - start, 2)}


def run_processes(n: int, args: argparse.Namespace, speech_dir: Path) -> dict:
    """N copies of this script, each one conversation with its own models; they start talking together."""
    children = []
    with tempfile.TemporaryDirectory() as scratch:
        start_at = Path(scratch) / "go"
        for k in range(n):
            cmd = [sys.executable, __file__, "--single", str(k), "--speech-dir", str(speech_dir),
                   "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed + k),
                   "--start-file", str(start_at), *(["--quick"] if args.quick else [])]
            children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        ready = [Path(str(start_at) + f".ready{k}") for k in range(n)]  # each child builds its models first
        while not all(r.exists() for r in ready) and all(c.poll() is None for c in children):
            time.sleep(0.1)
        go = time.perf_counter()
        start_at.touch()
        outs = [json.loads(c.communicate(timeout=3600)[0]) for c in children]
    return {"conversations": [o["conversations"][0] for o in outs], "wall_s": round(time.perf_counter() - go, 2)}


def summarize(run: dict) -> dict:
    turns = [t for conv in run["conversations"] for t in conv]
    tokens = sum(t["tokens"] for t in turns)
    return {"end_of_voice_to_first_sample_s": stats([t["first_sample_s"] for t in turns
                                                     if t["first_sample_s"] is not None]),
            "underruns": sum(t["underruns"] for t in turns), "answers": len(turns),
            "tokens_per_s": round(tokens / run["wall_s"], 2) if run["wall_s"] else None, **run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny random models")
    ap.add_argument("--speech-dir", type=Path, default=None, help="as in latency.py (espeak-ng renders the rest)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batching", action="store_true", help="compare the speech batchers' modes on one worker")
    ap.add_argument("--same-input", action="store_true",
                    help="every conversation says the first script, all at once (their blocks coincide)")
    ap.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)  # a child: one conversation
    ap.add_argument("--start-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        speech_dir = args.speech_dir or Path(scratch) / "speech"
        assistant = on_passing_thread(lambda: build(Path(scratch), args.seed, args.quick))
        users = list(conversations(Path(scratch), speech_dir).values())
        if args.single is not None:
            assert args.start_file is not None
            Path(str(args.start_file) + f".ready{args.single}").touch()
            while not args.start_file.exists():
                time.sleep(0.02)
            print(json.dumps(run_single(assistant, users[args.single % len(users)], args.max_new_tokens, args.seed)))
            return
        load_before = os.getloadavg()[0]
        run_worker(assistant, [users[0][: RATE * 4]], 8, args.seed)  # warm-up: first calls allocate
        results = {}
        for n in args.counts:
            picked = [users[0 if args.same_input else k % len(users)] for k in range(n)]
            if args.batching:
                modes = {"unbatched": (False, None), "batched_never_waiting": (True, BatchPolicy(max_hold_s=0.0)),
                         "batched_default_policy": (True, BatchPolicy())}
                results[str(n)] = {name: summarize(run_worker(assistant, picked, args.max_new_tokens, args.seed,
                                                              batch, policy))
                                   for name, (batch, policy) in modes.items()}
                continue
            worker = summarize(run_worker(assistant, picked, args.max_new_tokens, args.seed))
            separate = summarize(run_processes(n, args, speech_dir))
            w, s = (r["end_of_voice_to_first_sample_s"]["median"] for r in (worker, separate))
            results[str(n)] = {"worker": worker, "processes": separate,
                               "worker_over_processes_median": round(w / s, 3) if w and s else None}
    result = {
        "benchmark": "conversations-batching" if args.batching else "conversations",
        "models": "tiny random set (--quick)" if args.quick else
                  "random weights: real-size tokenizer and decoder, scaled LM of benchmarks/lm.py",
        "input": "latency.py's espeak-ng conversations at real-time pace, one per conversation, started together"
                 + (" (all the first one)" if args.same_input else ""),
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        **envelope(load_before),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
