"""Configuration of the speech decoder, read safely from the official hyperpyyaml `config.yaml`.

The published file names Python classes and calls with `!new:`, `!apply:`, `!name:` and `!ref`
tags (hyperpyyaml instantiates them on load). We read it with a PyYAML SafeLoader taught those
tags as plain data: nothing named in the file is imported or called. The hyperparameters of
the flow model and the HiFT vocoder are then copied into frozen dataclasses; the unused `llm`
section and the seed calls are ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from glmvoice_cli.errors import CheckpointError, ModelNotFoundError
from glmvoice_cli.files import read_limited

CONFIG_FILE = "config.yaml"
MAX_YAML_ALIASES = 100  # the official file uses none; "billion laughs" needs many
MAX_YAML_DEPTH = 50  # nesting levels (the official file has about 6)
MAX_RESOLVED_NODES = 1_000_000  # values after !ref expansion (the official file has a few hundred)
_REF_PATTERN = re.compile(r"^<([A-Za-z_][\w.\[\]]*)>$")


@dataclass(frozen=True)
class Tagged:
    """A `!new:`/`!apply:`/`!name:` node kept as data: the tag, the dotted name, the arguments."""

    kind: str  # "new" | "apply" | "name"
    target: str  # e.g. "cosyvoice.flow.flow.MaskedDiffWithXvec"; never imported
    args: Any  # a dict (mapping node), a list (sequence node) or a scalar


@dataclass(frozen=True)
class Ref:
    """An unresolved `!ref <key>` placeholder."""

    key: str


class _SafeHyperLoader(yaml.SafeLoader):
    """A SafeLoader that understands hyperpyyaml tags as inert data, within an alias and depth budget."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_ALIASES} aliases")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_tagged(kind: str) -> Callable[[yaml.SafeLoader, str, yaml.Node], Tagged]:
    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
        if isinstance(node, yaml.MappingNode):
            args: Any = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            args = loader.construct_sequence(node, deep=True)
        else:
            args = loader.construct_scalar(node)
        return Tagged(kind, suffix, args)

    return construct


def _construct_ref(loader: yaml.SafeLoader, node: yaml.Node) -> Ref:
    text = str(loader.construct_scalar(node)).strip()
    match = _REF_PATTERN.match(text)
    if match is None:
        raise yaml.constructor.ConstructorError(None, None, f"unsupported !ref expression {text!r}", node.start_mark)
    return Ref(match.group(1))


def _strict_scalar(base: Callable[[yaml.SafeLoader, yaml.Node], Any]) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    """A scalar constructor whose bad values (`!!int 1.5`, a 13th month) report their line."""

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return base(loader, node)
        except (ValueError, TypeError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"bad {node.tag.rsplit(':', 1)[-1]} value {str(node.value)[:40]!r}", node.start_mark
            ) from e

    return construct


for _tag, _base in (("timestamp", yaml.SafeLoader.construct_yaml_timestamp),
                    ("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float)):
    _SafeHyperLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _strict_scalar(_base))
for _kind in ("new", "apply", "name"):
    _SafeHyperLoader.add_multi_constructor(f"!{_kind}:", _construct_tagged(_kind))
_SafeHyperLoader.add_constructor("!ref", _construct_ref)


def _lookup(root: dict[str, Any], key: str) -> Any:
    node: Any = root
    for part in re.split(r"[.\[\]]+", key):
        if not part:
            continue
        if isinstance(node, Tagged):
            node = node.args
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


class _TooBig(Exception):
    """The resolved document would exceed MAX_RESOLVED_NODES."""


def _resolve(node: Any, root: dict[str, Any], depth: int = 0, budget: list[int] | None = None) -> Any:
    budget = [MAX_RESOLVED_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    if depth > 32:
        raise KeyError("!ref cycle")
    if isinstance(node, Ref):
        return _resolve(_lookup(root, node.key), root, depth + 1, budget)
    if isinstance(node, Tagged):
        return Tagged(node.kind, node.target, _resolve(node.args, root, depth, budget))
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth, budget) for v in node]
    return node


def parse_hyperpyyaml(text: str, where: Path = Path(CONFIG_FILE)) -> dict[str, Any]:
    """Parse hyperpyyaml text into plain data (dicts, lists, scalars, Tagged), refs resolved."""
    try:
        raw = yaml.load(text, Loader=_SafeHyperLoader)  # a SafeLoader subclass: no python/ tags
    except yaml.YAMLError as e:
        first = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{where}: unreadable YAML ({first[:200]})") from e
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # bad timestamps, !!int 1.5, ...
        raise CheckpointError(f"{where}: unreadable YAML (a bad value: {type(e).__name__})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a mapping at the top level")
    try:
        return _resolve(raw, raw)
    except KeyError as e:
        raise CheckpointError(f"{where}: unresolvable !ref {e.args[0]!r}") from e
    except (_TooBig, RecursionError) as e:
        raise CheckpointError(f"{where}: expands to more than {MAX_RESOLVED_NODES} values") from e


