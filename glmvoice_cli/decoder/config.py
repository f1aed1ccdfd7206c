"""Configuration of the speech decoder, read safely from the official hyperpyyaml `config.yaml`.

The published file names Python classes and calls with `!new:`, `!apply:`, `!name:` and `!ref`
tags (hyperpyyaml instantiates them on load). We read it with a PyYAML SafeLoader taught those
tags as plain data: nothing named in the file is imported or called. The hyperparameters of
the flow model and the HiFT vocoder are then read into frozen pydantic models, whose field types
say what each value may be (an int above 0, a finite number, the one variant we implement) and
where in the file it sits; the unused `llm` section and the seed calls are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasPath,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

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


def _not_a_flag(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's true/false is no size or rate
        raise ValueError("a number, not true/false")  # noqa: TRY004 - pydantic reports ValueError, not TypeError
    return value


# The field types say what each value may be; pydantic checks them, ranges included, when the file is read.
Size = Annotated[int, Field(strict=True, gt=0)]  # a width, a count, a rate: an int (never true/false) above 0
Count = Annotated[int, Field(strict=True, ge=0)]
Number = Annotated[float, BeforeValidator(_not_a_flag), Field(allow_inf_nan=False)]  # YAML 1.1 reads 1e-06 as text
Sizes = Annotated[tuple[Size, ...], Field(min_length=1)]


class _Schema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


def _at(*path: str) -> Any:
    """The field's value sits at this path inside its section of config.yaml."""
    return Field(validation_alias=AliasPath(*path))


class EncoderConfig(_Schema):
    """BlockConformerEncoder (rel-pos self-attention, pre-LN, no conv module, no macaron)."""

    input_size: Size  # token embedding width fed to the input Linear
    output_size: Size  # model width d
    attention_heads: Size
    linear_units: Size  # feed-forward hidden width
    num_blocks: Size  # number of conformer layers
    block_size: Size  # tokens per attention block (keys of the same block are visible)
    # the only variant the reference ships (and we implement): any other value is refused by name
    input_layer: Literal["linear"] = "linear"
    pos_enc_layer_type: Literal["rel_pos_espnet"] = "rel_pos_espnet"
    selfattention_layer_type: Literal["block_rel_selfattn"] = "block_rel_selfattn"
    use_cnn_module: Literal[False] = False
    macaron_style: Literal[False] = False
    normalize_before: Literal[True] = True


class EstimatorConfig(_Schema):
    """The U-Net velocity estimator (Matcha-TTS `ConditionalDecoder`)."""

    in_channels: Size  # x + mu + spks + cond = 4 x 80
    out_channels: Size  # mel bins
    channels: Sizes  # widths of the down path
    attention_head_dim: Size
    num_heads: Size
    n_blocks: Count  # transformer blocks after each resnet
    num_mid_blocks: Count
    act_fn: Literal["gelu"] = "gelu"

    @property
    def time_embed_dim(self) -> int:
        return self.channels[0] * 4


class FlowConfig(_Schema):
    """MaskedDiffWithXvec: tokens -> mel via encoder, length regulator and conditional flow matching."""

    vocab_size: Size
    input_size: Size  # token embedding width
    output_size: Size  # mel bins
    spk_embed_dim: Size
    input_frame_rate: Annotated[Number, Field(gt=0)]  # tokens per second
    encoder: EncoderConfig
    regulator_channels: Size = _at("length_regulator", "channels")
    regulator_sampling_ratios: tuple[Size, ...] = _at("length_regulator", "sampling_ratios")
    cfm_in_channels: Size = _at("decoder", "in_channels")
    spk_emb_dim: Size = _at("decoder", "spk_emb_dim")  # projected speaker width inside the CFM
    inference_cfg_rate: Annotated[Number, Field(ge=0)] = _at("decoder", "cfm_params", "inference_cfg_rate")
    t_scheduler: Literal["cosine", "linear"] = Field("cosine", validation_alias=AliasPath(
        "decoder", "cfm_params", "t_scheduler"))
    sigma_min: Number = Field(1e-6, validation_alias=AliasPath("decoder", "cfm_params", "sigma_min"))  # training only
    estimator: EstimatorConfig = _at("decoder", "estimator")


class HiFTConfig(_Schema):
    """HiFTGenerator: neural source filter + iSTFT vocoder, with its ConvRNN F0 predictor."""

    in_channels: Size
    base_channels: Size
    nb_harmonics: Count
    sampling_rate: Size
    nsf_alpha: Number  # sine amplitude
    nsf_sigma: Number  # noise std in voiced regions
    nsf_voiced_threshold: Number  # Hz
    upsample_rates: Sizes
    upsample_kernel_sizes: Sizes
    n_fft: Size = _at("istft_params", "n_fft")
    hop_len: Size = _at("istft_params", "hop_len")
    resblock_kernel_sizes: Sizes
    resblock_dilation_sizes: Annotated[tuple[Sizes, ...], Field(min_length=1)]
    source_resblock_kernel_sizes: Sizes
    source_resblock_dilation_sizes: Annotated[tuple[Sizes, ...], Field(min_length=1)]
    lrelu_slope: Number
    audio_limit: Annotated[Number, Field(gt=0)]
    f0_num_class: Size = _at("f0_predictor", "num_class")
    f0_in_channels: Size = _at("f0_predictor", "in_channels")
    f0_cond_channels: Size = _at("f0_predictor", "cond_channels")

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (upsampling x iSTFT hop)."""
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


class DecoderConfig(_Schema):
    flow: FlowConfig
    hift: HiFTConfig
    sample_rate: Size  # output sample rate, Hz

    @model_validator(mode="before")
    @classmethod
    def _vocoder_rate(cls, data: Any) -> Any:
        """A file without `sample_rate` speaks at its vocoder's rate."""
        if isinstance(data, dict) and "sample_rate" not in data and isinstance(data.get("hift"), dict):
            return {**data, "sample_rate": data["hift"].get("sampling_rate")}
        return data


def _plain(node: Any) -> Any:
    """The parsed YAML as plain dicts and lists: a `!new:` node is its arguments (an omegaconf DictConfig's
    values sit under `content:`)."""
    if isinstance(node, Tagged):
        args = node.args
        if node.target.endswith("DictConfig") and isinstance(args, dict) and "content" in args:
            args = args["content"]
        return _plain(args)
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _one_line(error: ValidationError, where: Path) -> CheckpointError:
    """The first problem, naming the file and the key."""
    first = error.errors(include_url=False)[0]
    key = ".".join(["config", *map(str, first["loc"])])
    if first["type"] == "missing":
        return CheckpointError(f"{where}: missing key {key}")
    shown = repr(first["input"]) if len(repr(first["input"])) <= 80 else repr(first["input"])[:77] + "..."
    verb = "unsupported" if first["type"] == "literal_error" else "bad value for"
    return CheckpointError(f"{where}: {verb} {key}: {shown} ({first['msg'].lower()})")


def decoder_config_from_data(data: dict[str, Any], where: Path = Path(CONFIG_FILE)) -> DecoderConfig:
    """Build the typed config from parsed YAML data (the `llm` section is ignored)."""
    try:
        return DecoderConfig.model_validate(_plain(data))
    except ValidationError as e:
        raise _one_line(e, where) from None  # pydantic's own text is many lines


def load_decoder_config(path: Path) -> DecoderConfig:
    """Read `config.yaml` (a file, or a decoder folder holding it) without instantiating anything.

    Types and ranges are checked here; consistency between fields and sizes by
    `config_checks.check_decoder_config`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    return decoder_config_from_data(read_hyperpyyaml_as_data(path), path)
