"""Strict loading of the official speech-decoder files: config.yaml, flow.pt and hift.pt.

The `.pt` files are plain pickled state dicts of tensors, read with `weights_only=True` (no
arbitrary unpickling). Keys and shapes must match the modules built from config.yaml exactly;
any difference is a one-line CheckpointMismatchError naming the file and the key. Weight-norm
pairs (`weight_g`/`weight_v`) load as published and are folded into plain weights afterwards.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.decoder.config import CONFIG_FILE, DecoderConfig, load_decoder_config
from glmvoice_cli.decoder.config_checks import check_decoder_config
from glmvoice_cli.errors import CheckpointError, CheckpointMismatchError, ModelNotFoundError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from glmvoice_cli.decoder.flow import FlowModel
    from glmvoice_cli.decoder.vocoder import HiFTGenerator

FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
DECODER_FILES = (CONFIG_FILE, FLOW_FILE, HIFT_FILE)
WEIGHT_FILE_MAGIC = (b"PK", b"\x80\x02")  # torch.save's zip archive, or a legacy pickle (protocol 2)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d state dict, loaded with weights_only=True onto the CPU."""
    import torch

    if not path.is_file():
        raise ModelNotFoundError(f"{path}: checkpoint file not found")
    if _magic(path) not in WEIGHT_FILE_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch weights file (neither a zip archive nor a pickle)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met something other than tensors
        raise CheckpointError(
            f"{path}: holds something other than weights (Python objects or code); refused for safety"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a PyTorch weights file ({type(e).__name__})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: expected a state dict of named tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{path}: key {key!r} is not a tensor")
        check_finite(value, path, key)
    return state


def _magic(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(2)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from e


def check_finite(tensor: torch.Tensor, path: Path, key: str) -> None:
    """Refuse NaN or infinite weights at load time (one pass per tensor), not as a sampling error later."""
    import torch

    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointMismatchError(f"{path}: key {key!r} holds NaN or infinite values")


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


def load_decoder(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                 ) -> DecoderModels:
    """Build the flow model and the vocoder from `directory/config.yaml` and load their weights.

    `dtype` (default float32) is the flow model's; the vocoder always runs in float32 (its STFT and
    source phases need it, and it is the small part)."""
    import torch

    from glmvoice_cli.decoder.flow import FlowModel
    from glmvoice_cli.decoder.vocoder import HiFTGenerator

    directory = Path(directory)
    check_decoder_dir(directory)
    config = load_decoder_config(directory / CONFIG_FILE)
    check_decoder_config(config, directory / CONFIG_FILE)  # ranges and sizes, before anything is built
    with torch.device("meta"):  # no random init, no second copy of the weights
        flow = FlowModel(config.flow)
        hift = HiFTGenerator(config.hift)
    load_strict(flow, read_state_dict(directory / FLOW_FILE), directory / FLOW_FILE)
    load_strict(hift, read_state_dict(directory / HIFT_FILE), directory / HIFT_FILE)
    hift.fold_weight_norm()
    flow.requires_grad_(False).to(device=device, dtype=dtype or torch.float32).eval()
    hift.requires_grad_(False).to(device).eval()
    return DecoderModels(config=config, flow=flow, hift=hift)
