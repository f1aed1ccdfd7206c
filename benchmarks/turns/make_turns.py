"""The labelled end-of-turn set: espeak-ng speech that ends complete, or is cut off mid-phrase and goes on.

Every phrase below has three parts: a complete question or request, a cut-off start of one (it ends where a
speaker would still be mid-phrase: "... like in"), and the rest that a person would say after a pause. Each
phrase is rendered in `VARIANTS` draws of voice, speaking rate, pause and noise level, chosen by a seeded
generator (not picked by hand):

- `complete`: leading silence, the complete sentence, then `TAIL_S` of silence (the turn is over);
- `incomplete`: leading silence, the cut-off start, a pause of 200-1500 ms, then the rest: one sentence
  spoken with an SSML break in it, so the start keeps the mid-sentence intonation a person pausing has
  (rendered alone, espeak-ng would end it with a sentence's final fall).

Noise (white, at the drawn SNR against the speech's RMS) covers the whole item, silences included. Written
as 16 kHz mono WAV files plus `manifest.json` (labels, where the voice ends, where the rest begins) into the
folder given; `benchmarks/end_of_turn.py` renders the set itself when its folder is empty. espeak-ng is not
a human voice: see the README for what this set can and cannot show.

    python benchmarks/turns/make_turns.py --out benchmarks/turns/audio
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

RATE = 16_000  # Hz
LEAD_S = 0.5  # silence before the speech
TAIL_S = 2.5  # silence after a complete turn (longer than every policy's wait)
VARIANTS = 6  # draws per phrase
PAUSES_MS = (200, 300, 500, 700, 1000, 1500)  # the pause after a cut-off start
SNR_DB = (None, 30.0, 20.0, 10.0)  # None: clean
RATES_WPM = (140, 175, 210)  # espeak-ng -s
VOICES = {"en": ("en-us", "en-gb", "en-us+f3", "en-gb+m3"), "zh": ("cmn", "cmn+f3")}
VOICE_FLOOR = 0.01  # |sample| above this is voice (espeak renders true silence between phrases)
SEED = 20261207

# (complete, cut-off start, the rest after the pause)
PHRASES = {
    "en": [
        ("What is the weather like today?", "What is the weather like in", "Paris tomorrow morning?"),
        ("Can you set a timer for ten minutes?", "Can you set a timer for", "the pasta, about ten minutes?"),
        ("Tell me a joke about cats.", "Tell me a joke about", "cats and dogs."),
        ("How far is the moon from the earth?", "How far is the moon from", "the earth in kilometres?"),
        ("Please play some relaxing music.", "Please play some music by", "a jazz pianist."),
        ("What time does the train leave?", "What time does the train to", "London leave tonight?"),
        ("I would like to book a table for two.", "I would like to book a table for", "four people on Friday."),
        ("Remind me to call my mother tomorrow.", "Remind me to call my", "mother tomorrow at noon."),
        ("How do I make a cup of green tea?", "How do I make a cup of", "green tea without a kettle?"),
        ("Translate good morning into French.", "Translate good morning into", "French and Spanish."),
        ("What is the capital of Australia?", "What is the capital of", "Australia, by the way?"),
        ("Turn off the lights in the kitchen.", "Turn off the lights in the", "kitchen and the hall."),
        ("Who wrote the book Pride and Prejudice?", "Who wrote the book that", "I was reading last week?"),
        ("Explain how a rainbow forms.", "Explain how a rainbow forms when", "the sun comes out after rain."),
        ("Give me three ideas for dinner tonight.", "Give me three ideas for", "a quick dinner tonight."),
        ("Thank you, that was very helpful.", "Thank you, that was very helpful, but", "can you say it more slowly?"),
        ("Is it going to rain this weekend?", "Is it going to rain this weekend in", "the mountains?"),
        ("Send a message to Anna saying I am late.", "Send a message to Anna saying that", "I will be ten minutes late."),
        ("What does the word serendipity mean?", "What does the word serendipity mean and", "where does it come from?"),
        ("Add milk and eggs to my shopping list.", "Add milk and eggs to my", "shopping list for Saturday."),
    ],
    "zh": [
        ("今天天气怎么样？", "今天的天气在", "北京怎么样？"),
        ("帮我定一个十分钟的闹钟。", "帮我定一个", "十分钟的闹钟。"),
        ("给我讲一个笑话吧。", "给我讲一个关于", "小猫的笑话吧。"),
        ("附近有什么好吃的餐厅？", "附近有什么好吃的", "四川餐厅吗？"),
        ("请播放一些轻松的音乐。", "请播放一些", "轻松的钢琴音乐。"),
        ("明天早上几点的火车？", "明天早上去上海的", "火车是几点的？"),
        ("把客厅的灯关掉。", "把客厅的灯和", "厨房的灯都关掉。"),
        ("月亮离地球有多远？", "月亮离地球有多远，还有", "太阳离地球多远？"),
        ("提醒我明天给妈妈打电话。", "提醒我明天给", "妈妈打个电话。"),
        ("怎么泡一杯绿茶？", "怎么用冷水泡", "一杯好喝的绿茶？"),
        ("谢谢你，这很有帮助。", "谢谢你，不过我还想知道", "怎么去机场。"),
        ("周末会下雨吗？", "这个周末在山里", "会不会下雨？"),
    ],
}


def speak(text: str, voice: str, wpm: int, work: Path, ssml: bool = False) -> np.ndarray:
    """espeak-ng's rendering of `text`, resampled to 16 kHz float32, its silent ends trimmed."""
    import soundfile as sf
    import soxr

    wav = work / "say.wav"
    subprocess.run(["espeak-ng", *(["-m"] if ssml else []), "-v", voice, "-s", str(wpm), "-w", str(wav), text],
                   check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32")
    audio = soxr.resample(audio, rate, RATE).astype(np.float32)
    voiced = np.flatnonzero(np.abs(audio) > VOICE_FLOOR)
    return audio[voiced[0] : voiced[-1] + 1] if len(voiced) else audio


def longest_gap(audio: np.ndarray) -> tuple[int, int]:
    """[start, end) of the longest silent stretch inside `audio` (the SSML break)."""
    voiced = np.flatnonzero(np.abs(audio) > VOICE_FLOOR)
    k = int(np.argmax(np.diff(voiced)))
    return int(voiced[k]) + 1, int(voiced[k + 1])


def add_noise(audio: np.ndarray, speech: np.ndarray, snr_db: float | None, rng: np.random.Generator) -> np.ndarray:
    if snr_db is None:
        return audio
    rms = float(np.sqrt(np.mean(np.square(speech))))
    noise = rng.standard_normal(len(audio)).astype(np.float32) * rms / 10 ** (snr_db / 20)
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def render(out: Path) -> list[dict]:
    """Write the set into `out` (replacing what is there); its manifest rows."""
    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng)")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    rows: list[dict] = []
    lead = np.zeros(int(LEAD_S * RATE), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for lang, phrases in PHRASES.items():
            for p, (complete, start, rest) in enumerate(phrases):
                for v in range(VARIANTS):
                    voice = str(rng.choice(VOICES[lang]))
                    wpm = int(rng.choice(RATES_WPM))
                    pause_ms = int(rng.choice(PAUSES_MS))
                    snr = SNR_DB[int(rng.integers(len(SNR_DB)))]
                    whole = speak(complete, voice, wpm, work)
                    clean = np.concatenate([lead, whole, np.zeros(int(TAIL_S * RATE), np.float32)])
                    broken = speak(f"<speak>{start}<break time='{pause_ms}ms'/>{rest}</speak>", voice, wpm, work,
                                   ssml=True)
                    gap_start, gap_end = longest_gap(broken)
                    cut = np.concatenate([lead, broken, np.zeros(int(TAIL_S * RATE), np.float32)])
                    common = {"lang": lang, "phrase": p, "variant": v, "voice": voice, "wpm": wpm, "snr_db": snr}
                    for label, audio, speech, extra in (
                        ("complete", clean, whole, {"voice_end": len(lead) + len(whole)}),
                        ("incomplete", cut, broken, {"voice_end": len(lead) + gap_start, "pause_ms": pause_ms,
                                                     "gap_ms": round((gap_end - gap_start) / RATE * 1000),
                                                     "resumes_at": len(lead) + gap_end}),
                    ):
                        name = f"{lang}-{p:02d}-{v}-{label}.wav"
                        sf.write(out / name, add_noise(audio, speech, snr, rng), RATE, subtype="PCM_16")
                        rows.append({"file": name, "label": label, **common, **extra})
    (out / "manifest.json").write_text(json.dumps({"rate": RATE, "seed": SEED, "items": rows}, indent=1) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "audio")
    rows = render(parser.parse_args().out)
    print(f"{len(rows)} items")


if __name__ == "__main__":
    main()
