"""A static KV cache and a compiled one-token decode step for the in-process LM.

Decoding one token of a 9B model eagerly costs hundreds of Python-dispatched kernel launches; on a GPU
that launch overhead, not the memory bandwidth, sets the speed. Here the cache is preallocated at the
context length (`StaticCache`: fixed shapes, fixed addresses) and the one-token forward is compiled
once with `torch.compile`: on CUDA in "reduce-overhead" mode (CUDA graphs: a token is one graph
replay), elsewhere with inductor's default mode (fused kernels, no graphs). Prefill stays eager: its
length varies from turn to turn, and compiling it per length would recompile mid-conversation.

Every shape the loop uses is compiled by `warm_up` at load time, so nothing recompiles during a turn;
the compiled artefacts go to an on-disk cache under the glmvoice cache (`inductor_cache_dir`), so a
second start only loads them. One conversation at a time owns the static cache (`claim`): a
conversation that loses it simply re-prefills its history on its next turn. The cache can be
appended to and cropped like a dynamic one (cross-turn reuse, the crop after a barge-in, incremental
prefill of a user turn).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WARM_UP_PROMPT = 3  # ids prefilled before the warm-up steps (any small number)
WARM_UP_STEPS = 3  # CUDA graph trees run eager once, record once, then replay: all three at load time
INDUCTOR_CACHE_SUBDIR = "torch-compile"  # under the glmvoice cache root
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


_CLAIMS = itertools.count(1)


class CompileUnavailable(RuntimeError):
    """The compiled step cannot be built or run here; the caller falls back to the eager loop."""


@dataclass(frozen=True)
class CompileReport:
    """What `StaticDecoder.warm_up` did, for the load-time status line and `doctor`."""

    mode: str  # "reduce-overhead" (CUDA graphs), "default" (inductor, no graphs) or "eager"
    max_len: int  # tokens the static cache holds (the context length)
    warm_up_s: float  # first start: compile time; later starts: loading from the on-disk cache


def compile_mode(device: torch.device) -> str:
    """CUDA graphs where there are CUDA graphs; plain inductor kernels elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def inductor_cache_dir() -> Path:
    """<glmvoice cache root>/torch-compile, unless the user already chose TORCHINDUCTOR_CACHE_DIR."""
    explicit = os.environ.get(INDUCTOR_CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit)
    from glmvoice_cli.models.settings import cache_root

    return cache_root() / INDUCTOR_CACHE_SUBDIR


def use_inductor_cache() -> Path:
    """Point torch's compile caches (inductor, FX graph, autotuning) at `inductor_cache_dir`."""
    folder = inductor_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)  # read by inductor each time it looks for its cache
    return folder


