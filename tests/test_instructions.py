from __future__ import annotations

import pytest

from glmvoice_cli.errors import UsageError
from glmvoice_cli.pipeline.instructions import EMOTIONS, SpeakingStyle, build_instruction, split_sentences


def test_english_template_carries_text_and_style() -> None:
    out = build_instruction("Hello there.", SpeakingStyle(emotion="happy", speed="slow"))
    assert out.endswith("\nHello there.")
    assert "happy" in out and "slowly" in out and out.startswith("Read the following text aloud")


def test_chinese_text_gets_the_chinese_template() -> None:
    out = build_instruction("今天天气很好。", SpeakingStyle(emotion="sad", dialect="cantonese"))
    assert out.startswith("请用粤语用悲伤难过的语气") and out.endswith("今天天气很好。")


def test_neutral_style_has_no_style_words() -> None:
    assert build_instruction("Hi.") == "Read the following text aloud, word for word, without adding anything:\nHi."


def test_custom_template_replaces_or_prefixes() -> None:
    assert build_instruction("Hi.", template="Shout this: {text}!") == "Shout this: Hi.!"
    assert build_instruction("Hi.", template="Sing it") == "Sing it\nHi."


def test_unknown_style_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"unknown emotion 'grumpy'.*happy"):
        SpeakingStyle(emotion="grumpy")
    assert "surprised" in EMOTIONS and "calm" in EMOTIONS


def test_split_sentences_keeps_order_and_bounds() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(30))
    pieces = split_sentences(text, max_chars=80)
    assert " ".join(pieces) == text
    assert all(len(p) <= 80 for p in pieces)
    assert split_sentences("第一句。第二句！第三句？", max_chars=4) == ["第一句。", "第二句！", "第三句？"]
    long_word_run = "a" * 250
    assert "".join(split_sentences(long_word_run, max_chars=100)) == long_word_run
