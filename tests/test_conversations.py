"""Several conversations on one model worker, and the conversation core driven with no audio device.

Each conversation run together with others must give what it gives alone with the same seed: the same
history ids, exactly, and the same audio up to float rounding (its decoder blocks may share a batch with
others'; all its model work runs on one thread, with its own cache, generator and decoder noise).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from glmvoice_cli.audio.fakes import NullSink
from glmvoice_cli.chat.core import ConversationCore, EngineConfig
from glmvoice_cli.chat.worker import ModelWorker
from glmvoice_cli.events import AssistantTurn, AudioChunk, TextDelta, TurnEnded, UserAudio
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.pipeline.history import audio_tokens_heard

from .chat_helpers import FAST_VAD, RATE, assert_same_audio, burst, energy_vad, make_rig, run_rig, silence

RUN_TIMEOUT_S = 300.0


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _barge_in() -> np.ndarray:
    """A question, then the user cuts into the answer 0.6 s after it starts."""
    return np.concatenate([silence(0.5), burst(1.0), silence(0.9), burst(0.8, f0=180.0), silence(4.0)])


def _speculation_dropped() -> np.ndarray:
    """A pause long enough to start a speculative answer, then the user goes on."""
    return np.concatenate([silence(0.3), burst(1.0, f0=130.0), silence(0.25), burst(0.8, f0=130.0), silence(3.5)])


def _two_turns() -> np.ndarray:
    return np.concatenate([silence(0.3), burst(0.7, f0=220.0), silence(7.0), burst(0.6, f0=200.0), silence(7.0)])


@dataclass
class Outcome:
    ids: list[int]
    audio: np.ndarray
    interrupted: list[bool]
    dropped: int
    shed: int


def _outcome(rig) -> Outcome:  # type: ignore[no-untyped-def]
    engine = rig.engine
    assert engine.error is None, engine.error
    # what played, to its last sound (the silence after it lasts as long as the run took to notice the end)
    audio = np.trim_zeros(rig.sink.recording(), "b")
    return Outcome(list(engine.conversation.ids), audio, [r.interrupted for r in engine.reports],
                   engine.speculation.dropped, engine.speculation.shed)


def _alone(assistant: Assistant, user: np.ndarray, seed: int) -> Outcome:
    rig = make_rig(assistant, user, tmp_path=None, max_new_tokens=60, seed=seed)
    run_rig(rig, RUN_TIMEOUT_S)
    return _outcome(rig)


def _together(assistant: Assistant, users: list[np.ndarray], seeds: list[int]) -> list[Outcome]:
    worker = ModelWorker(prepare=assistant.lm.prepare_thread)
    rigs = [make_rig(assistant, user, tmp_path=None, max_new_tokens=60, seed=seed, worker=worker)
            for user, seed in zip(users, seeds, strict=True)]
    worker.start()
    try:
        for rig in rigs:
            rig.engine.start()
        for rig in rigs:
            assert rig.engine.wait(RUN_TIMEOUT_S), "a conversation did not finish"
            rig.engine.join()
            rig.sink.close()
    finally:
        worker.stop()
        worker.join()
    assert worker.units > 0
    return [_outcome(rig) for rig in rigs]


def _assert_same(together: Outcome, alone: Outcome) -> None:
    assert together.ids == alone.ids
    assert together.interrupted == alone.interrupted
    # under load a speculative answer may be shed where alone it was confirmed or dropped: only the head
    # start differs, never what is said or played
    assert alone.shed == 0
    assert_same_audio(together.audio, alone.audio)


def test_two_conversations_on_one_worker_answer_as_they_do_alone(assistant: Assistant) -> None:
    users, seeds = [_barge_in(), _two_turns()], [1, 2]
    together = _together(assistant, users, seeds)
    alone = [_alone(assistant, user, seed) for user, seed in zip(users, seeds, strict=True)]
    for got, want in zip(together, alone, strict=True):
        _assert_same(got, want)
    assert together[0].interrupted[0] and not any(together[1].interrupted)  # barge-in in one, not the other
    assert together[0].ids != together[1].ids


def test_three_conversations_with_a_barge_in_and_a_dropped_speculation(assistant: Assistant) -> None:
    users, seeds = [_barge_in(), _speculation_dropped(), _two_turns()], [3, 4, 3]
    together = _together(assistant, users, seeds)
    alone = [_alone(assistant, user, seed) for user, seed in zip(users, seeds, strict=True)]
    for got, want in zip(together, alone, strict=True):
        _assert_same(got, want)
    assert together[0].interrupted[0]
    assert alone[1].dropped >= 1 and together[1].dropped + together[1].shed >= 1
    assert together[1].interrupted == [False]
    assert len({tuple(o.ids) for o in together}) == 3


# --- the core with no audio device: frames in, events out, what was heard from the caller ---------------


class _NetworkOutput(NullSink):
    """What a network transport gives the core: audio leaves at once, what was heard is told later."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed = 0

    def flush(self) -> int:
        self.flushed += 1
        return 0


