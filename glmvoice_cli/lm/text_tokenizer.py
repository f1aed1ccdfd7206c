"""The GLM-4 text tokenizer, loaded natively from an official checkpoint folder.

`tokenizer.model` holds the byte-level BPE ranks (`base64(token_bytes) rank` per line, the tiktoken
format the official ChatGLM4Tokenizer reads); `tokenizer_config.json` lists the added tokens (the 14
GLM-4 specials, then the voice tokens `<|begin_of_audio|>`, `<|end_of_audio|>`, `<|audio_0|>`...) in
`added_tokens_decoder`. We build a `tiktoken.Encoding` from both, without running any remote code.

Every special token is resolved by name: in the real model `<|audio_0|>` does not follow
`<|end_of_audio|>` (151344 vs 152353).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from glmvoice_cli.errors import CheckpointMismatchError, ModelNotFoundError
from glmvoice_cli.files import read_limited

if TYPE_CHECKING:
    import tiktoken

RANKS_FILE = "tokenizer.model"
MAX_TOKEN_ID = 2**31 - 1  # tiktoken stores ids as 32-bit ranks
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# The GLM-4 pre-tokenizer split (the pattern of the official ChatGLM4Tokenizer).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
GMASK = "[gMASK]"
SOP = "<sop>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
OBSERVATION = "<|observation|>"
BEGIN_OF_AUDIO = "<|begin_of_audio|>"
END_OF_AUDIO = "<|end_of_audio|>"
EOS_TOKENS = (ENDOFTEXT, USER, OBSERVATION)  # the official generation stops on any of these
PROMPT_PREFIX = (GMASK, SOP)  # what the official tokenizer prepends with add_special_tokens=True

_AUDIO_TOKEN = re.compile(r"<\|audio_(\d+)\|>")

RANKS_MAX_BYTES = 64 << 20  # the official tokenizer.model is 2.6 MB: a larger one is not a BPE table
JSON_MAX_BYTES = 16 << 20  # tokenizer_config.json is a few hundred KiB


def audio_token_name(index: int) -> str:
    return f"<|audio_{index}|>"


def read_ranks(path: Path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken-format file: ranks 0..N-1, each once, every single byte present."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: not found")
    try:
        text = read_limited(path, RANKS_MAX_BYTES).decode("ascii")
    except OSError as exc:
        raise CheckpointMismatchError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointMismatchError(f"{path}: byte {exc.start} is not ASCII (expected 'base64 rank' lines)") from exc
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank_text = line.split()
            token_bytes, rank = base64.b64decode(token, validate=True), int(rank_text)
        except (ValueError, binascii.Error) as exc:
            raise CheckpointMismatchError(f"{path}: line {number} is not 'base64 rank'") from exc
        if token_bytes in ranks:
            raise CheckpointMismatchError(f"{path}: line {number} repeats a token")
        ranks[token_bytes] = rank
    _check_ranks(ranks, path)
    return ranks


def _check_ranks(ranks: dict[bytes, int], path: Path) -> None:
    if not ranks:
        raise CheckpointMismatchError(f"{path}: holds no ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):  # also catches duplicate, negative and huge ranks
        raise CheckpointMismatchError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointMismatchError(f"{path}: no rank for the single byte {missing[0]} (byte-level BPE needs all 256)")


def read_added_tokens(path: Path) -> dict[str, int]:
    """Added token content -> id, from `added_tokens_decoder` in tokenizer_config.json."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: not found")
    try:
        decoder = json.loads(read_limited(path, JSON_MAX_BYTES).decode("utf-8"))["added_tokens_decoder"]
        added = {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise CheckpointMismatchError(f"{path}: no valid 'added_tokens_decoder'") from exc
    if any(not isinstance(name, str) for name in added) or any(not 0 <= i <= MAX_TOKEN_ID for i in added.values()):
        raise CheckpointMismatchError(
            f"{path}: 'added_tokens_decoder' needs string contents and ids in [0, {MAX_TOKEN_ID}]")
    return added


class TextTokenizer:
    """GLM-4 tokenizer: plain-text encoding, special ids by name, audio id <-> index helpers."""

    def __init__(self, ranks: dict[bytes, int], added: dict[str, int], source: Path | None = None) -> None:
        import tiktoken

        where = source or Path("<memory>")
        overlap = set(added.values()) & set(ranks.values())
        if overlap:
            raise CheckpointMismatchError(f"{where}: added token id {min(overlap)} collides with a BPE rank")
        for name in (*EOS_TOKENS, *PROMPT_PREFIX, SYSTEM, ASSISTANT, BEGIN_OF_AUDIO, END_OF_AUDIO):
            if name not in added:
                raise CheckpointMismatchError(f"{where}: added_tokens_decoder lacks '{name}'")
        self.source = where
        self._added = dict(added)
        self._encoding: tiktoken.Encoding = tiktoken.Encoding(
            name=f"glm4:{where}", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=added
        )
        self.n_ranks = len(ranks)
        self.vocab_size = max([*ranks.values(), *added.values()]) + 1  # ids beyond are never valid
        self.valid_ids = frozenset(ranks.values()) | frozenset(added.values())  # gaps are never sampled
        self.max_token_bytes = max((len(token) for token in ranks), default=1)  # bounds tokens per byte
        self._named = self.valid_ids
        self._audio = self._audio_block(added, where)

    @classmethod
    def from_folder(cls, folder: Path) -> TextTokenizer:
        folder = Path(folder)
        ranks = read_ranks(folder / RANKS_FILE)
        added = read_added_tokens(folder / TOKENIZER_CONFIG_FILE)
        return cls(ranks, added, source=folder / TOKENIZER_CONFIG_FILE)  # errors name the file

    @staticmethod
    def _audio_block(added: dict[str, int], where: Path) -> tuple[int, int]:
        """(id of <|audio_0|>, number of audio tokens); the block must be contiguous."""
        if audio_token_name(0) not in added:
            raise CheckpointMismatchError(f"{where}: added_tokens_decoder lacks '{audio_token_name(0)}'")
        offset = added[audio_token_name(0)]
        count = sum(1 for name in added if _AUDIO_TOKEN.fullmatch(name))
        for index in (count - 1, count // 2):
            if added.get(audio_token_name(index)) != offset + index:
                raise CheckpointMismatchError(
                    f"{where}: '{audio_token_name(index)}' is not at id {offset + index}"
                )
        return offset, count

    # ------------------------------------------------------------------ ids by name

    def token_id(self, name: str) -> int:
        """The id of an added (special or voice) token, by its content."""
        try:
            return self._added[name]
        except KeyError:
            raise CheckpointMismatchError(f"{self.source}: no token '{name}'") from None

    @cached_property
    def eos_ids(self) -> frozenset[int]:
        return frozenset(self.token_id(name) for name in EOS_TOKENS)

    @cached_property
    def prefix_ids(self) -> list[int]:
        """`[gMASK]<sop>`, which the official tokenizer prepends to every prompt."""
        return [self.token_id(name) for name in PROMPT_PREFIX]

    @property
    def audio_offset(self) -> int:
        """Id of `<|audio_0|>`: a generated id >= this is audio token (id - offset)."""
        return self._audio[0]

    @property
    def n_audio_tokens(self) -> int:
        return self._audio[1]

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.audio_offset + self.n_audio_tokens

    def audio_ids(self, indices: list[int]) -> list[int]:
        """Speech-tokenizer indices [0, n_audio) -> LM token ids."""
        bad = [i for i in indices if not 0 <= i < self.n_audio_tokens]
        if bad:
            raise ValueError(f"audio token index {bad[0]} outside [0, {self.n_audio_tokens})")
        return [self.audio_offset + i for i in indices]

    def audio_index(self, token_id: int) -> int:
        """LM token id -> speech-tokenizer index (raises for a non-audio id)."""
        if not self.is_audio(token_id):
            raise ValueError(f"token id {token_id} is not an audio token")
        return token_id - self.audio_offset

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no prefix; special-token strings in `text` are treated as text."""
        return self._encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        """Ids -> text (special and audio tokens appear by name); invalid UTF-8 is replaced."""
        return self.token_bytes_of(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token's bytes are its name)."""
        return self._encoding.decode_single_token_bytes(token_id)

    def token_bytes_of(self, ids: list[int]) -> bytes:
        return self._encoding.decode_bytes(ids)

    def named_ids(self) -> list[int]:
        """Every id that is a token (a BPE rank or an added token), ascending; other rows are padding."""
        return sorted(self._named)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.n_ranks


class TextDetokenizer:
    """Turns text token ids into text pieces without splitting a UTF-8 character across pieces."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token ('' while a multi-byte character is incomplete)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is pending at the end of a turn (a replacement char for a cut character)."""
        return self._utf8.decode(b"", final=True)
