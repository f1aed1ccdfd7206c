"""The LM on a serving engine: an OpenAI-compatible completions server that speaks token ids (vLLM).

Only token ids cross the wire. The text tokenizer stays here (the server runs with its tokenizer
skipped); every turn sends the whole history as a token-id prompt and reads the answer back one
streamed token at a time (`return_token_ids`), so `RemoteVoiceLM` gives the same events, the same
id history and the same barge-in trim as the in-process `VoiceLM`. The history is resent each turn:
the server's prefix cache (on by default in vLLM) recognises the part it has already computed, in
blocks of its KV page size, so a turn costs what the in-process cache would, plus one round trip.

Everything that decides a token is sent explicitly, so the server's own defaults never do: the
temperature, top-p, top-k off, no penalties, a seed (drawn here when none is given), the stop ids,
and the allowed ids (every named id for a spoken answer, so padding rows are never sampled; every
non-audio id for text-only decoding). `connect` checks what it can before the first turn: the
server is up, serves one model (or the one named), returns token ids, honours `allowed_token_ids`
and has the vocabulary of the local tokenizer and config.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmvoice_cli.errors import CheckpointMismatchError, LMServerError
from glmvoice_cli.lm.checkpoint import read_chatglm_config
from glmvoice_cli.lm.context import ContextPlan, plan_context
from glmvoice_cli.lm.http_client import Cancelled, HttpClient, ServerURL
from glmvoice_cli.lm.prompts import UserInput, turn_ids
from glmvoice_cli.lm.sampling import SamplingSettings, blocked_ids, read_sampling
from glmvoice_cli.lm.text_tokenizer import USER, TextDetokenizer, TextTokenizer
from glmvoice_cli.lm.voice_lm import (
    AudioTokens,
    Conversation,
    GenerationOptions,
    LMEvent,
    StopReason,
    TextPiece,
    TurnEnd,
)
from glmvoice_cli.options import LMServer

COMPLETIONS = "completions"
MODELS = "models"
SEED_BITS = 63  # vLLM takes a signed 64-bit seed
_FINISH_LENGTH = "length"


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id to put in requests
    max_model_len: int | None  # prompt + answer, when the server says


BIAS_FLOOR = -100  # vLLM clamps logit_bias to [-100, 100]: at the floor a token is never chosen in practice


class RemoteVoiceLM:
    """The LM backend for `--lm-url`: same interface and events as `VoiceLM`, generation on a server."""

    def __init__(self, client: HttpClient, served: ServedModel, tokenizer: TextTokenizer) -> None:
        self.client, self.served, self.text_tokenizer = client, served, tokenizer
        self.user_id = tokenizer.token_id(USER)
        named = tokenizer.named_ids()
        self._named = frozenset(named)
        self._stop_ids = sorted(tokenizer.eos_ids)
        # Serialised once: the spoken list has as many entries as the vocabulary (~169k for the real model).
        self._allowed_json = {
            False: json.dumps(named, separators=(",", ":")),
            True: json.dumps([i for i in named if not tokenizer.is_audio(i)], separators=(",", ":")),
        }
        self.masks_ids = True  # the server honours allowed_token_ids (checked by `connect`)
        # The ids to forbid, by mode, as a logit_bias object (set by `connect` when the server honours one): the
        # few padded or unnamed ids (and, text only, the audio ids), kilobytes where the allowed list is a megabyte.
        self._forbid_json: dict[bool, str] | None = None
        self.waits_on_network = True  # a shared model worker reads this stream on a thread of its own
        self.sampling = SamplingSettings()  # the folder's generation_config.json; options may override it
        self.seq_length: int | None = None  # the checkpoint's trained context (config seq_length)

    @classmethod
    def connect(cls, folder: Path, server: LMServer) -> RemoteVoiceLM:
        """Check the server against the local LM folder (config and tokenizer only) and return the backend."""
        folder = Path(folder)
        raw = read_chatglm_config(folder)
        check_servable(raw, folder)
        tokenizer = TextTokenizer.from_folder(folder)
        client = HttpClient(ServerURL.parse(server.url), server.api_key, read_timeout_s=server.timeout_s)
        served = pick_model(client.get_json(MODELS), server.model, client.url)
        lm = cls(client, served, tokenizer)
        lm.sampling = read_sampling(folder)
        seq_length = raw.get("seq_length")
        lm.seq_length = seq_length if isinstance(seq_length, int) and seq_length > 0 else None
        lm.check_vocabulary(int(raw["padded_vocab_size"]))
        if lm.masks_ids and lm.honours_logit_bias():
            lm.forbid_by_bias(int(raw["padded_vocab_size"]))
        return lm

    def forbid_by_bias(self, padded_vocab_size: int) -> None:
        """Send the forbidden ids as `logit_bias` (at vLLM's floor, -100) instead of the allowed ones."""
        tok = self.text_tokenizer
        blocked = blocked_ids(tok, padded_vocab_size)  # what the in-process loop masks, the same rule
        audio = [i for i in self._named if tok.is_audio(i)]

        def as_json(ids: list[int]) -> str:
            return "{" + ",".join(f'"{i}":{BIAS_FLOOR}' for i in sorted(ids)) + "}"

        forbid = {False: as_json(blocked), True: as_json(blocked + audio)}
        # Whichever is shorter: on the real vocabulary (1,231 unnamed rows) the forbidden ids, by far; on a
        # checkpoint with few named ids (a test model padded to the real size) the allowed list stays shorter.
        if len(forbid[False]) < len(self._allowed_json[False]):
            self._forbid_json = forbid

    def honours_logit_bias(self) -> bool:
        """A one-token probe: the greedy token, once forbidden by logit_bias, is no longer the answer."""
        first = self._probe(None)
        if first is None:
            return False
        try:
            second = self._probe(None, {str(first): BIAS_FLOOR})
        except LMServerError:
            return False  # the server refuses the field: keep sending the allowed list
        return second is not None and second != first

    @property
    def device(self) -> str:
        return str(self.client.url)

    def new_conversation(self) -> Conversation:
        return Conversation()

    # ------------------------------------------------------------------ connect-time checks

    def warm(self, conv: Conversation, ids: list[int]) -> int:
        """Nothing to warm here: the server keeps its own prefix cache (see `LMBackend.warm`)."""
        return 0

    def prepare_thread(self) -> None:
        """Nothing per thread: every request is its own."""

    def ensure_slots(self, n: int) -> None:
        """Nothing to grow: the server batches every request in its own KV cache."""

    def release(self, conv: Conversation) -> None:
        """Nothing held here: the server's prefix cache evicts what no request uses."""

    def check_vocabulary(self, padded_vocab_size: int) -> None:
        """One-token probes: token ids come back, the mask is honoured, the vocabularies agree."""
        last = max(self._named)
        got = self._probe(last)
        if got is None:
            raise LMServerError(f"the LM server at {self.client.url} does not return token ids "
                                "(`return_token_ids`); it needs vLLM 0.10.2 or newer")
        if got != last:
            self.masks_ids = False
            return
        try:
            beyond = self._probe(padded_vocab_size)
        except LMServerError:
            return  # refused: the server's vocabulary ends where ours does
        if beyond == padded_vocab_size:
            raise LMServerError(f"the LM server at {self.client.url} serves a model with more than "
                                f"{padded_vocab_size} token ids: not the checkpoint whose tokenizer is here")

    def _probe(self, token_id: int | None, logit_bias: dict[str, float] | None = None) -> int | None:
        body: dict[str, Any] = {"model": self.served.name, "prompt": self.text_tokenizer.prefix_ids,
                                "max_tokens": 1, "temperature": 0.0, "seed": 0, "return_token_ids": True,
                                "detokenize": False, "skip_special_tokens": False, "stream": False}
        if token_id is not None:
            body["allowed_token_ids"] = [token_id]
        if logit_bias is not None:
            body["logit_bias"] = logit_bias
        try:
            answer = self.client.post_json(COMPLETIONS, body)
        except LMServerError as e:
            if token_id in self._named and "vocab" in str(e):
                raise LMServerError(f"the LM server at {self.client.url} has no token id {token_id}, which "
                                    "this tokenizer uses: it serves another model") from e
            raise
        ids = _choice(answer).get("token_ids")
        return int(ids[0]) if isinstance(ids, list) and ids else None

    # ------------------------------------------------------------------ generation

    def stream(self, conv: Conversation, user: UserInput, options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[LMEvent]:
        """Answer one user turn (see `VoiceLM.stream`)."""
        first_turn = conv.system_mode is None
        new_ids = turn_ids(self.text_tokenizer, user, conv.system_mode)
        if first_turn:
            conv.system_mode = user.mode
        return self._answer(conv, new_ids, options or GenerationOptions(), cancel, first_turn)

    def stream_ids(self, conv: Conversation, new_ids: list[int], options: GenerationOptions | None = None,
                   cancel: threading.Event | None = None) -> Iterator[LMEvent]:
        """Append raw prompt ids to the history and generate from there (see `VoiceLM.stream_ids`)."""
        return self._answer(conv, new_ids, options or GenerationOptions(), cancel, False)

    @property
    def context_length(self) -> int | None:
        """Positions a conversation may use: the checkpoint's seq_length, or the server's shorter limit."""
        limits = [n for n in (self.seq_length, self.served.max_model_len) if n is not None]
        return min(limits) if limits else None

    def _plan(self, conv: Conversation, new_ids: list[int], max_new_tokens: int) -> ContextPlan:
        """The same context trim as in-process (`lm.context.plan_context`), against the server's limit."""
        limit = self.context_length
        if limit is None:  # neither the checkpoint nor the server says: send everything, the server decides
            return ContextPlan(list(conv.ids), 0, 0, max_new_tokens, False)
        return plan_context(conv.ids, new_ids, user_id=self.user_id, seq_length=limit,
                            max_new_tokens=max_new_tokens)

    def _answer(self, conv: Conversation, new_ids: list[int], options: GenerationOptions,
                cancel: threading.Event | None, first_turn: bool) -> Iterator[LMEvent]:
        """Commit the prompt, stream the answer; a turn that fails before its first token is undone.

        A failure after some tokens keeps them (like a barge-in: the caller trims to what was heard)
        and raises the LMServerError.
        """
        plan = self._plan(conv, new_ids, options.max_new_tokens)
        history, last_start = list(conv.ids), conv.last_output_start
        last_input, dropped = conv.last_input_start, conv.dropped_turns
        if plan.dropped_tokens:
            conv.ids[:] = plan.history
            conv.dropped_turns += plan.dropped_turns
        conv.last_input_start = len(conv.ids)
        conv.ids.extend(new_ids)
        conv.last_output_start = len(conv.ids)
        if cancel is not None and cancel.is_set():
            yield TurnEnd(StopReason.CANCELLED, 0)
            return
        try:
            yield from self._generate(conv, options, cancel, plan)
        except LMServerError:
            if len(conv.ids) == conv.last_output_start:  # nothing generated: as if the turn never ran
                conv.ids[:] = history
                conv.last_output_start, conv.last_input_start, conv.dropped_turns = last_start, last_input, dropped
                if first_turn:
                    conv.system_mode = None
            raise

    def _generate(self, conv: Conversation, options: GenerationOptions,
                  cancel: threading.Event | None, plan: ContextPlan) -> Iterator[LMEvent]:
        max_tokens = self._answer_budget(len(conv.ids), plan.max_answer_tokens)
        conv.last_prefill_tokens = len(conv.ids)  # until the server reports its prefix-cache hits
        stream = self.client.open_events(COMPLETIONS, self.request_body(conv.ids, options, max_tokens))
        turn = _Turn(self, conv, cancel, max_tokens, plan.context_limited)
        events = stream.events(cancel)
        try:
            try:
                for event in events:
                    yield from turn.on_event(event)
                    if turn.reason is not None:
                        break
                else:
                    turn.reason = turn.reason_at_end(max_tokens, plan.context_limited)
            except Cancelled:
                turn.reason = StopReason.CANCELLED
            yield from turn.finish()
            if turn.reason is not StopReason.CANCELLED:
                turn.drain(events)  # after TurnEnd: the usage event costs the listener nothing
        finally:
            stream.close()

    def _answer_budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """max_tokens for this prompt: the option, capped by what the server's context has left."""
        limit = self.served.max_model_len
        if limit is None:
            return max_new_tokens
        if prompt_tokens >= limit:
            raise LMServerError(f"the conversation ({prompt_tokens} tokens) fills the LM server's context "
                                f"({limit} tokens); start a new chat or serve with a larger --max-model-len")
        return min(max_new_tokens, limit - prompt_tokens)

    def request_body(self, prompt: list[int], options: GenerationOptions, max_tokens: int) -> bytes:
        """The JSON of one streamed completion, every sampling choice explicit."""
        if options.text_only and not self.masks_ids:
            raise LMServerError(f"the LM server at {self.client.url} ignores `allowed_token_ids`, so it "
                                "cannot decode text only (transcription); serve the LM with vLLM")
        sampling = options.sampling(self.sampling)
        greedy = sampling.greedy
        seed = options.seed if options.seed is not None else random.SystemRandom().getrandbits(SEED_BITS)
        body: dict[str, Any] = {
            "model": self.served.name, "prompt": prompt, "max_tokens": max_tokens, "n": 1,
            "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p, "top_k": 0 if greedy else sampling.top_k,  # 0: off
            "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": seed,
            "stop_token_ids": self._stop_ids, "ignore_eos": False, "min_tokens": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True, "detokenize": False, "skip_special_tokens": False,
        }
        text = json.dumps(body, separators=(",", ":"))
        if self._forbid_json is not None:
            return f'{text[:-1]},"logit_bias":{self._forbid_json[options.text_only]}}}'.encode()
        allowed = self._allowed_json[options.text_only]
        return f'{text[:-1]},"allowed_token_ids":{allowed}}}'.encode()


DRAIN_EVENTS_MAX = 8  # events read after the stop, for the usage event that a well-behaved server sends next

class _Turn:
    """One answer's bookkeeping: ids committed to the history, events, the stop reason."""

    def __init__(self, lm: RemoteVoiceLM, conv: Conversation, cancel: threading.Event | None,
                 max_tokens: int | None = None, context_limited: bool = False) -> None:
        self.lm, self.conv, self.cancel = lm, conv, cancel
        self.max_tokens, self.context_limited = max_tokens, context_limited
        self.text = TextDetokenizer(lm.text_tokenizer)
        self.reason: StopReason | None = None
        self.finish_reason: str | None = None

    def on_event(self, event: dict[str, Any]) -> Iterator[LMEvent]:
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._note_usage(usage)
        if not event.get("choices"):
            return
        choice = _choice(event)
        finish = choice.get("finish_reason")
        self.finish_reason = (finish if isinstance(finish, str) else None) or self.finish_reason
        ids = choice.get("token_ids")
        ids = [] if ids is None else ids
        if not isinstance(ids, list):
            raise LMServerError(f"the LM server at {self.lm.client.url} sent token_ids that are not a list")
        for token_id in ids:
            if self.cancel is not None and self.cancel.is_set():
                self.reason = StopReason.CANCELLED  # checked before every token, as in-process
            elif self.max_tokens is not None and len(self.conv.last_output) >= self.max_tokens:
                # the server went past max_tokens (it ignores it, or is not what it claims): our budget holds
                self.reason = StopReason.CONTEXT if self.context_limited else StopReason.MAX_TOKENS
            if self.reason is not None:
                return
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                shown = repr(token_id)[:40]
                raise LMServerError(f"the LM server at {self.lm.client.url} sent a token id that is not an "
                                    f"integer ({shown})")
            yield from self._on_token(token_id)

    def drain(self, events: Iterator[dict[str, Any]]) -> None:
        """Read what follows the stop (the usage event) up to [DONE]; a failure there changes nothing."""
        try:
            for count, event in enumerate(events):
                usage = event.get("usage")
                if isinstance(usage, dict):
                    self._note_usage(usage)
                if count >= DRAIN_EVENTS_MAX:
                    return  # a server still streaming past the stop ignores it: stop listening (the caller closes)
        except (LMServerError, Cancelled):
            pass

    def _on_token(self, token_id: int) -> Iterator[LMEvent]:
        tok = self.lm.text_tokenizer
        if token_id in tok.eos_ids:
            self.reason = StopReason.USER if token_id == self.lm.user_id else StopReason.EOS
            return
        if token_id not in self.lm._named:
            raise LMServerError(f"the LM server at {self.lm.client.url} sent token id {token_id}, which this "
                                "tokenizer does not have: it serves another model")
        if len(self.conv.ids) == self.conv.last_output_start:
            self.conv.prefilled_at = time.perf_counter()  # the first token: the server's prefill is done
        self.conv.ids.append(token_id)
        if tok.is_audio(token_id):
            yield AudioTokens((tok.audio_index(token_id),))
        else:
            yield TextPiece(self.text.push(token_id), token_id)

    def _note_usage(self, usage: dict[str, Any]) -> None:
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int):
            self.conv.last_prefill_tokens = prompt - (cached if isinstance(cached, int) else 0)

    def reason_at_end(self, max_tokens: int, context_limited: bool = False) -> StopReason:
        """The stream ended ([DONE]) without a stop id in it."""
        if self.finish_reason == _FINISH_LENGTH or len(self.conv.last_output) >= max_tokens:
            return StopReason.CONTEXT if context_limited else StopReason.MAX_TOKENS
        if self.finish_reason == "stop":
            return StopReason.EOS
        raise LMServerError(f"the LM server at {self.lm.client.url} ended the answer without a reason "
                            f"(finish_reason {self.finish_reason!r})")

    def finish(self) -> Iterator[LMEvent]:
        tail = self.text.flush()
        if tail:
            yield TextPiece(tail, -1)
        assert self.reason is not None
        yield TurnEnd(self.reason, len(self.conv.last_output))


def _choice(answer: Any) -> dict[str, Any]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LMServerError("the LM server sent an answer without choices")
    return choices[0]


def pick_model(listing: Any, wanted: str | None, url: ServerURL) -> ServedModel:
    """The model to use from a /v1/models answer: the one named, or the server's only one."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        raise LMServerError(f"the server at {url} has no OpenAI-style /v1/models listing: is it an LM server?")
    cards = {str(card.get("id")): card for card in data if isinstance(card, dict) and card.get("id")}
    if not cards:
        raise LMServerError(f"the LM server at {url} serves no model")
    if wanted is None and len(cards) > 1:
        raise LMServerError(f"the LM server at {url} serves {len(cards)} models ({', '.join(sorted(cards))}); "
                            "name one with --lm-model")
    name = wanted if wanted is not None else next(iter(cards))
    if name not in cards:
        raise LMServerError(f"the LM server at {url} does not serve {name!r} (it serves "
                            f"{', '.join(sorted(cards))}); fix --lm-model")
    length = cards[name].get("max_model_len")
    return ServedModel(name, length if isinstance(length, int) and length > 0 else None)


def check_servable(raw: dict[str, Any], folder: Path) -> None:
    """A checkpoint a serving engine computes as we do: vLLM's ChatGLM ignores `kv_channels`."""
    try:
        heads, hidden, head_dim = int(raw["num_attention_heads"]), int(raw["hidden_size"]), int(raw["kv_channels"])
        int(raw["padded_vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{folder / 'config.json'}: missing or invalid field {e}") from e
    if heads * head_dim != hidden:
        raise CheckpointMismatchError(
            f"{folder / 'config.json'}: kv_channels ({head_dim}) x num_attention_heads ({heads}) != hidden_size "
            f"({hidden}); vLLM's ChatGLM assumes they are equal, so a server would compute another model: "
            "run this checkpoint in-process (without --lm-url)")