def read_hyperpyyaml_as_data(path: Path) -> dict[str, Any]:
    """Read and parse a hyperpyyaml file without importing or calling anything it names."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: decoder config not found")
    try:
        text = read_limited(path, 4 << 20).decode("utf-8")  # the official one is 4 KiB
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({type(e).__name__})") from e
    return parse_hyperpyyaml(text, path)


@dataclass(frozen=True)
class EncoderConfig:
    """BlockConformerEncoder (rel-pos self-attention, pre-LN, no conv module, no macaron)."""

    input_size: int  # token embedding width fed to the input Linear
    output_size: int  # model width d
    attention_heads: int
    linear_units: int  # feed-forward hidden width
    num_blocks: int  # number of conformer layers
    block_size: int  # tokens per attention block (keys of the same block are visible)


@dataclass(frozen=True)
class EstimatorConfig:
    """The U-Net velocity estimator (Matcha-TTS `ConditionalDecoder`)."""

    in_channels: int  # x + mu + spks + cond = 4 x 80
    out_channels: int  # mel bins
    channels: tuple[int, ...]  # widths of the down path
    attention_head_dim: int
    num_heads: int
    n_blocks: int  # transformer blocks after each resnet
    num_mid_blocks: int

    @property
    def time_embed_dim(self) -> int:
        return self.channels[0] * 4


@dataclass(frozen=True)
class FlowConfig:
    """MaskedDiffWithXvec: tokens -> mel via encoder, length regulator and conditional flow matching."""

    vocab_size: int
    input_size: int  # token embedding width
    output_size: int  # mel bins
    spk_embed_dim: int
    input_frame_rate: float  # tokens per second
    encoder: EncoderConfig
    regulator_channels: int
    regulator_sampling_ratios: tuple[int, ...]
    cfm_in_channels: int
    spk_emb_dim: int  # projected speaker width inside the CFM
    inference_cfg_rate: float  # classifier-free guidance weight
    t_scheduler: str  # "cosine" or "linear"
    sigma_min: float  # training-only
    estimator: EstimatorConfig


@dataclass(frozen=True)
class HiFTConfig:
    """HiFTGenerator: neural source filter + iSTFT vocoder, with its ConvRNN F0 predictor."""

    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float  # sine amplitude
    nsf_sigma: float  # noise std in voiced regions
    nsf_voiced_threshold: float  # Hz
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    f0_num_class: int
    f0_in_channels: int
    f0_cond_channels: int

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (upsampling x iSTFT hop)."""
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass(frozen=True)
class DecoderConfig:
    flow: FlowConfig
    hift: HiFTConfig
    sample_rate: int  # output sample rate, Hz


def _section(node: Any, path: str, where: Path) -> dict[str, Any]:
    if isinstance(node, Tagged):
        node = node.args
    if not isinstance(node, dict):
        raise CheckpointError(f"{where}: missing or malformed section {path}")
    return node


class _Reader:
    """Typed access to one section, with one-line errors naming the file and the key."""

    def __init__(self, node: Any, path: str, where: Path) -> None:
        self.data, self.path, self.where = _section(node, path, where), path, where

    def sub(self, key: str) -> _Reader:
        return _Reader(self.data.get(key), f"{self.path}.{key}", self.where)

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise CheckpointError(f"{self.where}: missing key {self.path}.{key}")
            return default
        value = self.data[key]
        converted = _convert(value, kind)
        if converted is _BAD:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise CheckpointError(f"{self.where}: bad value for {self.path}.{key}: {shown}")
        return converted


_BAD = object()


def _convert(value: Any, kind: type) -> Any:
    """`value` as `kind` (int, float, str, bool, tuple of ints or of int tuples), or _BAD."""
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return _BAD
        try:
            number = float(value)  # YAML 1.1 reads `1e-06` as a string: float() converts it
        except (ValueError, OverflowError):
            return _BAD
        return number if math.isfinite(number) else _BAD
    if kind is bool:
        return value if isinstance(value, bool) else _BAD
    if kind is str:
        return value if isinstance(value, str) else _BAD
    if not isinstance(value, list) or not value:
        return _BAD
    items = [tuple(v) if isinstance(v, list) else v for v in value]
    flat = [x for item in items for x in (item if isinstance(item, tuple) else (item,))]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        return _BAD
    return tuple(items)


