"""A complete tiny model set (tokenizer/, lm/, decoder/) in the official formats, one audio vocabulary.

Used by `glmvoice selftest` and the end-to-end tests: the LM's audio tokens, the tokenizer's codebook
and the decoder's embedding all have `codebook` entries, and the audio rows of the LM's output layer
are boosted so that a random model actually speaks (emits audio tokens) instead of only text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from glmvoice_cli.tiny.decoder import TinyDecoderSpec, write_tiny_decoder
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm
from glmvoice_cli.tiny.tokenizer import TinyTokenizerSpec, write_tiny_tokenizer

NON_SQUARE_HEAD_DIM = 32  # 4 heads x 32 != hidden 64: the suite covers ChatGLM's kv_channels x heads != hidden
AUDIO_LOGIT_BOOST = 1.2  # scale of the audio rows of the LM head: a random model then mixes text and audio


@dataclass(frozen=True)
class TinyModelSet:
    root: Path

    @property
    def dirs(self) -> dict[str, Path]:
        return {stage: self.root / stage for stage in ("tokenizer", "lm", "decoder")}


def write_tiny_model_set(root: str | Path, codebook: int = 128, seed: int = 0,
                         lm: TinyLMSpec | None = None) -> TinyModelSet:
    """Write tokenizer/, lm/ and decoder/ under `root`; returns their paths.

    `lm` chooses the LM's size (its audio vocabulary and seed are always the set's).
    """
    root = Path(root)
    write_tiny_tokenizer(root / "tokenizer", TinyTokenizerSpec(codebook=codebook, seed=seed))
    write_tiny_lm(root / "lm", replace(lm or TinyLMSpec(kv_channels=NON_SQUARE_HEAD_DIM), n_audio_tokens=codebook,
                                        seed=seed))
    _boost_audio_rows(root / "lm", codebook)
    write_tiny_decoder(root / "decoder", TinyDecoderSpec(vocab_size=codebook, seed=seed))
    return TinyModelSet(root)


def _boost_audio_rows(folder: Path, n_audio: int) -> None:
    """Scale the output-layer rows of the audio tokens, in place, keeping the official file layout."""
    import json

    from safetensors.torch import load_file, save_file

    added = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"]
    first = next(int(i) for i, tok in added.items() if tok["content"] == "<|audio_0|>")
    path = folder / "model.safetensors"
    weights = load_file(path)
    head = weights["transformer.output_layer.weight"]
    head[first : first + n_audio] = (head[first : first + n_audio].float() * AUDIO_LOGIT_BOOST).to(head.dtype)
    save_file(weights, str(path), metadata={"format": "pt"})
