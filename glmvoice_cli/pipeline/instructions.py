"""Speaking instructions for `glmvoice tts`, as data.

GLM-4-Voice has no separate TTS model and no official list of styles (GLM-4-Voice issue 128): it
speaks a text when asked to in a text turn. These templates ask it to read the text verbatim, in
the text's own language (Chinese templates for text with CJK characters, English otherwise), with
an optional emotion, speed and dialect. `--instruction` replaces the template with the user's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glmvoice_cli.errors import UsageError

TEXT_SLOT = "{text}"

EMOTIONS: dict[str, tuple[str, str]] = {  # name -> (English phrase, Chinese phrase)
    "neutral": ("", ""),
    "happy": ("in a happy, cheerful tone", "用开心愉快的语气"),
    "sad": ("in a sad, sorrowful tone", "用悲伤难过的语气"),
    "angry": ("in an angry tone", "用生气愤怒的语气"),
    "surprised": ("in a surprised tone", "用惊讶的语气"),
    "calm": ("in a calm, soothing tone", "用平静舒缓的语气"),
    "excited": ("in an excited, energetic tone", "用兴奋激动的语气"),
    "gentle": ("in a gentle, soft tone", "用温柔的语气"),
    "serious": ("in a serious, formal tone", "用严肃正式的语气"),
    "fearful": ("in a frightened tone", "用害怕的语气"),
    "whisper": ("in a whisper", "用耳语般的轻声"),
}
SPEEDS: dict[str, tuple[str, str]] = {
    "slow": ("slowly", "用较慢的语速"),
    "normal": ("", ""),
    "fast": ("quickly", "用较快的语速"),
}
DIALECTS: dict[str, tuple[str, str]] = {  # Chinese dialects the model was shown to speak in its demos
    "mandarin": ("", ""),
    "cantonese": ("in Cantonese", "用粤语"),
    "sichuanese": ("in Sichuanese", "用四川话"),
    "northeastern": ("in the Northeastern Chinese dialect", "用东北话"),
    "shanghainese": ("in Shanghainese", "用上海话"),
}

ENGLISH_TEMPLATE = "Read the following text aloud{style}, word for word, without adding anything:\n{text}"
CHINESE_TEMPLATE = "请{style}把下面这段话原样朗读出来，不要添加任何内容：\n{text}"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class SpeakingStyle:
    emotion: str = "neutral"
    speed: str = "normal"
    dialect: str = "mandarin"

    def __post_init__(self) -> None:
        for value, table, what in ((self.emotion, EMOTIONS, "emotion"), (self.speed, SPEEDS, "speed"),
                                   (self.dialect, DIALECTS, "dialect")):
            if value not in table:
                raise UsageError(f"unknown {what} {value!r} (choose from {', '.join(table)})")


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def build_instruction(text: str, style: SpeakingStyle = SpeakingStyle(), template: str | None = None) -> str:
    """The text turn that makes the model speak `text`; a custom `template` may hold `{text}`."""
    if template is not None:
        return template.replace(TEXT_SLOT, text) if TEXT_SLOT in template else f"{template}\n{text}"
    column = 1 if is_chinese(text) else 0
    phrases = [t[style_key][column] for t, style_key in
               ((DIALECTS, style.dialect), (EMOTIONS, style.emotion), (SPEEDS, style.speed))]
    phrases = [p for p in phrases if p]
    if column:
        return CHINESE_TEMPLATE.format(style="".join(phrases) or "", text=text)
    style_text = (" " + ", ".join(phrases)) if phrases else ""
    return ENGLISH_TEMPLATE.format(style=style_text, text=text)


_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;…])\s*")


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Split long text at sentence ends into pieces of at most about `max_chars`, in order."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    pieces: list[str] = []
    for sentence in sentences:
        joiner = "" if is_chinese(sentence) else " "
        if pieces and len(pieces[-1]) + len(sentence) + 1 <= max_chars:
            pieces[-1] = pieces[-1] + joiner + sentence
        else:
            pieces.extend(_hard_wrap(sentence, max_chars))
    return pieces


def _hard_wrap(sentence: str, max_chars: int) -> list[str]:
    """A single over-long sentence is cut at spaces (or anywhere, for text without spaces)."""
    out: list[str] = []
    while len(sentence) > max_chars:
        cut = sentence.rfind(" ", 0, max_chars)
        cut = cut if cut > 0 else max_chars
        out.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    return out + ([sentence] if sentence else [])
