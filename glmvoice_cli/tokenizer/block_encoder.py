"""The WhisperVQ encoder run one span of blocks at a time, with per-layer key/value caches.

The encoder is block-causal: a position attends to every earlier position and to its own block,
never to a later block; both convolutions are causal; pooling groups 4 positions that never straddle
a block boundary. So the states of a completed block depend only on the log-mel frames up to its end,
and a later span can be computed from the earlier blocks' keys and values alone (like an LM's cache).

`encode_span` computes positions [p0, p1) (p0 block-aligned) of one window from that window's
features and the caches of [0, p0). The result equals the whole-window forward up to float rounding
(different matrix shapes sum in a different order); `SpanResult.margin` reports how close each id came
to a tie so that the caller can fall back to the whole-window path where rounding could matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from glmvoice_cli.tokenizer.whisper_vq import CONV2_STRIDE, EncoderLayer, WhisperVQEncoder, code_distances

LayerCache = tuple[torch.Tensor, torch.Tensor]  # keys, values (1, heads, positions, head_dim)


@dataclass
class SpanResult:
    ids: list[int]  # one per pooled position of the span (padding positions included)
    valid: list[bool]  # which pooled positions hold real audio
    margin: torch.Tensor  # (n,) second-nearest minus nearest code distance
    scale: torch.Tensor  # (n,) size of the terms the distances are made of, to make `margin` relative
    caches: list[LayerCache]  # per layer: keys and values of this span only
    states: torch.Tensor  # (n, D) pooled states the ids were chosen from


def _front(model: WhisperVQEncoder, feats: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
    """Both causal convolutions for positions [p0, p1): feats (n_mels, >= 2*p1) -> (1, p1 - p0, D).

    conv2 at position p reads conv1 frames 2p-2..2p, which read mel frames 2p-4..2p; before frame 0
    both convolutions see zeros (their causal padding), so the span starting at 0 keeps the padding.
    """
    dtype = model.conv1.weight.dtype
    if p0 == 0:
        x = F.gelu(model.conv1(feats[None, :, : 2 * p1].to(dtype)))
        return F.gelu(model.conv2(x)).transpose(1, 2)
    mel = feats[None, :, 2 * p0 - 4 : 2 * p1].to(dtype)
    x = F.gelu(F.conv1d(mel, model.conv1.weight, model.conv1.bias))
    x = F.gelu(F.conv1d(x, model.conv2.weight, model.conv2.bias, stride=CONV2_STRIDE))
    return x.transpose(1, 2)


def _mask(offset: int, valid: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, n, offset + n) mask for queries [offset, offset + n) over keys [0, offset + n)."""
    n = valid.shape[0]
    q = torch.arange(offset, offset + n, device=valid.device)[:, None]
    k = torch.arange(offset + n, device=valid.device)[None, :]
    keys_valid = torch.cat([torch.ones(offset, dtype=torch.bool, device=valid.device), valid])
    allowed = ((k <= q) | (k // block == q // block)) & keys_valid[None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _layer(layer: EncoderLayer, x: torch.Tensor, past: LayerCache | None, mask: torch.Tensor,
           ) -> tuple[torch.Tensor, LayerCache]:
    attn = layer.self_attn
    b, t, d = x.shape

    def split(y: torch.Tensor) -> torch.Tensor:
        return y.view(b, t, attn.heads, d // attn.heads).transpose(1, 2)

    h = layer.self_attn_layer_norm(x)
    q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    x = x + attn.out_proj(y.transpose(1, 2).reshape(b, t, d))
    x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
    return x, (k, v)


@dataclass
class Span:
    """One window's positions [p0, p1) to encode (see `encode_span`)."""

    feats: torch.Tensor  # (n_mels, frames) of the window, frames >= 2 * p1
    frame_valid: torch.Tensor  # (frames,) bool
    p0: int
    p1: int
    past: list[LayerCache] | None  # every layer's cache of [0, p0) (None at 0)


@torch.inference_mode()
def encode_span(model: WhisperVQEncoder, feats: torch.Tensor, frame_valid: torch.Tensor, p0: int, p1: int,
                past: list[LayerCache] | None) -> SpanResult:
    """Ids of positions [p0, p1) of one window; `past` holds every layer's cache of [0, p0) (None at 0).

    feats: (n_mels, frames) of the window (frames >= 2 * p1); frame_valid: (frames,) bool.
    """
    return encode_spans(model, [Span(feats, frame_valid, p0, p1, past)])[0]


@torch.inference_mode()
def encode_spans(model: WhisperVQEncoder, spans: list[Span]) -> list[SpanResult]:
    """Several streams' spans at once: spans of the same length share each layer's call, wherever they start.

    A span that starts later has more keys (its earlier blocks' caches): the others' keys are padded on the
    left with zeros that the attention mask hides, so each row equals its span encoded alone up to float
    rounding (which `SpanResult.margin` covers, as for a span against the whole window).
    """
    groups: dict[int, list[int]] = {}
    for index, span in enumerate(spans):
        groups.setdefault(span.p1 - span.p0, []).append(index)
    results: dict[int, SpanResult] = {}
    for members in groups.values():
        for index, result in zip(members, _encode_group(model, [spans[i] for i in members]), strict=True):
            results[index] = result
    return [results[i] for i in range(len(spans))]


def _left_padded(past: list[LayerCache | None], masks: list[torch.Tensor]) -> tuple[LayerCache | None, torch.Tensor]:
    """Each row's keys/values of earlier blocks and its mask, padded on the left to the longest row (a row with
    no earlier block is all padding)."""
    lengths = [0 if p is None else p[0].shape[2] for p in past]
    longest = max(lengths)
    mask = torch.cat([F.pad(m, (longest - n, 0), value=torch.finfo(m.dtype).min)
                      for m, n in zip(masks, lengths, strict=True)])
    if longest == 0:
        return None, mask
    ref = next(p for p in past if p is not None)[0]
    empty = ref.new_zeros(1, ref.shape[1], 0, ref.shape[3])
    padded = [(F.pad(k, (0, 0, longest - n, 0)), F.pad(v, (0, 0, longest - n, 0)))
              for (k, v), n in zip((p or (empty, empty) for p in past), lengths, strict=True)]
    return (torch.cat([k for k, _ in padded]), torch.cat([v for _, v in padded])), mask


def _encode_group(model: WhisperVQEncoder, spans: list[Span]) -> list[SpanResult]:
    cfg = model.cfg
    device = model.conv1.weight.device
    x = torch.cat([_front(model, span.feats.to(device), span.p0, span.p1) for span in spans])
    x = x + torch.stack([model.embed_positions.weight[span.p0 : span.p1] for span in spans])
    valid = torch.stack([span.frame_valid.to(device)[::CONV2_STRIDE][span.p0 : span.p1].bool() for span in spans])
    offsets, block, k = [span.p0 for span in spans], cfg.quantize_causal_block_size, cfg.pooling_kernel_size
    if block is None or k is None:  # StreamingTokenizer refuses such configs up front
        raise ValueError("block encoding needs a block-causal, pooled tokenizer")
    caches: list[LayerCache] = []
    for i, layer in enumerate(model.layers):
        past, mask = _left_padded([None if span.past is None else span.past[i] for span in spans],
                                  [_mask(offset, row, block, x.dtype) for offset, row in zip(offsets, valid, strict=True)])
        x, cache = _layer(cast(EncoderLayer, layer), x, past, mask)
        caches.append(cache)
        if i + 1 == cfg.pooling_position:
            x, valid = model._pool(x), valid[:, ::k]
            offsets, block = [offset // k for offset in offsets], max(1, block // k)
    results = []
    for row in range(len(spans)):
        pooled = x[row]
        distances = code_distances(pooled, model.codebook.weight)
        best = distances.topk(min(2, distances.shape[1]), dim=1, largest=False)
        ids = best.indices[:, 0]
        margin = best.values[:, 1] - best.values[:, 0] if best.values.shape[1] > 1 else torch.full_like(ids, 1e30)
        scale = (pooled.float() ** 2).sum(1) + 1.0  # distances are |x|^2 + |c|^2 - 2x.c: rounding scales with |x|^2
        own = [(key[row : row + 1], value[row : row + 1]) for key, value in caches]
        results.append(SpanResult(ids.tolist(), valid[row].tolist(), margin.float(), scale, own, pooled))
    return results
