"""4-bit (NF4) and 8-bit loading of the LM on CUDA through transformers' bitsandbytes integration.

The official int4 mode is NF4 with double quantization and bf16 compute. As in the dense path, the
model is built on the meta device, its Linear layers are swapped for bitsandbytes ones
(`replace_with_bnb_linear`), and each official tensor is quantized as it streams in, so the full
bf16 model never sits in memory. lm_head stays dense (as transformers does by default).

Note: written against transformers 5.x and bitsandbytes >= 0.43; it needs a CUDA machine to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.errors import UsageError

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, GlmConfig, GlmForCausalLM

    from glmvoice_cli.options import LoadOptions

KEEP_DENSE = ["lm_head"]  # quantizing the output layer costs accuracy for little memory
INSTALL_HINT = "pip install 'glmvoice[quant]' (bitsandbytes)"


def check_quantization(bits: int, device: torch.device) -> None:
    """Raise a one-line UsageError where `bits`-bit loading cannot work."""
    if bits not in (4, 8):
        raise UsageError(f"quantization must be 4 or 8 bits, not {bits}")
    if device.type != "cuda":
        raise UsageError(f"{bits}-bit loading needs a CUDA GPU (device is {device.type}); use bf16 or fp32")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{bits}-bit loading needs bitsandbytes: {INSTALL_HINT}") from exc


def load_quantized(
    files: dict[str, Path], cfg: GlmConfig, device: torch.device, dtype: torch.dtype, options: LoadOptions
) -> GlmForCausalLM:
    """Build on meta, swap in bitsandbytes Linear layers, quantize each tensor as it streams in."""
    import torch
    from transformers import GlmForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from glmvoice_cli.lm.checkpoint import (
        iter_official_tensors,
        map_official_tensor,
        rebuild_rotary,
    )

    bits = int(options.quantize_bits or 0)
    check_quantization(bits, device)
    cfg._attn_implementation = options.attn_implementation
    with torch.device("meta"):
        model = GlmForCausalLM(cfg)
    model = replace_with_bnb_linear(model, modules_to_not_convert=KEEP_DENSE,
                                    quantization_config=_bnb_config(bits, dtype))
    for key, tensor in iter_official_tensors(files):
        for native, part in map_official_tensor(key, tensor, cfg):
            _assign_quantized(model, native, part.to(dtype).contiguous(), device)
    rebuild_rotary(model, device)
    return model.eval()


def quantize_model(model: torch.nn.Module, bits: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Swap the Linear layers of a built dense model (lm_head aside) for `bits`-bit ones holding its weights.

    For benchmarks that build random weights in memory (the loader quantizes tensors as they stream in
    instead, without a dense copy). The CUDA requirement is the caller's to check, as in `load_quantized`.
    """
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    dense = {name: tensor.detach() for name, tensor in model.named_parameters()}
    model = replace_with_bnb_linear(model, modules_to_not_convert=KEEP_DENSE,
                                    quantization_config=_bnb_config(bits, dtype))
    for name, value in dense.items():
        _assign_quantized(model, name, value.to(dtype).contiguous(), device)
    return model


def _bnb_config(bits: int, dtype: torch.dtype) -> BitsAndBytesConfig:
    """The official int4 mode (NF4, double quantization, compute in `dtype`), or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _assign_quantized(model: torch.nn.Module, native: str, value: torch.Tensor, device: torch.device) -> None:
    import bitsandbytes as bnb
    import torch

    owner_name, _, attr = native.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    if attr == "weight" and isinstance(owner, bnb.nn.Linear4bit):
        quantized: torch.nn.Parameter = bnb.nn.Params4bit(value.cpu(), requires_grad=False, **old.__dict__)
    elif attr == "weight" and isinstance(owner, bnb.nn.Linear8bitLt):
        kwargs = {k: v for k, v in old.__dict__.items() if k != "SCB"}
        quantized = bnb.nn.Int8Params(value.cpu(), requires_grad=False, **kwargs)
    else:
        setattr(owner, attr, torch.nn.Parameter(value.to(device), requires_grad=False))
        return
    # bitsandbytes' parameters quantize in their own .to(device), which returns the same parameter class.
    setattr(owner, attr, quantized.to(device))
