"""End of voice -> first answer sample: today's serial path against the streaming path, side by side in one run.

Models (random weights, built in memory): the real-size speech tokenizer (Whisper large-v3 encoder,
16 layers), the real-size speech decoder (flow + HiFT), and the scaled LM of `benchmarks/lm.py`
(~0.5B, real vocabulary; its stop tokens silenced so every answer runs `--max-new-tokens`).

Scripted espeak-ng conversations are fed at real-time pace (a RealClock source, as `glmvoice chat
--input-file --realtime` does), so the work done during speech and silence overlaps them as it would
live, through the real engine and webrtcvad. One conversation has the user pause mid-sentence (shorter
than the end-of-turn silence) and go on. Each conversation runs twice, alternating:

- serial: `streaming=False`, no speculation: after the end-of-turn silence the whole utterance is
  tokenized, the LM prefills it, samples, and the decoder makes its first block;
- streaming: blocks tokenized and prefilled while the user speaks, the answer started at a 200 ms pause.

Per turn it records the breakdown the chat shows (seconds from the end of voice: the last voiced frame
read) and how much the end-of-turn prefill and tokenization still had to do. JSON to stdout and `--out`.

    python benchmarks/latency.py [--max-new-tokens 40] [--rounds 1] [--out benchmarks/results/latency-cpu.json]
    python benchmarks/latency.py --quick    # tiny random models: the engine's own overheads only
    python benchmarks/latency.py --render-only --speech-dir DIR   # the conversations' speech, for a machine
                                                                  # without espeak-ng (gpu_check.py --latency)

On a GPU, `benchmarks/gpu_check.py --latency` runs the same comparison with the 9B LM, after its checks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from glmvoice_cli.audio.fakes import ArraySource, RecordingSink
from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.audio.playback import RealClock
from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
from glmvoice_cli.chat.turn_timing import STAGES
from glmvoice_cli.decoder.speech_decoder import SpeechDecoder
from glmvoice_cli.lm.voice_lm import GenerationOptions, VoiceLM
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.threads import on_passing_thread
from glmvoice_cli.tiny.decoder import REAL_DECODER_SPEC, tiny_decoder
from glmvoice_cli.tiny.lm import write_tiny_lm
from glmvoice_cli.tokenizer.features import FeatureConfig
from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
from glmvoice_cli.tokenizer.whisper_vq import TokenizerConfig, WhisperVQEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm import SIZES, silence_stops  # the scaled LM of benchmarks/lm.py
from results_io import emit

RATE, OUT_RATE = 16_000, 22_050
ANSWER_ROOM_S = 9.0  # silence after each question: the answer is generated and played in it
CONVERSATIONS = {  # name -> user turns; "|" is a mid-sentence pause of PAUSE_S
    "weather": ["What will the weather be like tomorrow morning in the city, and should I take an umbrella?",
                "And what about the weekend, will it be warm enough to go to the beach with the kids?"],
    "pause": ["I would like to know | how long it takes to cook a soft boiled egg in boiling water."],
    "short": ["Tell me a joke about computers, please.", "Another one about cats."],
}
PAUSE_S = 0.45  # mid-sentence: longer than the speculative pause, shorter than the end-of-turn silence


def espeak(text: str, folder: Path, speech_dir: Path | None = None) -> np.ndarray:
    """`text` spoken by espeak-ng at 16 kHz, "|" as a PAUSE_S pause. Each piece is read from `speech_dir` when
    it holds it (saved there by an earlier run as .npy: a lent GPU machine has neither espeak-ng nor an audio
    file library), else rendered (and saved there when given)."""
    exe = shutil.which("espeak-ng")
    parts = []
    for piece in (p.strip() for p in text.split("|")):
        name = hashlib.sha256(piece.encode()).hexdigest()[:16]  # stable across runs and machines
        saved = None if speech_dir is None else speech_dir / f"{name}.npy"
        if saved is not None and saved.is_file():
            parts.append(np.load(saved, allow_pickle=False).astype(np.float32))
            continue
        if exe is None:
            raise SystemExit(f"error: espeak-ng is needed for this benchmark, or --speech-dir holding {name}.npy "
                             f"(rendered where espeak-ng is: --render-only --speech-dir DIR)")
        wav = folder / f"{name}.wav"
        subprocess.run([exe, "-w", str(wav), piece], check=True, timeout=60)
        parts.append(load_audio(wav, RATE).samples)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            np.save(saved, parts[-1], allow_pickle=False)
    pause = np.zeros(int(PAUSE_S * RATE), dtype=np.float32)
    out = [parts[0]]
    for part in parts[1:]:
        out += [pause, part]
    return np.concatenate(out)


def conversations(folder: Path, speech_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Every scripted conversation as one input signal (questions, each followed by room for the answer)."""
    return {name: script([espeak(t, folder, speech_dir) for t in turns]) for name, turns in CONVERSATIONS.items()}


