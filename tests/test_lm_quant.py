"""4/8-bit LM loading. The product allows it on CUDA only; bitsandbytes' CPU backend lets the test run
our loading path (official tensors quantized as they stream in) here, with the CUDA check bypassed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glmvoice_cli.errors import UsageError
from glmvoice_cli.lm import quant as lm_quant
from glmvoice_cli.lm.voice_lm import VoiceLM
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("lm"), TinyLMSpec(hidden_size=128, ffn_hidden_size=256, seed=4))


def test_quantization_needs_cuda_and_valid_bits(lm_dir: Path) -> None:
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        VoiceLM.from_folder(lm_dir, LoadOptions(device="cpu", quantize_bits=4))
    with pytest.raises(UsageError, match="4 or 8 bits"):
        lm_quant.check_quantization(3, torch.device("cuda"))


@pytest.mark.parametrize("bits, min_agreement", [(8, 0.9), (4, 0.5)])
def test_quantized_loading_path_on_the_cpu_backend(lm_dir: Path, monkeypatch: pytest.MonkeyPatch, bits: int,
                                                   min_agreement: float) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(lm_quant, "check_quantization", lambda bits, device: None)
    dense = VoiceLM.from_folder(lm_dir, LoadOptions(device="cpu", dtype="fp32"))
    quant = VoiceLM.from_folder(lm_dir, LoadOptions(device="cpu", dtype="fp32", quantize_bits=bits))
    layer = quant.model.model.layers[0]
    linear = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(layer.self_attn.q_proj, linear) and isinstance(layer.mlp.down_proj, linear)
    assert not isinstance(quant.model.lm_head, linear)  # the output layer stays dense
    ids = torch.tensor([dense.text_tokenizer.prefix_ids + dense.text_tokenizer.encode("hello there, how are you today?")])
    with torch.no_grad():
        ref = dense.model(input_ids=ids).logits.float()
        out = quant.model(input_ids=ids).logits.float()
    assert torch.isfinite(out).all()
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= min_agreement
    if bits == 8:  # int8 with fp16 activations stays close to the dense model
        assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


@pytest.mark.compiles
def test_4bit_weights_decode_compiled_as_eager(lm_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """NF4 layers compile with the static cache (bitsandbytes' CPU backend here) and give the same greedy ids."""
    pytest.importorskip("bitsandbytes")
    from glmvoice_cli.lm.prompts import TextInput
    from glmvoice_cli.lm.voice_lm import GenerationOptions

    monkeypatch.setattr(lm_quant, "check_quantization", lambda bits, device: None)
    options = LoadOptions(device="cpu", dtype="fp32", quantize_bits=4)
    eager, compiled = VoiceLM.from_folder(lm_dir, options), VoiceLM.from_folder(lm_dir, options)
    compiled.enable_static(compiled=True, max_len=256)
    greedy = GenerationOptions(temperature=0.0, max_new_tokens=16)
    ids = []
    for lm in (eager, compiled):
        conv = lm.new_conversation()
        list(lm.stream(conv, TextInput("hi"), greedy))
        ids.append(conv.last_output)
    assert ids[0] == ids[1] and len(ids[0]) > 0
