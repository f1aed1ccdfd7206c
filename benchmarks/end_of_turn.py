"""When does a turn end? Silence-only waits against the smart detector, on the labelled set (benchmarks/turns).

For each policy, every item of the set is pushed through the chat's own segmenter (webrtcvad by default,
`--vad silero` for Silero) frame by frame, as the microphone would push it, and the moment its first turn
ends is read off the input timeline:

- false cut-off: the turn ended while the person was not done (an incomplete item answered before the rest
  began; a complete item answered before its last word, at a comma);
- confirm latency: for complete items, end of voice -> turn confirmed, in ms of audio, plus (smart) the
  detector's own measured time for the decision that ended it (it runs while the audio goes on);
- detector time: wall and CPU milliseconds per decision (features + model), one thread.

Policies: silence at 400/700/1000 ms, and the smart detector at each threshold given (the pause it judges at
is the speculative pause, 200 ms; a turn it judges unfinished ends after `--max-pause-ms` of silence).
A decision's probability depends only on the audio up to its pause, so each is computed once and shared by
every threshold. JSON to stdout and `--out`.

    python benchmarks/end_of_turn.py --out benchmarks/results/end-of-turn-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "turns"))

from results_io import emit

from glmvoice_cli.audio.end_of_turn import (
    Decision,
    Judgement,
    TurnEndConfig,
    TurnJudge,
    judge,
    judge_offline,
    turn_vad,
)
from glmvoice_cli.audio.vad import Segmenter, SegmentEvent, Utterance, VadConfig
from glmvoice_cli.config import SPECULATIVE_PAUSE_MS

SILENCES_MS = (400, 700, 1000)
MS = 1000


def load_set(folder: Path) -> list[dict]:
    import soundfile as sf

    if not (folder / "manifest.json").is_file():
        import make_turns

        make_turns.render(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    items = manifest["items"]
    for item in items:
        item["audio"], _ = sf.read(folder / item["file"], dtype="float32")
    return items


class CachedJudge:
    """The detector, each pause of each item decided once (the thresholds share the decisions), the measured
    times kept with it. A pause is known by its item and the length of the turn heard up to it."""

    def __init__(self, detector: TurnJudge) -> None:
        self.detector = detector
        self.item = ""  # the item being pushed
        self.seen: dict[tuple[str, int], Judgement] = {}

    def __call__(self, samples: np.ndarray) -> Judgement:
        key = (self.item, len(samples))
        if key not in self.seen:
            self.seen[key] = judge(self.detector, samples)
        return self.seen[key]


def first_turn(item: dict, vad: VadConfig, turn_end: TurnEndConfig, detector: CachedJudge | None
               ) -> Iterator[tuple[int, SegmentEvent | Decision]]:
    """The chat's segmenter and policy over the item, up to the end of its first turn."""
    smart = turn_end.smart and detector is not None
    segmenter = Segmenter(turn_vad(vad, turn_end), pause_ms=SPECULATIVE_PAUSE_MS if smart else None)
    if detector is not None:
        detector.item = item["file"]
    for at, event in judge_offline(segmenter, turn_end, detector if smart else None, item["audio"]):
        yield at, event
        if (isinstance(event, Decision) and event.ended) or (isinstance(event, Utterance) and not event.truncated):
            return


def first_turn_end(item: dict, vad: VadConfig, turn_end: TurnEndConfig, detector: CachedJudge | None
                   ) -> tuple[int | None, float, bool]:
    """(input sample at which the first turn ended or None, the deciding detector's seconds, ended by it)."""
    for at, event in first_turn(item, vad, turn_end, detector):
        if isinstance(event, Decision) and event.ended:
            return at, event.judgement.seconds, True
        if isinstance(event, Utterance) and not event.truncated:
            return at, 0.0, False
    return None, 0.0, False


