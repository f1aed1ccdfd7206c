"""Speech decoder benchmark: the reference block schedule against ours, side by side in one run.

The real-size decoder (flow 111 M + HiFT 20 M parameters, fp32) with random weights, built in
memory through the same config path as the published files. For each schedule: time to the
first audio block, the streaming real-time factor over a 20 s answer (250 tokens, all available
at once, so this is the decoder's own cost), the cost of every block (to see how it grows with
the answer: the reference re-encodes the whole answer so far as prompt, ours a bounded context),
and the peak resident memory. A one-pass decode of the whole answer is measured too.

    python benchmarks/decoder.py [--quick] [--tokens 250] [--threads N] [--out results.json]

`--quick` uses a tiny decoder and 60 tokens (a smoke test, seconds). The figures from the issue
for the reference code on a 2-core CPU are included in the JSON for comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from glmvoice_cli.decoder.checkpoint import DecoderModels
from glmvoice_cli.decoder.speech_decoder import (
    DEFAULT_SCHEDULE,
    REFERENCE_SCHEDULE,
    BlockOutput,
    SpeechDecoder,
    StreamSchedule,
)
from glmvoice_cli.tiny.decoder import REAL_DECODER_SPEC, TinyDecoderSpec, tiny_decoder

TOKENS_PER_SECOND = 12.5
ANSWER_TOKENS = 250  # a 20 s answer
QUICK_TOKENS = 60
REFERENCE_CODE_2CORE = {  # the reference implementation, fp32, 2-core CPU (issue 3)
    "first_audio_10_tokens_s": 3.33,
    "first_audio_25_tokens_s": 5.24,
    "stream_20s_answer_s": 109.0,
    "stream_rtf": 5.46,
    "one_pass_20s_s": 64.9,
    "floor_10_tokens_s": 1.05,
    "floor_20s_s": 41.0,
}


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_stream(models: DecoderModels, schedule: StreamSchedule, tokens: list[int]) -> dict[str, object]:
    """Push all tokens at once (blocks run back to back), then flush; time every block."""
    blocks: list[dict[str, float]] = []
    last = [time.perf_counter(), time.process_time()]

    def on_block(out: BlockOutput) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        _log(f"  block {len(blocks)}: {out.flow_mel.shape[-1]} new frames, {out.prompt_feat.shape[1]} prompt "
             f"frames, {now - last[0]:.2f} s (cpu {cpu - last[1]:.2f} s)")
        blocks.append({
            "new_frames": out.flow_mel.shape[-1],
            "prompt_frames": out.prompt_feat.shape[1],
            "samples": out.speech.shape[-1],
            "seconds": round(now - last[0], 4),
            "cpu_seconds": round(cpu - last[1], 4),  # all threads; less sensitive to other load
        })
        last[0], last[1] = now, cpu

    decoder = SpeechDecoder(models, schedule, on_block=on_block)
    state = decoder.new_state()
    exact = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    last[0], last[1] = start, cpu_start
    first_audio_s = None
    n_samples = i = 0
    while i < len(tokens):  # tokens arrive in block-sized groups, as fast as possible
        size = schedule.block_size(state.block_index)
        chunks = decoder.push(state, tokens[i : i + size])
        i += size
        if chunks and first_audio_s is None:
            first_audio_s = time.perf_counter() - start
        n_samples += sum(len(c) for c in chunks)
    tail = decoder.flush(state)
    total = time.perf_counter() - start
    cpu_total = time.process_time() - cpu_start
    n_samples += len(tail)
    if first_audio_s is None:
        first_audio_s = total
    audio_s = n_samples / decoder.sample_rate
    return {
        "schedule": asdict(schedule),
        "first_block_tokens": schedule.block_size(0),
        "first_audio_s": round(first_audio_s, 3),
        "total_s": round(total, 3),
        "total_cpu_s": round(cpu_total, 3),
        "audio_s": round(audio_s, 3),
        "rtf": round(total / audio_s, 3),
        "blocks": blocks,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_exact": exact,
    }


def run_one_pass(models: DecoderModels, tokens: list[int]) -> dict[str, object]:
    decoder = SpeechDecoder(models, DEFAULT_SCHEDULE)
    exact = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    audio = decoder.decode(tokens)
    total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    audio_s = len(audio) / decoder.sample_rate
    return {"total_s": round(total, 3), "total_cpu_s": round(cpu_total, 3), "audio_s": round(audio_s, 3),
            "rtf": round(total / audio_s, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "peak_rss_exact": exact}


def growth(blocks: list[dict[str, float]]) -> dict[str, float]:
    """Seconds per new mel frame in the first and last full blocks: flat means a bounded cost."""
    full = [b for b in blocks[:-1] if b["new_frames"]] or blocks
    per = [b["seconds"] / max(b["new_frames"], 1) for b in full]
    return {"first_ms_per_frame": round(1000 * per[0], 3), "last_ms_per_frame": round(1000 * per[-1], 3),
            "last_over_first": round(per[-1] / per[0], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny decoder, 60 tokens")
    parser.add_argument("--tokens", type=int, default=None, help=f"answer length (default {ANSWER_TOKENS})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = TinyDecoderSpec(vocab_size=REAL_DECODER_SPEC.vocab_size) if args.quick else REAL_DECODER_SPEC
    n_tokens = args.tokens or (QUICK_TOKENS if args.quick else ANSWER_TOKENS)
    baseline_mb = _peak_rss_mb()
    models = tiny_decoder(spec)
    tokens = torch.randint(0, spec.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        SpeechDecoder(models, DEFAULT_SCHEDULE).decode(tokens[:10])  # warm-up, not measured
        _log("our schedule")
        ours = run_stream(models, DEFAULT_SCHEDULE, tokens)
        _log("reference schedule")
        reference = run_stream(models, REFERENCE_SCHEDULE, tokens)
        _log("one pass")
        one_pass = run_one_pass(models, tokens)
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "quick": args.quick,
        "tokens": n_tokens,
        "params": {"flow": _params(models.flow), "hift": _params(models.hift)},
        "rss_before_models_mb": round(baseline_mb, 1),  # python + torch, before the decoder exists
        "reference_schedule": {**reference, "growth": growth(reference["blocks"])},  # type: ignore[arg-type]
        "our_schedule": {**ours, "growth": growth(ours["blocks"])},  # type: ignore[arg-type]
        "one_pass": one_pass,
        "ratios": {
            "first_audio_reference_over_ours": round(reference["first_audio_s"] / ours["first_audio_s"], 2),  # type: ignore[operator]
            "stream_time_reference_over_ours": round(reference["total_s"] / ours["total_s"], 2),  # type: ignore[operator]
        },
        "reference_code_2core_cpu": REFERENCE_CODE_2CORE,
    }
    text = json.dumps(result, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