def _drain(events: queue.Queue[object | None], until: type, timeout: float = RUN_TIMEOUT_S) -> list[object]:
    got: list[object] = []
    while True:
        event = events.get(timeout=timeout)
        assert event is not None, f"the conversation ended before a {until.__name__}"
        got.append(event)
        if isinstance(event, until):
            return got


def _core(assistant: Assistant, worker: ModelWorker, seed: int = 5) -> ConversationCore:
    config = EngineConfig(vad=FAST_VAD, generation=GenerationOptions(max_new_tokens=60, seed=seed))
    return ConversationCore(assistant, _NetworkOutput(), worker, config=config, classifier=energy_vad,
                            conversation_id="caller-1")


def test_the_core_runs_from_frames_in_to_events_out_and_trims_to_what_the_caller_heard(
        assistant: Assistant) -> None:
    worker = ModelWorker(prepare=assistant.lm.prepare_thread)
    core = _core(assistant, worker)
    worker.start()
    core.start()
    try:
        speech = np.concatenate([silence(0.3), burst(1.0)])
        for start in range(0, len(speech), 480):  # 30 ms frames, as a WebSocket client sends them
            core.push_audio(speech[start : start + 480])
        assert core.input_samples == len(speech) - len(speech) % FAST_VAD.frame_samples  # whole VAD frames
        core.commit()  # push-to-talk: the turn ends now, not after a silence
        events = _drain(core.events, TurnEnded)
        tagged = [e for e in events if hasattr(e, "conversation")]
        assert tagged and all(e.conversation == "caller-1" for e in tagged)  # type: ignore[attr-defined]
        user = next(e for e in events if isinstance(e, UserAudio))
        assert user.turn == 1 and user.at_sample is not None and 0 <= user.at_sample < int(0.3 * RATE)
        chunks = [e for e in events if isinstance(e, AudioChunk)]
        assert chunks and all(c.turn == 1 for c in chunks)
        assert [c.at_sample for c in chunks] == list(np.cumsum([0] + [len(c.samples) for c in chunks[:-1]]))
        assert all(e.turn == 1 for e in events if isinstance(e, TextDelta | TurnEnded))
        answer = next(e for e in events if isinstance(e, AssistantTurn))
        tok = assistant.lm.text_tokenizer
        said = sum(tok.is_audio(i) for i in core.conversation.last_output)
        assert said >= 2 and not answer.interrupted

        # the caller played only 120 ms of it: the history keeps the audio tokens heard, no more
        answer_start = core.conversation.last_output_start
        core.truncate(1, 120.0)
        core.type_text("And then?")  # queued after the truncation: it builds on the trimmed history
        second = [e for e in _drain(core.events, TurnEnded) if isinstance(e, AssistantTurn)]
        assert [e.turn for e in second] == [2]
        first_answer = core.conversation.ids[answer_start : core.conversation.last_input_start]
        heard = audio_tokens_heard(round(0.12 * core.output.sample_rate), core.output.sample_rate)
        assert sum(tok.is_audio(i) for i in first_answer) == heard < said
    finally:
        core.stop()
        assert core.wait(RUN_TIMEOUT_S)
        worker.stop()
        worker.join()


def test_new_turn_taking_settings_wait_for_the_end_of_the_users_turn(assistant: Assistant) -> None:
    from dataclasses import replace

    from glmvoice_cli.chat.core import TurnSettings

    core = _core(assistant, ModelWorker())  # the worker never starts: no model work here
    core.start()
    core.push_audio(np.concatenate([silence(0.3), burst(0.6)]))
    assert core.segmenter is not None and core.segmenter.in_turn
    position = core.input_samples
    core.update(TurnSettings(barge_in=False, vad=replace(FAST_VAD, hangover_ms=600), speculative_pause_ms=0))
    assert core.config.barge_in and core.config.vad.hangover_ms == FAST_VAD.hangover_ms  # one turn, one config
    core.commit()
    assert not core.config.barge_in and core.config.speculative_pause_ms is None
    assert core.segmenter.config.hangover_ms == 600 and core.segmenter.pause_ms is None
    assert core.input_samples == position  # the timeline goes on where it was
    core.stop()


