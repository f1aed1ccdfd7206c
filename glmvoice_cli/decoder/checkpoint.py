"""Strict loading of the official speech-decoder files: config.yaml, flow.pt and hift.pt.

The `.pt` files are plain pickled state dicts of tensors, read with `weights_only=True` (no
arbitrary unpickling). Keys and shapes must match the modules built from config.yaml exactly;
any difference is a one-line CheckpointMismatchError naming the file and the key. Weight-norm
pairs (`weight_g`/`weight_v`) load as published and are folded into plain weights afterwards.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.decoder.config import CONFIG_FILE, DecoderConfig, load_decoder_config
from glmvoice_cli.errors import CheckpointError, CheckpointMismatchError, ModelNotFoundError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from glmvoice_cli.decoder.flow import FlowModel
    from glmvoice_cli.decoder.vocoder import HiFTGenerator

FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
DECODER_FILES = (CONFIG_FILE, FLOW_FILE, HIFT_FILE)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d state dict, loaded with weights_only=True onto the CPU."""
    import torch

    if not path.is_file():
        raise ModelNotFoundError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint ({first[:200]})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: expected a state dict of named tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{path}: key {key!r} is not a tensor")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `state` into `module`, refusing any missing, unexpected or mis-shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointMismatchError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointMismatchError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, tensor in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{path}: key {key!r} has shape {list(got.shape)}, config expects {list(tensor.shape)}"
            )
        if not got.is_floating_point() and tensor.is_floating_point():
            raise CheckpointMismatchError(f"{path}: key {key!r} has dtype {got.dtype}, expected floating point")
    # assign: the loaded tensors become the parameters (no second copy; the module may be on meta)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    leftover = [k for k, v in module.state_dict().items() if v.is_meta]
    if leftover:  # pragma: no cover - every persistent tensor is in the checked state dict
        raise CheckpointMismatchError(f"{path}: key {leftover[0]!r} was not loaded")


@dataclass
class DecoderModels:
    """The loaded speech decoder: config, flow model and vocoder (eval mode, weight norm folded)."""

    config: DecoderConfig
    flow: FlowModel
    hift: HiFTGenerator


def check_decoder_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise ModelNotFoundError(f"{directory}: decoder folder not found")
    for name in DECODER_FILES:
        if not (directory / name).is_file():
            raise ModelNotFoundError(f"{directory / name}: decoder file not found")


def load_decoder(directory: Path, device: str | torch.device = "cpu") -> DecoderModels:
    """Build the flow model and the vocoder from `directory/config.yaml` and load their weights."""
    import torch

    from glmvoice_cli.decoder.flow import FlowModel
    from glmvoice_cli.decoder.vocoder import HiFTGenerator

    directory = Path(directory)
    check_decoder_dir(directory)
    config = load_decoder_config(directory / CONFIG_FILE)
    with torch.device("meta"):  # no random init, no second copy of the weights
        flow = FlowModel(config.flow)
        hift = HiFTGenerator(config.hift)
    load_strict(flow, read_state_dict(directory / FLOW_FILE), directory / FLOW_FILE)
    load_strict(hift, read_state_dict(directory / HIFT_FILE), directory / HIFT_FILE)
    hift.fold_weight_norm()
    flow.requires_grad_(False).to(device).eval()
    hift.requires_grad_(False).to(device).eval()
    return DecoderModels(config=config, flow=flow, hift=hift)
