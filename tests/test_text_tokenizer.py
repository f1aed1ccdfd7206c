"""The native GLM-4 tokenizer on a tiny folder written like the official one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from glmvoice_cli.errors import CheckpointMismatchError, ModelNotFoundError
from glmvoice_cli.lm.text_tokenizer import TextDetokenizer, TextTokenizer
from glmvoice_cli.tiny.lm import GLM4_SPECIALS, TinyLMSpec, write_tokenizer

SPEC = TinyLMSpec(n_audio_tokens=20, n_reserved=7, n_merges=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, SPEC)
    return path


@pytest.fixture(scope="module")
def tok(folder: Path) -> TextTokenizer:
    return TextTokenizer.from_folder(folder)


def test_layout_resolved_by_name(tok: TextTokenizer) -> None:
    n = tok.n_ranks
    assert n == 256 + SPEC.n_merges
    assert tok.token_id("<|endoftext|>") == n
    assert [tok.token_id(name) for name in GLM4_SPECIALS] == list(range(n, n + len(GLM4_SPECIALS)))
    end_of_audio = tok.token_id("<|end_of_audio|>")
    # reserved slots sit between <|end_of_audio|> and <|audio_0|>, as in the real model
    assert tok.audio_offset == end_of_audio + 1 + SPEC.n_reserved
    assert tok.n_audio_tokens == SPEC.n_audio_tokens
    assert tok.vocab_size == tok.audio_offset + SPEC.n_audio_tokens
    assert tok.prefix_ids == [tok.token_id("[gMASK]"), tok.token_id("<sop>")]
    assert tok.eos_ids == {tok.token_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}


@pytest.mark.parametrize(
    "text", ["Hello there! What is the weather?", "你好，今天天气怎么样？", " a\n\n b  c ", ""]
)
def test_round_trip(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(i < tok.n_ranks for i in ids)
    assert tok.decode(ids) == text


def test_merges_are_used(tok: TextTokenizer) -> None:
    text = "the weather"
    assert len(tok.encode(text)) < len(text.encode())


def test_special_strings_in_text_stay_text(tok: TextTokenizer) -> None:
    ids = tok.encode("<|user|> [gMASK]")
    assert tok.token_id("<|user|>") not in ids
    assert all(i < tok.n_ranks for i in ids)
    assert tok.decode([tok.token_id("<|user|>"), tok.audio_offset + 3]) == "<|user|><|audio_3|>"


def test_audio_helpers(tok: TextTokenizer) -> None:
    ids = tok.audio_ids([0, 5, SPEC.n_audio_tokens - 1])
    assert ids == [tok.audio_offset, tok.audio_offset + 5, tok.audio_offset + SPEC.n_audio_tokens - 1]
    assert [tok.audio_index(i) for i in ids] == [0, 5, SPEC.n_audio_tokens - 1]
    assert tok.is_audio(ids[0]) and not tok.is_audio(tok.token_id("<|end_of_audio|>"))
    with pytest.raises(ValueError):
        tok.audio_ids([SPEC.n_audio_tokens])
    with pytest.raises(ValueError):
        tok.audio_index(5)


def test_stream_decoder_never_splits_a_character(tok: TextTokenizer) -> None:
    text = "天气 ok 你好"
    decoder = TextDetokenizer(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert "" in pieces  # multi-byte characters span several byte tokens
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_unknown_name(tok: TextTokenizer) -> None:
    with pytest.raises(CheckpointMismatchError, match=re.escape("<|nope|>")):
        tok.token_id("<|nope|>")


def test_missing_files(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"tokenizer.model"):
        TextTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    with pytest.raises(ModelNotFoundError, match=r"tokenizer_config.json"):
        TextTokenizer.from_folder(tmp_path)


def test_bad_files(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_text("not base64!! x\n")
    (tmp_path / "tokenizer_config.json").write_bytes((folder / "tokenizer_config.json").read_bytes())
    with pytest.raises(CheckpointMismatchError, match="line 1"):
        TextTokenizer.from_folder(tmp_path)


def test_missing_special(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if v["content"] != "<|begin_of_audio|>"
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="begin_of_audio"):
        TextTokenizer.from_folder(tmp_path)


def test_a_replaced_rank_file_is_read_afresh(tmp_path: Path) -> None:
    """Our reader, not tiktoken's `load_tiktoken_bpe`: that one copies a local file into a cache keyed by its path
    (/tmp/data-gym-cache) and would hand back the old ranks after `tokenizer.model` was replaced."""
    import base64

    from glmvoice_cli.lm.text_tokenizer import read_ranks

    def ranks(extra: bytes) -> str:
        lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
        return "\n".join([*lines, f"{base64.b64encode(extra).decode()} 256"]) + "\n"

    path = tmp_path / "tokenizer.model"
    path.write_text(ranks(b"ab"))
    assert read_ranks(path)[b"ab"] == 256
    path.write_text(ranks(b"cd"))  # replaced at the same path
    again = read_ranks(path)
    assert again[b"cd"] == 256 and b"ab" not in again
