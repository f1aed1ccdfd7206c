"""The tokenizer's config.json: missing fields take WhisperVQConfig's defaults; bad fields are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmvoice_cli.errors import CheckpointMismatchError
from glmvoice_cli.tokenizer.whisper_vq import REFERENCE_DEFAULTS, TokenizerConfig, WhisperVQEncoder

REAL = {  # the fields of the real config.json that matter here
    "num_mel_bins": 128, "d_model": 1280, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
    "max_source_positions": 1500, "quantize_position": 16, "quantize_vocab_size": 16384,
    "quantize_causal_block_size": 200, "pooling_position": 16, "pooling_kernel_size": 4, "pooling_type": "avg",
    "encoder_causal_convolution": True, "encoder_causal_attention": False,
}  # fmt: skip


def _read(tmp_path: Path, fields: object) -> TokenizerConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields), encoding="utf-8")
    return TokenizerConfig.from_json(path)


def test_the_real_fields_are_read_as_is(tmp_path: Path) -> None:
    cfg = _read(tmp_path, REAL)
    assert cfg == TokenizerConfig()  # the dataclass defaults are the real model's values
    assert cfg.frames_per_token == 8


def test_missing_fields_take_the_reference_class_defaults(tmp_path: Path) -> None:
    cfg = _read(tmp_path, {"quantize_vocab_size": 64})
    for name, default in REFERENCE_DEFAULTS.items():
        assert getattr(cfg, name) == default, name
    assert (cfg.d_model, cfg.num_mel_bins, cfg.pooling_type) == (384, 80, "max")
    assert not cfg.pools and cfg.frames_per_token == 2  # no kernel: the reference does not pool (25 Hz)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"d_model": 0}, "d_model"),
        ({"encoder_attention_heads": -4}, "encoder_attention_heads"),
        ({"encoder_attention_heads": 7}, "encoder_attention_heads"),
        ({"num_mel_bins": "128"}, "num_mel_bins"),
        ({"max_source_positions": 1e400}, "max_source_positions"),
        ({"quantize_vocab_size": [1]}, "quantize_vocab_size"),
        ({"quantize_vocab_size": None}, "quantize_vocab_size"),
        ({"pooling_kernel_size": 0}, "pooling_kernel_size"),
        ({"pooling_position": 17}, "pooling_position"),
        ({"pooling_type": "median"}, "pooling_type"),
        ({"quantize_causal_block_size": 2.5}, "quantize_causal_block_size"),
        ({"encoder_causal_convolution": "yes"}, "encoder_causal_convolution"),
        ({"encoder_causal_attention": True}, "encoder_causal_attention"),
    ],
)
def test_a_bad_field_is_one_line_naming_file_and_field(tmp_path: Path, changes: dict, field: str) -> None:
    with pytest.raises(CheckpointMismatchError, match=field) as info:
        _read(tmp_path, {**REAL, **changes})
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["[1, 2]", "{", "[" * 100_000, "\udcff"])
def test_not_a_config_at_all(tmp_path: Path, content: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointMismatchError, match=r"config.json"):
        TokenizerConfig.from_json(path)


def _encoder(**changes: object) -> WhisperVQEncoder:
    cfg = TokenizerConfig(num_mel_bins=8, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32,
                          max_source_positions=64, quantize_position=2, quantize_vocab_size=8, **changes)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = WhisperVQEncoder(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_the_reference_variants_run() -> None:
    """No pooling, max pooling, centred convolutions and a plain padding mask: shapes as the reference's."""
    features, mask = torch.randn(1, 8, 48), torch.ones(1, 48)
    with torch.no_grad():
        ids, valid = _encoder(pooling_kernel_size=None, quantize_causal_block_size=None)(features, mask)
        assert ids.shape == valid.shape == (1, 24)
        ids, valid = _encoder(pooling_type="max", pooling_position=1, quantize_causal_block_size=None)(features, mask)
        assert ids.shape == (1, 6)
        ids, _ = _encoder(pooling_position=0)(features, mask)
        assert ids.shape == (1, 24)  # pooling_position 0: the reference never pools


def test_a_centred_convolution_sees_the_next_frame_and_a_causal_one_does_not() -> None:
    features = torch.randn(1, 8, 48)
    later = features.clone()
    later[..., 40:] += 5.0
    mask = torch.ones(1, 48)
    for causal, changed in ((True, False), (False, True)):
        model = _encoder(encoder_causal_convolution=causal, pooling_kernel_size=None, quantize_causal_block_size=1)
        with torch.no_grad():
            a, _ = model.encode(features, mask)
            b, _ = model.encode(later, mask)
        # position 19 covers mel frames 38-39 (+ frame 40 for a centred kernel); block 1 attends only backwards
        assert (not torch.allclose(a[0, 19], b[0, 19])) == changed
