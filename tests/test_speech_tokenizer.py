"""The speech tokenizer on tiny random checkpoints: loading rules, windows, batching, features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from glmvoice_cli.errors import CheckpointMismatchError, ModelNotFoundError
from glmvoice_cli.tiny.tokenizer import TinyTokenizerSpec, write_tiny_tokenizer
from glmvoice_cli.tokenizer.features import FeatureConfig, LogMel
from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer

RATE = 16_000
SAMPLES_PER_TOKEN = 1280  # 8 mel frames of 160 samples


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), TinyTokenizerSpec(seed=3))


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> SpeechTokenizer:
    return SpeechTokenizer.from_pretrained(tiny_dir, device="cpu")


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = np.sin(2 * np.pi * (150 + 80 * np.sin(2 * np.pi * 0.5 * t)) * t)
    return (0.4 * tone * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)).astype(
        np.float32)


@pytest.mark.parametrize("seconds", [0.05, 1.0, 1.3, 29.99, 30.0, 31.0, 61.5])
def test_token_count_is_ceil_per_30s_window(tok: SpeechTokenizer, seconds: float) -> None:
    audio = speechlike(seconds)
    n = len(audio)
    windows = [min(30 * RATE, n - s) for s in range(0, n, 30 * RATE)]
    ids = tok.encode([audio])[0]
    assert len(ids) == sum(math.ceil(w / SAMPLES_PER_TOKEN) for w in windows)
    assert all(0 <= i < 64 for i in ids)


def test_tokens_follow_the_audio(tok: SpeechTokenizer) -> None:
    a, b = tok.encode([speechlike(3, seed=1), np.zeros(3 * RATE, np.float32)])
    assert len(set(a)) > 3, "a varied signal should give varied tokens"
    assert a != b


def test_micro_batch_size_does_not_change_results(tiny_dir: Path) -> None:
    audios = [speechlike(s, seed=i) for i, s in enumerate([1.0, 31.0, 2.5, 65.0])]
    results = [SpeechTokenizer.from_pretrained(tiny_dir, micro_batch=m).encode(audios) for m in (1, 3, 16)]
    assert results[0] == results[1] == results[2]


def test_full_windows_do_not_depend_on_batch_mates(tok: SpeechTokenizer) -> None:
    full = speechlike(30.0, seed=5)
    alone = tok.encode([full])[0]
    together = tok.encode([speechlike(4.0, seed=6), full])[1]
    assert alone == together


def test_empty_input_list_and_empty_signal(tok: SpeechTokenizer) -> None:
    assert tok.encode([]) == []
    assert tok.encode([np.zeros(0, np.float32)]) == [[]]


def test_features_match_transformers_whisper_extractor() -> None:
    from transformers import WhisperFeatureExtractor

    audio = speechlike(2.56, seed=9)  # a multiple of 1280 samples: no padding on either side
    ours = LogMel(FeatureConfig())(torch.from_numpy(audio)[None])
    theirs = WhisperFeatureExtractor(feature_size=128)(
        audio, sampling_rate=RATE, padding="longest", return_tensors="pt", device="cpu").input_features
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)


def test_bfloat16_runs_and_mostly_agrees(tiny_dir: Path, tok: SpeechTokenizer) -> None:
    audio = speechlike(5.0, seed=2)
    ref = tok.encode([audio])[0]
    half = SpeechTokenizer.from_pretrained(tiny_dir, dtype="bf16").encode([audio])[0]
    assert len(half) == len(ref)
    assert np.mean(np.array(half) == np.array(ref)) > 0.5


# --- loading rules -----------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    dst.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (dst / name).write_text((src / name).read_text())
    save_file(state if state is not None else load_file(src / "model.safetensors"), str(dst / "model.safetensors"))
    return dst


def test_missing_folder_and_files(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="folder not found"):
        SpeechTokenizer.from_pretrained(tmp_path / "nope")
    folder = copy_checkpoint(tiny_dir, tmp_path / "t")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"preprocessor_config.json"):
        SpeechTokenizer.from_pretrained(folder)


def test_missing_key_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    state = load_file(tiny_dir / "model.safetensors")
    del state["layers.1.fc2.bias"]
    folder = copy_checkpoint(tiny_dir, tmp_path / "t", state)
    with pytest.raises(CheckpointMismatchError, match=r"model\.safetensors.*layers\.1\.fc2\.bias"):
        SpeechTokenizer.from_pretrained(folder)


def test_wrong_shape_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    state = load_file(tiny_dir / "model.safetensors")
    state["codebook.weight"] = torch.zeros(10, 32)
    folder = copy_checkpoint(tiny_dir, tmp_path / "t", state)
    with pytest.raises(CheckpointMismatchError, match=r"codebook\.weight.*\[10, 32\]"):
        SpeechTokenizer.from_pretrained(folder)


def test_unexpected_key_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    state = load_file(tiny_dir / "model.safetensors")
    state["decoder.surprise"] = torch.zeros(2)
    folder = copy_checkpoint(tiny_dir, tmp_path / "t", state)
    with pytest.raises(CheckpointMismatchError, match=r"decoder.surprise"):
        SpeechTokenizer.from_pretrained(folder)


def test_prefixed_training_layout_and_extra_layers_load(tiny_dir: Path, tmp_path: Path, tok: SpeechTokenizer) -> None:
    state = {f"model.encoder.{k}": v for k, v in load_file(tiny_dir / "model.safetensors").items()}
    state["model.encoder.layers.2.fc1.weight"] = torch.zeros(3)  # a layer past the quantizer: ignored
    state["model.encoder.layer_norm.weight"] = torch.zeros(3)  # the final norm is never used
    folder = copy_checkpoint(tiny_dir, tmp_path / "t", state)
    audio = speechlike(2.0)
    assert SpeechTokenizer.from_pretrained(folder).encode([audio]) == tok.encode([audio])


def test_corrupt_weights_and_config(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_dir, tmp_path / "t")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointMismatchError, match=r"model.safetensors"):
        SpeechTokenizer.from_pretrained(folder)
    folder = copy_checkpoint(tiny_dir, tmp_path / "u")
    (folder / "config.json").write_text("{broken")
    with pytest.raises(CheckpointMismatchError, match=r"config.json"):
        SpeechTokenizer.from_pretrained(folder)


def test_mel_bins_must_agree(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_dir, tmp_path / "t")
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["feature_size"] = 80
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointMismatchError, match="feature_size"):
        SpeechTokenizer.from_pretrained(folder)
