"""A random GLM-4-Voice LM of any size, written in the official ChatGLM on-disk format.

The folder holds what THUDM/glm-4-voice-9b holds: a `model_type: chatglm` config.json (with its
`auto_map`), safetensors weights under `transformer.*` keys (one file or index + shards),
`tokenizer.model` (tiktoken-format ranks: 256 bytes plus a few BPE merges learnt from a built-in
text) and `tokenizer_config.json` whose `added_tokens_decoder` lists the GLM-4 specials, the voice
tokens, optional reserved slots (as in the real model, where `<|audio_0|>` does not follow
`<|end_of_audio|>`) and the audio tokens. Tests, benchmarks and `glmvoice selftest` build on it.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>",
)  # fmt: skip
VOICE_SPECIALS = ("<|begin_of_audio|>", "<|end_of_audio|>")
EOS_NAMES = ("<|endoftext|>", "<|user|>", "<|observation|>")
N_BYTES = 256  # ranks 0..255 are the single bytes

# A little bilingual text to learn merges from: the merges only need to be a valid BPE.
TRAINING_TEXT = (
    "Hello there! What is the weather today? The weather is sunny and warm, so let us walk to the park. "
    "I think the answer is simple: speak slowly, listen well, and the robot will sing along. "
    "你好，今天天气怎么样？今天天气很好，我们去公园散步吧。 12345 67890 "
) * 4
_WORD = re.compile(r"\s?\w+|\s?[^\w\s]+|\s+")


@dataclass(frozen=True)
class TinyLMSpec:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    kv_channels: int | None = None  # head dim; None: hidden_size // num_heads. ChatGLM allows any (non-square)
    kv_groups: int = 2
    ffn_hidden_size: int = 128
    n_merges: int = 40  # BPE merges on top of the 256 byte tokens
    n_audio_tokens: int = 32
    n_reserved: int = 0  # unnamed slots between <|end_of_audio|> and <|audio_0|>
    vocab_multiple: int = 64  # padded_vocab_size is rounded up to this
    padded_vocab_size: int | None = None  # overrides the rounding (e.g. 168960 like the real model)
    seq_length: int = 4096
    rope_ratio: float = 1.0
    layernorm_epsilon: float = 3.90625e-08
    dtype: str = "bfloat16"  # on-disk dtype, as in the official repo
    n_shards: int = 1  # >1 writes model-0000i-of-0000n.safetensors + index
    seed: int = 0


def learn_merges(text: str, n_merges: int) -> list[bytes]:
    """Tokens created by `n_merges` greedy byte-pair merges over `text`, in rank order."""
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in _WORD.findall(text)]
    tokens: list[bytes] = []
    for _ in range(n_merges):
        pairs = Counter((a, b) for w in words for a, b in itertools.pairwise(w))
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        merged = left + right
        tokens.append(merged)
        words = [_merge_word(w, left, right, merged) for w in words]
    return tokens


def _merge_word(word: list[bytes], left: bytes, right: bytes, merged: bytes) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def added_token_names(spec: TinyLMSpec) -> list[str]:
    """Added tokens in id order, starting right after the mergeable ranks."""
    reserved = [f"<|reserved_{i}|>" for i in range(spec.n_reserved)]
    audio = [f"<|audio_{i}|>" for i in range(spec.n_audio_tokens)]
    return [*GLM4_SPECIALS, *VOICE_SPECIALS, *reserved, *audio]


def padded_vocab(spec: TinyLMSpec, n_tokens: int) -> int:
    if spec.padded_vocab_size is not None:
        if spec.padded_vocab_size < n_tokens:
            raise ValueError(f"padded_vocab_size {spec.padded_vocab_size} < {n_tokens} tokens")
        return spec.padded_vocab_size
    return math.ceil(n_tokens / spec.vocab_multiple) * spec.vocab_multiple


def write_tokenizer(folder: Path, spec: TinyLMSpec) -> dict[str, int]:
    """tokenizer.model + tokenizer_config.json; returns added token name -> id."""
    ranks = [bytes([b]) for b in range(N_BYTES)] + learn_merges(TRAINING_TEXT, spec.n_merges)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}" for rank, tok in enumerate(ranks)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    added = {name: len(ranks) + i for i, name in enumerate(added_token_names(spec))}
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {str(i): {"content": name, **entry} for name, i in added.items()},
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return added


def chatglm_config(spec: TinyLMSpec, vocab: int, added: dict[str, int]) -> dict:
    """config.json with the official field names and the flags the real checkpoint sets."""
    return {
        "_name_or_path": "tiny-glm-4-voice", "add_bias_linear": False, "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
        "architectures": ["ChatGLMModel"], "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bias_dropout_fusion": True, "classifier_dropout": None,
        "eos_token_id": [added[name] for name in EOS_NAMES],
        "ffn_hidden_size": spec.ffn_hidden_size, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "hidden_size": spec.hidden_size, "kv_channels": head_dim(spec),
        "layernorm_epsilon": spec.layernorm_epsilon, "model_type": "chatglm", "multi_query_attention": True,
        "multi_query_group_num": spec.kv_groups, "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers, "num_layers": spec.num_layers, "original_rope": True,
        "pad_token_id": added["<|endoftext|>"], "padded_vocab_size": vocab, "post_layer_norm": True,
        "rmsnorm": True, "rope_ratio": spec.rope_ratio, "seq_length": spec.seq_length,
        "tie_word_embeddings": False, "torch_dtype": spec.dtype, "transformers_version": "4.44.1",
        "use_cache": True, "vocab_size": vocab,
    }  # fmt: skip


def head_dim(spec: TinyLMSpec) -> int:
    return spec.kv_channels if spec.kv_channels is not None else spec.hidden_size // spec.num_heads


def random_weights(spec: TinyLMSpec, vocab: int) -> dict[str, torch.Tensor]:
    """Official-key tensors; std 1/sqrt(fan_in) so that activations stay O(1) at any size."""
    g = torch.Generator().manual_seed(spec.seed)
    h, f = spec.hidden_size, spec.ffn_hidden_size
    hd = head_dim(spec)
    qkv = (spec.num_heads + 2 * spec.kv_groups) * hd
    dtype = getattr(torch, spec.dtype)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(dtype)

    out = {"transformer.embedding.word_embeddings.weight": normal(vocab, h, std=1.0)}
    for i in range(spec.num_layers):
        p = f"transformer.encoder.layers.{i}."
        out[p + "input_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
        out[p + "self_attention.query_key_value.weight"] = normal(qkv, h, std=h**-0.5)
        out[p + "self_attention.query_key_value.bias"] = normal(qkv, std=0.5)
        out[p + "self_attention.dense.weight"] = normal(h, spec.num_heads * hd, std=(spec.num_heads * hd) ** -0.5)
        out[p + "post_attention_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
        out[p + "mlp.dense_h_to_4h.weight"] = normal(2 * f, h, std=h**-0.5)
        out[p + "mlp.dense_4h_to_h.weight"] = normal(h, f, std=f**-0.5)
    out["transformer.encoder.final_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
    out["transformer.output_layer.weight"] = normal(vocab, h, std=2 * h**-0.5)
    # the official files carry this buffer (computed without rope_ratio); loaders must drop it
    rotary = hd // 2
    out["transformer.rotary_pos_emb.inv_freq"] = (
        1.0 / 10_000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary)
    ).to(dtype)
    return out


def write_weights(folder: Path, weights: dict[str, torch.Tensor], n_shards: int) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if n_shards <= 1:
        save_file(weights, str(folder / "model.safetensors"), metadata=metadata)
        return
    keys = list(weights)
    per_shard = math.ceil(len(keys) / n_shards)
    weight_map: dict[str, str] = {}
    for index in range(n_shards):
        name = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {k: weights[k] for k in keys[index * per_shard : (index + 1) * per_shard]}
        save_file(chunk, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2), encoding="utf-8")


def write_tiny_lm(folder: Path, spec: TinyLMSpec | None = None) -> Path:
    """Write a random checkpoint folder in the official format; returns the folder."""
    spec = spec or TinyLMSpec()
    if spec.num_heads % spec.kv_groups or head_dim(spec) % 4:
        raise ValueError("num_heads must divide by kv_groups, and the head dim by 4 (rotary pairs)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    added = write_tokenizer(folder, spec)
    vocab = padded_vocab(spec, max(added.values()) + 1)
    config = chatglm_config(spec, vocab, added)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_weights(folder, random_weights(spec, vocab), spec.n_shards)
    return folder
