"""Consistency and size checks of the decoder config, run when the folder is read.

`decoder.config`'s schema checks each field's type and range; here the fields are checked against each
other (one-line errors naming the file and the key), and the sizes are compared with the machine's memory
and with the weight files before a module is built: a hostile `upsample_rates: [100000000, 8]` or
`num_blocks: 1000000` is refused at once instead of exhausting memory or time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.errors import CheckpointError
from glmvoice_cli.memory import check_fits

if TYPE_CHECKING:
    from glmvoice_cli.decoder.config import DecoderConfig, FlowConfig, HiFTConfig

FLOAT32_BYTES = 4
MIN_BYTES_PER_WEIGHT = 2  # a checkpoint stores at least half precision
PLANNED_MEL_FRAMES = 200  # about 2.3 s of mel: the vocoder's working set is estimated on a block this long
VOCODER_TEMPORARIES = 4  # activations alive at once per upsampling stage (input, resblock branches, sum)
MIN_RATE, MAX_RATE = 8_000, 192_000  # Hz: the official decoder speaks at 22,050


def check_decoder_config(cfg: DecoderConfig, where: Path) -> None:
    """Raise CheckpointError naming the file and key for the first field that does not fit the others, or whose
    sizes are too big (each field's own type and range were checked when the file was read)."""
    _check_flow(cfg.flow, where)
    _check_hift(cfg.hift, where)
    for key, rate in (("config.sample_rate", cfg.sample_rate), ("hift.sampling_rate", cfg.hift.sampling_rate)):
        if not MIN_RATE <= rate <= MAX_RATE:  # audio files (and speakers) take no other rates
            raise _fail(where, key, rate, f"an audio rate in [{MIN_RATE}, {MAX_RATE}] Hz")
    _check_sizes(cfg, where)


def _fail(where: Path, key: str, value: object, want: str) -> CheckpointError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return CheckpointError(f"{where}: {key} must be {want}, got {shown}")


def _check_flow(f: FlowConfig, where: Path) -> None:
    e = f.encoder
    if e.output_size % e.attention_heads:
        raise _fail(where, "config.flow.encoder.attention_heads", e.attention_heads,
                    f"a divisor of output_size {e.output_size}")


def _check_hift(h: HiFTConfig, where: Path) -> None:
    p = "config.hift"
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