def script(turns: list[np.ndarray]) -> np.ndarray:
    room = np.zeros(int(ANSWER_ROOM_S * RATE), dtype=np.float32)
    return np.concatenate([np.zeros(RATE // 2, dtype=np.float32)] + [x for t in turns for x in (t, room)])


def real_tokenizer(device: str | torch.device = "cpu", config: TokenizerConfig | None = None) -> SpeechTokenizer:
    """The published tokenizer's shape (or `config`'s) with random weights."""
    torch.manual_seed(0)
    model = WhisperVQEncoder(config or TokenizerConfig()).eval().requires_grad_(False)
    with torch.no_grad():  # the encoder's tables are torch.empty: give every parameter a defined value
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:
                p.zero_()
        # A trained codebook sits where the encoder's states are. Codes at the 0.02 scale above leave every
        # state almost equidistant from all of them: a fifth of the ids became near-ties (relative margin
        # under the streaming tokenizer's 2e-5) and every turn fell back to whole-utterance tokenization,
        # which real weights rarely do. Codes at unit scale give margins of 3e-5 and up; the fallbacks that
        # remain are counted in the JSON.
        model.codebook.weight.normal_(0.0, 1.0)
    return SpeechTokenizer(model.to(device), FeatureConfig(), micro_batch=1)


def build(scratch: Path, seed: int, quick: bool) -> Assistant:
    if quick:
        from glmvoice_cli.tiny.modelset import write_tiny_model_set

        return Assistant.load(write_tiny_model_set(scratch / "tiny", codebook=64).dirs, LoadOptions(seed=seed))
    folder = write_tiny_lm(scratch / "lm", replace(SIZES["scaled"], seed=0))
    lm = VoiceLM.from_folder(folder, LoadOptions(device="cpu", seed=seed))
    silence_stops(lm)
    decoder = SpeechDecoder(tiny_decoder(REAL_DECODER_SPEC), seed=seed)
    return Assistant(lm, real_tokenizer(), decoder)


def converse(assistant: Assistant, user: np.ndarray, streaming: bool, max_new_tokens: int, seed: int) -> list[dict]:
    clock = RealClock()
    sink = RecordingSink(sample_rate=OUT_RATE, clock=clock)
    config = EngineConfig(vad=VadConfig(), generation=GenerationOptions(max_new_tokens=max_new_tokens, seed=seed),
                          streaming=streaming, speculative_pause_ms=200 if streaming else None)
    engine = ChatEngine(assistant, ArraySource(user, RATE, clock=clock), sink, config=config, clock=clock)
    engine.start()
    if not engine.wait(len(user) / RATE + 300):
        engine.stop()
    engine.join()
    sink.close()
    if engine.error is not None:
        raise SystemExit(f"error: {engine.error}")
    rows = []
    for report in engine.reports:
        t = report.timings
        row = {name: None if t is None or getattr(t, name) is None else round(getattr(t, name), 4)
               for name, _ in STAGES}
        row.update(first_token_s=None if t is None or t.first_token_s is None else round(t.first_token_s, 4),
                   prefill_tokens_at_end=report.prefill_tokens, tail_frames_tokenized_at_end=report.tail_frames,
                   interrupted=report.interrupted)
        rows.append(row)
    if streaming:
        spec = engine.speculation
        stream = engine.listener.stream.stats if engine.listener is not None else None
        rows.append({"speculation": {"started": spec.started, "confirmed": spec.confirmed, "dropped": spec.dropped},
                     "tokenizer": None if stream is None else {
                         "blocks_encoded": stream.blocks_encoded, "blocks_redone": stream.blocks_redone,
                         "fallbacks": stream.fallbacks}})
    return rows


def _commit() -> str | None:
    """The checkout's commit (with + when it has changes), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty else "")


def envelope(load_before: float) -> dict:
    """What every benchmark JSON ends with: the machine, its load and the code measured."""
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other jobs skew timings
            "platform": platform.platform(), "torch": torch.__version__, "commit": _commit()}


def stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"median": None, "p90": None, "n": 0}
    return {"median": round(float(np.median(values)), 3), "p90": round(float(np.percentile(values, 90)), 3),
            "n": len(values)}


def summarize(turns: list[dict]) -> dict:
    out = {"end_of_voice_to_first_sample_s": stats([t["first_sample_s"] for t in turns
                                                    if t.get("first_sample_s") is not None])}
    out["breakdown_median_s"] = {
        name: stats([t[name] for t in turns if t.get(name) is not None])["median"] for name, _ in STAGES}
    out["prefill_tokens_at_end_median"] = stats([t["prefill_tokens_at_end"] for t in turns
                                                 if t.get("prefill_tokens_at_end") is not None])["median"]
    return out


def compare(assistant: Assistant, users: dict[str, np.ndarray], rounds: int, max_new_tokens: int,
            seed: int) -> dict:
    """Serial against streaming on every conversation, alternating; the summary and every turn's breakdown."""
    converse(assistant, next(iter(users.values()))[: RATE * 4], True, 8, seed)  # warm-up: first calls allocate
    turns: dict[str, list[dict]] = {"serial": [], "streaming": []}
    per_conversation: dict[str, dict[str, list[dict]]] = {}
    for _ in range(rounds):
        for name, user in users.items():
            for path in ("serial", "streaming"):  # alternating, so that load drift hits both alike
                rows = converse(assistant, user, path == "streaming", max_new_tokens, seed)
                per_conversation.setdefault(name, {}).setdefault(path, []).extend(rows)
                turns[path].extend(r for r in rows if "speculation" not in r)
    serial, streaming = summarize(turns["serial"]), summarize(turns["streaming"])
    s_med = serial["end_of_voice_to_first_sample_s"]["median"]
    t_med = streaming["end_of_voice_to_first_sample_s"]["median"]
    return {
        "lm_params_m": round(sum(p.numel() for p in assistant.lm.model.parameters()) / 1e6, 1),
        "input": "espeak-ng conversations fed at real-time pace (RealClock), webrtcvad, default VAD settings",
        "max_new_tokens": max_new_tokens,
        "serial": serial,
        "streaming": streaming,
        "streaming_over_serial_median": None if not s_med or t_med is None else round(t_med / s_med, 3),
        "turns": per_conversation,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1, help="times each conversation runs per path")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny random models (the engine's own overheads)")
    ap.add_argument("--speech-dir", type=Path, default=None,
                    help="read the conversations' speech from here (rendering what is missing with espeak-ng)")
    ap.add_argument("--render-only", action="store_true", help="render the speech into --speech-dir and stop")
    args = ap.parse_args()
    if args.render_only:
        if args.speech_dir is None:
            raise SystemExit("error: --render-only needs --speech-dir")
        with tempfile.TemporaryDirectory() as scratch:
            users = conversations(Path(scratch), args.speech_dir)
        print(f"{len(list(args.speech_dir.glob('*.npy')))} speech pieces in {args.speech_dir} "
              f"({sum(len(u) for u in users.values()) / RATE:.0f} s of conversation)")
        return
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        # built on a thread that ends, as the CLI loads: the engine's model thread holds the only OpenMP pool
        assistant = on_passing_thread(lambda: build(Path(scratch), args.seed, args.quick))
        users = conversations(Path(scratch), args.speech_dir)
        build_s = time.perf_counter() - start
        measured = compare(assistant, users, args.rounds, args.max_new_tokens, args.seed)
    result = {
        "benchmark": "latency",
        "models": "tiny random set (--quick)" if args.quick else
                  "random weights: real-size tokenizer and decoder, scaled LM of benchmarks/lm.py",
        **measured,
        "build_s": round(build_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        **envelope(load_before),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
