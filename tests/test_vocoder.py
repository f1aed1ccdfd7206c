"""HiFT vocoder on a tiny random decoder: shapes, weight norm, source cache, randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glmvoice_cli.decoder.vocoder import SourceDraws, WNConv1d, _hann_periodic
from glmvoice_cli.tiny.decoder import TinyDecoderSpec, tiny_decoder


@pytest.fixture(scope="module")
def hift():  # type: ignore[no-untyped-def]
    return tiny_decoder(TinyDecoderSpec(seed=4)).hift


def test_shapes_and_limit(hift) -> None:  # type: ignore[no-untyped-def]
    mel = torch.randn(1, 80, 20, generator=torch.Generator().manual_seed(0))
    speech, source = hift.inference(mel, generator=torch.Generator().manual_seed(0))
    assert speech.shape == (1, 20 * 256) and source.shape == (1, 1, 20 * 256)
    assert speech.abs().max() <= hift.cfg.audio_limit
    assert torch.isfinite(speech).all()


def test_generator_determinism_and_global_rng(hift) -> None:  # type: ignore[no-untyped-def]
    mel = torch.randn(1, 80, 8)
    state = torch.get_rng_state()
    a, _ = hift.inference(mel, generator=torch.Generator().manual_seed(7))
    b, _ = hift.inference(mel, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_cache_source_replaces_head(hift) -> None:  # type: ignore[no-untyped-def]
    mel = torch.randn(1, 80, 6)
    cache = torch.full((1, 1, 256), 0.05)
    _, source = hift.inference(mel, cache, generator=torch.Generator().manual_seed(1))
    assert torch.equal(source[:, :, :256], cache)
    decoded, _ = hift.inference(mel, source)  # a full-length cache makes decoding deterministic
    again, _ = hift.inference(mel, source, generator=torch.Generator().manual_seed(3))
    assert torch.equal(decoded, again)


def test_weight_norm_fold() -> None:
    conv = WNConv1d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(1, 4, 10)
    unfolded = conv(x)
    assert conv.weight_g is not None and conv.weight_v is not None
    manual = conv.weight_g * conv.weight_v / conv.weight_v.norm(dim=(1, 2), keepdim=True)
    conv.fold()
    assert conv.folded and conv.weight is not None
    torch.testing.assert_close(conv.weight, manual)
    assert torch.equal(conv(x), unfolded)
    assert sorted(conv.state_dict()) == ["bias", "weight"]


def test_transposed_weight_norm_dim0_is_input_channels() -> None:
    conv = WNConv1d(8, 4, 16, stride=8, padding=4, transpose=True)
    assert conv.weight_v.shape == (8, 4, 16) and conv.weight_g.shape == (8, 1, 1)
    assert conv(torch.randn(1, 8, 5)).shape == (1, 4, (5 - 1) * 8 - 8 + 16)


def test_phase_draw_and_unvoiced(hift) -> None:  # type: ignore[no-untyped-def]
    n = 512
    f0 = torch.zeros(1, 1, n)  # unvoiced: noise only, amplitude sine_amp / 3
    draws = SourceDraws(torch.rand(1, 9, 1), torch.ones(1, 9, n))
    waves = hift.m_source.sine_waves(f0, draws)
    assert torch.allclose(waves, torch.full_like(waves, hift.cfg.nsf_alpha / 3))


def test_cycle_offset_continues_sines(hift) -> None:  # type: ignore[no-untyped-def]
    """Two halves with the carried phase equal one pass (what the streaming decoder relies on)."""
    n = 4096
    f0 = torch.full((1, 1, n), 150.0)
    draws = SourceDraws(torch.rand(1, 9, 1), torch.zeros(1, 9, n))
    trace: dict[str, torch.Tensor] = {}
    whole = hift.m_source.sine_waves(f0, draws, trace)
    half = n // 2
    first = hift.m_source.sine_waves(f0[..., :half], SourceDraws(draws.phase_u, draws.noise[..., :half]), trace)
    offset = trace["cycles"][..., -1:] % 1
    second = hift.m_source.sine_waves(
        f0[..., half:], SourceDraws(draws.phase_u, draws.noise[..., half:], offset)
    )
    torch.testing.assert_close(torch.cat([first, second], -1), whole, atol=1e-4, rtol=0)


def test_hann_window_matches_scipy() -> None:
    from scipy import signal  # in the dev extra

    for n in (16, 1024):
        expected = signal.get_window("hann", n, fftbins=True).astype(np.float32)
        assert np.array_equal(_hann_periodic(n).numpy(), expected)