def _encoder_config(r: _Reader) -> EncoderConfig:
    expected = {
        "input_layer": "linear",
        "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "block_rel_selfattn",
    }
    for key, value in expected.items():
        if r.get(key, str, value) != value:
            raise CheckpointError(f"{r.where}: unsupported {r.path}.{key} (expected {value!r})")
    if r.get("use_cnn_module", bool, False) or r.get("macaron_style", bool, False):
        raise CheckpointError(f"{r.where}: unsupported {r.path}: conv module / macaron style")
    if not r.get("normalize_before", bool, True):
        raise CheckpointError(f"{r.where}: unsupported {r.path}.normalize_before: false")
    return EncoderConfig(
        input_size=r.get("input_size", int),
        output_size=r.get("output_size", int),
        attention_heads=r.get("attention_heads", int),
        linear_units=r.get("linear_units", int),
        num_blocks=r.get("num_blocks", int),
        block_size=r.get("block_size", int),
    )


def _estimator_config(r: _Reader) -> EstimatorConfig:
    act = r.get("act_fn", str, "gelu")
    if act != "gelu":
        raise CheckpointError(f"{r.where}: unsupported {r.path}.act_fn {act!r} (expected 'gelu')")
    return EstimatorConfig(
        in_channels=r.get("in_channels", int),
        out_channels=r.get("out_channels", int),
        channels=r.get("channels", tuple),
        attention_head_dim=r.get("attention_head_dim", int),
        num_heads=r.get("num_heads", int),
        n_blocks=r.get("n_blocks", int),
        num_mid_blocks=r.get("num_mid_blocks", int),
    )


def _flow_config(r: _Reader) -> FlowConfig:
    reg, cfm = r.sub("length_regulator"), r.sub("decoder")
    params = cfm.sub("cfm_params")
    if "content" in params.data:  # `!new:omegaconf.DictConfig` wraps the values in `content:`
        params = params.sub("content")
    return FlowConfig(
        vocab_size=r.get("vocab_size", int),
        input_size=r.get("input_size", int),
        output_size=r.get("output_size", int),
        spk_embed_dim=r.get("spk_embed_dim", int),
        input_frame_rate=r.get("input_frame_rate", float),
        encoder=_encoder_config(r.sub("encoder")),
        regulator_channels=reg.get("channels", int),
        regulator_sampling_ratios=reg.get("sampling_ratios", tuple),
        cfm_in_channels=cfm.get("in_channels", int),
        spk_emb_dim=cfm.get("spk_emb_dim", int),
        inference_cfg_rate=params.get("inference_cfg_rate", float),
        t_scheduler=params.get("t_scheduler", str, "cosine"),
        sigma_min=params.get("sigma_min", float, 1e-6),
        estimator=_estimator_config(cfm.sub("estimator")),
    )


def _hift_config(r: _Reader) -> HiFTConfig:
    istft, f0 = r.sub("istft_params"), r.sub("f0_predictor")
    return HiFTConfig(
        in_channels=r.get("in_channels", int),
        base_channels=r.get("base_channels", int),
        nb_harmonics=r.get("nb_harmonics", int),
        sampling_rate=r.get("sampling_rate", int),
        nsf_alpha=r.get("nsf_alpha", float),
        nsf_sigma=r.get("nsf_sigma", float),
        nsf_voiced_threshold=r.get("nsf_voiced_threshold", float),
        upsample_rates=r.get("upsample_rates", tuple),
        upsample_kernel_sizes=r.get("upsample_kernel_sizes", tuple),
        n_fft=istft.get("n_fft", int),
        hop_len=istft.get("hop_len", int),
        resblock_kernel_sizes=r.get("resblock_kernel_sizes", tuple),
        resblock_dilation_sizes=r.get("resblock_dilation_sizes", tuple),
        source_resblock_kernel_sizes=r.get("source_resblock_kernel_sizes", tuple),
        source_resblock_dilation_sizes=r.get("source_resblock_dilation_sizes", tuple),
        lrelu_slope=r.get("lrelu_slope", float),
        audio_limit=r.get("audio_limit", float),
        f0_num_class=f0.get("num_class", int),
        f0_in_channels=f0.get("in_channels", int),
        f0_cond_channels=f0.get("cond_channels", int),
    )


def decoder_config_from_data(data: dict[str, Any], where: Path = Path(CONFIG_FILE)) -> DecoderConfig:
    """Build the typed config from parsed YAML data (the `llm` section is ignored)."""
    root = _Reader(data, "", where)
    root.path = "config"
    hift = _hift_config(root.sub("hift"))
    flow = _flow_config(root.sub("flow"))
    sample_rate = root.get("sample_rate", int, hift.sampling_rate)
    return DecoderConfig(flow=flow, hift=hift, sample_rate=sample_rate)


def load_decoder_config(path: Path) -> DecoderConfig:
    """Read `config.yaml` (a file, or a decoder folder holding it) without instantiating anything.

    Field types are checked here; ranges and sizes by `config_checks.check_decoder_config`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    return decoder_config_from_data(read_hyperpyyaml_as_data(path), path)
