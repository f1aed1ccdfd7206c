"""Sampling as the reference does it: generation_config.json, transformers' warper order, blocked ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmvoice_cli.errors import CheckpointMismatchError
from glmvoice_cli.lm.prompts import TextInput
from glmvoice_cli.lm.sampling import (
    DEMO_TEMPERATURE,
    DEMO_TOP_P,
    GENERATION_CONFIG_FILE,
    NUCLEUS_CANDIDATES,
    TRANSFORMERS_TOP_K,
    SamplingSettings,
    blocked_ids,
    candidates,
    read_sampling,
    sample_on_device,
    sample_token,
)
from glmvoice_cli.lm.voice_lm import GenerationOptions, VoiceLM
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

SPEC = TinyLMSpec(hidden_size=32, num_layers=1, num_heads=4, kv_groups=2, ffn_hidden_size=64, n_reserved=3)


def _write_generation_config(folder: Path, **fields: object) -> Path:
    path = folder / GENERATION_CONFIG_FILE
    path.write_text(json.dumps(fields), encoding="utf-8")
    return path


def test_without_the_file_the_demo_values_and_transformers_top_k(tmp_path: Path) -> None:
    sampling = read_sampling(tmp_path)
    assert (sampling.do_sample, sampling.temperature, sampling.top_p) == (True, DEMO_TEMPERATURE, DEMO_TOP_P)
    assert sampling.top_k == TRANSFORMERS_TOP_K == 50
    assert sampling.source == "defaults"


def test_the_file_gives_do_sample_and_top_k_but_not_temperature(tmp_path: Path) -> None:
    """The GLM-4 family file: do_sample true, temperature 0.8, top_p 0.8, no top_k (so 50)."""
    path = _write_generation_config(tmp_path, do_sample=True, temperature=0.8, top_p=0.8, eos_token_id=[1, 2])
    sampling = read_sampling(tmp_path)
    assert sampling == SamplingSettings(do_sample=True, top_k=50, source=str(path))
    assert sampling.temperature == DEMO_TEMPERATURE  # the demo passes its own temperature and top-p
    _write_generation_config(tmp_path, do_sample=True, top_k=7)
    assert read_sampling(tmp_path).top_k == 7


def test_a_file_silent_on_do_sample_means_greedy_as_in_transformers(tmp_path: Path) -> None:
    _write_generation_config(tmp_path, temperature=0.8)
    sampling = read_sampling(tmp_path)
    assert sampling.greedy and "greedy" in sampling.describe()


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"do_sample": "yes"}', "do_sample"),
        ('{"do_sample": true, "top_k": -1}', "top_k"),
        ('{"do_sample": true, "top_k": 2.5}', "top_k"),
        ('{"do_sample": true, "top_k": true}', "top_k"),
        ("[1, 2]", "JSON object"),
        ("{not json", "unreadable JSON"),
        ("[" * 100_000, "unreadable JSON"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_field(tmp_path: Path, content: str, field: str) -> None:
    (tmp_path / GENERATION_CONFIG_FILE).write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointMismatchError, match=field) as info:
        read_sampling(tmp_path)
    assert GENERATION_CONFIG_FILE in str(info.value) and "\n" not in str(info.value)


def test_flags_override_the_file() -> None:
    base = SamplingSettings(do_sample=True, top_k=50, source="x")
    assert GenerationOptions().sampling(base) == base
    chosen = GenerationOptions(temperature=0.7, top_p=0.9, top_k=0).sampling(base)
    assert (chosen.temperature, chosen.top_p, chosen.top_k, chosen.source) == (0.7, 0.9, 0, "x")
    assert GenerationOptions(temperature=0.0).sampling(base).greedy
    assert not GenerationOptions(do_sample=True).sampling(SamplingSettings(do_sample=False)).greedy


def test_settings_travel_as_a_dict() -> None:
    settings = SamplingSettings(do_sample=True, temperature=0.5, top_k=3, top_p=0.7, source="file")
    assert SamplingSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}])
def test_settings_refuse_values_out_of_range(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingSettings(**bad)


def _transformers_probs(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(s.temperature)])
    if s.top_k:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        warpers.append(TopPLogitsWarper(s.top_p))
    scores = warpers(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.2, 50, 0.8), (1.0, 50, 0.8), (0.7, 0, 0.9), (1.3, 5, 1.0), (1.0, 0, 1.0), (2.0, 400, 0.95), (1.0, 3, 0.3)],
)
def test_the_distribution_equals_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    """Temperature, then top-k, then top-p, exactly as transformers' generate(do_sample=True) applies them."""
    g = torch.Generator().manual_seed(int(temperature * 10) + top_k)
    logits = torch.randn(3000, generator=g) * 3  # no exact ties: their order is the sort's, not a contract
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p)
    weights, ids = candidates(logits, settings)
    ours = torch.zeros_like(logits).index_put_((ids,), weights)
    torch.testing.assert_close(ours / ours.sum(), _transformers_probs(logits, settings), rtol=1e-5, atol=1e-6)


def test_top_k_keeps_ties_at_the_kth_value_like_transformers() -> None:
    logits = torch.tensor([5.0, 4.0, 4.0, 4.0, 1.0])
    weights, ids = candidates(logits, SamplingSettings(temperature=1.0, top_k=2, top_p=1.0))
    assert sorted(ids[weights > 0].tolist()) == [0, 1, 2, 3]