def test_a_stalled_remote_lm_holds_up_only_its_own_conversation(assistant: Assistant, tmp_path: Path) -> None:
    """With `--lm-url`, a conversation whose server stream stalls waits apart: the worker answers the others."""
    from glmvoice_cli.lm.remote import RemoteVoiceLM
    from glmvoice_cli.lm.voice_lm import VoiceLM
    from glmvoice_cli.options import LMServer
    from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

    from .fake_lm_server import FakeLMServer, FakeState, Fault

    folder = write_tiny_lm(tmp_path / "lm", TinyLMSpec(n_audio_tokens=64))  # a shape vLLM can serve
    local = VoiceLM.from_folder(folder)
    state = FakeState(vocab_size=local.model.config.vocab_size, faults={0: Fault(stall_after=2)})
    with FakeLMServer(local, state) as fake:
        remote = RemoteVoiceLM.connect(folder, LMServer(fake.url, timeout_s=60.0))
        served = Assistant(remote, None, assistant.decoder)
        worker = ModelWorker(prepare=remote.prepare_thread)
        config = EngineConfig(generation=GenerationOptions(max_new_tokens=20, seed=1))
        stalled, answered = (ConversationCore(served, NullSink(), worker, config=config, hears_audio=False)
                             for _ in range(2))
        worker.start()
        try:
            stalled.start()
            answered.start()
            stalled.type_text("Tell me everything.")
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not fake.completions and time.monotonic() < deadline:  # its request is the stalled one
                time.sleep(0.01)
            answered.type_text("Hello.")
            ended = _drain(answered.events, TurnEnded)[-1]
            assert isinstance(ended, TurnEnded) and not ended.interrupted, ended  # answered in full
            assert not stalled.wait(0) and stalled.state.value == "thinking"  # still waiting on its server
            assert fake.state.active >= 1  # its stream is still open: the worker answered around it
            stalled.interrupt()  # the user gives up on it: cut at once, the worker was never blocked
            cut = _drain(stalled.events, TurnEnded)[-1]
            assert isinstance(cut, TurnEnded) and cut.interrupted
        finally:
            for core in (stalled, answered):
                core.stop()
            worker.stop()
            worker.join()
            fake.stop()


class _Loaded(ModelWorker):
    """A worker that always has another conversation's confirmed answer waiting."""

    def others_urgent(self, task: object) -> bool:  # type: ignore[override]
        return True


def test_speculation_gives_way_under_load_and_the_turn_still_gets_its_answer(assistant: Assistant) -> None:
    user = np.concatenate([silence(0.3), burst(1.0, f0=130.0), silence(3.0)])  # a pause that becomes the end
    worker = _Loaded(prepare=assistant.prepare_thread)
    rig = make_rig(assistant, user, tmp_path=None, max_new_tokens=60, seed=6, worker=worker)
    worker.start()
    try:
        run_rig(rig, RUN_TIMEOUT_S)
    finally:
        worker.stop()
        worker.join()
    shed = rig.engine.speculation
    assert shed.started >= 1 and shed.shed == shed.started and shed.confirmed == 0
    got, alone = _outcome(rig), _alone(assistant, user, 6)  # alone, the speculative answer is the one played
    assert got.ids == alone.ids and got.interrupted == alone.interrupted == [False]
    np.testing.assert_array_equal(got.audio, alone.audio)


def test_an_ended_conversation_frees_its_cache_at_once(assistant: Assistant) -> None:
    """A client that vanishes (the core is stopped) leaves no KV cache or static slot behind; its history stays."""
    worker = ModelWorker(prepare=assistant.lm.prepare_thread)
    core = _core(assistant, worker)
    worker.start()
    core.start()
    try:
        assert core.type_text("Hello there") == 1
        turn = core.submit_audio(np.concatenate([silence(0.2), burst(0.6)]))
        assert turn == 2
        _drain(core.events, TurnEnded)
        first = core.conversation.cache
        assert first is not None  # a live conversation keeps its cache between turns
        core.stop()
        assert core.wait(RUN_TIMEOUT_S)
    finally:
        worker.stop()
        worker.join()
    conv = core.conversation
    assert conv.cache is None and conv.cached_ids == [] and conv.slot is None
    assert conv.ids  # what was said is still there (a saved session restores from its ids, not the cache)


def test_session_audio_files_are_numbered_in_conversation_order(assistant: Assistant, tmp_path: Path) -> None:
    """A second spoken turn that arrives while the first is still answered: its speech is saved at once, but
    the first answer's file still comes before it (its name is reserved when its turn is numbered)."""
    from glmvoice_cli.sessions.store import SessionStore, load_session

    store = SessionStore.create(session_dir=tmp_path / "S", mode="audio")
    worker = ModelWorker(prepare=assistant.lm.prepare_thread)
    config = EngineConfig(vad=FAST_VAD, generation=GenerationOptions(max_new_tokens=60, seed=2))
    core = ConversationCore(assistant, _NetworkOutput(), worker, store=store, config=config,
                            classifier=energy_vad)
    worker.start()
    core.start()
    try:
        core.submit_audio(burst(0.8))
        core.submit_audio(burst(0.6))  # before the first answer has ended
        core.end_input()
        assert core.wait(RUN_TIMEOUT_S)
        core.join(RUN_TIMEOUT_S)
    finally:
        worker.stop()
        worker.join()
    saved = load_session(store.path).turns
    files = [turn.audio for turn in saved if turn.audio is not None]
    assert [Path(f).name.split("-")[1] for f in files] == ["user.wav", "assistant.wav", "user.wav", "assistant.wav"]
    assert files == sorted(files)  # numbered in the order of the conversation
