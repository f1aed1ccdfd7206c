"""Parity of our native LM loader and tokenizer with the reference fixtures in `<golden>/lm`.

Every size, id and expected value comes from the fixture files, so any fixture folder of this layout
(other sizes, other seeds) must pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmvoice_cli.lm.loader import load_lm
from glmvoice_cli.lm.sampling import SamplingSettings, sample_token
from glmvoice_cli.lm.text_tokenizer import GLM4_PATTERN, TextTokenizer
from glmvoice_cli.lm.voice_lm import GenerationOptions, VoiceLM
from glmvoice_cli.options import LoadOptions

pytestmark = pytest.mark.golden

LOGITS_ATOL = 2e-5  # fp32 contract of the fixture (measured ~3e-6 with SDPA, 0 with eager)


@pytest.fixture(scope="module")
def lm_dir(golden: Path) -> Path:
    return golden / "lm"


@pytest.fixture(scope="module")
def reference(lm_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(lm_dir / "reference_outputs.safetensors"))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def voice_lm(request: pytest.FixtureRequest, lm_dir: Path) -> VoiceLM:
    options = LoadOptions(device="cpu", dtype="fp32", attn_implementation=request.param)
    return VoiceLM(load_lm(lm_dir, options), TextTokenizer.from_folder(lm_dir))


def test_config_maps_the_fixture_sizes(lm_dir: Path, voice_lm: VoiceLM) -> None:
    raw = json.loads((lm_dir / "config.json").read_text())
    cfg = voice_lm.model.config
    assert cfg.vocab_size == raw["padded_vocab_size"]
    assert cfg.num_hidden_layers == raw["num_layers"]
    assert cfg.num_key_value_heads == raw["multi_query_group_num"]
    assert cfg.head_dim == raw["kv_channels"]
    assert cfg.rms_norm_eps == raw["layernorm_epsilon"]
    assert cfg.rope_parameters["rope_theta"] == 10_000 * raw["rope_ratio"]


def test_full_forward_logits(voice_lm: VoiceLM, reference: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        logits = voice_lm.model(input_ids=reference["input_ids"]).logits
    assert logits.shape == reference["logits"].shape
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=LOGITS_ATOL)


def test_full_sequence_logits(voice_lm: VoiceLM, reference: dict[str, torch.Tensor]) -> None:
    ids = torch.cat([reference["input_ids"], reference["greedy_ids"]], dim=1)
    with torch.no_grad():
        logits = voice_lm.model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference["full_sequence_logits"], rtol=0, atol=LOGITS_ATOL)


def test_greedy_ids_and_cached_step_logits_native(voice_lm: VoiceLM, reference: dict) -> None:
    """The loaded model with a KV cache, over the full padded vocabulary (the fixture's contract)."""
    from transformers import DynamicCache

    model = voice_lm.model
    cache = {voice_lm._cache_kwarg: DynamicCache(config=model.config)}
    n_steps = reference["greedy_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], **cache).logits[:, -1]
        greedy, steps = [], []
        for step in range(n_steps):
            token = logits.argmax(-1, keepdim=True)
            greedy.append(int(token))
            if step + 1 < n_steps:
                logits = model(input_ids=token, **cache).logits[:, -1]
                steps.append(logits[0])
    assert greedy == reference["greedy_ids"][0].tolist()
    expected = reference["decode_step_logits"][0, : len(steps)]
    torch.testing.assert_close(torch.stack(steps), expected, rtol=0, atol=LOGITS_ATOL)


def _require_in_tokenizer_range(voice_lm: VoiceLM, reference: dict) -> int:
    n_valid = voice_lm.text_tokenizer.vocab_size  # our loop masks the padded rows beyond this
    if max(reference["greedy_ids"][0].tolist()) >= n_valid:
        pytest.skip("the reference continuation uses padded-vocabulary rows, which our loop masks")
    return n_valid


def test_greedy_ids_and_cached_step_logits_ours(voice_lm: VoiceLM, reference: dict) -> None:
    """Our prefill/step path with the KV cache: greedy ids exact, per-step logits within tolerance."""
    n_valid = _require_in_tokenizer_range(voice_lm, reference)
    conv = voice_lm.new_conversation()
    n_steps = reference["greedy_ids"].shape[1]
    logits = voice_lm.prefill(conv, reference["input_ids"][0].tolist())
    assert torch.isneginf(logits[n_valid:]).all()
    torch.testing.assert_close(
        logits[:n_valid], reference["logits"][0, -1, :n_valid], rtol=0, atol=LOGITS_ATOL
    )
    greedy, steps = [], []
    for step in range(n_steps):
        token = sample_token(logits, SamplingSettings(do_sample=False), torch.Generator())
        greedy.append(token)
        if step + 1 < n_steps:
            logits = voice_lm.prefill(conv, [token])
            assert conv.last_prefill_tokens == 1  # the cache covered everything before
            steps.append(logits[:n_valid])
    assert greedy == reference["greedy_ids"][0].tolist()
    expected = reference["decode_step_logits"][0, : len(steps), :n_valid]
    torch.testing.assert_close(torch.stack(steps), expected, rtol=0, atol=LOGITS_ATOL)


def test_greedy_through_the_streaming_loop(voice_lm: VoiceLM, reference: dict) -> None:
    """The generation loop itself (temperature 0) reproduces the reference continuation."""
    _require_in_tokenizer_range(voice_lm, reference)
    conv = voice_lm.new_conversation()
    expected = reference["greedy_ids"][0].tolist()
    options = GenerationOptions(temperature=0.0, max_new_tokens=len(expected))
    events = list(voice_lm.stream_ids(conv, reference["input_ids"][0].tolist(), options))
    assert conv.last_output == expected
    assert events[-1].n_generated == len(expected)


@pytest.fixture(scope="module")
def tokenizer_golden(lm_dir: Path) -> dict:
    return json.loads((lm_dir / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(lm_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_folder(lm_dir)


def test_tokenizer_layout(tokenizer: TextTokenizer, tokenizer_golden: dict) -> None:
    assert tokenizer_golden["pattern"] == GLM4_PATTERN
    assert tokenizer.n_ranks == tokenizer_golden["n_mergeable_ranks"]
    assert tokenizer.audio_offset == tokenizer_golden["audio_token_offset"]
    assert tokenizer.n_audio_tokens == tokenizer_golden["n_audio_tokens"]


def test_tokenizer_special_ids(tokenizer: TextTokenizer, tokenizer_golden: dict) -> None:
    expected = {**tokenizer_golden["special_token_ids"], **tokenizer_golden["audio_and_extra_token_ids"]}
    assert expected
    for name, token_id in expected.items():
        assert tokenizer.token_id(name) == token_id, name


def test_tokenizer_plain_encodings(tokenizer: TextTokenizer, tokenizer_golden: dict) -> None:
    (key,) = [k for k in tokenizer_golden if k.startswith("encode_plain")]
    assert tokenizer_golden[key]
    for case in tokenizer_golden[key]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["text"]


def test_fixture_prompt_starts_with_the_official_prefix(tokenizer: TextTokenizer, reference: dict) -> None:
    ids = reference["input_ids"][0].tolist()
    assert ids[:2] == tokenizer.prefix_ids
