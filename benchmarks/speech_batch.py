"""Speech decoder batched across conversations against one by one, side by side in one run.

N streams (N = 1, 2, 4, 8 by default) each decode the same length of answer with the default block
schedule, real-size decoder (flow 111 M + HiFT 20 M parameters, random weights, fp32):
- one by one: each stream's blocks decoded alone (`SpeechDecoder.push`/`flush`), as before batching;
- batched: every round, the streams' ready blocks in one `decode_blocks` call (one flow and one vocoder
  call per shape), as the worker's batcher runs them when N people talk at once.
For each N: wall seconds of each, the speed-up, the real-time factor per stream (wall / one stream's audio),
the real-time streams the machine sustains (N x audio / wall), and the largest difference between a
stream's audio batched and alone (relative rms). The floor is the FLOPs one stream's answer needs
(counted by torch's FlopCounterMode) over the machine's measured fp32 matmul rate.

    python benchmarks/speech_batch.py [--quick] [--streams 1,2,4,8] [--tokens 100] [--threads N] [--out F]

The tokenizer side: each stream's next 4 s causal block (after one block already encoded, so each has
its own key/value cache), encoded one by one (`encode_span`) against together (`encode_spans`), real-size
WhisperVQ encoder with random weights; real-time streams = N x 4 s / wall.

`--quick` uses a tiny decoder and tokenizer (a smoke test, seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from glmvoice_cli.decoder.speech_decoder import SpeechDecoder
from glmvoice_cli.tiny.decoder import REAL_DECODER_SPEC, TinyDecoderSpec, tiny_decoder
from glmvoice_cli.tokenizer.block_encoder import Span, encode_span, encode_spans
from glmvoice_cli.tokenizer.features import FeatureConfig
from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
from glmvoice_cli.tokenizer.whisper_vq import CONV2_STRIDE, TokenizerConfig, WhisperVQEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import emit

TOKENS_PER_SECOND = 12.5


def _streams(n: int, tokens: int, vocab: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(n)]


def one_by_one(decoder: SpeechDecoder, streams: list[list[int]]) -> list[np.ndarray]:
    out = []
    for seed, tokens in enumerate(streams):
        state = decoder.new_state(decoder.new_noise(seed))
        out.append(np.concatenate([*decoder.push(state, tokens), decoder.flush(state)]))
    return out


def batched(decoder: SpeechDecoder, streams: list[list[int]]) -> list[np.ndarray]:
    states = [decoder.new_state(decoder.new_noise(seed)) for seed in range(len(streams))]
    chunks = decoder.push_streams(list(zip(states, streams, strict=True)))
    finals = [decoder.final_block(state) for state in states]
    decoder.decode_blocks([f for f in finals if f is not None])
    return [np.concatenate([*c, decoder.end(s, f)]) for c, s, f in zip(chunks, states, finals, strict=True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def matmul_rate(size: int = 1024, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate (FLOP/s), best of a few."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def stream_flops(decoder: SpeechDecoder, tokens: list[int]) -> int:
    with FlopCounterMode(display=False) as counter:
        one_by_one(decoder, [tokens])
    return int(counter.get_total_flops())


def decoder_rows(decoder: SpeechDecoder, counts: list[int], tokens: int, flops: int | None = None,
                 rate: float | None = None) -> list[dict[str, object]]:
    """N streams of `tokens` each, one by one against batched, for each N in `counts`."""
    device = decoder.flow.device
    audio_s = tokens / TOKENS_PER_SECOND
    rows: list[dict[str, object]] = []
    for n in counts:
        streams = _streams(n, tokens, decoder.flow.cfg.vocab_size)
        timed: dict[str, float] = {}
        outputs: dict[str, list[np.ndarray]] = {}
        for name, run in (("one_by_one", one_by_one), ("batched", batched)):
            start = time.perf_counter()
            outputs[name] = run(decoder, streams)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timed[name] = time.perf_counter() - start
        row: dict[str, object] = {
            "streams": n,
            "one_by_one_s": round(timed["one_by_one"], 3),
            "batched_s": round(timed["batched"], 3),
            "speedup": round(timed["one_by_one"] / timed["batched"], 3),
            "rtf_per_stream_one_by_one": round(timed["one_by_one"] / audio_s, 3),
            "rtf_per_stream_batched": round(timed["batched"] / audio_s, 3),
            "realtime_streams_one_by_one": round(n * audio_s / timed["one_by_one"], 3),
            "realtime_streams_batched": round(n * audio_s / timed["batched"], 3),
            "max_relative_rms_difference": max(_relative_rms(a, b) for a, b in
                                               zip(outputs["batched"], outputs["one_by_one"], strict=True)),
        }
        if flops is not None and rate is not None:
            row["floor_s"] = round(n * flops / rate, 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def tokenizer_rows(counts: list[int], quick: bool, device: torch.device, dtype: torch.dtype = torch.float32
                   ) -> list[dict[str, object]]:
    """Second 4 s blocks of N streams (their first block encoded beforehand): alone against together."""
    cfg = TokenizerConfig()
    if quick:
        cfg = TokenizerConfig(d_model=64, encoder_attention_heads=2, encoder_ffn_dim=128, quantize_position=2,
                              pooling_position=2, quantize_vocab_size=256)
    torch.manual_seed(0)
    model = WhisperVQEncoder(cfg).eval().requires_grad_(False).to(device, dtype)
    tok = SpeechTokenizer(model, FeatureConfig(), micro_batch=1)
    block = cfg.quantize_causal_block_size or 200  # positions (after conv2) per causal block
    block_s = block * CONV2_STRIDE * tok.feature_config.hop_length / tok.feature_config.sampling_rate
    rows: list[dict[str, object]] = []
    for n in counts:
        g = torch.Generator().manual_seed(n)
        feats = [tok.logmel(torch.randn(1, int(2.2 * block_s * 16_000), generator=g) * 0.1)[0].to(device)
                 for _ in range(n)]
        valid = [torch.ones(f.shape[1], dtype=torch.bool) for f in feats]
        first = encode_spans(model, [Span(f, v, 0, block, None) for f, v in zip(feats, valid, strict=True)])
        spans = [Span(f, v, block, 2 * block, r.caches) for f, v, r in zip(feats, valid, first, strict=True)]
        _sync(device)
        start = time.perf_counter()
        alone = [encode_span(model, s.feats, s.frame_valid, s.p0, s.p1, s.past) for s in spans]
        _sync(device)
        one_s = time.perf_counter() - start
        start = time.perf_counter()
        together = encode_spans(model, spans)
        _sync(device)
        both_s = time.perf_counter() - start
        rows.append({"streams": n, "block_s": block_s, "one_by_one_s": round(one_s, 4), "batched_s": round(both_s, 4),
                     "speedup": round(one_s / both_s, 3),
                     "realtime_streams_one_by_one": round(n * block_s / one_s, 2),
                     "realtime_streams_batched": round(n * block_s / both_s, 2),
                     "ids_equal": all(a.ids == b.ids for a, b in zip(alone, together, strict=True))})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=100, help="answer tokens per stream (12.5 per second)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = TinyDecoderSpec() if args.quick else REAL_DECODER_SPEC
    models = tiny_decoder(spec)
    device = torch.device(args.device)
    models.flow.to(device)
    models.hift.to(device)
    decoder = SpeechDecoder(models)
    counts = [int(n) for n in args.streams.split(",")]
    audio_s = args.tokens / TOKENS_PER_SECOND
    one_by_one(decoder, _streams(1, min(args.tokens, 40), spec.vocab_size))  # warm-up
    flops = stream_flops(decoder, _streams(1, args.tokens, spec.vocab_size)[0]) if device.type == "cpu" else None
    rate = matmul_rate() if device.type == "cpu" else None
    rows = decoder_rows(decoder, counts, args.tokens, flops, rate)
    result = {
        "benchmark": "speech_batch",
        "decoder": "tiny" if args.quick else "real-size (random weights), fp32",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "answer_tokens_per_stream": args.tokens,
        "answer_audio_s_per_stream": audio_s,
        "flops_per_stream": flops,
        "matmul_flops_per_s": round(rate) if rate else None,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
        "tokenizer_rows": tokenizer_rows(counts, args.quick, device),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
