"""Build the LM from an official checkpoint folder: dense weights, or 4/8-bit through `quant`.

The format itself (config mapping, key renames, shard checks) lives in `checkpoint`; this module only
decides where each tensor goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.errors import CheckpointMismatchError
from glmvoice_cli.lm.checkpoint import (
    CONFIG_FILE,
    check_lm_size,
    check_weight_files,
    iter_official_tensors,
    load_lm_config,
    map_official_tensor,
    rebuild_rotary,
    weight_files,
)
from glmvoice_cli.options import LoadOptions

if TYPE_CHECKING:
    import torch
    from transformers import GlmConfig, GlmForCausalLM


def load_lm(folder: Path, options: LoadOptions | None = None) -> GlmForCausalLM:
    """The official ChatGLM checkpoint in `folder` as an eval-mode `GlmForCausalLM`.

    All headers are checked before any weight is read; tensors stream in one at a time.
    """
    options = options or LoadOptions()
    folder = Path(folder)
    cfg = load_lm_config(folder)
    files = weight_files(folder)
    # The per-key check names the exact key at fault but loops over the config's layers, so it goes
    # first only while that loop is bounded by what is on disk (every layer has tensors of its own);
    # a config with more layers than the files have keys meets the cheap size check first.
    keys_bound_layers = cfg.num_hidden_layers <= len(files)
    if keys_bound_layers:
        check_weight_files(files, cfg)
    check_lm_size(cfg, files, folder / CONFIG_FILE)
    if not keys_bound_layers:
        check_weight_files(files, cfg)
    from glmvoice_cli.device import pick_device, pick_dtype

    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    if options.quantize_bits is not None:
        from glmvoice_cli.lm.quant import load_quantized

        return load_quantized(files, cfg, device, dtype, options)
    cfg._attn_implementation = options.attn_implementation
    return _load_dense(files, cfg, device, dtype)


def _load_dense(
    files: dict[str, Path], cfg: GlmConfig, device: torch.device, dtype: torch.dtype
) -> GlmForCausalLM:
    import torch
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        model = GlmForCausalLM(cfg)
    targets = dict(model.named_parameters())
    filled: set[str] = set()
    for key, tensor in iter_official_tensors(files):
        for native, part in map_official_tensor(key, tensor, cfg):
            _assign_parameter(model, native, part.to(device=device, dtype=dtype), targets)
            filled.add(native)
    missing = sorted(set(targets) - filled)
    if missing:  # unreachable after check_weight_files, kept as the loader's own invariant
        raise CheckpointMismatchError(f"{min(set(files.values()))}: no tensor for '{missing[0]}'")
    rebuild_rotary(model, device)
    return model.eval().requires_grad_(False)


def _assign_parameter(model: torch.nn.Module, native: str, value: torch.Tensor, targets: dict) -> None:
    import torch

    if native not in targets:
        raise CheckpointMismatchError(f"no native parameter '{native}' for this config")
    if tuple(targets[native].shape) != tuple(value.shape):
        raise CheckpointMismatchError(
            f"'{native}' has shape {list(value.shape)}, model expects {list(targets[native].shape)}"
        )
    owner_name, _, attr = native.rpartition(".")
    owner = model.get_submodule(owner_name)
    # contiguous(): the qkv split yields views; each parameter must own its memory.
    setattr(owner, attr, torch.nn.Parameter(value.contiguous(), requires_grad=False))
