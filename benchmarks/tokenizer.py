"""Speech tokenizer benchmark: real-size configuration, random weights, 5 s and 30 s inputs.

Ours (torch log-mel + our encoder) against the natural baseline: `transformers`' WhisperFeatureExtractor
and WhisperEncoder layers (the code the reference is built on), with the same weights copied in, run side
by side in one process. Reports real-time factor (compute seconds per audio second), peak memory and
the FLOP floor (encoder FLOPs over this machine's measured matmul rate), as JSON.

    python benchmarks/tokenizer.py [--quick] [--device cpu|cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from glmvoice_cli.tokenizer.features import FeatureConfig
from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
from glmvoice_cli.tokenizer.whisper_vq import (
    TokenizerConfig,
    WhisperVQEncoder,
    block_causal_mask,
    nearest_code,
)

RATE = 16_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Best observed fp32 matmul rate: the machine's attainable peak for the FLOP floor."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def encoder_gflop(cfg: TokenizerConfig, frames: int) -> float:
    """Multiply-adds x2 of convs, attention and MLPs for one window of `frames` mel frames."""
    t, d, f = frames // 2, cfg.d_model, cfg.encoder_ffn_dim
    conv = 2 * frames * cfg.num_mel_bins * d * 3 + 2 * t * d * d * 3
    layer = 2 * t * d * d * 4 + 2 * 2 * t * t * d + 2 * 2 * t * d * f
    vq = 2 * (t // cfg.pooling_kernel_size) * d * cfg.quantize_vocab_size
    return (conv + cfg.quantize_position * layer + vq) / 1e9


class Baseline:
    """transformers' Whisper feature extractor + encoder layers, with the reference's causal convs and mask."""

    def __init__(self, ours: WhisperVQEncoder, device: torch.device) -> None:
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg = ours.cfg
        wcfg = WhisperConfig(d_model=cfg.d_model, encoder_layers=cfg.quantize_position,
                             encoder_attention_heads=cfg.encoder_attention_heads,
                             encoder_ffn_dim=cfg.encoder_ffn_dim, num_mel_bins=cfg.num_mel_bins)
        wcfg._attn_implementation = "sdpa"
        self.encoder = WhisperEncoder(wcfg).eval().requires_grad_(False)
        missing = self.encoder.load_state_dict(ours.state_dict(), strict=False).missing_keys
        assert all(k.startswith("layer_norm") for k in missing), missing
        self.encoder.conv1.padding = self.encoder.conv2.padding = (0,)  # causal: we pad on the left ourselves
        self.encoder.to(device)
        self.cfg, self.codebook, self.device = cfg, ours.codebook.weight, device
        self.extractor = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins)

    @torch.inference_mode()
    def encode(self, audio: np.ndarray) -> list[int]:
        feats = self.extractor(audio, sampling_rate=RATE, padding="longest", pad_to_multiple_of=1280,
                               return_attention_mask=True, return_tensors="pt")
        x = feats.input_features.to(self.device)
        mask = feats.attention_mask.to(self.device)
        enc = self.encoder
        x = F.gelu(enc.conv1(F.pad(x, (2, 0))))
        x = F.gelu(enc.conv2(F.pad(x, (2, 0)))).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        valid = mask[:, ::2].bool()
        attn = block_causal_mask(valid, self.cfg.quantize_causal_block_size, x.dtype)
        for layer in enc.layers:
            x = layer(x, attn)
            x = x[0] if isinstance(x, tuple) else x
        pooled = F.avg_pool1d(x.transpose(1, 2), self.cfg.pooling_kernel_size).transpose(1, 2)
        ids = nearest_code(pooled[0], self.codebook)
        return ids[valid[0, :: self.cfg.pooling_kernel_size]].tolist()


def timed(fn, reps: int, device: torch.device) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="5 s input only, one repetition")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", help="write the JSON here as well as to stdout")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = TokenizerConfig()
    rss0 = peak_rss_mb()
    model = WhisperVQEncoder(cfg).eval().requires_grad_(False).to(device)
    ours = SpeechTokenizer(model, FeatureConfig(), micro_batch=1)
    baseline = Baseline(model, device)
    rate = matmul_gflops(device)
    results = {"device": str(device), "threads": args.threads, "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "matmul_gflops": round(rate, 1),
               "weights_mb": round(sum(p.numel() * 4 for p in model.parameters()) / 2**20, 1), "inputs": []}
    rng = np.random.default_rng(0)
    for seconds in [5] if args.quick else [5, 30]:
        audio = (0.1 * rng.standard_normal(seconds * RATE)).astype(np.float32)
        reps = 1 if args.quick else 3
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_ours, ids_ours = timed(lambda audio=audio: ours.encode([audio])[0], reps, device)
        gpu_ours = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_base, ids_base = timed(lambda audio=audio: baseline.encode(audio), reps, device)
        gpu_base = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        floor = encoder_gflop(cfg, -(-seconds * RATE // 1280) * 8) / rate
        results["inputs"].append({
            "seconds": seconds, "ours_s": round(t_ours, 3), "baseline_s": round(t_base, 3),
            "ours_rtf": round(t_ours / seconds, 4), "baseline_rtf": round(t_base / seconds, 4),
            "speedup_vs_baseline": round(t_base / t_ours, 2), "flop_floor_s": round(floor, 3),
            "ours_fraction_of_floor": round(floor / t_ours, 2), "same_tokens": ids_ours == ids_base,
            "gpu_peak_mb_ours": gpu_ours and round(gpu_ours), "gpu_peak_mb_baseline": gpu_base and round(gpu_base)})
    results["process_peak_rss_mb"] = round(peak_rss_mb() - rss0, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
