"""One-shot GPU check: the embedded LM eager and compiled against the bandwidth floor, the decoder, the tokenizer.

Everything is built in memory with random weights at the published sizes (the 9B LM in bf16, the
speech decoder and the speech tokenizer in fp32), so the run needs no download and nothing beyond
PyTorch, transformers, safetensors and tiktoken (numpy and PyYAML come with transformers). It writes
one JSON, updated after each stage so that a run cut short keeps what it measured:

- LM: decode tokens/s of the eager loop and of the compiled loop (static cache, CUDA graphs), each as a
  fraction of the floor: weight bytes per token over the bandwidth of a large device-to-device copy
  (bytes read plus written); the compile time; 4-bit (NF4) only where bitsandbytes is importable.
- Decoder: time to first audio and the streaming real-time factor of a 20 s answer (our schedule).
- Tokenizer: real-time factor of a 30 s input.
- Peak GPU memory with the three stages loaded together.
- With `--latency`: end of voice -> first answer sample, today's serial path against the streaming path
  (`benchmarks/latency.py`'s conversations at real-time pace, about 3 minutes) with these three stages.

    bash benchmarks/gpu_check.sh [--out results.json]      # on the GPU machine, < 5 min
    bash benchmarks/gpu_check.sh --latency --speech-dir DIR --out results.json   # + the latency comparison
    bash benchmarks/gpu_check.sh --conversations --speech-dir DIR   # + 1, 2, 4 conversations on one worker
    bash benchmarks/gpu_check.sh --realtime --speech-dir DIR   # + 1, 2, 4 SDK clients of `glmvoice serve`
    bash benchmarks/gpu_check.sh --speech-batch   # + 1-32 speech streams batched against one by one
    python benchmarks/gpu_check.py --tiny --out x.json      # tiny sizes on CPU (the CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers
from lm import SIZES, copy_bandwidth, decode_weight_bytes, run_ours, silence_stops  # benchmarks/lm.py

from glmvoice_cli.decoder.checkpoint import DecoderModels
from glmvoice_cli.lm.prompts import SpeechInput
from glmvoice_cli.lm.voice_lm import GenerationOptions, VoiceLM
from glmvoice_cli.tiny.lm import TinyLMSpec
from glmvoice_cli.tokenizer.whisper_vq import TokenizerConfig

PROMPT_AUDIO_TOKENS = 150  # a 12 s spoken question
EAGER_TOKENS, COMPILED_TOKENS = 64, 256  # the eager loop is the slow one: fewer tokens
DECODER_TOKENS = 250  # a 20 s answer at 12.5 tokens/s
TOKENIZER_SECONDS = 30.0  # one full window
INIT_STD = 0.02  # random weights: logits stay finite and varied in bf16
TINY_COPY_BYTES = 1 << 26


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


# --------------------------------------------------------------------------- the LM


def build_lm(spec: TinyLMSpec, device: torch.device, dtype: torch.dtype) -> VoiceLM:
    """A GLM-4-Voice LM of `spec`'s size with random weights, straight on `device` (no checkpoint on disk)."""
    from transformers import GlmForCausalLM

    from glmvoice_cli.lm.checkpoint import glm_config_from_chatglm, rebuild_rotary
    from glmvoice_cli.lm.text_tokenizer import TextTokenizer
    from glmvoice_cli.tiny.lm import chatglm_config, padded_vocab, write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        added = write_tokenizer(folder, spec)
        raw = chatglm_config(spec, padded_vocab(spec, max(added.values()) + 1), added)
        tokenizer = TextTokenizer.from_folder(folder)
    cfg = glm_config_from_chatglm(raw, folder / "config.json")
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = GlmForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norm scales 1, biases 0
                param.fill_(1.0 if "norm" in name else 0.0)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    rebuild_rotary(model, device)
    lm = VoiceLM(model.eval().requires_grad_(False), tokenizer)
    silence_stops(lm)
    return lm


def lm_rate(lm: VoiceLM, prompt: SpeechInput, n_tokens: int) -> dict:
    """One turn of `n_tokens` (demo sampling, seeded), timed as the chat runs it."""
    options = GenerationOptions(max_new_tokens=n_tokens, seed=0)
    timings, _ = run_ours(lm, prompt, options)
    return {k: None if v is None else round(v, 4) for k, v in timings.items()}


