"""Will the models fit? Memory needed for the chosen device and dtype against what the machine has free.

The official language model is stored in bf16 (2 bytes per parameter, about 19 GB); loaded in fp32 on a
CPU it takes twice that. The check runs before a model loads and before a download is offered, so that a
machine that cannot hold the model is told what to do instead of downloading 21 GB and then swapping.
No torch at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmvoice_cli.memory import machine_available
from glmvoice_cli.models import hub

GB = 1_000_000_000
STORED_BYTES_PER_PARAM = 2  # the official LM shards are bf16
BYTES_PER_PARAM = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
QUANT_BYTES_PER_PARAM = {4: 0.56, 8: 1.06}  # NF4 / int8 weights plus their scales and the fp16 layers
OVERHEAD = 1.15  # activations, KV cache of a conversation, allocator slack


@dataclass(frozen=True)
class MemoryNeed:
    needed_bytes: int
    available_bytes: int | None  # None: the platform does not say
    where: str  # "RAM" or "cuda:0 memory"
    dtype: str
    choices: tuple[tuple[str, int], ...] = ()  # (flag, bytes needed with it) on this device, best quality first

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def advice(self) -> str:
        """One line: how much is needed, how much is free, and what to do."""
        have = "unknown" if self.available_bytes is None else f"{self.available_bytes / GB:.1f} GB"
        line = (f"the models need about {self.needed_bytes / GB:.0f} GB of {self.where} in {self.dtype} and "
                f"{have} is available")
        if self.available_bytes is not None and self.choices:
            fitting = [(flag, need) for flag, need in self.choices
                       if need <= self.available_bytes and need < self.needed_bytes]
            if fitting:
                flag, need = fitting[0]
                extra = " (pip install 'glmvoice[quant]')" if flag.startswith("--quantize") else ""
                return line + f": {flag} fits (about {need / GB:.0f} GB){extra}"
            smallest = min(self.choices, key=lambda c: c[1])
            if smallest[1] < self.needed_bytes:
                return (line + f": even {smallest[0]} needs about {smallest[1] / GB:.0f} GB; free memory, or use a "
                        "machine with more")
        if self.where == "RAM" and self.dtype in ("fp32", "float32"):
            return line + ": use --dtype bf16 (about half), or a CUDA GPU (--device cuda)"
        if self.where == "RAM":
            return line + ": free memory, or use a CUDA GPU (--device cuda)"
        return line + ": use --quantize 4 (pip install 'glmvoice[quant]'), or a larger GPU"


def stored_bytes(stage: hub.Stage, folder: Path | None) -> int:
    """The stage's weights on disk when present, else its published size."""
    if folder is not None:
        size = hub.folder_size(folder)
        if size > 0 and hub.inspect_stage(stage, folder).complete:
            return size
    return stage.approx_bytes


def available_ram() -> int | None:
    """The machine's available RAM, None where the platform does not say."""
    return machine_available()


def estimate(dirs: dict[str, Path | None], device_type: str, dtype: str, quantize: int | None = None,
             available: int | None = None) -> MemoryNeed:
    """The memory the stages in `dirs` (stage -> folder, None when not downloaded) need on the device.

    `available` is the device's free memory (RAM for "cpu" and "mps", which shares it) when known.
    """
    where = "RAM" if device_type in ("cpu", "mps") else f"{device_type} memory"
    if available is None and where == "RAM":
        available = available_ram()
    return MemoryNeed(_total(dirs, dtype, quantize), available, where, dtype, _choices(dirs, device_type))


def _choices(dirs: dict[str, Path | None], device_type: str) -> tuple[tuple[str, int], ...]:
    """The precision flags that work on `device_type` and what the same stages need with each."""
    options: list[tuple[str, str, int | None]] = (
        [("--dtype fp32", "fp32", None), ("--dtype bf16", "bf16", None)] if device_type in ("cpu", "mps") else
        [("--dtype bf16", "bf16", None), ("--quantize 8", "bf16", 8), ("--quantize 4", "bf16", 4)])
    if "lm" not in dirs:
        return ()
    return tuple((flag, _total(dirs, dtype, bits)) for flag, dtype, bits in options)


def _total(dirs: dict[str, Path | None], dtype: str, quantize: int | None) -> int:
    total = 0.0
    for name, folder in dirs.items():
        size: float = stored_bytes(hub.STAGES[name], folder)
        if name == "lm":
            size = size * (QUANT_BYTES_PER_PARAM.get(quantize or 0) or BYTES_PER_PARAM.get(dtype, 4)) \
                / STORED_BYTES_PER_PARAM
        total += size
    return int(total * OVERHEAD)


def published_needs() -> dict[str, int]:
    """GB each documented set-up needs for all three stages at their published sizes (the README quotes these:
    a test keeps them equal)."""
    every: dict[str, Path | None] = {name: None for name in hub.STAGES}
    return {"cpu fp32": round(_total(every, "fp32", None) / GB), "cpu bf16": round(_total(every, "bf16", None) / GB),
            "cuda bf16": round(_total(every, "bf16", None) / GB), "cuda 8-bit": round(_total(every, "bf16", 8) / GB),
            "cuda 4-bit": round(_total(every, "bf16", 4) / GB)}


def memory_need(stages: tuple[str, ...], *, models: Path | None, overrides: dict[str, Path | None],
                device: str | None, dtype: str | None, quantize: int | None = None) -> MemoryNeed:
    """What the stages need in memory on the chosen device and dtype, against what it has free."""
    import torch

    from glmvoice_cli.device import pick_device, pick_dtype
    from glmvoice_cli.models import settings

    chosen = pick_device(device)
    dtype_name = str(pick_dtype(dtype, chosen)).removeprefix("torch.").replace("float32", "fp32").replace(
        "bfloat16", "bf16").replace("float16", "fp16")
    dirs: dict[str, Path | None] = {}
    for s in stages:
        where = settings.locate(s, models=models, override=overrides.get(s))
        dirs[s] = where.path if hub.inspect_stage(hub.STAGES[s], where.path).complete else None
    free = torch.cuda.mem_get_info(chosen)[0] if chosen.type == "cuda" else None
    return estimate(dirs, chosen.type, dtype_name, quantize, available=free)
