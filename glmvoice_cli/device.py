"""Device and dtype choice shared by the model stages: cuda, then mps, then cpu, unless told."""

from __future__ import annotations

import torch

from glmvoice_cli.errors import UsageError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    """The named device, or the best available one ("auto" or None)."""
    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("CUDA was asked for but is not available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError("MPS was asked for but is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The named dtype, or bf16 on CUDA and fp32 elsewhere ("auto" or None)."""
    if name and name != "auto":
        if name not in DTYPES:
            raise UsageError(f"unknown dtype {name!r} (use auto, fp32, bf16 or fp16)")
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32
