"""Chat engine latency over scripted conversations: end of speech to first audio, barge-in reaction.

Each run is one scripted exchange through the real engine, the fakes and webrtcvad: the user
asks (espeak-ng speech, or a synthetic voice without it), the assistant answers, and the user cuts
in a varying time into the answer. Two figures per run, reported as median and p90:

- `end_of_speech_to_first_audio_s`: wall seconds from the moment the segmenter closed the user's
  turn to the first decoded block reaching the sink (speech tokenizer + prefill + the first decoder
  block). The VAD's end-of-turn hangover comes on top of it and is reported apart.
- `barge_in_reaction_s`: on the recorded output's sample timeline, from the interrupting speech's
  onset in the input to the last audible sample of the cut answer (VAD confirmation + block size).

    python benchmarks/chat.py [--runs 10] [--realtime] [--models DIR] [--max-new-tokens 60] [--out f.json]

By default the input runs on a virtual clock in lockstep (model time counts as zero for the
timeline, but is still measured in wall time); `--realtime` plays it at wall-clock pace against
the live model, as `glmvoice chat --input-file --realtime` does (slower: the runs take real time).
Without `--models` a tiny random model set is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glmvoice_cli.audio.fakes import ArraySource, RecordingSink
from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.audio.playback import RealClock, VirtualClock
from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.threads import on_passing_thread
from glmvoice_cli.tiny.modelset import write_tiny_model_set

RATE, OUT_RATE = 16_000, 22_050
AUDIBLE = 1e-4  # output samples above this count as sound
SPEECH_LEVEL = 0.01  # input samples above this mark the interrupting speech's onset
CUT_IN_S = (0.4, 0.6, 0.8, 1.0, 1.2)  # how far into the answer the user interrupts, cycled over the runs
TAIL_S = 3.0  # silence after the interruption, for its own answer
RUN_TIMEOUT_S = 600.0


def _phrases() -> tuple[np.ndarray, np.ndarray, str]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return _voice(1.5, 130.0), _voice(1.0, 180.0), "synthetic voice"
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for k, text in enumerate(("What is the weather like today?", "Wait, stop.")):
            path = Path(folder) / f"{k}.wav"
            subprocess.run([exe, "-w", str(path), text], check=True, timeout=60)
            out.append(load_audio(path, RATE).samples)
    return out[0], out[1], "espeak-ng"


def _voice(seconds: float, f0: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(f0 + 20 * np.sin(2 * np.pi * 1.3 * t)) / RATE
    v = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * t) ** 2)
    return (0.05 * v / np.std(v)).astype(np.float32)


def _one_run(assistant: Assistant, question: np.ndarray, cut: np.ndarray, cut_in_s: float,
             args: argparse.Namespace, vad: VadConfig) -> dict[str, float | None]:
    lead = np.zeros(RATE // 2, dtype=np.float32)
    gap = np.zeros(int((vad.hangover_ms / 1000 + cut_in_s) * RATE), dtype=np.float32)
    user = np.concatenate([lead, question, gap, cut, np.zeros(int(TAIL_S * RATE), dtype=np.float32)])
    onset = (len(lead) + len(question) + len(gap) + int(np.argmax(np.abs(cut) > SPEECH_LEVEL))) / RATE
    clock = RealClock() if args.realtime else VirtualClock()
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock)
    config = EngineConfig(vad=vad, lockstep=not args.realtime,
                          generation=GenerationOptions(max_new_tokens=args.max_new_tokens, seed=args.seed))
    engine = ChatEngine(assistant, ArraySource(user, RATE, clock=clock), sink, config=config, clock=clock)
    engine.start()
    if not engine.wait(RUN_TIMEOUT_S):
        engine.stop()
    engine.join()
    sink.close()
    first = engine.reports[0]
    reaction = None
    if first.interrupted and first.barge_in_at is not None:
        end = int((len(user) - len(cut) // 2 - int(TAIL_S * RATE)) / RATE * OUT_RATE)
        heard = np.flatnonzero(np.abs(sink.recording(0, end)) > AUDIBLE)
        reaction = heard[-1] / OUT_RATE - onset if heard.size else None
    return {"end_of_speech_to_first_audio_s": first.first_audio_wall_s, "barge_in_reaction_s": reaction,
            "interrupted": float(first.interrupted)}


def _stats(values: list[float | None]) -> dict[str, float | int | None]:
    kept = [v for v in values if v is not None]
    if not kept:
        return {"median": None, "p90": None, "n": 0}
    return {"median": round(float(np.median(kept)), 4), "p90": round(float(np.percentile(kept, 90)), 4),
            "n": len(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--realtime", action="store_true")
    parser.add_argument("--models", type=Path, default=None, help="tokenizer/, lm/, decoder/ (default: tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.models or write_tiny_model_set(Path(scratch) / "models", codebook=64).root
        dirs = {stage: Path(root) / stage for stage in ("tokenizer", "lm", "decoder")}
        # loaded on a thread that ends, as the CLI does: the engine's model thread then holds the only OpenMP pool
        assistant = on_passing_thread(lambda: Assistant.load(dirs, LoadOptions(device=args.device, seed=args.seed)))
        question, cut, speech = _phrases()
        vad = VadConfig()
        _one_run(assistant, question, cut, CUT_IN_S[0], args, vad)  # warm-up: first calls allocate
        start = time.perf_counter()
        runs = [_one_run(assistant, question, cut, CUT_IN_S[k % len(CUT_IN_S)], args, vad) for k in range(args.runs)]
    result = {
        "benchmark": "chat",
        "mode": "realtime" if args.realtime else "virtual clock (lockstep)",
        "models": str(args.models) if args.models else "tiny random (codebook 64)",
        "speech": speech,
        "runs": args.runs,
        "max_new_tokens": args.max_new_tokens,
        "vad_hangover_s": vad.hangover_ms / 1000,
        "end_of_speech_to_first_audio_s": _stats([r["end_of_speech_to_first_audio_s"] for r in runs]),
        "barge_in_reaction_s": _stats([r["barge_in_reaction_s"] for r in runs]),
        "interrupted_runs": int(sum(r["interrupted"] or 0 for r in runs)),
        "wall_s": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
