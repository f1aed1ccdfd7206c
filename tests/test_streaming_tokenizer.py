"""Streaming tokenization gives exactly the ids of the whole utterance passed alone to SpeechTokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.tiny.tokenizer import TinyTokenizerSpec, write_tiny_tokenizer
from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
from glmvoice_cli.tokenizer.streaming import StreamingTokenizer

RATE = 16_000
SPLIT_SEEDS = (0, 1, 2)  # random capture-block splits tried per signal


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> SpeechTokenizer:
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), TinyTokenizerSpec(seed=3))
    return SpeechTokenizer.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def small_blocks(tmp_path_factory: pytest.TempPathFactory) -> SpeechTokenizer:
    """Blocks of 20 positions (0.4 s) and pooling before the last layer: many blocks, the general layer path."""
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("tok_small"), TinyTokenizerSpec(seed=5))
    config = json.loads((folder / "config.json").read_text())
    config.update(quantize_causal_block_size=20, pooling_position=1)
    (folder / "config.json").write_text(json.dumps(config))
    return SpeechTokenizer.from_pretrained(folder, device="cpu")


def speechlike(seconds: float, seed: int = 0, loud_at: float | None = None) -> np.ndarray:
    """A gliding voiced tone with a syllable rhythm; `loud_at` (fraction) adds a burst 20 dB louder there."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    tone = np.sin(2 * np.pi * (150 + 80 * np.sin(2 * np.pi * 0.5 * t)) * t)
    audio = 0.05 * tone * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.002 * rng.standard_normal(t.size)
    if loud_at is not None:
        start = int(loud_at * t.size)
        audio[start : start + RATE // 10] *= 10.0
    return audio.astype(np.float32)


def stream(tok: SpeechTokenizer, audio: np.ndarray, seed: int, max_block: int = 6000) -> StreamingTokenizer:
    """Push `audio` in random capture blocks (1 sample up to max_block)."""
    rng = np.random.default_rng(seed)
    st = StreamingTokenizer(tok)
    pos = 0
    while pos < len(audio):
        n = int(rng.integers(1, max_block))
        st.push(audio[pos : pos + n])
        pos += n
    return st


def block_samples(tok: SpeechTokenizer) -> int:
    return tok.model.cfg.quantize_causal_block_size * 2 * tok.feature_config.hop_length


@pytest.mark.parametrize("seed", SPLIT_SEEDS)
def test_random_splits_match_whole_utterance(tok: SpeechTokenizer, seed: int) -> None:
    audio = speechlike(9.7, seed, loud_at=0.8)
    st = stream(tok, audio, seed)
    assert st.stats.blocks_encoded >= 2  # blocks were encoded while "speaking"
    assert st.finish() == tok.encode([audio])[0]


@pytest.mark.parametrize("seed", SPLIT_SEEDS)
def test_small_blocks_and_pooling_before_the_last_layer(small_blocks: SpeechTokenizer, seed: int) -> None:
    audio = speechlike(3.3, seed, loud_at=0.6)
    st = stream(small_blocks, audio, seed, max_block=2000)
    assert st.stats.blocks_encoded >= 5
    assert st.finish() == small_blocks.encode([audio])[0]


def test_shorter_than_one_block_and_exactly_one_block(tok: SpeechTokenizer) -> None:
    one = block_samples(tok)
    for n in (1, 100, 1280, one // 3, one - 1, one, one + 1):
        audio = speechlike(n / RATE, n)
        st = stream(tok, audio, n)
        assert st.finish() == tok.encode([audio])[0], n
    assert StreamingTokenizer(tok).finish() == []


def test_across_the_30s_window_boundary(tok: SpeechTokenizer) -> None:
    window = tok.feature_config.samples_per_window
    for extra in (0, block_samples(tok) + 333):
        audio = speechlike((window + extra) / RATE, extra, loud_at=0.97)
        st = stream(tok, audio, extra, max_block=40_000)
        assert st.finish() == tok.encode([audio])[0], extra


def test_a_louder_sound_later_reencodes_the_blocks_its_clamp_changes(tok: SpeechTokenizer) -> None:
    quiet = speechlike(9.0, 7)
    quiet[:RATE] *= 1e-4  # very quiet start: the later floor (max - 8 decades) will lift it
    loud = speechlike(4.5, 8) * 20  # completes a block while streaming
    audio = np.concatenate([quiet, loud])
    st = stream(tok, audio, 7)
    assert st.stats.blocks_redone >= 1
    assert st.finish() == tok.encode([audio])[0]


def test_a_loud_sound_in_the_last_partial_block_is_recomputed_before_the_end_of_turn(tok: SpeechTokenizer) -> None:
    """Digital silence first (its frames sit at the clamp), the loudest sound in the last partial block, then the
    end-of-turn silence: the blocks the louder clamp changes are redone while the silence is still arriving, so
    the end of the turn encodes the partial block only, and the ids are still the whole utterance's."""
    block = block_samples(tok)
    speech = speechlike(block / RATE + 1.0, 17)
    speech[-RATE // 2 : -RATE // 4] *= 10.0  # the loudest moment: after the last complete block
    silence = np.zeros(int(0.7 * RATE), dtype=np.float32)  # the end-of-turn silence
    audio = np.concatenate([np.zeros(RATE // 4, dtype=np.float32), speech, silence])
    st = StreamingTokenizer(tok)
    for start in range(0, len(audio), 480):  # 30 ms capture blocks, as the chat pushes them
        st.push(audio[start : start + 480])
    assert st.stats.blocks_redone >= 1  # the first block was redone while the turn went on
    assert st.finish() == tok.encode([audio])[0]
    assert st.stats.last_span_frames < block // tok.feature_config.hop_length  # less than one block


def test_finish_of_a_shorter_utterance_and_going_on_after_a_finish(tok: SpeechTokenizer) -> None:
    audio = speechlike(12.0, 11, loud_at=0.9)
    st = StreamingTokenizer(tok)
    st.push(audio[: 8 * RATE + 123])
    n = 5 * RATE + 77  # the turn ended before the trailing audio already pushed
    assert st.finish(n) == tok.encode([audio[:n]])[0]
    st.push(audio[8 * RATE + 123 :])  # the user went on: the stored blocks still serve
    assert st.finish() == tok.encode([audio])[0]


def test_near_ties_fall_back_to_the_whole_utterance(tok: SpeechTokenizer) -> None:
    audio = speechlike(6.0, 13)
    st = StreamingTokenizer(tok, tie_margin=1e9)  # every id counts as a near tie
    st.push(audio)
    assert st.finish() == tok.encode([audio])[0]
    assert st.stats.fallbacks == 1


def test_only_the_last_partial_block_is_left_at_the_end(tok: SpeechTokenizer) -> None:
    audio = speechlike(10.0, 17)
    st = stream(tok, audio, 17)
    st.finish()
    frames_per_block = tok.model.cfg.quantize_causal_block_size * 2
    assert 0 < st.stats.last_span_frames <= frames_per_block + frames_per_block // 2


def test_real_speech(tok: SpeechTokenizer, tmp_path: Path) -> None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed")
    text = "Tell me about the weather tomorrow, and whether I should take an umbrella to work in the morning."
    subprocess.run([exe, "-w", str(tmp_path / "s.wav"), text], check=True, timeout=60)
    audio = load_audio(tmp_path / "s.wav", RATE).samples
    for seed in SPLIT_SEEDS:
        assert stream(tok, audio, seed, max_block=960).finish() == tok.encode([audio])[0]


@pytest.mark.golden
def test_golden_checkpoint_and_inputs(golden: Path) -> None:
    tokenizer = SpeechTokenizer.from_pretrained(golden / "tokenizer", device="cpu")
    expected = json.loads((golden / "tokenizer_fixtures" / "tokens.json").read_text())
    for name in expected["input_order"]:
        audio = load_audio(golden / "tokenizer_fixtures" / "inputs" / f"{name}.wav").samples
        for seed in SPLIT_SEEDS[:2]:
            st = stream(tokenizer, audio, seed, max_block=20_000)
            assert st.finish() == expected["per_utterance"][name], (name, seed)