def score(items: list[dict], vad: VadConfig, turn_end: TurnEndConfig, detector: CachedJudge | None) -> dict:
    rate = vad.sample_rate
    cut, cut_complete, latencies, by_detector, never = 0, 0, [], 0, 0
    by_pause: dict[int, list[int]] = {}
    by_snr: dict[str, list[int]] = {}
    by_lang: dict[str, list[int]] = {}
    for item in items:
        end, seconds, judged = first_turn_end(item, vad, turn_end, detector)
        if end is None:
            never += 1
            continue
        if item["label"] == "incomplete":
            early = end < item["resumes_at"]
            cut += early
            by_pause.setdefault(item["pause_ms"], []).append(int(early))
            by_snr.setdefault(str(item["snr_db"]), []).append(int(early))
            by_lang.setdefault(item["lang"], []).append(int(early))
        elif end < item["voice_end"]:
            cut_complete += 1
        else:
            latencies.append((end - item["voice_end"]) / rate * MS + seconds * MS)
            by_detector += judged
    incomplete = sum(1 for i in items if i["label"] == "incomplete")
    complete = len(items) - incomplete

    def rates(groups: dict) -> dict:
        return {str(k): round(sum(v) / len(v), 3) for k, v in sorted(groups.items())}

    return {
        "false_cutoffs": cut, "false_cutoff_rate": round(cut / incomplete, 3),
        "complete_cut_before_last_word": cut_complete,
        "false_cutoff_rate_by_pause_ms": rates(by_pause), "false_cutoff_rate_by_snr_db": rates(by_snr),
        "false_cutoff_rate_by_lang": rates(by_lang),
        "confirm_ms_median": round(statistics.median(latencies), 1) if latencies else None,
        "confirm_ms_p90": round(float(np.percentile(latencies, 90)), 1) if latencies else None,
        "complete_ended_by_detector": by_detector, "complete_items": complete, "never_ended": never,
    }


def separation(items: list[dict], vad: VadConfig, detector: CachedJudge) -> dict:
    """How well the probability alone tells the two kinds of pause apart: the first decision after a complete
    item's last word against the first one inside an incomplete item's pause (AUC 0.5: chance, 1: perfect)."""
    never_ends = TurnEndConfig("smart", 1.0, TurnEndConfig().max_pause_ms)  # every pause of the turn judged
    complete, incomplete = [], []
    for item in items:
        judged = [(e.request.at_sample, e.judgement.probability)
                  for _, e in first_turn(item, vad, never_ends, detector) if isinstance(e, Decision)]
        if item["label"] == "complete":
            found = [p for at, p in judged if at >= item["voice_end"]]
            complete.extend(found[:1])
        else:
            found = [p for at, p in judged if item["voice_end"] <= at < item["resumes_at"]]
            incomplete.extend(found[:1])
    c, i = np.array(complete)[:, None], np.array(incomplete)[None, :]
    auc = float(np.mean((c > i) + 0.5 * (c == i))) if c.size and i.size else None
    return {"auc": None if auc is None else round(auc, 3),
            "median_probability_complete": round(float(np.median(complete)), 3) if complete else None,
            "median_probability_incomplete_pause": round(float(np.median(incomplete)), 3) if incomplete else None,
            "complete_judged": len(complete), "incomplete_pauses_judged": len(incomplete)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=Path, default=Path(__file__).parent / "turns" / "audio")
    parser.add_argument("--model", type=Path, default=None, help="Smart Turn ONNX file (default: as the chat finds it)")
    parser.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--max-pause-ms", type=int, default=TurnEndConfig().max_pause_ms)
    parser.add_argument("--vad", default="webrtc", choices=("webrtc", "silero"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from glmvoice_cli.audio.end_of_turn import SmartTurn
    from glmvoice_cli.models.settings import turn_model_path

    torch.set_num_threads(1)
    items = load_set(args.set)
    model = args.model or turn_model_path()
    if model is None:
        raise SystemExit("no Smart Turn model: glmvoice models download turn (or pip install pipecat-ai)")
    detector = CachedJudge(SmartTurn(model))
    vad = VadConfig(engine=args.vad)
    policies: dict[str, dict] = {}
    for silence in SILENCES_MS:
        policies[f"silence {silence} ms"] = score(items, VadConfig(engine=args.vad, hangover_ms=silence),
                                                  TurnEndConfig(), None)
    for threshold in (float(t) for t in args.thresholds.split(",")):
        config = TurnEndConfig("smart", threshold, args.max_pause_ms)
        policies[f"smart {threshold}"] = score(items, vad, config, detector)
    sep = separation(items, vad, detector)
    seconds = [j.seconds for j in detector.seen.values()]
    emit({
        "benchmark": "end_of_turn", "machine": platform.processor() or platform.machine(), "vad": args.vad,
        "items": len(items), "model": model.name, "speculative_pause_ms": SPECULATIVE_PAUSE_MS,
        "max_pause_ms": args.max_pause_ms,
        "detector_ms_per_decision": {"median": round(statistics.median(seconds) * MS, 1),
                                     "p90": round(float(np.percentile(seconds, 90)) * MS, 1),
                                     "cpu_median": round(statistics.median(j.cpu_seconds for j in detector.seen.values()) * MS, 1),
                                     "decisions": len(seconds), "threads": 1},
        "separation": sep,
        "policies": policies,
    }, args.out)


if __name__ == "__main__":
    main()
