"""How a token is drawn from the LM's logits, as the reference does it, in one place for every backend.

The reference (`model_server.py`) calls transformers' `generate` with the web demo's temperature and
top-p (0.2 and 0.8) and leaves everything else to the checkpoint's `generation_config.json`, and where
that file is silent, to transformers' own defaults. So `do_sample` and `top_k` come from the file, and a
silent `top_k` means 50; the file's own temperature and top-p never apply, since the demo always passes
its own. Transformers applies temperature, then top-k, then top-p (`SamplingSettings.sample`
reproduces that order). Flags override everything.

`SamplingSettings` is the resolved, explicit form a remote backend can send as is (`to_dict`);
`blocked_ids` lists the ids no backend may ever sample (padded rows and unnamed gaps in the vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmvoice_cli.errors import CheckpointMismatchError
from glmvoice_cli.lm.checkpoint import read_json_object

if TYPE_CHECKING:
    import torch

    from glmvoice_cli.lm.text_tokenizer import TextTokenizer

GENERATION_CONFIG_FILE = "generation_config.json"
DEMO_TEMPERATURE = 0.2  # official web demo defaults, passed explicitly to generate()
DEMO_TOP_P = 0.8
TRANSFORMERS_TOP_K = 50  # transformers' GenerationConfig default when the file is silent
NUCLEUS_CANDIDATES = 1024  # ids sorted for top-p before falling back to a full-vocabulary sort
MAX_GENERATION_CONFIG_BYTES = 1 << 20  # the real file is 228 bytes; anything huge is not one


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling in effect for a turn: everything a backend needs to draw tokens the same way."""

    do_sample: bool = True  # False: greedy (argmax), whatever the other fields say
    temperature: float = DEMO_TEMPERATURE  # logits are divided by it; <= 0 also means greedy
    top_k: int = TRANSFORMERS_TOP_K  # keep the k most likely ids (ties at the k-th kept); 0 disables
    top_p: float = DEMO_TOP_P  # then keep the smallest set holding this much mass; 1.0 disables
    source: str = "defaults"  # where do_sample/top_k came from (a file path, or "defaults"); shown to users

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0

    def override(
        self, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        do_sample: bool | None = None,
    ) -> SamplingSettings:
        """A copy with the given (non-None) fields replaced: flags beat the folder's file."""
        return replace(
            self,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            top_k=self.top_k if top_k is None else top_k,
            do_sample=self.do_sample if do_sample is None else do_sample,
        )

    def describe(self) -> str:
        """One line for `-v` and `doctor`."""
        if self.greedy:
            return f"greedy (from {self.source})"
        top_k = f"top-k {self.top_k}" if self.top_k else "no top-k"
        return f"temperature {self.temperature:g}, {top_k}, top-p {self.top_p:g} (do_sample, top_k from {self.source})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingSettings:
        return cls(**{k: data[k] for k in ("do_sample", "temperature", "top_k", "top_p", "source") if k in data})

    def sample(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        """logits [V] (blocked ids already -inf) -> one id: temperature, then top-k, then top-p."""
        return sample_token(logits, self, generator)


def read_sampling(folder: Path) -> SamplingSettings:
    """The reference's sampling for the checkpoint in `folder` (demo temperature/top-p, file's do_sample/top_k).

    Without the file: sampling with the demo's values and transformers' top-k. With it, the reference's
    behaviour exactly: a file silent on `do_sample` means greedy, as transformers' default is.
    """
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return SamplingSettings()
    raw = read_json_object(path, MAX_GENERATION_CONFIG_BYTES)
    do_sample = raw.get("do_sample", False)  # transformers' default: a file silent on it means greedy
    if not isinstance(do_sample, bool):
        raise CheckpointMismatchError(f"{path}: field 'do_sample' must be true or false, got {do_sample!r}")
    top_k = raw.get("top_k", TRANSFORMERS_TOP_K)
    if top_k is None:
        top_k = 0  # transformers: top_k None adds no top-k filter
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise CheckpointMismatchError(f"{path}: field 'top_k' must be an integer >= 0, got {top_k!r}")
    return SamplingSettings(do_sample=do_sample, top_k=top_k, source=str(path))


def sample_token(logits: torch.Tensor, sampling: SamplingSettings, generator: torch.Generator) -> int:
    """logits [V] -> one id, as transformers' sampling does: temperature, top-k, top-p, multinomial.

    Greedy takes the argmax; otherwise one multinomial draw over the ids `candidates` lists.
    """
    return sample_on_device(logits, sampling, generator)[0]


def sample_on_device(
    logits: torch.Tensor, sampling: SamplingSettings, generator: torch.Generator
) -> tuple[int, torch.Tensor]:
    """logits [V] -> (id, the same id as ids [1, 1] on the logits' device), with one host synchronisation.

    The draw runs on the device among a fixed number of candidates (the top NUCLEUS_CANDIDATES ids,
    or top_k if larger), so nothing needs the host until the id is read back. In the rare case where
    the candidates cannot hold the answer (a nucleus wider than them, or ids tied with the k-th beyond
    them), the draw is made again over the full sorted vocabulary: a second synchronisation.
    """
    import torch

    if sampling.greedy:
        token = logits.argmax()
        return int(token), token.view(1, 1)
    scaled = logits / sampling.temperature
    n = scaled.numel()
    token, exact = _draw(scaled, sampling, generator, _n_candidates(sampling, n))
    token_id, is_exact = torch.stack([token, exact.to(token.dtype)]).tolist()  # the one sync
    if not is_exact:
        token, _ = _draw(scaled, sampling, generator, n)
        token_id = int(token)
    return int(token_id), token.view(1, 1)


def _n_candidates(sampling: SamplingSettings, n: int) -> int:
    if 0 < sampling.top_k < n:
        return min(n, max(sampling.top_k + 1, NUCLEUS_CANDIDATES))  # one past the k-th at least: ties show
    return n if sampling.top_p >= 1.0 else min(n, NUCLEUS_CANDIDATES)


def _draw(
    scaled: torch.Tensor, sampling: SamplingSettings, generator: torch.Generator, n_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw among the top `n_candidates` ids: (id, exact) as 0-d device tensors, no host sync.

    `exact` is False when the candidates may miss an id that the full-vocabulary rule keeps.
    """
    import torch

    n = scaled.numel()
    everything = torch.ones((), dtype=torch.bool, device=scaled.device)  # a fill, not a host-to-device copy
    if 0 < sampling.top_k < n:
        values, ids = scaled.topk(n_candidates)
        values = values.masked_fill(values < values[sampling.top_k - 1], float("-inf"))  # ties at the k-th stay
        exact = everything if n_candidates >= n else torch.isinf(values[-1])  # last dropped: no tie beyond it
        probs = torch.softmax(values, dim=-1)
    else:
        full = torch.softmax(scaled, dim=-1)
        if sampling.top_p >= 1.0:  # plain multinomial over the whole vocabulary
            return torch.multinomial(full, 1, generator=generator)[0], everything
        probs, ids = full.topk(n_candidates)
        exact = everything if n_candidates >= n else probs.sum() >= sampling.top_p
    if sampling.top_p < 1.0:
        # keep an id while the mass before it is below top_p; the top id always stays
        before = probs.cumsum(0) - probs
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    return ids[torch.multinomial(probs, 1, generator=generator)[0]], exact


def candidates(logits: torch.Tensor, sampling: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [C], ids [C]) of the ids that can be drawn, most likely first; weights sum to <= 1.

    Only the candidates (the top-k ids, or the top NUCLEUS_CANDIDATES ids when the nucleus lies inside
    them) are sorted: the draw is the same as transformers' over the full vocabulary. Not for greedy.
    """
    import torch

    scaled = logits / sampling.temperature
    n = scaled.numel()
    if 0 < sampling.top_k < n:
        values, ids = scaled.topk(sampling.top_k)
        ties = int((scaled >= values[-1]).sum())  # transformers keeps every id tied with the k-th
        if ties > sampling.top_k:
            values, ids = scaled.topk(ties)
        probs = torch.softmax(values, dim=-1)
    else:
        full = torch.softmax(scaled, dim=-1)
        if sampling.top_p >= 1.0:
            return full, torch.arange(n, device=logits.device)
        probs, ids = full.topk(min(NUCLEUS_CANDIDATES, n))
        if float(probs.sum()) < sampling.top_p:
            probs, ids = full.sort(descending=True)
    if sampling.top_p < 1.0:
        # keep an id while the mass before it is below top_p; the top id always stays
        before = probs.cumsum(0) - probs
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    return probs, ids


# --------------------------------------------------------------------------- ids never sampled


def blocked_ids(tokenizer: TextTokenizer, n_logits: int) -> list[int]:
    """Ids in [0, n_logits) that are neither a BPE rank nor a named token: never to be sampled.

    The padded embedding rows beyond the vocabulary, and any unnamed gap inside it (the real
    vocabulary may leave one between `<|end_of_audio|>` and `<|audio_0|>`).
    """
    valid = tokenizer.valid_ids
    return [i for i in range(n_logits) if i not in valid]


def blocked_mask(tokenizer: TextTokenizer, n_logits: int, device: torch.device) -> torch.Tensor:
    """Bool [n_logits], True where `blocked_ids` says an id is never sampled."""
    import torch

    mask = torch.ones(n_logits, dtype=torch.bool)
    valid = [i for i in tokenizer.valid_ids if i < n_logits]
    mask[torch.tensor(valid, dtype=torch.long)] = False
    return mask.to(device)
