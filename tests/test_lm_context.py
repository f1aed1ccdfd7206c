"""Context-length management: whole past turns are dropped before a turn would overflow seq_length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glmvoice_cli.errors import ContextLengthError
from glmvoice_cli.lm.context import answer_room, plan_context
from glmvoice_cli.lm.prompts import TextInput
from glmvoice_cli.lm.voice_lm import PREFILL_CHUNK, GenerationOptions, StopReason, TurnEnd, VoiceLM
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

U = 9  # <|user|> in the synthetic histories
SEQ_LENGTH = 420  # small: a first text turn is ~200 tokens with the tiny tokenizer
SPEC = TinyLMSpec(hidden_size=32, num_layers=1, num_heads=4, kv_groups=2, ffn_hidden_size=64, seq_length=SEQ_LENGTH)


def _history() -> list[int]:
    system = [1, 2, 3]
    return [*system, U, 10, 11, 12, U, 20, 21, U, 30, 31, 32, 33]  # three past turns


def test_a_turn_that_fits_keeps_everything() -> None:
    plan = plan_context(_history(), [U, 40], user_id=U, seq_length=100, max_new_tokens=20)
    assert plan.history == _history() and plan.dropped_turns == 0 and plan.dropped_tokens == 0
    assert plan.max_answer_tokens == 20 and not plan.context_limited


def test_oldest_whole_turns_go_first_and_the_system_prompt_stays() -> None:
    # 15 history + 2 new + room 6 = 23 > 17: drop the first turn (4 ids) -> 19, still > 17: drop the second
    plan = plan_context(_history(), [U, 40], user_id=U, seq_length=17, max_new_tokens=6)
    assert plan.history == [1, 2, 3, U, 30, 31, 32, 33]
    assert (plan.dropped_turns, plan.dropped_tokens) == (2, 7)
    assert plan.max_answer_tokens == 6


def test_the_answer_room_is_capped_at_half_the_context() -> None:
    assert answer_room(2000, 8192) == 2000 and answer_room(2000, 1000) == 500
    plan = plan_context(_history(), [U, 40], user_id=U, seq_length=30, max_new_tokens=2000)
    assert plan.dropped_turns == 1  # room 15: 15 + 2 + 15 > 30, 11 + 2 + 15 <= 30
    assert plan.max_answer_tokens == 30 - len(plan.history) - 2 and plan.context_limited


def test_a_turn_too_long_even_alone_is_refused_in_one_line() -> None:
    with pytest.raises(ContextLengthError, match="this turn is 30 tokens") as info:
        plan_context(_history(), [U, *range(29)], user_id=U, seq_length=40, max_new_tokens=2000)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ with a tiny model


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> VoiceLM:
    folder = write_tiny_lm(tmp_path_factory.mktemp("lm"), SPEC)
    lm = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    eos = sorted(lm.text_tokenizer.eos_ids)

    def never_stop(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., eos] = -1e4  # answers run until a limit
        return out

    lm.model.lm_head.register_forward_hook(never_stop)
    return lm


def _turn(lm: VoiceLM, conv, text: str, max_new_tokens: int) -> TurnEnd:  # type: ignore[no-untyped-def]
    events = list(lm.stream(conv, TextInput(text), GenerationOptions(max_new_tokens=max_new_tokens, seed=0)))
    assert isinstance(events[-1], TurnEnd)
    return events[-1]


def test_a_long_chat_stays_inside_seq_length(lm: VoiceLM) -> None:
    assert lm.seq_length == SEQ_LENGTH
    conv = lm.new_conversation()
    first = _turn(lm, conv, "Hello there!", max_new_tokens=2000)
    assert first.reason is StopReason.CONTEXT  # the answer ran into the context, not into max_new_tokens
    assert len(conv.ids) == SEQ_LENGTH
    system = conv.ids[: conv.ids.index(lm.user_id)]
    for text in ("Why?", "And then?"):
        end = _turn(lm, conv, text, max_new_tokens=2000)
        assert end.reason is StopReason.CONTEXT and len(conv.ids) <= SEQ_LENGTH
        assert conv.ids[: len(system)] == system  # the system prompt is always kept
        assert conv.ids.count(lm.user_id) == 1  # the older turns were dropped whole
    assert conv.dropped_turns == 2
    # the kept history is exactly what the model saw: a fresh prefill gives the same next logits
    cached = lm.prefill(conv, [])  # everything cached: recomputes the last position only
    fresh = lm.prefill(lm.new_conversation(), list(conv.ids))
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-4)


def test_a_short_budget_ends_with_max_tokens_and_nothing_is_dropped(lm: VoiceLM) -> None:
    conv = lm.new_conversation()
    for _ in range(2):
        end = _turn(lm, conv, "Hi!", max_new_tokens=10)
        assert end.reason is StopReason.MAX_TOKENS
    assert conv.dropped_turns == 0 and conv.ids.count(lm.user_id) == 2


def test_a_huge_typed_line_is_refused_before_it_is_tokenized(lm: VoiceLM) -> None:
    conv = lm.new_conversation()
    with pytest.raises(ContextLengthError, match=f"context holds {SEQ_LENGTH}") as info:
        lm.stream(conv, TextInput("x" * 1_000_000), GenerationOptions(max_new_tokens=20))
    assert "\n" not in str(info.value) and conv.ids == []


def test_a_line_just_too_long_is_refused_after_tokenizing_and_the_history_is_unchanged(lm: VoiceLM) -> None:
    conv = lm.new_conversation()
    _turn(lm, conv, "Hi!", max_new_tokens=10)
    before = list(conv.ids)
    words = " ".join(f"w{i}" for i in range(300))  # fewer bytes than the pre-check bound, too many tokens
    with pytest.raises(ContextLengthError, match="this turn is"):
        list(lm.stream(conv, TextInput(words), GenerationOptions(max_new_tokens=20)))
    assert conv.ids == before


def _typed_chat(lm: VoiceLM, lines: list[str], store=None):  # type: ignore[no-untyped-def]
    """Typed turns through a chat engine with long answers -> (the engine, every event it emitted)."""
    from glmvoice_cli.audio.fakes import NullSink
    from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
    from glmvoice_cli.pipeline.assistant import Assistant

    config = EngineConfig(generation=GenerationOptions(max_new_tokens=2000, seed=0))
    engine = ChatEngine(Assistant(lm), None, NullSink(), store=store, config=config)
    for line in lines:
        engine.type_text(line)
    engine.end_input()
    engine.run()
    events = []
    while (event := engine.events.get(timeout=5)) is not None:
        events.append(event)
    return engine, events


def test_the_chat_engine_says_so_and_goes_on(lm: VoiceLM, tmp_path: Path) -> None:
    from glmvoice_cli.events import Failed, TurnEnded
    from glmvoice_cli.sessions.store import SessionStore

    store = SessionStore.create(session_dir=tmp_path / "s")
    engine, events = _typed_chat(lm, ["y" * 100_000, "Hello!"], store)
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].recoverable and "context" in failed[0].message
    assert engine.error is None
    ended = [e for e in events if isinstance(e, TurnEnded)]
    assert [e.reason for e in ended] == ["context_full"]
    assert [(t.role, t.reason) for t in store.turns] == [("user", None), ("assistant", "context_full")]


def test_a_resumed_history_longer_than_the_context_is_trimmed_and_answers(lm: VoiceLM) -> None:
    from glmvoice_cli.pipeline.history import restore_conversation
    from glmvoice_cli.sessions.store import TurnRecord

    conv = lm.new_conversation()
    _turn(lm, conv, "Hi!", max_new_tokens=30)
    first_user, answer = conv.ids[: conv.last_output_start], conv.ids[conv.last_output_start :]
    again = first_user[first_user.index(lm.user_id):]  # a later turn: its user part without the system prompt

    def record(role: str, ids: list[int]) -> TurnRecord:
        return TurnRecord(role, None, None, tuple(ids), False, None, "")

    records = [record("user", first_user), record("assistant", answer)]
    for _ in range(20):  # a saved session far longer than the context (as after a larger model, or a bug)
        records += [record("user", again), record("assistant", answer)]
    assert sum(len(r.token_ids) for r in records) > 2 * SEQ_LENGTH

    restored = restore_conversation(lm, records)
    assert len(restored.ids) + answer_room(SEQ_LENGTH, SEQ_LENGTH) <= SEQ_LENGTH
    assert restored.ids[: first_user.index(lm.user_id)] == first_user[: first_user.index(lm.user_id)]
    assert restored.dropped_turns > 0
    kept_turns = restored.ids.count(lm.user_id)  # the newest whole turns, if any fit beside the system prompt
    assert restored.last_output == (answer if kept_turns else [])
    target = len(restored.ids) + len(again)  # warms what fits, within the context, in whole prefill chunks
    assert lm.warm(restored, again) == target - target % PREFILL_CHUNK > 0
    end = _turn(lm, restored, "And now?", max_new_tokens=20)
    assert end.reason is StopReason.MAX_TOKENS and len(restored.ids) <= SEQ_LENGTH


def test_warming_past_the_context_computes_nothing(lm: VoiceLM) -> None:
    conv = lm.new_conversation()
    conv.ids[:] = [lm.user_id] * SEQ_LENGTH  # a history already at the context's end
    assert lm.warm(conv, [lm.user_id] * 4) == 0 and conv.cache is None


def test_the_view_hears_once_that_old_turns_were_left_out(lm: VoiceLM) -> None:
    import io

    from glmvoice_cli.events import ContextTrimmed
    from glmvoice_cli.ui.live_view import TranscriptState, status_line
    from glmvoice_cli.ui.view import PlainView

    engine, events = _typed_chat(lm, ["Hello there!", "Why?", "And then?", "Really?"])  # each fills the context
    trimmed = [e for e in events if isinstance(e, ContextTrimmed)]
    assert engine.conversation.dropped_turns >= 2  # turns were dropped more than once ...
    assert len(trimmed) == 1 and trimmed[0].dropped_turns == 1  # ... and said the first time only
    out = io.StringIO()
    PlainView(out).show(trimmed[0])
    assert out.getvalue().startswith("note: the oldest 1 turn no longer fit the model's context")
    state = TranscriptState()
    state.apply(trimmed[0])
    assert "no longer fit the model's context" in status_line(state).plain