class StaticDecoder:
    """One static KV cache of `max_len` tokens and the one-token forward, compiled over it.

    `step(token)` takes ids [1, 1] on the model's device and returns the fp32 logits [V] of that
    position, with `blocked` ids set to -inf; the cache grows by one. Build with `compiled=False`
    to run the same static-cache step eagerly (the fallback, and the reference in tests).
    """

    def __init__(self, model: Any, max_len: int, blocked: torch.Tensor, compiled: bool = True) -> None:
        import torch
        from transformers import StaticCache

        self.model = model
        self.max_len = int(max_len)
        self.blocked = blocked  # bool [V] on the device: padded rows (and gaps) are never tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.owner: Any = None  # the Conversation whose ids the cache holds
        self.claimed_at = 0  # when it was last handed to a conversation (the pool takes the oldest)
        self.mode = compile_mode(blocked.device) if compiled else "eager"
        self.report: CompileReport | None = None  # set by build_static_decoder
        self._input = torch.zeros((1, 1), dtype=torch.long, device=blocked.device)
        # Which threads have recorded their CUDA graphs (see warm_this_thread). Thread-local, as torch keeps
        # the graph trees: a thread id is reused once its thread ends, so a set of ids would mistake a new
        # thread for an old one.
        self._warm = threading.local()
        self._step = self._eager_step
        if compiled:
            self._step = torch.compile(self._eager_step, mode=self.mode, fullgraph=True, dynamic=False)

    @property
    def device(self) -> torch.device:
        return self.blocked.device

    def _eager_step(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().masked_fill(self.blocked, float("-inf"))

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """ids [1, 1] -> logits [V] fp32 (a fresh tensor the caller may keep until the next step)."""
        import torch

        with torch.no_grad():
            self._input.copy_(token.reshape(1, 1))  # one address, one stride: no guard can fail on it
            logits = self._step(self._input)
        # A CUDA-graph output lives in the graph's memory pool and is overwritten by the next replay.
        return logits.clone() if self.mode == "reduce-overhead" else logits

    def extend(self, ids: torch.Tensor) -> None:
        """ids [1, T] (eager, any T): the cache grows by T; no logits (a prefill chunk before the last)."""
        import torch

        with torch.no_grad():
            self.model.model(input_ids=ids, cache=self.cache, use_cache=True)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, T] (eager, any T) -> logits [V] fp32 of the last position; the cache grows by T."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().masked_fill(self.blocked, float("-inf"))

    def claim(self, conv: Any) -> Any:
        """Hand the (emptied) static cache to `conv`; its previous owner loses its cache."""
        previous = self.owner
        if previous is not None and previous is not conv:
            previous.cache, previous.cached_ids = None, []
            if getattr(previous, "slot", None) is self:
                previous.slot = None
        self.rewind_to(0)
        self.owner = conv
        self.claimed_at = next(_CLAIMS)
        return self.cache

    def length(self) -> int:
        """Tokens held (a host sync: used outside the per-token path only)."""
        return int(self.cache.get_seq_length()) if self.cache.is_initialized else 0

    def rewind_to(self, n_tokens: int) -> None:
        """Keep the first `n_tokens` positions (a counter change: stale rows are overwritten later)."""
        held = self.length()
        if n_tokens < held:
            self.cache.crop(n_tokens - held)

    def warm_this_thread(self, first_id: int = 0) -> bool:
        """Record the CUDA graphs for the calling thread, if they are not yet; True if it ran.

        torch's CUDA graph trees are kept per thread: graphs recorded by the loading thread are recorded
        again by the first steps on another one. The chat decodes on its model thread, so it calls this
        there once, before the first turn, instead of paying the recording inside it. Other modes'
        compiled kernels serve every thread: nothing to do. The cache is emptied (call it between turns).
        """
        if self.mode != "reduce-overhead" or getattr(self._warm, "done", False):
            return False
        self.warm_up(first_id)
        return True

    def warm_up(self, first_id: int = 0) -> CompileReport:
        """Prefill a few ids and run the step until every shape is compiled (and graphs recorded)."""
        import torch

        self._warm.done = True
        start = time.perf_counter()
        ids = torch.full((1, WARM_UP_PROMPT), first_id, dtype=torch.long, device=self.device)
        self.claim(None)
        self.prefill(ids)
        for _ in range(WARM_UP_STEPS):
            self.step(ids[:, :1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.claim(None)
        return CompileReport(self.mode, self.max_len, time.perf_counter() - start)


def build_static_decoder(model: Any, max_len: int, blocked: torch.Tensor, compiled: bool) -> StaticDecoder:
    """A warmed-up StaticDecoder; raises CompileUnavailable (with the reason) when compiling fails.

    The caller turns that into a one-line warning and keeps the eager loop.
    """
    if compiled:
        use_inductor_cache()
    try:
        decoder = StaticDecoder(model, max_len, blocked, compiled=compiled)
        decoder.report = decoder.warm_up()
    except Exception as e:  # inductor, a C++ compiler, a CUDA graph capture: any of them may fail here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileUnavailable(f"{type(e).__name__}: {reason[:200]}") from e
    return decoder
