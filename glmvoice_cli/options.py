"""How the model stages are placed in memory: one options type for every loader. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LM_TIMEOUT_S = 60.0  # a remote LM's longest silence: the headers, or the next token of an answer


@dataclass(frozen=True)
class LMServer:
    """A remote LM: an OpenAI-compatible completions server (vLLM) serving the GLM-4-Voice LM."""

    url: str  # http(s)://host:port, with or without /v1
    api_key: str | None = None  # sent as a Bearer token
    model: str | None = None  # the served model name; None: the server's only model
    timeout_s: float = DEFAULT_LM_TIMEOUT_S


@dataclass(frozen=True)
class LoadOptions:
    """Where and how to load the stages. None means 'choose automatically'."""

    device: str | None = None  # "cuda", "cuda:1", "mps", "cpu"; auto: cuda > mps > cpu
    dtype: str | None = None  # the LM's: "fp32" | "bf16" | "fp16" (or full names); auto: bf16 on cuda, else fp32
    quantize_bits: int | None = None  # the LM's: 4 (NF4) or 8 through bitsandbytes, CUDA only
    attn_implementation: str = "sdpa"  # the LM's attention: "sdpa" or "eager"
    seed: int | None = None  # the speech decoder's noise seed; None draws a fresh one
    schedule: str = "default"  # the speech decoder's blocks: "default" or "reference" (the demo's; see decoder)
    compile: bool | None = None  # the LM's static cache + compiled decode step; auto: on for CUDA only
    lm_server: LMServer | None = None  # run the LM on this server; only its tokenizer and config load here
