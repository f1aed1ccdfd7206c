"""Damaged decoder config.yaml files: one-line errors naming the file and the key, nothing allocated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from glmvoice_cli.decoder.config import decoder_config_from_data, parse_hyperpyyaml
from glmvoice_cli.decoder.config_checks import check_decoder_config
from glmvoice_cli.errors import CheckpointError
from glmvoice_cli.tiny.decoder import TinyDecoderSpec, decoder_yaml

WHERE = Path("decoder/config.yaml")


def _check(text: str) -> None:
    check_decoder_config(decoder_config_from_data(parse_hyperpyyaml(text, WHERE), WHERE), WHERE)


def _edit(key: str, value: str) -> str:
    """The tiny config with the last line `key: ...` (the flow and hift sections come last) given a new value."""
    lines = decoder_yaml(TinyDecoderSpec()).splitlines()
    hits = [i for i, line in enumerate(lines) if re.match(rf"\s*{key}:", line)]
    i = hits[-1]
    lines[i] = lines[i].split(":")[0] + ": " + value
    return "\n".join(lines) + "\n"


def test_the_tiny_config_passes() -> None:
    _check(decoder_yaml(TinyDecoderSpec()))


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("attention_heads", "0", "attention_heads"),
        ("attention_heads", "3", "attention_heads"),
        ("hop_len", "0", "hop_len"),
        ("n_fft", "-16", "n_fft"),
        ("channels", "[]", "channels"),
        ("channels", "[-32, 32]", "channels"),
        ("channels", "32", "channels"),
        ("num_blocks", ".inf", "num_blocks"),
        ("num_blocks", "many", "num_blocks"),
        ("upsample_rates", "[8]", "upsample_kernel_sizes"),
        ("upsample_rates", "[1000, 8]", "upsample_kernel_sizes"),
        ("input_frame_rate", ".nan", "input_frame_rate"),
        ("vocab_size", "2001-13-45", "bad timestamp value '2001-13-45'.*line 62"),
        ("vocab_size", "!!int 1.5", "bad int value '1.5'.*line 62"),
        ("vocab_size", "[1, [2, [3]]]", "vocab_size"),
        ("base_channels", "33", "base_channels"),
        ("input_layer", "conv2d", r"unsupported config\.flow\.encoder\.input_layer: 'conv2d'"),
        ("t_scheduler", "cubic", r"cfm_params\.t_scheduler: 'cubic'"),
        ("use_cnn_module", "true", "use_cnn_module"),
        ("nsf_alpha", "true", "nsf_alpha"),  # a flag is no number
        ("vocab_size", "true", "vocab_size"),
        ("n_blocks", "-1", "n_blocks"),
        ("audio_limit", "0", "audio_limit"),
    ],
)
def test_a_bad_value_names_file_and_key(key: str, value: str, named: str) -> None:
    with pytest.raises(CheckpointError, match=named) as info:
        _check(_edit(key, value))
    assert str(info.value).startswith(str(WHERE)) and "\n" not in str(info.value)


def test_sizes_beyond_the_machine_are_refused_before_allocating() -> None:
    text = _edit("upsample_rates", "[100000000, 8]")
    text = text.replace("upsample_kernel_sizes: [16, 16]", "upsample_kernel_sizes: [100000000, 16]")
    with pytest.raises(CheckpointError, match=r"would need about .* GiB"):
        _check(text)
    with pytest.raises(CheckpointError, match="flow"):
        _check(_edit("num_blocks", "1000000000"))


def test_more_layers_than_the_weight_file_holds(tmp_path: Path) -> None:
    (tmp_path / "flow.pt").write_bytes(b"PK" + bytes(1000))
    where = tmp_path / "config.yaml"
    cfg = decoder_config_from_data(parse_hyperpyyaml(_edit("num_blocks", "100000"), where), where)
    with pytest.raises(CheckpointError, match=r"more than flow.pt"):
        check_decoder_config(cfg, where)


def test_billion_laughs_and_deep_nesting_are_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(CheckpointError, match="aliases"):
        parse_hyperpyyaml("\n".join(lines), WHERE)
    few = "\n".join(lines[:9])  # 80 aliases, but 10^8 values once expanded
    with pytest.raises(CheckpointError, match="expands to more than"):
        parse_hyperpyyaml(few, WHERE)
    with pytest.raises(CheckpointError, match="nested deeper"):
        parse_hyperpyyaml("a: " + "[" * 10_000 + "]" * 10_000, WHERE)