def check_lm(spec: TinyLMSpec, device: torch.device, dtype: torch.dtype, scale: int, copy_bytes: int) -> dict:
    t = time.perf_counter()
    lm = build_lm(spec, device, dtype)
    out: dict = {"build_s": round(time.perf_counter() - t, 1),
                 "params_b": round(sum(p.numel() for p in lm.model.parameters()) / 1e9, 3),
                 "dtype": str(dtype).removeprefix("torch.")}
    bandwidth = copy_bandwidth(device, copy_bytes)
    weight_bytes = decode_weight_bytes(lm.model)
    out["floor"] = {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_bytes_per_token": weight_bytes,
                    "tokens_per_s": round(bandwidth / weight_bytes, 1)}
    prompt = SpeechInput(tuple(i * 7 % lm.text_tokenizer.n_audio_tokens for i in range(PROMPT_AUDIO_TOKENS)))
    lm_rate(lm, prompt, 8)  # warm-up of the eager kernels
    _log("lm: eager")
    out["eager"] = lm_rate(lm, prompt, max(8, EAGER_TOKENS // scale))
    _log("lm: compiling")
    report = lm.enable_static(compiled=True)
    out["compile"] = {"mode": report.mode, "static_cache_tokens": report.max_len, "warm_up_s": round(report.warm_up_s, 1)}
    _log("lm: compiled")
    out["compiled"] = lm_rate(lm, prompt, max(8, COMPILED_TOKENS // scale))
    out["fraction_of_floor"] = {
        name: round((out[name]["decode_tokens_per_s"] or 0.0) / out["floor"]["tokens_per_s"], 3)
        for name in ("eager", "compiled")
    }
    out["peak_gpu_gb"] = _peak_gb(device)
    return {"lm": out, "_model": lm}


def check_lm_4bit(spec: TinyLMSpec, device: torch.device, dtype: torch.dtype, scale: int,
                  allow_cpu: bool = False) -> dict:
    """NF4 weights through bitsandbytes, eager decode rate: where bitsandbytes is importable and on CUDA
    (`allow_cpu`: its CPU backend, for the smoke test)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"skipped": "bitsandbytes is not importable here"}
    if device.type != "cuda" and not allow_cpu:
        return {"skipped": "4-bit needs CUDA"}
    from glmvoice_cli.lm.quant import quantize_model

    t = time.perf_counter()
    lm = build_lm(spec, device, dtype)
    dense_bytes = decode_weight_bytes(lm.model)
    quantize_model(lm.model, 4, dtype, device)
    out: dict = {"build_s": round(time.perf_counter() - t, 1), "quant_type": "nf4, double quantization",
                 "weight_bytes_per_token": decode_weight_bytes(lm.model), "dense_weight_bytes_per_token": dense_bytes}
    prompt = SpeechInput(tuple(i * 7 % lm.text_tokenizer.n_audio_tokens for i in range(PROMPT_AUDIO_TOKENS)))
    lm_rate(lm, prompt, 8)  # warm-up of the kernels
    _log("lm 4-bit: eager")
    out["eager"] = lm_rate(lm, prompt, max(8, EAGER_TOKENS // scale))
    out["peak_gpu_gb"] = _peak_gb(device)
    del lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- decoder and tokenizer


def check_decoder(device: torch.device, tiny: bool) -> dict:
    from decoder import run_stream  # benchmarks/decoder.py

    from glmvoice_cli.decoder.speech_decoder import DEFAULT_SCHEDULE, SpeechDecoder
    from glmvoice_cli.tiny.decoder import REAL_DECODER_SPEC, TinyDecoderSpec, tiny_decoder

    spec = TinyDecoderSpec(vocab_size=REAL_DECODER_SPEC.vocab_size) if tiny else REAL_DECODER_SPEC
    models = tiny_decoder(spec)
    models.flow.to(device)
    models.hift.to(device)
    n_tokens = 60 if tiny else DECODER_TOKENS
    tokens = torch.randint(0, spec.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        SpeechDecoder(models, DEFAULT_SCHEDULE).decode(tokens[:10])  # warm-up
        _sync(device)
        stream = run_stream(models, DEFAULT_SCHEDULE, tokens)
    keep = ("first_block_tokens", "first_audio_s", "total_s", "audio_s", "rtf")
    return {"decoder": {"tokens": n_tokens, **{k: stream[k] for k in keep}, "peak_gpu_gb": _peak_gb(device)},
            "_model": models}


def tokenizer_config(tiny: bool) -> TokenizerConfig:
    cfg = TokenizerConfig()
    if tiny:
        cfg = replace(cfg, d_model=64, encoder_attention_heads=2, encoder_ffn_dim=128, quantize_position=2,
                      pooling_position=2, quantize_vocab_size=64)  # pooled and block-causal, as the real one
    return cfg


def check_tokenizer(device: torch.device, tiny: bool) -> dict:
    from glmvoice_cli.tokenizer.features import FeatureConfig
    from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
    from glmvoice_cli.tokenizer.whisper_vq import WhisperVQEncoder

    cfg = tokenizer_config(tiny)
    torch.manual_seed(0)
    model = WhisperVQEncoder(cfg).eval().requires_grad_(False).to(device)
    tokenizer = SpeechTokenizer(model, FeatureConfig(), micro_batch=1)
    seconds = 5.0 if tiny else TOKENIZER_SECONDS
    t = np.arange(int(seconds * 16_000)) / 16_000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32)
    tokenizer.encode([audio])  # warm-up
    _sync(device)
    start = time.perf_counter()
    ids = tokenizer.encode([audio])[0]
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"tokenizer": {"input_s": seconds, "tokens": len(ids), "seconds": round(elapsed, 4),
                          "rtf": round(elapsed / seconds, 5), "peak_gpu_gb": _peak_gb(device)},
            "_model": model}


# --------------------------------------------------------------------------- end of voice -> first sample


def _conversations(speech_dir: Path | None) -> dict[str, np.ndarray]:
    from latency import conversations  # benchmarks/latency.py

    with tempfile.TemporaryDirectory() as scratch:
        return conversations(Path(scratch), speech_dir)


def _missing_for_latency() -> list[str]:
    """What the chat engine's audio side needs that a bare GPU machine may lack (install or carry them as
    wheels): webrtcvad (the VAD), soundfile and soxr (the file-backed fakes)."""
    import importlib.util

    return [name for name in ("webrtcvad", "soundfile", "soxr") if importlib.util.find_spec(name) is None]


def _missing_for_realtime() -> list[str]:
    """The chat's audio side and the server extra with the official client (`glmvoice[server]`, `openai`)."""
    import importlib.util

    extra = ("starlette", "uvicorn", "websockets", "openai")
    return _missing_for_latency() + [name for name in extra if importlib.util.find_spec(name) is None]


def _spoken_turns(speech_dir: Path | None) -> list[list[np.ndarray]]:
    from latency import CONVERSATIONS, espeak

    with tempfile.TemporaryDirectory() as scratch:
        return [[espeak(t, Path(scratch), speech_dir) for t in turns] for turns in CONVERSATIONS.values()]


def check_realtime(lm: VoiceLM, decoder_models: DecoderModels, device: torch.device, turns: list[list[np.ndarray]],
                   tiny: bool, counts: tuple[int, ...] = (1, 2, 4)) -> dict:
    """realtime.py's server side: N official-SDK clients at once against `glmvoice serve`'s app in this process,
    with the stages measured above (one static-cache slot per client for the compiled LM)."""
    from latency import real_tokenizer
    from realtime import run_clients

    from glmvoice_cli.decoder.speech_decoder import SpeechDecoder
    from glmvoice_cli.pipeline.assistant import Assistant

    if lm.static is not None and len(lm.slots) < max(counts):
        lm.enable_static(compiled=lm.static.mode != "eager", max_len=lm.static.max_len, slots=max(counts))
    assistant = Assistant(lm, real_tokenizer(device, tokenizer_config(tiny)), SpeechDecoder(decoder_models, seed=1))
    out = {}
    for n in counts:
        run = run_clients(assistant, [turns[k % len(turns)] for k in range(n)], 40, 1)
        run.pop("per_client_s")
        out[str(n)] = run
    return out


def check_latency(lm: VoiceLM, decoder_models: DecoderModels, device: torch.device, users: dict[str, np.ndarray],
                  tiny: bool) -> dict:
    """latency.py's serial/streaming comparison with the stages measured above (the LM compiled, its CUDA
    graphs recorded again on the chat's model thread) and latency.py's tokenizer (its codebook near the states)."""
    from latency import compare, real_tokenizer

    from glmvoice_cli.decoder.speech_decoder import SpeechDecoder
    from glmvoice_cli.pipeline.assistant import Assistant

    tokenizer = real_tokenizer(device, tokenizer_config(tiny))
    assistant = Assistant(lm, tokenizer, SpeechDecoder(decoder_models, seed=1))
    measured = compare(assistant, users, rounds=1, max_new_tokens=40, seed=1)
    measured.pop("turns")  # the summary and its breakdown are enough here
    return measured


def check_speech_batch(lm: VoiceLM, decoder_models: DecoderModels, device: torch.device, _given: object,
                       tiny: bool) -> dict:
    """speech_batch.py: N decoder streams (and N tokenizer blocks) batched against one by one, N up to 32: how
    many real-time streams one GPU's speech stages sustain."""
    from speech_batch import decoder_rows, tokenizer_rows  # benchmarks/speech_batch.py

    from glmvoice_cli.decoder.speech_decoder import SpeechDecoder

    counts = [1, 2] if tiny else [1, 2, 4, 8, 16, 32]
    decoder = SpeechDecoder(decoder_models)
    decoder_rows(decoder, [1], 30)  # warm-up (kernels, allocator)
    dtype = next(decoder_models.flow.parameters()).dtype
    return {"answer_tokens_per_stream": 100, "decoder": decoder_rows(decoder, counts, 30 if tiny else 100),
            "tokenizer": tokenizer_rows(counts, tiny, device, dtype)}


def check_conversations(lm: VoiceLM, decoder_models: DecoderModels, device: torch.device,
                        users: dict[str, np.ndarray], tiny: bool, counts: tuple[int, ...] = (1, 2, 4)) -> dict:
    """conversations.py's worker side: N conversations at once on one model worker with the stages measured
    above (N separate processes would each load the 9B LM: that side runs where memory allows, on the CPU).
    The compiled LM gets one static-cache slot per conversation."""
    from conversations import run_worker, summarize
    from latency import real_tokenizer

    from glmvoice_cli.decoder.speech_decoder import SpeechDecoder
    from glmvoice_cli.pipeline.assistant import Assistant

    if lm.static is not None and len(lm.slots) < max(counts):
        lm.enable_static(compiled=lm.static.mode != "eager", max_len=lm.static.max_len, slots=max(counts))
    assistant = Assistant(lm, real_tokenizer(device, tokenizer_config(tiny)), SpeechDecoder(decoder_models, seed=1))
    scripts = list(users.values())
    out = {}
    for n in counts:
        run = summarize(run_worker(assistant, [scripts[k % len(scripts)] for k in range(n)], 40, 1))
        run.pop("conversations")
        out[str(n)] = run
    return out


# --------------------------------------------------------------------------- the run


def _write(results: dict, out: Path | None) -> None:
    text = json.dumps(results, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (runs on CPU in seconds to minutes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here (after every stage)")
    ap.add_argument("--latency", action="store_true",
                    help="also compare serial and streaming end of voice -> first sample (benchmarks/latency.py)")
    ap.add_argument("--conversations", action="store_true",
                    help="also run 1, 2 and 4 conversations at once on one model worker (benchmarks/conversations.py)")
    ap.add_argument("--speech-dir", type=Path, default=None,
                    help="the conversations' speech rendered by `latency.py --render-only` (no espeak-ng here)")
    ap.add_argument("--speech-batch", action="store_true",
                    help="also run 1-32 decoder and tokenizer streams batched against one by one (speech_batch.py)")
    ap.add_argument("--realtime", action="store_true",
                    help="also run 1, 2 and 4 SDK clients at once against the Realtime server (benchmarks/realtime.py)")
    args = ap.parse_args()
    talks = args.latency or args.conversations
    missing = _missing_for_latency() if talks else []
    missing_rt = _missing_for_realtime() if args.realtime else []
    # the speech is read before any model is built: a missing piece fails now, not after minutes of GPU time
    users = _conversations(args.speech_dir) if talks and not missing else None
    spoken = _spoken_turns(args.speech_dir) if args.realtime and not missing_rt else None
    device = torch.device(args.device)
    os.environ.setdefault("GLMVOICE_HOME", tempfile.mkdtemp(prefix="glmvoice-gpu-check-"))
    spec = SIZES["quick"] if args.tiny else replace(SIZES["full"], seq_length=8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict = {
        "benchmark": "gpu_check", "tiny": args.tiny, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    keep = []  # the three stages stay loaded: the peak is theirs together
    for name, check in (
        ("lm", lambda: check_lm(spec, device, dtype, 8 if args.tiny else 1,
                                TINY_COPY_BYTES if args.tiny else 1 << 31)),
        ("decoder", lambda: check_decoder(device, args.tiny)),
        ("tokenizer", lambda: check_tokenizer(device, args.tiny)),
    ):
        _log(f"{name} ...")
        part = check()
        keep.append(part.pop("_model"))
        results.update(part)
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        _write(results, args.out)
    results["peak_gpu_gb_all_stages"] = _peak_gb(device)
    _write(results, args.out)
    optional = (  # (flag, name, what the log says, the input or None when packages are missing, missing, check)
        (args.latency, "latency", "serial and streaming, at real-time pace", users, missing, check_latency),
        (args.conversations, "conversations", "1, 2 and 4 at once on one model worker, at real-time pace", users,
         missing, check_conversations),
        (args.realtime, "realtime", "1, 2 and 4 SDK clients of the Realtime server, at real-time pace", spoken,
         missing_rt, check_realtime),
        (args.speech_batch, "speech_batch", "decoder and tokenizer streams batched against one by one", True, [],
         check_speech_batch),
    )
    for wanted, name, what, given, lacking, stage in optional:
        if not wanted:
            continue
        _log(f"{name}: {what} ...")
        results[name] = {"skipped": f"not importable here: {', '.join(lacking)} (carry their wheels)"} \
            if given is None else stage(keep[0], keep[1], device, given, args.tiny)
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        _write(results, args.out)
    del keep  # the 4-bit LM is measured alone, after the three stages' peak
    results["lm_4bit"] = check_lm_4bit(spec, device, dtype, 8 if args.tiny else 1)
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    _write(results, args.out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
