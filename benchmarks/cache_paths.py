"""The eager loop (dynamic cache) against the static cache (`--compile`'s layout), in fp32 and bf16, side by side.

Greedy answers of `--tokens` tokens to the same prompts, from a random LM wide enough that bf16 rounding
shows (512 wide, 4 layers, as in the bf16 tests), on the CPU. For each dtype: the first token where the two
loops' greedy ids differ (None: identical), and for each loop how often its greedy choice is the one fp32
makes given the same prefix (teacher-forced over the loop's own answer). What it shows: whether the two
cache paths give identical ids, and if not, whether one is less accurate than the other.

    python benchmarks/cache_paths.py [--tokens 300] [--prompts 3] [--out benchmarks/results/cache-paths-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from glmvoice_cli.lm.prompts import TextInput, turn_ids
from glmvoice_cli.lm.voice_lm import GenerationOptions, VoiceLM
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import emit

WIDE = TinyLMSpec(hidden_size=512, num_layers=4, num_heads=8, kv_groups=2, ffn_hidden_size=1024, seq_length=2048)
PROMPTS = ("Tell me a story about the sea.", "What is the weather like today?", "Count to twenty, slowly.")


def _greedy(lm: VoiceLM, prompt: str, tokens: int) -> list[int]:
    conv = lm.new_conversation()
    options = GenerationOptions(max_new_tokens=tokens, seed=0, temperature=0.0)
    for _ in lm.stream(conv, TextInput(prompt), options):
        pass
    return list(conv.ids)


def _agreement(reference: VoiceLM, ids: list[int], start: int) -> float:
    """Share of ids[start:] that are fp32's greedy choice given the same prefix (one forward over the whole)."""
    with torch.no_grad():
        logits = reference.model(input_ids=torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1]
    return (logits.argmax(-1) == torch.tensor(ids[start:])).float().mean().item()


def _first_difference(a: list[int], b: list[int], start: int) -> int | None:
    for i, (x, y) in enumerate(zip(a[start:], b[start:], strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b)) - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_tiny_lm(Path(scratch) / "lm", WIDE)
        reference = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
        for dtype in ("fp32", "bf16"):
            eager = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype=dtype))
            static = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype=dtype))
            static.enable_static(compiled=False, max_len=WIDE.seq_length)
            for prompt in PROMPTS[: args.prompts]:
                a, b = _greedy(eager, prompt, args.tokens), _greedy(static, prompt, args.tokens)
                start = len(turn_ids(eager.text_tokenizer, TextInput(prompt), None))
                row: dict[str, object] = {"dtype": dtype, "prompt": prompt, "answer_tokens": len(a) - start,
                                          "first_different_token": _first_difference(a, b, start),
                                          "eager_agrees_with_fp32": round(_agreement(reference, a, start), 4),
                                          "static_agrees_with_fp32": round(_agreement(reference, b, start), 4)}
                rows.append(row)
                print(json.dumps(row))
    result = {
        "benchmark": "cache_paths", "lm": "random, 512 wide, 4 layers", "tokens": args.tokens,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "rows": rows,
        "bf16_first_difference_median": statistics.median(
            [r["first_different_token"] if r["first_different_token"] is not None else args.tokens
             for r in rows if r["dtype"] == "bf16"]),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
