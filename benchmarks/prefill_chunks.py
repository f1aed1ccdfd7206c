"""What canonical prefill chunks cost at the end of a turn, side by side with warming every known id.

Streaming input prefills a spoken turn while it is spoken. Before canonical chunks, every completed 4 s
block's ids were prefilled as soon as they were known, so the end-of-turn prefill held only the last partial
block and the assistant prefix. With `PREFILL_CHUNK`, ids are prefilled in whole chunks of 50 counted from
the start of the turn, so up to 49 more ids can be left for the end. For turns of 1 to 12 s of speech
(12.5 ids per second, after a first turn and its answer), this measures the end-of-turn prefill of both,
ids and wall seconds (median of `--reps`, the two alternating), with the scaled LM of benchmarks/lm.py.

    python benchmarks/prefill_chunks.py [--quick] [--reps 3] [--out benchmarks/results/prefill-chunks-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from glmvoice_cli.lm.prompts import SpeechInput, turn_ids
from glmvoice_cli.lm.voice_lm import Conversation, GenerationOptions, VoiceLM
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.pipeline.listening import user_prefix_ids
from glmvoice_cli.tiny.lm import write_tiny_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm import SIZES  # the scaled LM
from results_io import emit

IDS_PER_SECOND = 12.5
BLOCK_IDS = 50  # ids per 4 s tokenizer block


def _after_a_first_turn(lm: VoiceLM) -> Conversation:
    conv = lm.new_conversation()
    first = SpeechInput(tuple(i % lm.text_tokenizer.n_audio_tokens for i in range(40)))
    for _ in lm.stream(conv, first, GenerationOptions(max_new_tokens=10, seed=0)):
        pass
    return conv


def end_of_turn(lm: VoiceLM, seconds: float, canonical: bool) -> tuple[int, float]:
    """One turn of `seconds` of speech -> (ids prefilled at its end, wall seconds of that prefill)."""
    conv = _after_a_first_turn(lm)
    audio = tuple(i % lm.text_tokenizer.n_audio_tokens for i in range(round(seconds * IDS_PER_SECOND)))
    completed = audio[: len(audio) - len(audio) % BLOCK_IDS]  # the blocks tokenized while speaking
    known = user_prefix_ids(lm, list(completed), conv.system_mode)
    if canonical:
        lm.warm(conv, known)  # whole chunks from the start of the turn
    else:  # as before: every known id prefilled at once
        todo = (conv.ids + known)[len(conv.cached_ids):]
        lm._forward(conv, todo, torch.tensor([todo]))  # the previous behaviour, for comparison
        conv.stable = len(conv.cached_ids)
    start = time.perf_counter()
    lm.prefill(conv, turn_ids(lm.text_tokenizer, SpeechInput(audio), conv.system_mode))
    return conv.last_prefill_tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny LM (a smoke test)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_tiny_lm(Path(scratch) / "lm", replace(SIZES["quick" if args.quick else "scaled"], seed=0))
        lm = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
        end_of_turn(lm, 2.0, True)  # warm-up
        rows = []
        for seconds in (1, 2, 3, 4.5, 6, 8, 10, 12):
            runs: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
            for _ in range(args.reps):
                for canonical in (False, True):
                    runs[canonical].append(end_of_turn(lm, seconds, canonical))
            row = {"speech_s": seconds}
            for canonical, name in ((False, "every_known_id"), (True, "canonical_chunks")):
                row[f"{name}_ids"] = runs[canonical][0][0]
                row[f"{name}_s"] = round(statistics.median(t for _, t in runs[canonical]), 4)
            row["extra_s"] = round(row["canonical_chunks_s"] - row["every_known_id_s"], 4)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    extra = [r["extra_s"] for r in rows]
    result = {
        "benchmark": "prefill_chunks",
        "lm": "tiny (--quick)" if args.quick else "scaled LM of benchmarks/lm.py (random weights), fp32",
        "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "rows": rows, "median_extra_s": round(statistics.median(extra), 4), "max_extra_s": round(max(extra), 4),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
