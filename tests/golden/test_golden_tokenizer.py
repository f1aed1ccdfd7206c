"""Parity with the reference speech tokenizer on the golden fixtures (any fixture set of this layout).

Token ids must match exactly; intermediate states within 1e-4 of the largest reference magnitude,
the tolerance MANIFEST.md suggests for an independent fp32 implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
from glmvoice_cli.tokenizer.whisper_vq import code_distances

pytestmark = pytest.mark.golden

REL_TOL = 1e-4  # of max |reference|, for encoder intermediates


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = REL_TOL * float(expected.abs().max()) + 1e-6
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def fixtures(golden: Path) -> Path:
    return golden / "tokenizer_fixtures"


@pytest.fixture(scope="module")
def expected(fixtures: Path) -> dict:
    return json.loads((fixtures / "tokens.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(golden: Path) -> SpeechTokenizer:
    return SpeechTokenizer.from_pretrained(golden / "tokenizer", device="cpu")


def read_input(fixtures: Path, name: str) -> np.ndarray:
    """The recorded input as the tokenizer sees it (16 kHz mono files pass through unchanged)."""
    return load_audio(fixtures / "inputs" / f"{name}.wav").samples


def utterances(golden_path: Path | None = None) -> list[str]:
    from tests.conftest import golden_dir

    path = golden_path or golden_dir()
    if path is None:
        return []
    return json.loads((path / "tokenizer_fixtures" / "tokens.json").read_text())["input_order"]


@pytest.mark.parametrize("name", utterances() or [pytest.param("none", marks=pytest.mark.skip("no golden dir"))])
def test_token_ids_per_utterance(tokenizer: SpeechTokenizer, fixtures: Path, expected: dict, name: str) -> None:
    ids = tokenizer.encode([read_input(fixtures, name)])[0]
    assert ids == expected["per_utterance"][name]
    recorded = load_file(fixtures / f"{name}.safetensors")
    assert ids == recorded["token_ids"].tolist()


def test_token_ids_all_inputs_in_one_batch(tokenizer: SpeechTokenizer, fixtures: Path, expected: dict) -> None:
    audios = [read_input(fixtures, n) for n in expected["input_order"]]
    assert tokenizer.encode(audios) == expected["batched_all_inputs"]


@pytest.mark.parametrize("name", utterances() or [pytest.param("none", marks=pytest.mark.skip("no golden dir"))])
def test_intermediate_states(tokenizer: SpeechTokenizer, fixtures: Path, name: str) -> None:
    recorded = load_file(fixtures / f"{name}.safetensors")
    model = tokenizer.model
    feats, frame_mask = tokenizer.features(read_input(fixtures, name))
    torch.testing.assert_close(frame_mask.int(), recorded["attention_mask"].int(), atol=0, rtol=0)
    if "input_features" in recorded:
        assert_close_rel(feats, recorded["input_features"], "input_features")

    captured: dict[str, torch.Tensor] = {}
    hooks = [model.conv1.register_forward_hook(lambda m, i, o: captured.__setitem__("conv1_out_pre_gelu", o)),
             model.conv2.register_forward_hook(lambda m, i, o: captured.__setitem__("conv2_out_pre_gelu", o))]
    for n, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(f"layer{n}_out", o)))
    try:
        with torch.inference_mode():
            pooled, valid = model.encode(feats, frame_mask)
            ids = model(feats, frame_mask)[0]
    finally:
        for h in hooks:
            h.remove()

    checked = 0
    for key, value in captured.items():
        if key in recorded:
            assert_close_rel(value, recorded[key], key)
            checked += 1
    assert checked == sum(k in recorded for k in captured), "an intermediate was recorded but not captured"
    assert_close_rel(pooled, recorded["vq_input"], "vq_input")
    assert ids.tolist() == recorded["token_ids_all_positions"].tolist()
    flat = pooled.reshape(-1, pooled.shape[-1])
    distances = code_distances(flat, model.codebook.weight)
    if "vq_distances" in recorded:
        assert_close_rel(distances, recorded["vq_distances"], "vq_distances")
    # The argmin is robust: the recorded margin between the two nearest codes is reproduced.
    best2 = distances[valid.reshape(-1)].topk(2, largest=False).values
    assert_close_rel(best2[:, 1] - best2[:, 0], recorded["nearest_code_margin"], "nearest_code_margin")
    if "last_hidden_state" in recorded:
        with safe_open(str(fixtures.parent / "tokenizer" / "model.safetensors"), "pt") as f:
            positions2 = f.get_tensor("embed_positions2.weight")
        quantized = model.codebook.weight[ids] + positions2[: ids.shape[1]]
        assert_close_rel(quantized, recorded["last_hidden_state"], "last_hidden_state")


def test_cli_tokenize_matches_golden(fixtures: Path, expected: dict, golden: Path) -> None:
    from typer.testing import CliRunner

    from glmvoice_cli.cli import app

    files = [str(fixtures / "inputs" / f"{n}.wav") for n in expected["input_order"]]
    result = CliRunner().invoke(app, ["tokenize", *files, "--tokenizer", str(golden / "tokenizer"), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["tokens"] for r in rows] == expected["batched_all_inputs"]  # the CLI batches all files
    assert [Path(r["file"]).stem for r in rows] == expected["input_order"]
