"""Flow model pieces on a tiny random decoder: lengths, positions, masks, CFM, RNG hygiene."""

from __future__ import annotations

import pytest
import torch

from glmvoice_cli.decoder.conformer import _rel_shift, block_attention_mask, relative_position_table
from glmvoice_cli.decoder.flow import mel_frames, time_span
from glmvoice_cli.tiny.decoder import TinyDecoderSpec, tiny_decoder


@pytest.fixture(scope="module")
def models():  # type: ignore[no-untyped-def]
    return tiny_decoder(TinyDecoderSpec(seed=3))


@pytest.mark.parametrize(("tokens", "frames"), [(10, 68), (25, 172), (30, 206), (75, 516), (120, 826)])
def test_mel_frames(tokens: int, frames: int) -> None:
    assert mel_frames(tokens, 12.5) == frames


def test_relative_position_table_layout() -> None:
    n, d = 5, 8
    table = relative_position_table(n, d)
    assert table.shape == (1, 2 * n - 1, d)
    assert torch.all(table[0, n - 1, 0::2] == 0) and torch.all(table[0, n - 1, 1::2] == 1)  # position 0
    assert torch.allclose(table[0, 0, 0], torch.sin(torch.tensor(n - 1.0)))  # row 0 = position n-1
    assert torch.allclose(table[0, -1, 0], torch.sin(torch.tensor(-(n - 1.0))))


def test_rel_shift_indexing() -> None:
    t = 4
    raw = torch.arange(t * (2 * t - 1), dtype=torch.float32).view(1, 1, t, 2 * t - 1)
    shifted = _rel_shift(raw)
    for i in range(t):
        for j in range(t):
            assert shifted[0, 0, i, j] == raw[0, 0, i, t - 1 - i + j]


def test_block_mask() -> None:
    mask = block_attention_mask(torch.tensor([25]), 25, 10)[0]
    assert mask[3, 9] and not mask[3, 10]  # same block sees ahead, not the next block
    assert mask[24, 0] and mask[12, 19] and not mask[12, 20]
    padded = block_attention_mask(torch.tensor([7]), 10, 10)[0]
    assert not padded[0, 8] and padded[0, 6]


def test_encoder_is_block_causal(models) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (1, 30), generator=g)
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 64
    with torch.inference_mode():
        a = models.flow.encoder(models.flow.input_embedding(tokens), torch.tensor([30]))
        b = models.flow.encoder(models.flow.input_embedding(changed), torch.tensor([30]))
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_time_span() -> None:
    span = time_span(10, "cosine")
    assert span[0] == 0 and abs(span[-1].item() - 1) < 1e-6
    assert torch.all(span[1:] > span[:-1]) and span[1] < 0.1  # small steps near the noise end


def test_inference_shapes_and_rng(models) -> None:  # type: ignore[no-untyped-def]
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    a = models.flow.inference(tokens, generator=torch.Generator().manual_seed(5))
    b = models.flow.inference(tokens, generator=torch.Generator().manual_seed(5))
    c = models.flow.inference(tokens, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be touched"
    assert a.shape == (1, 80, mel_frames(12, 12.5))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_prompt_continuation_length(models) -> None:  # type: ignore[no-untyped-def]
    prompt = torch.randint(0, 64, (1, 10))
    feat = torch.randn(1, 50, 80)
    mel = models.flow.inference(torch.randint(0, 64, (1, 15)), prompt, feat)
    assert mel.shape == (1, 80, mel_frames(25, 12.5) - 50)
    with pytest.raises(ValueError, match="noise shape"):
        models.flow.inference(torch.randint(0, 64, (1, 15)), noise=torch.zeros(1, 80, 3))


def test_batched_guidance_matches_sequential(models) -> None:  # type: ignore[no-untyped-def]
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(2))
    seq = models.flow.inference(tokens, batch_guidance=False)
    both = models.flow.inference(tokens, batch_guidance=True)
    torch.testing.assert_close(both, seq, atol=1e-4, rtol=1e-4)


def test_zero_speaker_embedding_is_bias(models) -> None:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        spks = models.flow.speaker()
    assert torch.equal(spks[0], models.flow.spk_embed_affine_layer.bias)