def test_sampling_rules() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)

    def draw(temperature: float, top_p: float, top_k: int = 0) -> int:
        return sample_token(logits, SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k), g)

    assert draw(0.0, 0.8) == 1  # temperature 0 is greedy
    assert sample_token(logits, SamplingSettings(do_sample=False, temperature=5.0), g) == 1
    assert {draw(1.0, 1e-6) for _ in range(20)} == {1}  # a tiny top_p keeps the top token
    assert {draw(1.0, 0.9) for _ in range(200)} == {1, 2}  # the nucleus holds the two close tokens only
    assert {draw(50.0, 1.0, top_k=1) for _ in range(50)} == {1}  # top-k 1 is greedy at any temperature


def test_wide_nucleus_falls_back_to_a_full_sort() -> None:
    n = 4 * NUCLEUS_CANDIDATES
    logits = -torch.arange(n, dtype=torch.float32) * 1e-4  # nearly flat, strictly decreasing
    g = torch.Generator().manual_seed(0)
    seen = [sample_token(logits, SamplingSettings(temperature=1.0, top_k=0, top_p=0.5), g) for _ in range(500)]
    assert max(seen) > NUCLEUS_CANDIDATES  # beyond the pre-sorted candidates
    assert max(seen) < 0.55 * n  # but still inside the nucleus


# ------------------------------------------------------------------ ids never sampled


@pytest.fixture(scope="module")
def gap_lm(tmp_path_factory: pytest.TempPathFactory) -> VoiceLM:
    """A vocabulary with unnamed ids between <|end_of_audio|> and <|audio_0|>, as the real one may have."""
    folder = write_tiny_lm(tmp_path_factory.mktemp("gap"), SPEC)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    decoder = config["added_tokens_decoder"]
    for key in [k for k, v in decoder.items() if v["content"].startswith("<|reserved_")]:
        del decoder[key]
    path.write_text(json.dumps(config), encoding="utf-8")
    _write_generation_config(folder, do_sample=True)
    return VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))


def _gap_ids(lm: VoiceLM) -> list[int]:
    tok = lm.text_tokenizer
    return list(range(tok.token_id("<|end_of_audio|>") + 1, tok.audio_offset))


def test_unnamed_ids_and_padded_rows_are_blocked(gap_lm: VoiceLM) -> None:
    gaps = _gap_ids(gap_lm)
    assert len(gaps) == SPEC.n_reserved
    n_logits = gap_lm.model.config.vocab_size
    blocked = blocked_ids(gap_lm.text_tokenizer, n_logits)
    assert blocked == [*gaps, *range(gap_lm.text_tokenizer.vocab_size, n_logits)]


def test_an_unnamed_id_is_never_sampled_even_when_it_wins(gap_lm: VoiceLM) -> None:
    gap = _gap_ids(gap_lm)[1]

    def favour_gap(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., -1, gap] += 1e4
        return out

    handle = gap_lm.model.lm_head.register_forward_hook(favour_gap)
    try:
        conv = gap_lm.new_conversation()
        options = GenerationOptions(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, seed=0)
        list(gap_lm.stream(conv, TextInput("x"), options))
    finally:
        handle.remove()
    assert conv.last_output and gap not in conv.last_output  # no KeyError mid-turn, no gap id


def test_the_folder_sampling_is_what_the_lm_uses(gap_lm: VoiceLM) -> None:
    assert gap_lm.sampling.source.endswith(GENERATION_CONFIG_FILE)
    assert "top-k 50" in gap_lm.sampling.describe()


def test_doctor_shows_the_sampling_in_effect(tmp_path: Path) -> None:
    from glmvoice_cli.commands.doctor import _sampling_check

    assert _sampling_check(tmp_path).detail.startswith("temperature 0.2, top-k 50, top-p 0.8")
    _write_generation_config(tmp_path, do_sample="maybe")
    check = _sampling_check(tmp_path)
    assert check.status == "fail" and "do_sample" in check.detail


def _reference_sample(logits: torch.Tensor, sampling: SamplingSettings, generator: torch.Generator) -> int:
    """The host-synchronising rule it replaces: top-k (with ties) or the full sort, then top-p, multinomial."""
    scaled = logits / sampling.temperature
    n = scaled.numel()
    if 0 < sampling.top_k < n:
        values, ids = scaled.topk(sampling.top_k)
        values, ids = scaled.topk(int((scaled >= values[-1]).sum()))
        probs = torch.softmax(values, dim=-1)
    else:
        probs, ids = torch.softmax(scaled, dim=-1).sort(descending=True)
    if sampling.top_p < 1.0:
        before = probs.cumsum(0) - probs
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    return int(ids[torch.multinomial(probs, 1, generator=generator)])


@pytest.mark.parametrize("top_k, top_p", [(50, 0.8), (0, 0.8), (3, 1.0), (2000, 0.95)])
def test_device_sampler_draws_as_the_reference_rule(top_k: int, top_p: float) -> None:
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3  # no ties: the order is unique
    sampling = SamplingSettings(temperature=0.7, top_k=top_k, top_p=top_p)
    for seed in range(40):
        ours, tensor = sample_on_device(logits, sampling, torch.Generator().manual_seed(seed))
        assert ours == _reference_sample(logits, sampling, torch.Generator().manual_seed(seed))
        assert tensor.shape == (1, 1) and int(tensor) == ours


def test_device_sampler_keeps_every_id_tied_with_the_kth() -> None:
    logits = torch.full((3000,), -5.0)
    logits[:2] = 4.0
    logits[10:2010] = 3.0  # 2000 ids tied with the 3rd: beyond the candidates, so the exact redraw runs
    sampling = SamplingSettings(temperature=1.0, top_k=3, top_p=1.0)
    seen = {sample_on_device(logits, sampling, torch.Generator().manual_seed(seed))[0] for seed in range(300)}
    assert seen <= {0, 1, *range(10, 2010)} and max(seen) > 10 + NUCLEUS_CANDIDATES
