"""Device and dtype choice shared by the model stages: cuda, then mps, then cpu, unless told."""

from __future__ import annotations

import torch

from glmvoice_cli.errors import UsageError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
RUNNABLE = ("cpu", "cuda", "mps")


def pick_device(name: str | None = None) -> torch.device:
    """The named device, or the best available one ("auto" or None)."""
    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from e
        if device.type not in RUNNABLE:  # torch knows meta, xla, hpu...: none of them runs these models here
            raise UsageError(f"device {name!r} cannot run the models (use auto, cpu, cuda, cuda:N or mps)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("CUDA was asked for but is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"there is no {name} here: this machine has {torch.cuda.device_count()} CUDA device(s)")
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


def check_dtype(name: str | None, device: torch.device, default: torch.dtype) -> torch.dtype:
    """The named dtype (`default` for "auto" or None) once `device` has run the layers a model is made of
    in it, else a one-line UsageError: not every device runs every 16-bit type (bf16 needs a recent GPU
    or CPU build, fp16 kernels are missing on some CPU builds)."""
    dtype = default if not name or name == "auto" else pick_dtype(name, device)
    if dtype == torch.float32:
        return dtype
    try:
        probe = torch.randn(1, 4, 8, device=device).to(dtype)
        conv = torch.nn.Conv1d(4, 4, 3, padding=1).to(device=device, dtype=dtype)
        linear = torch.nn.Linear(4, 4).to(device=device, dtype=dtype)
        with torch.inference_mode():
            torch.nn.functional.interpolate(linear(conv(probe).transpose(1, 2)).transpose(1, 2), size=12)
    except (RuntimeError, TypeError) as e:
        label = str(dtype).removeprefix("torch.")
        raise UsageError(f"{device.type} cannot run {label} here ({str(e).splitlines()[0][:120]}); "
                         f"use --dtype fp32") from e
    return dtype
