"""VoiceLM: streaming interleaved text + audio generation from GLM-4-Voice.

`VoiceLM.stream(conversation, user_input)` is a generator of typed events, one per sampled token:
`TextPiece` (text, whole UTF-8 characters only), `AudioTokens` (speech-tokenizer indices for the
decoder) and finally `TurnEnd` with its reason. The caller owns the `Conversation`: its token-id
history and the KV cache that goes with it. A new turn only prefills what the cache lacks; a
cut-short turn is trimmed with `Conversation.keep_heard` so that the history holds only what the user
actually heard.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmvoice_cli.errors import CheckpointMismatchError, ContextLengthError, GlmVoiceError
from glmvoice_cli.lm.context import answer_room, min_tokens_for_bytes, plan_context
from glmvoice_cli.lm.prompts import InputMode, TextInput, UserInput, turn_ids
from glmvoice_cli.lm.sampling import (
    DEMO_TEMPERATURE,
    DEMO_TOP_P,
    SamplingSettings,
    blocked_mask,
    read_sampling,
    sample_on_device,
)
from glmvoice_cli.lm.text_tokenizer import USER, TextDetokenizer, TextTokenizer

if TYPE_CHECKING:
    import torch
    from transformers import GlmForCausalLM

    from glmvoice_cli.lm.compiled import CompileReport, StaticDecoder
    from glmvoice_cli.options import LoadOptions

DEFAULT_TEMPERATURE = DEMO_TEMPERATURE  # official web demo defaults (kept for importers)
DEFAULT_TOP_P = DEMO_TOP_P
DEFAULT_MAX_NEW_TOKENS = 2000  # ~2.5 min of interleaved answer
# Ids per prefill forward. In bf16 or fp16 a cache row depends on the shape of the forward that computed it, so
# a turn is always prefilled in the same chunks, counted from where its new ids start, whatever the timing:
# one prefill at the end, blocks warmed while the user speaks, or an answer started at a pause. The same
# recording then gives the same answer on any path and machine. 50 = one 4 s block of speech ids.
PREFILL_CHUNK = 50


@dataclass(frozen=True)
class GenerationOptions:
    """One turn's generation. Sampling fields left None take the LM's `sampling` (its folder's file)."""

    temperature: float | None = None  # 0 means greedy
    top_p: float | None = None  # nucleus mass kept; 1.0 disables
    top_k: int | None = None  # 0 disables
    do_sample: bool | None = None  # False: greedy
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None  # a fixed seed makes a turn reproducible on the same device
    text_only: bool = False  # mask the audio tokens out of the logits (transcription: no time spent on speech)

    def sampling(self, base: SamplingSettings) -> SamplingSettings:
        """The sampling in effect: `base` with this turn's non-None fields (the flags) applied."""
        return base.override(self.temperature, self.top_p, self.top_k, self.do_sample)


class LMSlotsBusy(GlmVoiceError):
    """Every static-cache slot is in a turn of another conversation: try again once one ends."""


class StopReason(str, Enum):
    USER = "user"  # the model emitted <|user|>: its normal end of turn
    EOS = "eos"  # <|endoftext|> or <|observation|>
    MAX_TOKENS = "max_tokens"
    CONTEXT = "context_full"  # the answer reached the model's seq_length (see lm.context)
    CANCELLED = "cancelled"  # the cancel flag was set (barge-in)


@dataclass(frozen=True)
class TextPiece:
    text: str  # may be '' while a multi-byte character is incomplete; a special token gives its name
    token_id: int  # -1 for the pending bytes flushed at the end of a turn


@dataclass(frozen=True)
class AudioTokens:
    indices: tuple[int, ...]  # speech-tokenizer indices in [0, n_audio_tokens)


@dataclass(frozen=True)
class TurnEnd:
    reason: StopReason
    n_generated: int  # tokens of this turn kept in the history (the stop token excluded)


LMEvent = TextPiece | AudioTokens | TurnEnd


@dataclass
class Conversation:
    """Token-id history and its KV cache. Create with `VoiceLM.new_conversation`.

    One turn at a time: a conversation is not shared by two running streams.
    """

    system_mode: InputMode | None = None  # set by the first turn
    ids: list[int] = field(default_factory=list)  # committed history
    cache: Any = None  # a transformers Cache holding exactly `cached_ids`
    cached_ids: list[int] = field(default_factory=list)
    # cache rows [0, stable) were computed in canonical chunks (or are decoded tokens); rows past it (an
    # answer's prefill that may be dropped) are computed again before anything is added after them
    stable: int = 0
    last_input_start: int | None = None  # where the last user turn begins in `ids`
    last_output_start: int | None = None  # where the last answer begins in `ids`
    dropped_turns: int = 0  # past turns dropped so far to stay inside the context
    last_prefill_tokens: int = 0  # how many ids the last prefill actually ran through the model
    prefilled_at: float | None = None  # perf_counter when the last prefill's logits were ready
    slot: Any = None  # the static-cache slot it holds (compiled LM), while it holds one
    answering: bool = False  # a turn is under way: its slot is not taken by another conversation

    @property
    def last_output(self) -> list[int]:
        return [] if self.last_output_start is None else self.ids[self.last_output_start :]

    def keep_heard(self, n_tokens: int) -> None:
        """Keep only the first `n_tokens` of the last answer (what the user heard before barge-in)."""
        if self.last_output_start is None:
            raise ValueError("no answer to trim")
        if not 0 <= n_tokens <= len(self.last_output):
            raise ValueError(f"n_tokens {n_tokens} outside [0, {len(self.last_output)}]")
        del self.ids[self.last_output_start + n_tokens :]
        _crop_cache(self, common_prefix_length(self.cached_ids, self.ids))


def tokens_through_audio(output: list[int], tokenizer: TextTokenizer, n_audio: int) -> int:
    """How many answer tokens to keep so that exactly the first `n_audio` audio tokens are kept.

    The text interleaved before the last heard audio token is kept, the text after it is not.
    """
    if n_audio <= 0:
        return 0
    seen = 0
    for position, token_id in enumerate(output):
        if tokenizer.is_audio(token_id):
            seen += 1
            if seen == n_audio:
                return position + 1
    return len(output)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _crop_cache(conv: Conversation, length: int) -> None:
    conv.stable = min(conv.stable, length)
    if length >= len(conv.cached_ids):
        return
    if length == 0 or conv.cache is None:
        conv.cache, conv.cached_ids = None, []
        return
    conv.cache.crop(length - len(conv.cached_ids))  # a negative count removes tokens from the end
    del conv.cached_ids[length:]


class VoiceLM:
    """A GlmForCausalLM plus its tokenizer, generating one token at a time with an explicit cache."""

    def __init__(
        self, model: GlmForCausalLM, tokenizer: TextTokenizer, sampling: SamplingSettings | None = None
    ) -> None:
        self.model = model
        self.text_tokenizer = tokenizer
        self.sampling = sampling or SamplingSettings()  # the folder's; GenerationOptions may override it
        self.seq_length = int(model.config.max_position_embeddings)  # positions the model was trained on
        self.user_id = tokenizer.token_id(USER)
        self._blocked: torch.Tensor | None = None  # [V] ids never sampled, built on the first forward
        n_logits = int(model.config.vocab_size)
        if tokenizer.vocab_size > n_logits:
            raise CheckpointMismatchError(
                f"{tokenizer.source}: token id {tokenizer.vocab_size - 1} is beyond the model's {n_logits} rows"
            )
        # transformers 5.x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        keep = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)
        self._keep_last = {keep: 1} if keep else {}  # compute lm_head for the last position only
        self.waits_on_network = False  # every event is computed here (see LMBackend)
        self.static: StaticDecoder | None = None  # the first static-cache slot, once enabled
        self.slots: list[StaticDecoder] = []  # every slot: one conversation's cache each (see `_slot_for`)

    def enable_static(self, compiled: bool = True, max_len: int | None = None, slots: int = 1) -> CompileReport:
        """Decode over static caches of `max_len` tokens (the context length), compiled or not.

        `slots` conversations keep their caches at once (each slot holds `max_len` tokens of KV memory); a
        conversation beyond them takes the slot of one that is not answering, which re-prefills its
        history on its next turn. Compiles and warms up every shape now. Raises CompileUnavailable (and
        keeps the eager loop) when that fails.
        """
        from glmvoice_cli.lm.compiled import build_static_decoder

        if slots < 1:
            raise ValueError(f"at least one static-cache slot is needed, not {slots}")
        n_logits = self.model.lm_head.weight.shape[0]
        blocked = blocked_mask(self.text_tokenizer, n_logits, self.device)  # padded rows and unnamed gaps
        max_len = max_len or int(self.model.config.max_position_embeddings)
        self.static, self.slots = None, []
        built = [build_static_decoder(self.model, max_len, blocked, compiled) for _ in range(slots)]
        self.static, self.slots = built[0], built
        assert built[0].report is not None
        return built[0].report

    def ensure_slots(self, n: int) -> None:
        """At least `n` static-cache slots, built as the first (a server keeps one per session); nothing
        without a static cache (the eager loop gives every conversation a cache of its own)."""
        from glmvoice_cli.lm.compiled import build_static_decoder

        first = self.static
        if first is None or len(self.slots) >= n:
            return
        blocked = blocked_mask(self.text_tokenizer, self.model.lm_head.weight.shape[0], self.device)
        self.slots += [build_static_decoder(self.model, first.max_len, blocked, first.mode != "eager")
                       for _ in range(n - len(self.slots))]

    def prepare_thread(self) -> None:
        """Get the calling thread ready to decode without first-turn set-up (CUDA graphs are per thread).

        Call it from the thread that will run the turns, before the first one: it empties the cache.
        """
        for slot in self.slots:
            slot.warm_this_thread()

    @classmethod
    def from_folder(cls, folder: Path, options: LoadOptions | None = None) -> VoiceLM:
        """Load an official ChatGLM-format checkpoint folder (weights, config and tokenizer)."""
        from glmvoice_cli.lm.loader import load_lm

        return cls(load_lm(folder, options), TextTokenizer.from_folder(folder), read_sampling(folder))

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def new_conversation(self) -> Conversation:
        return Conversation()

    # ------------------------------------------------------------------ forward

    def prefill(self, conv: Conversation, ids: list[int]) -> torch.Tensor:
        """Run `conv.ids + ids` through the model, reusing the cache; logits of the last position [V].

        `ids` are appended to the history. Only the part the cache lacks is computed
        (`conv.last_prefill_tokens` says how much).
        """
        import torch

        conv.ids.extend(ids)
        if not conv.ids:
            raise ValueError("nothing to prefill")
        self._check_slot(conv)
        keep = min(common_prefix_length(conv.cached_ids, conv.ids), conv.stable)
        keep = min(keep, len(conv.ids) - 1)  # always feed at least one id to get fresh logits
        _crop_cache(conv, keep)
        if conv.cache is None:
            conv.cache = self._new_cache(conv)
        todo = conv.ids[len(conv.cached_ids) :]
        conv.last_prefill_tokens = len(todo)
        if self.static is not None and len(conv.ids) > self.static.max_len:
            raise ContextLengthError(
                f"the conversation holds {len(conv.ids)} tokens, the context {self.static.max_len}"
            )
        last = (len(todo) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
        self._extend(conv, todo[:last])
        logits = self._forward(conv, todo[last:], torch.tensor([todo[last:]], device=self.device))
        conv.stable = len(conv.cached_ids)  # the answer builds on it; a dropped one puts `stable` back
        conv.prefilled_at = time.perf_counter()
        return logits

    def warm(self, conv: Conversation, ids: list[int]) -> int:
        """Make the cache hold `conv.ids + ids` without adding `ids` to the history; returns the ids computed.

        For input known ahead of its turn (the user's speech tokens while they speak): the next
        `prefill` whose ids start the same way only computes the rest.
        """
        target = conv.ids + ids
        self._check_slot(conv)
        _crop_cache(conv, min(common_prefix_length(conv.cached_ids, target), conv.stable))
        todo = target[len(conv.cached_ids) :]
        todo = todo[: len(todo) - len(todo) % PREFILL_CHUNK]  # whole chunks only: the rest waits for more
        if not todo or len(target) >= self.context_length:
            # nothing to do, or past the context: the turn's own prefill first drops the oldest turns (or reports
            # an overflow); warming here would compute positions the model never saw, and again at every block
            return 0
        if conv.cache is None:
            try:
                conv.cache = self._new_cache(conv)
            except LMSlotsBusy:
                return 0  # every slot is answering: the turn's own prefill computes it later
        self._extend(conv, todo)
        conv.stable = len(conv.cached_ids)
        return len(todo)

    def _check_slot(self, conv: Conversation) -> None:
        if self.static is not None and (conv.slot is None or conv.slot.owner is not conv):
            conv.cache, conv.cached_ids, conv.slot = None, [], None  # its slot went to another conversation
            conv.stable = 0

    def _new_cache(self, conv: Conversation) -> Any:
        from transformers import DynamicCache

        if self.static is not None:
            slot = self._slot_for(conv)
            conv.slot = slot
            return slot.claim(conv)
        return DynamicCache(config=self.model.config)

    def _slot_for(self, conv: Conversation) -> StaticDecoder:
        """A free slot, else the one least recently claimed whose conversation is not answering."""
        free = [slot for slot in self.slots if slot.owner is None or slot.owner is conv]
        if free:
            return free[0]
        idle = [slot for slot in self.slots if not getattr(slot.owner, "answering", False)]
        if not idle:
            raise LMSlotsBusy(f"all {len(self.slots)} static-cache slots of the language model are answering "
                              "other conversations")
        return min(idle, key=lambda slot: slot.claimed_at)

    def release(self, conv: Conversation) -> None:
        """`conv` has ended: drop its cache and hand back its static slot (its history ids stay)."""
        slot = conv.slot
        if slot is not None and slot.owner is conv:
            slot.owner = None
        conv.cache, conv.cached_ids, conv.slot, conv.answering = None, [], None, False
        conv.stable = 0

    def reserve(self, conv: Conversation) -> None:
        """Make sure `conv` can get a slot before its history changes; raises LMSlotsBusy (try again later)."""
        if self.static is not None and (conv.slot is None or conv.slot.owner is not conv):
            self._slot_for(conv)

    def _extend(self, conv: Conversation, id_list: list[int]) -> None:
        """Grow the cache by `id_list` in whole PREFILL_CHUNKs (the last may be shorter), computing no logits."""
        import torch

        for start in range(0, len(id_list), PREFILL_CHUNK):
            chunk = id_list[start : start + PREFILL_CHUNK]
            ids = torch.tensor([chunk], device=self.device)
            conv.cached_ids.extend(chunk)
            if self.static is not None:
                conv.slot.extend(ids)
                continue
            with torch.no_grad():
                self.model.model(input_ids=ids, use_cache=True, **{self._cache_kwarg: conv.cache})

    def _forward(self, conv: Conversation, id_list: list[int], ids: torch.Tensor) -> torch.Tensor:
        """ids [1, T] (`id_list` on the host) -> logits [V] (fp32) of the last position; the cache grows by T."""
        import torch

        conv.cached_ids.extend(id_list)
        if self.static is not None:
            slot = conv.slot
            return slot.step(ids) if len(id_list) == 1 else slot.prefill(ids)
        with torch.no_grad():
            out = self.model(
                input_ids=ids, use_cache=True, **self._keep_last, **{self._cache_kwarg: conv.cache}
            )
        logits = out.logits[0, -1].float()
        if self._blocked is None or self._blocked.shape != logits.shape:
            self._blocked = blocked_mask(self.text_tokenizer, logits.numel(), logits.device)
        return logits.masked_fill_(self._blocked, float("-inf"))  # padded rows and unnamed gaps

    # ------------------------------------------------------------------ generation

    def stream(
        self,
        conv: Conversation,
        user: UserInput,
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[LMEvent]:
        """Answer one user turn, yielding an event per sampled token and a final TurnEnd.

        The first turn of `conv` fixes its system prompt (from the input mode); later turns, spoken
        or typed, only add their user part.
        """
        options = options or GenerationOptions()
        if isinstance(user, TextInput):  # refuse a huge typed line before tokenizing it
            self._check_text_fits(user.text, options.max_new_tokens)
        self.reserve(conv)  # before the system mode is set: a turn that must wait changes nothing
        new_ids = turn_ids(self.text_tokenizer, user, conv.system_mode)
        if conv.system_mode is None:
            conv.system_mode = user.mode
        return self.stream_ids(conv, new_ids, options, cancel)

    @property
    def context_length(self) -> int:
        """Positions a conversation may use: seq_length, or the static cache's size when smaller."""
        return min(self.seq_length, self.static.max_len) if self.static is not None else self.seq_length

    def _check_text_fits(self, text: str, max_new_tokens: int) -> None:
        """Raise ContextLengthError when `text` cannot fit, from its byte length alone (no encoding)."""
        n_bytes = len(text.encode("utf-8", "replace"))
        at_least = min_tokens_for_bytes(n_bytes, self.text_tokenizer.max_token_bytes)
        room = answer_room(max_new_tokens, self.context_length)
        if at_least + room > self.context_length:
            raise ContextLengthError(
                f"this message is at least {at_least} tokens; the model's context holds {self.context_length} "
                f"with {room} kept for the answer: shorten it"
            )

    def stream_ids(
        self,
        conv: Conversation,
        new_ids: list[int],
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[LMEvent]:
        """Append raw prompt ids to the history and generate from there (see `stream`).

        The answer is committed to `conv` as it is generated (also if the consumer stops early);
        the stop token is not, since the next turn starts with <|user|> anyway. Cancellation is
        checked before every step, so a set `cancel` ends the turn within one token.
        """
        options = options or GenerationOptions()
        self.reserve(conv)  # before the history changes: a conversation that must wait loses nothing
        conv.answering = True
        try:
            yield from self._answer(conv, new_ids, options, cancel)
        finally:
            conv.answering = False

    def _answer(self, conv: Conversation, new_ids: list[int], options: GenerationOptions,
                cancel: threading.Event | None) -> Iterator[LMEvent]:
        plan = plan_context(
            conv.ids, new_ids, user_id=self.user_id, seq_length=self.context_length,
            max_new_tokens=options.max_new_tokens,
        )
        if plan.dropped_tokens:
            conv.ids[:] = plan.history  # the cache is cropped to the common prefix by prefill
            conv.dropped_turns += plan.dropped_turns
        conv.last_input_start = len(conv.ids)
        if cancel is not None and cancel.is_set():
            conv.ids.extend(new_ids)
            conv.last_output_start = len(conv.ids)
            yield TurnEnd(StopReason.CANCELLED, 0)
            return
        logits = self.prefill(conv, new_ids)
        conv.last_output_start = len(conv.ids)
        limit = StopReason.CONTEXT if plan.context_limited else StopReason.MAX_TOKENS
        yield from self._sample_loop(conv, logits, options, cancel, (plan.max_answer_tokens, limit))

    def _sample_loop(
        self,
        conv: Conversation,
        logits: torch.Tensor,
        options: GenerationOptions,
        cancel: threading.Event | None,
        limit: tuple[int, StopReason],
    ) -> Iterator[LMEvent]:
        """Sample up to `limit[0]` tokens; reaching that many ends the turn with `limit[1]`."""

        generator = _make_generator(self.device, options.seed)
        sampling = options.sampling(self.sampling)
        text = TextDetokenizer(self.text_tokenizer)
        eos = self.text_tokenizer.eos_ids
        max_steps, limit_reason = limit
        for n in range(max_steps):
            if cancel is not None and cancel.is_set():
                yield from self._finish(conv, text, StopReason.CANCELLED)
                return
            if options.text_only:
                start = self.text_tokenizer.audio_offset
                logits[start : start + self.text_tokenizer.n_audio_tokens] = float("-inf")
            token_id, token = sample_on_device(logits, sampling, generator)  # the step's one host sync
            if token_id in eos:
                reason = StopReason.USER if token_id == self.user_id else StopReason.EOS
                yield from self._finish(conv, text, reason)
                return
            conv.ids.append(token_id)
            if self.text_tokenizer.is_audio(token_id):
                yield AudioTokens((self.text_tokenizer.audio_index(token_id),))
            else:
                yield TextPiece(text.push(token_id), token_id)
            if n + 1 < max_steps:
                logits = self._forward(conv, [token_id], token)
                conv.stable = len(conv.cached_ids)  # decoded rows are the same on every path
        yield from self._finish(conv, text, limit_reason)

    def _finish(self, conv: Conversation, text: TextDetokenizer, reason: StopReason) -> Iterator[LMEvent]:
        tail = text.flush()
        if tail:
            yield TextPiece(tail, -1)
        yield TurnEnd(reason, len(conv.last_output))


def _make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    import torch

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
