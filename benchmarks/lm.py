"""LM generation benchmark: our streaming loop, eager and compiled, against `model.generate` with a streamer.

Same random GLM-4-Voice model (written in the official ChatGLM format by our tiny writer, loaded by
our loader), same prompt (a first spoken turn), same sampling settings (the demo's temperature 0.2,
top_p 0.8), measured side by side in one process. Our loop runs twice: eager over a dynamic cache, and
compiled over the static cache (`glmvoice_cli.lm.compiled`). The baseline is what the reference server
does: `generate` in a thread feeding a queue streamer, the consumer reading token ids as they come.

The floor is the memory-bandwidth limit of batch-1 decoding: every token reads every weight once
(the embedding table aside: one row), so tokens/s cannot beat the machine's copy rate (bytes read plus
written by a large tensor copy) over the weight bytes per token.

Reports time to first token, time to first audio token, decode tokens/s and peak memory as JSON;
also checks that both produce the same ids under greedy decoding. The output layer rows of the EOS
tokens and of the padded vocabulary are zeroed, so that no random model stops early and `generate`
(which does not mask the padding) samples from the same tokens as our loop.

    python benchmarks/lm.py [--quick] [--device cpu|cuda] [--size scaled|full] [--no-compile] [--out results.json]

`scaled` (default) is a ~0.5B configuration with the real vocabulary; `full` is the 9B shape (GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from glmvoice_cli.lm.prompts import SpeechInput, turn_ids
from glmvoice_cli.lm.voice_lm import AudioTokens, GenerationOptions, TurnEnd, VoiceLM
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

REAL_VOCAB = 168_960  # padded vocabulary of glm-4-voice-9b
REAL_AUDIO_TOKENS = 16_384
REAL_RESERVED = 1_008  # slots between <|end_of_audio|> and <|audio_0|> in the real tokenizer
SIZES = {
    # The tests' compiled LM (tests/test_lm_compiled.py) has this size too: one compile cache serves both.
    "quick": TinyLMSpec(hidden_size=32, num_layers=2, num_heads=4, kv_groups=2, ffn_hidden_size=64, n_reserved=3,
                        seq_length=384),
    "scaled": TinyLMSpec(
        hidden_size=1024, num_layers=12, num_heads=16, kv_groups=2, ffn_hidden_size=3072,
        n_audio_tokens=REAL_AUDIO_TOKENS, n_reserved=REAL_RESERVED, padded_vocab_size=REAL_VOCAB,
    ),
    "full": TinyLMSpec(
        hidden_size=4096, num_layers=40, num_heads=32, kv_groups=2, ffn_hidden_size=13696,
        n_audio_tokens=REAL_AUDIO_TOKENS, n_reserved=REAL_RESERVED, padded_vocab_size=REAL_VOCAB,
    ),
}  # fmt: skip
PROMPT_AUDIO_TOKENS = 150  # a 12 s spoken question at 12.5 tokens/s
GREEDY_CHECK_TOKENS = 16
COPY_BYTES = 1 << 30  # a copy this large runs at the memory's streaming rate, far beyond any cache
COPY_REPEATS = 5


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class QueueStreamer(BaseStreamer):
    """The reference server's pattern: generate() puts ids on a queue, a consumer reads them."""

    def __init__(self) -> None:
        self.queue: queue.Queue[int | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.queue.put(token_id)

    def end(self) -> None:
        self.queue.put(None)


def copy_bandwidth(device: torch.device, n_bytes: int = COPY_BYTES) -> float:
    """Bytes per second a large same-device tensor copy moves, counting bytes read plus bytes written."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(COPY_REPEATS + 1):  # the first copy also faults the pages in
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: all of them, but a single row of the embedding table."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    return total - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()


def floor(model: torch.nn.Module, device: torch.device) -> dict:
    """The bandwidth floor of batch-1 decoding on this machine, in tokens/s."""
    bandwidth = copy_bandwidth(device)
    weight_bytes = decode_weight_bytes(model)
    return {
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),  # read + write
        "weight_bytes_per_token": weight_bytes,
        "tokens_per_s": round(bandwidth / weight_bytes, 2),
    }


def silence_stops(lm: VoiceLM) -> None:
    """Zero the output rows of EOS ids and padded ids: logit 0 never wins against the random rows."""
    weight = lm.model.lm_head.weight
    with torch.no_grad():
        weight[lm.text_tokenizer.vocab_size :] = 0
        for token_id in lm.text_tokenizer.eos_ids:
            weight[token_id] = 0


def _timings(start: float, stamps: list[float], first_audio: float | None) -> dict:
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {
        "new_tokens": len(stamps),
        "time_to_first_token_s": stamps[0] - start,
        "time_to_first_audio_s": None if first_audio is None else first_audio - start,
        "decode_tokens_per_s": (len(stamps) - 1) / decode if decode > 0 else None,
        "total_s": stamps[-1] - start,
    }


def run_ours(lm: VoiceLM, prompt: SpeechInput, options: GenerationOptions) -> tuple[dict, list[int]]:
    """Our loop in a fresh worker thread feeding a queue, as the session runs it (and as generate runs).

    Both sides run in a fresh thread: a thread that calls torch after another thread's OpenMP team has
    gone can be several times slower on CPU, which would skew a main-thread vs worker-thread comparison.
    """
    conv = lm.new_conversation()
    events: queue.Queue = queue.Queue()

    def produce() -> None:
        for event in lm.stream(conv, prompt, options):
            events.put(event)

    sync(lm.device)
    start = time.perf_counter()
    worker = threading.Thread(target=produce)
    worker.start()
    stamps: list[float] = []
    first_audio = None
    while not isinstance(event := events.get(timeout=600), TurnEnd):
        stamps.append(time.perf_counter())
        if isinstance(event, AudioTokens) and first_audio is None:
            first_audio = stamps[-1]
    worker.join()
    return _timings(start, stamps, first_audio), conv.last_output


def run_generate(lm: VoiceLM, prompt_ids: list[int], options: GenerationOptions) -> tuple[dict, list[int]]:
    ids = torch.tensor([prompt_ids], device=lm.device)
    streamer = QueueStreamer()
    settings = options.sampling(lm.sampling)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                "top_k": settings.top_k}
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": options.max_new_tokens,
        "streamer": streamer,
        "eos_token_id": sorted(lm.text_tokenizer.eos_ids),
        "pad_token_id": lm.text_tokenizer.token_id("<|endoftext|>"),
        **(sampling if not settings.greedy else {"do_sample": False}),
    }
    sync(lm.device)
    start = time.perf_counter()
    worker = threading.Thread(target=lm.model.generate, kwargs=kwargs)
    worker.start()
    stamps: list[float] = []
    tokens: list[int] = []
    first_audio = None
    while (token_id := streamer.queue.get(timeout=600)) is not None:
        stamps.append(time.perf_counter())
        tokens.append(token_id)
        if first_audio is None and lm.text_tokenizer.is_audio(token_id):
            first_audio = stamps[-1]
    worker.join()
    return _timings(start, stamps, first_audio), tokens


def summarize(runs: list[dict]) -> dict:
    """Median over the repeats, plus the best run (the least disturbed by other load on the machine)."""
    out: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    rates = [r["decode_tokens_per_s"] or 0.0 for r in runs]
    ttfa = [r["time_to_first_audio_s"] for r in runs if r["time_to_first_audio_s"] is not None]
    out["best_decode_tokens_per_s"] = round(max(rates), 4)
    out["best_time_to_first_audio_s"] = round(min(ttfa), 4) if ttfa else None
    return out


def enable_compiled(lm: VoiceLM, cache_dir: Path | None = None, second_start: bool = True) -> dict:
    """Compile the decode step twice: into an empty compile cache (or `cache_dir`, which may hold it
    already: then the first start is not a cold one), then again from that cache (a second start; left
    out with `second_start=False`, as `--quick` does: a smoke run has no start-up time to measure)."""
    import os

    from glmvoice_cli.lm.compiled import INDUCTOR_CACHE_ENV

    with tempfile.TemporaryDirectory() as empty:
        os.environ[INDUCTOR_CACHE_ENV] = str(cache_dir or empty)
        first = second = lm.enable_static(compiled=True)
        if second_start:
            torch._dynamo.reset()  # forget the in-memory compile, as a new process would
            second = lm.enable_static(compiled=True)
    return {"mode": second.mode, "static_cache_tokens": second.max_len, "cold_first_start": cache_dir is None,
            "first_start_s": round(first.warm_up_s, 2),
            "second_start_s": round(second.warm_up_s, 2) if second_start else None}


def use(lm: VoiceLM, static: object) -> VoiceLM:
    """Switch `lm` between its eager loop (None) and the compiled one (its StaticDecoder)."""
    lm.static = static  # type: ignore[assignment]
    return lm


def measure(lm: VoiceLM, prompt: SpeechInput, options: GenerationOptions, repeats: int, compiled: bool) -> dict:
    """Eager, compiled and generate side by side: greedy ids first (also the warm-up), then timed repeats."""
    static = lm.static
    prompt_ids = turn_ids(lm.text_tokenizer, prompt, None)
    greedy = replace(options, temperature=0.0, max_new_tokens=GREEDY_CHECK_TOKENS)
    ids = {"eager": run_ours(use(lm, None), prompt, greedy)[1]}
    if compiled:
        ids["compiled"] = run_ours(use(lm, static), prompt, greedy)[1]
    ids["generate"] = run_generate(use(lm, None), prompt_ids, greedy)[1]
    runs: dict[str, list[dict]] = {name: [] for name in ids}
    for _ in range(repeats):  # interleaved, so that drift affects all alike
        runs["eager"].append(run_ours(use(lm, None), prompt, options)[0])
        if compiled:
            runs["compiled"].append(run_ours(use(lm, static), prompt, options)[0])
        runs["generate"].append(run_generate(use(lm, None), prompt_ids, options)[0])
    use(lm, static)
    out = {name: summarize(r) for name, r in runs.items()}
    out["greedy_ids_match"] = {
        "eager_vs_generate": ids["eager"] == ids["generate"],
        **({"compiled_vs_eager": ids["compiled"] == ids["eager"]} if compiled else {}),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny model, short prompt, one repetition (smoke test)"
    )
    ap.add_argument("--size", choices=["scaled", "full"], default="scaled")
    ap.add_argument("--compile-cache", type=Path, default=None,
                    help="compile cache folder to use (default: an empty one, so the first start is cold)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled loop")
    ap.add_argument("--out", help="write the JSON here as well as to stdout")
    args = ap.parse_args()
    size = "quick" if args.quick else args.size
    new_tokens = args.new_tokens or (16 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)
    n_audio = 20 if args.quick else PROMPT_AUDIO_TOKENS

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_lm(Path(tmp) / "lm", replace(SIZES[size], seed=0))
        t = time.perf_counter()
        lm = VoiceLM.from_folder(folder, LoadOptions(device=args.device, dtype=args.dtype))
        load_s = time.perf_counter() - t
    silence_stops(lm)
    compile_info = None if args.no_compile else enable_compiled(lm, args.compile_cache, second_start=not args.quick)
    prompt = SpeechInput(tuple(i * 7 % lm.text_tokenizer.n_audio_tokens for i in range(n_audio)))
    options = GenerationOptions(max_new_tokens=new_tokens, seed=0)
    loops = measure(lm, prompt, options, repeats, compiled=compile_info is not None)
    limit = floor(lm.model, lm.device)
    results = {
        "benchmark": "lm",
        "size": size,
        "params_m": round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 1),
        "config": {
            k: getattr(lm.model.config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")
        },
        "device": str(lm.device),
        "dtype": str(lm.model.lm_head.weight.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(turn_ids(lm.text_tokenizer, prompt, None)),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "sampling": options.sampling(lm.sampling).to_dict(),
        "load_s": round(load_s, 2),
        "compile": compile_info,
        "floor": limit,
        **loops,
        "fraction_of_floor": {
            name: round(loops[name]["best_decode_tokens_per_s"] / limit["tokens_per_s"], 3)
            for name in ("eager", "compiled", "generate") if name in loops
        },
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other jobs skew timings
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": platform.processor() or platform.machine(),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
