"""Type, range and size checks of the decoder config, run when the folder is read.

`decoder.config` only checks that each field has the right type; here every field the flow model and
the vocoder use is checked for a sensible range and for consistency with the others (one-line errors
naming the file and the key), and the sizes are compared with the machine's memory and with the weight
files before a module is built: a hostile `upsample_rates: [100000000, 8]` or `num_blocks: 1000000`
is refused at once instead of exhausting memory or time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.errors import CheckpointError
from glmvoice_cli.memory import check_fits

if TYPE_CHECKING:
    from glmvoice_cli.decoder.config import DecoderConfig, EstimatorConfig, FlowConfig, HiFTConfig

FLOAT32_BYTES = 4
MIN_BYTES_PER_WEIGHT = 2  # a checkpoint stores at least half precision
PLANNED_MEL_FRAMES = 200  # about 2.3 s of mel: the vocoder's working set is estimated on a block this long
VOCODER_TEMPORARIES = 4  # activations alive at once per upsampling stage (input, resblock branches, sum)
T_SCHEDULERS = ("cosine", "linear")
MIN_RATE, MAX_RATE = 8_000, 192_000  # Hz: the official decoder speaks at 22,050


def check_decoder_config(cfg: DecoderConfig, where: Path) -> None:
    """Raise CheckpointError naming the file and key for the first field out of range or too big."""
    _check_flow(cfg.flow, where)
    _check_hift(cfg.hift, where)
    _positive(where, "config.sample_rate", cfg.sample_rate)
    for key, rate in (("config.sample_rate", cfg.sample_rate), ("hift.sampling_rate", cfg.hift.sampling_rate)):
        if not MIN_RATE <= rate <= MAX_RATE:  # audio files (and speakers) take no other rates
            raise _fail(where, key, rate, f"an audio rate in [{MIN_RATE}, {MAX_RATE}] Hz")
    _check_sizes(cfg, where)


def _fail(where: Path, key: str, value: object, want: str) -> CheckpointError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return CheckpointError(f"{where}: {key} must be {want}, got {shown}")


def _positive(where: Path, key: str, *values: float) -> None:
    for value in values:
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise _fail(where, key, value, "positive")


def _positive_list(where: Path, key: str, values: tuple, allow_empty: bool = False) -> None:
    if not values and not allow_empty:
        raise _fail(where, key, values, "a non-empty list")
    for value in values:
        if isinstance(value, tuple):
            _positive_list(where, key, value)
        elif not value > 0:
            raise _fail(where, key, values, "a list of positive integers")


def _check_flow(f: FlowConfig, where: Path) -> None:
    p = "config.flow"
    for name in ("vocab_size", "input_size", "output_size", "spk_embed_dim", "input_frame_rate",
                 "regulator_channels", "cfm_in_channels", "spk_emb_dim"):
        _positive(where, f"{p}.{name}", getattr(f, name))
    e = f.encoder
    for name in ("input_size", "output_size", "attention_heads", "linear_units", "num_blocks", "block_size"):
        _positive(where, f"{p}.encoder.{name}", getattr(e, name))
    if e.output_size % e.attention_heads:
        raise _fail(where, f"{p}.encoder.attention_heads", e.attention_heads, f"a divisor of output_size {e.output_size}")
    _positive_list(where, f"{p}.length_regulator.sampling_ratios", f.regulator_sampling_ratios, allow_empty=True)
    if not (math.isfinite(f.inference_cfg_rate) and f.inference_cfg_rate >= 0):
        raise _fail(where, f"{p}.decoder.cfm_params.inference_cfg_rate", f.inference_cfg_rate, "a number >= 0")
    if f.t_scheduler not in T_SCHEDULERS:
        raise _fail(where, f"{p}.decoder.cfm_params.t_scheduler", f.t_scheduler, f"one of {T_SCHEDULERS}")
    _check_estimator(f.estimator, where, f"{p}.decoder.estimator")


def _check_estimator(e: EstimatorConfig, where: Path, p: str) -> None:
    for name in ("in_channels", "out_channels", "attention_head_dim", "num_heads"):
        _positive(where, f"{p}.{name}", getattr(e, name))
    _positive_list(where, f"{p}.channels", e.channels)
    for name in ("n_blocks", "num_mid_blocks"):
        if getattr(e, name) < 0:
            raise _fail(where, f"{p}.{name}", getattr(e, name), ">= 0")


def _check_hift(h: HiFTConfig, where: Path) -> None:
    p = "config.hift"
    for name in ("in_channels", "base_channels", "sampling_rate", "n_fft", "hop_len", "audio_limit",
                 "f0_num_class", "f0_in_channels", "f0_cond_channels"):
        _positive(where, f"{p}.{name}", getattr(h, name))
    if h.nb_harmonics < 0:
        raise _fail(where, f"{p}.nb_harmonics", h.nb_harmonics, ">= 0")
    for name in ("nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope"):
        if not math.isfinite(getattr(h, name)):
            raise _fail(where, f"{p}.{name}", getattr(h, name), "a finite number")
    for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes", "resblock_dilation_sizes",
                 "source_resblock_kernel_sizes", "source_resblock_dilation_sizes"):
        _positive_list(where, f"{p}.{name}", getattr(h, name))
    stages = len(h.upsample_rates)
    for name in ("upsample_kernel_sizes", "source_resblock_kernel_sizes", "source_resblock_dilation_sizes"):
        if len(getattr(h, name)) != stages:
            raise _fail(where, f"{p}.{name}", getattr(h, name), f"{stages} entries, one per upsample rate")
    if len(h.resblock_dilation_sizes) != len(h.resblock_kernel_sizes):
        raise _fail(where, f"{p}.resblock_dilation_sizes", h.resblock_dilation_sizes, "one entry per kernel size")
    for rate, kernel in zip(h.upsample_rates, h.upsample_kernel_sizes, strict=True):
        if kernel < rate:
            raise _fail(where, f"{p}.upsample_kernel_sizes", h.upsample_kernel_sizes, "no smaller than its rate")
    if h.base_channels % 2**stages:
        raise _fail(where, f"{p}.base_channels", h.base_channels, f"divisible by 2**{stages} (one halving per stage)")
    if h.n_fft % 2:
        raise _fail(where, f"{p}.istft_params.n_fft", h.n_fft, "even")


def _check_sizes(cfg: DecoderConfig, where: Path) -> None:
    """The vocoder's working set on one block, and the weights the config implies, against what exists."""
    h = cfg.hift
    length, working = PLANNED_MEL_FRAMES * h.hop_len, 0.0
    for i, rate in enumerate(h.upsample_rates):
        length *= rate
        working += VOCODER_TEMPORARIES * (h.base_channels // 2 ** (i + 1)) * length
    samples = PLANNED_MEL_FRAMES * h.samples_per_frame
    working += (h.nb_harmonics + 2) * samples + (h.n_fft + 2) * samples / h.hop_len
    check_fits(working * FLOAT32_BYTES, where, "the vocoder (config.hift sizes) on one block")
    e = cfg.flow.encoder
    flow_weights = e.num_blocks * (4 * e.output_size**2 + 2 * e.output_size * e.linear_units)
    flow_weights += cfg.flow.vocab_size * cfg.flow.input_size
    check_fits(flow_weights * FLOAT32_BYTES, where, "the flow model (config.flow sizes)")
    _check_against_file(where.parent / "flow.pt", flow_weights, "config.flow sizes")


def _check_against_file(path: Path, n_weights: int, what: str) -> None:
    """A config implying more weights than its file can hold is wrong (and would be slow to build)."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # no file to compare with (a config read on its own)
    if n_weights * MIN_BYTES_PER_WEIGHT > size:
        raise CheckpointError(
            f"{path.parent / 'config.yaml'}: {what} imply at least {n_weights:,} weights, "
            f"more than {path.name} ({size:,} bytes) holds"
        )
