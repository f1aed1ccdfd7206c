"""How the model stages are placed in memory: one options type for every loader. No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadOptions:
    """Where and how to load the stages. None means 'choose automatically'."""

    device: str | None = None  # "cuda", "cuda:1", "mps", "cpu"; auto: cuda > mps > cpu
    dtype: str | None = None  # the LM's: "fp32" | "bf16" | "fp16" (or full names); auto: bf16 on cuda, else fp32
    quantize_bits: int | None = None  # the LM's: 4 (NF4) or 8 through bitsandbytes, CUDA only
    attn_implementation: str = "sdpa"  # the LM's attention: "sdpa" or "eager"
    seed: int | None = None  # the speech decoder's noise seed; None draws a fresh one
    compile: bool | None = None  # the LM's static cache + compiled decode step; auto: on for CUDA only
