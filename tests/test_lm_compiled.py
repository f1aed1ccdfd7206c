"""The compiled decode step over a static cache gives the eager loop's tokens, and never recompiles mid-turn.

The compile itself takes about a minute on two shared cores, so one compiled LM serves the whole
session (`compiled`), next to an eager LM loaded from the same folder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from glmvoice_cli.lm.compiled import CompileUnavailable, StaticDecoder
from glmvoice_cli.lm.prompts import SpeechInput, TextInput, UserInput, turn_ids
from glmvoice_cli.lm.voice_lm import (
    Conversation,
    GenerationOptions,
    StopReason,
    TurnEnd,
    VoiceLM,
    tokens_through_audio,
)
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

pytestmark = pytest.mark.compiles

SPEC = TinyLMSpec(hidden_size=32, num_layers=2, num_heads=4, kv_groups=2, ffn_hidden_size=64, n_reserved=3,
                  seq_length=384)
GREEDY = GenerationOptions(temperature=0.0, max_new_tokens=24)


@dataclass
class Pair:
    eager: VoiceLM  # today's loop: dynamic cache, eager forward
    compiled: VoiceLM  # static cache, compiled one-token step


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    folder = write_tiny_lm(tmp_path_factory.mktemp("lm_compiled"), SPEC)
    # The session's compile cache (conftest), never the user's: the benchmark smoke test compiles this size too.
    compiled = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    report = compiled.enable_static(compiled=True)
    assert report.mode == "default" and report.max_len == SPEC.seq_length
    yield Pair(VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32")), compiled)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _turn(lm: VoiceLM, conv: Conversation, user: UserInput, options: GenerationOptions,
          cancel: threading.Event | None = None) -> tuple[list, TurnEnd]:
    events = list(lm.stream(conv, user, options, cancel))
    assert isinstance(events[-1], TurnEnd)
    return events[:-1], events[-1]


def _conversation(lm: VoiceLM) -> tuple[list, list[int]]:
    """Three turns, spoken and typed, with a barge-in trim after the first; events and the final history."""
    conv = lm.new_conversation()
    log: list = []
    events, end = _turn(lm, conv, SpeechInput((3, 1, 4, 1, 5)), GREEDY)
    log += [*events, end]
    heard = tokens_through_audio(conv.last_output, lm.text_tokenizer, 2) or len(conv.last_output) // 2
    conv.keep_heard(heard)  # the user barged in: only what was heard stays
    log.append(list(conv.ids))
    for user in (TextInput("and then?"), SpeechInput((9, 2, 6))):
        events, end = _turn(lm, conv, user, GREEDY)
        log += [*events, end, conv.last_prefill_tokens]
    return log, list(conv.ids)


def test_greedy_multi_turn_with_barge_in_equals_eager(pair: Pair) -> None:
    before = _graphs()
    assert _conversation(pair.compiled) == _conversation(pair.eager)
    assert _graphs() == before  # every shape was compiled at warm-up: nothing recompiled mid-turn


def test_seeded_sampling_equals_eager(pair: Pair) -> None:
    options = GenerationOptions(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=24)

    def run(lm: VoiceLM) -> list[int]:
        conv = lm.new_conversation()
        _turn(lm, conv, TextInput("hello"), options)
        return conv.last_output

    assert run(pair.compiled) == run(pair.eager)
    assert run(pair.compiled) == run(pair.compiled)


def test_text_only_equals_eager(pair: Pair) -> None:
    options = GenerationOptions(temperature=0.0, max_new_tokens=24, text_only=True)

    def run(lm: VoiceLM) -> list[int]:
        conv = lm.new_conversation()
        _turn(lm, conv, SpeechInput((7, 7, 2)), options)
        return conv.last_output

    ids = run(pair.compiled)
    assert ids == run(pair.eager)
    assert not any(pair.compiled.text_tokenizer.is_audio(i) for i in ids)


def test_two_conversations_take_turns_with_the_static_cache(pair: Pair) -> None:
    def run(lm: VoiceLM) -> list[list[int]]:
        a, b = lm.new_conversation(), lm.new_conversation()
        out = []
        for conv, user in ((a, TextInput("one")), (b, TextInput("two")), (a, TextInput("three"))):
            _turn(lm, conv, user, GREEDY)
            out.append(list(conv.ids))
        return out

    assert run(pair.compiled) == run(pair.eager)


def test_cancel_stops_within_one_token(pair: Pair) -> None:
    cancel = threading.Event()
    conv = pair.compiled.new_conversation()
    after: list = []
    for n, event in enumerate(pair.compiled.stream(conv, TextInput("x"), GREEDY, cancel)):
        if cancel.is_set():
            after.append(event)
        if n == 2:
            cancel.set()
    assert after[-1] == TurnEnd(StopReason.CANCELLED, 3)  # no token after the one being consumed
    assert all(getattr(e, "token_id", None) == -1 for e in after[:-1])  # at most the flushed text tail


def test_context_full_ends_the_answer(tmp_path: Path) -> None:
    """The static cache holds the context: an answer stops at its end (eager static step: no compile)."""
    folder = write_tiny_lm(tmp_path / "lm", SPEC)
    lm = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    prompt = len(turn_ids(lm.text_tokenizer, TextInput("x"), None))
    max_len = 2 * prompt + 20  # room for the answer (half the context) is kept, the rest is reached
    lm.enable_static(compiled=False, max_len=max_len)
    conv = lm.new_conversation()
    _, end = _turn(lm, conv, TextInput("x"), GenerationOptions(temperature=0.0, max_new_tokens=10 * max_len))
    assert lm.context_length == min(max_len, lm.seq_length)
    assert end.reason is StopReason.CONTEXT and len(conv.ids) == lm.context_length
    assert conv.cached_ids == conv.ids[:-1]  # the last sampled token needs no forward


def test_a_failing_compile_raises_compile_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        def step(*a: object, **k: object) -> torch.Tensor:
            raise RuntimeError("C++ compiler not found\nmore detail")
        return step

    monkeypatch.setattr(torch, "compile", broken)
    folder = write_tiny_lm(tmp_path / "lm", SPEC)
    lm = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    with pytest.raises(CompileUnavailable, match=r"^RuntimeError: C\+\+ compiler not found$"):
        lm.enable_static(compiled=True)
    assert lm.static is None  # the eager loop stays
    _, end = _turn(lm, lm.new_conversation(), TextInput("x"), GenerationOptions(temperature=0, max_new_tokens=3))
    assert end == TurnEnd(StopReason.MAX_TOKENS, 3)


def test_static_step_is_exact_against_prefill(tmp_path: Path) -> None:
    """One token through the step gives the logits a full prefill of the same ids gives."""
    folder = write_tiny_lm(tmp_path / "lm", SPEC)
    lm = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    blocked = torch.zeros(lm.model.lm_head.weight.shape[0], dtype=torch.bool)
    static = StaticDecoder(lm.model, 32, blocked, compiled=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    static.claim(None)
    static.prefill(ids[:, :3])
    stepped = static.step(ids[:, 3:])
    static.rewind_to(0)
    full = static.prefill(ids)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    assert static.length() == 4


# ---------------------------------------------------------------- loading: status line, flag, fallback


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glmvoice_cli.tiny.modelset import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("models"), codebook=64).root


def _broken_compile(*args: object, **kwargs: object) -> object:
    def step(*a: object, **k: object) -> torch.Tensor:
        raise RuntimeError("injected compile failure")
    return step


def test_cli_compile_failure_is_one_warning_line_and_decodes_eagerly(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from glmvoice_cli.cli import app

    monkeypatch.setattr(torch, "compile", _broken_compile)
    out = tmp_path / "out.wav"
    result = CliRunner().invoke(app, ["tts", "Hello.", "--models", str(models), "-o", str(out), "--compile",
                                      "--max-new-tokens", "20", "--seed", "1"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "injected compile failure" in warnings[0] and "decoding eagerly" in warnings[0]
    assert out.is_file()


def test_assistant_compiles_at_load_with_a_status_line(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.pipeline.assistant import Assistant

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring, not inductor (tested above)
    statuses: list[str] = []
    dirs = {"lm": models / "lm"}
    assistant = Assistant.load(dirs, LoadOptions(device="cpu", compile=True), on_status=statuses.append)
    assert assistant.lm.static is not None and assistant.compile_report is not None
    assert any(s.startswith("compiling the language model") for s in statuses)
    assert "lm_compile" in assistant.load_seconds and assistant.warnings == []
    default = Assistant.load(dirs, LoadOptions(device="cpu"))  # CPU default: the eager loop
    assert default.lm.static is None and default.compile_report is None


def test_cuda_graphs_are_recorded_on_the_thread_that_decodes(tmp_path: Path) -> None:
    """CUDA graph trees are per thread: a reduce-overhead decoder warms up once more on a new thread (the
    chat's model thread), once; other modes need nothing (their kernels serve every thread)."""
    folder = write_tiny_lm(tmp_path / "lm", SPEC)
    lm = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    lm.enable_static(compiled=False)
    static = lm.static
    assert static is not None and not static.warm_this_thread()  # eager mode: nothing per thread
    static.mode = "reduce-overhead"  # as on CUDA (the step itself runs eagerly here)
    steps: list[str] = []
    eager_step = static._step
    static._step = lambda token: (steps.append(threading.current_thread().name), eager_step(token))[1]
    assert not static.warm_this_thread()  # the loading thread warmed up at build time
    worker = threading.Thread(target=lambda: (lm.prepare_thread(), lm.prepare_thread()), name="model")
    worker.start()
    worker.join(timeout=60)
    assert steps and set(steps) == {"model"}  # recorded on the model thread, once: the second call is free
    count = len(steps)
    worker = threading.Thread(target=lm.prepare_thread, name="other")
    worker.start()
    worker.join(timeout=60)
    assert len(steps) > count and steps[-1] == "other"


def test_the_chat_prepares_its_model_thread_before_the_first_turn(assistant, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from .chat_helpers import burst, make_rig, run_rig, silence

    calls: list[tuple[str, int]] = []  # (thread, turns already started)
    turns: list[int] = []
    stream = assistant.lm.stream
    monkeypatch.setattr(assistant.lm, "prepare_thread",
                        lambda: calls.append((threading.current_thread().name, len(turns))), raising=False)
    monkeypatch.setattr(assistant.lm, "stream", lambda *a, **k: (turns.append(1), stream(*a, **k))[1])
    rig = make_rig(assistant, np.concatenate([silence(0.3), burst(0.8), silence(1.5)]), tmp_path=tmp_path)
    run_rig(rig)
    assert turns and calls == [("glmvoice-model", 0)]


def test_a_pool_of_static_slots_serves_interleaved_conversations(tmp_path: Path) -> None:
    """Two conversations decoded token by token in turn, each in its own slot, give the eager loop's ids;
    with one slot, a turn that finds it answering another conversation is refused before anything changes."""
    from glmvoice_cli.lm.voice_lm import LMSlotsBusy

    folder = write_tiny_lm(tmp_path / "lm", SPEC)
    eager = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    pooled = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    pooled.enable_static(compiled=False, slots=2)  # the static step run eagerly: no compile in this test
    assert len(pooled.slots) == 2

    def interleaved(lm: VoiceLM) -> list[list[int]]:
        convs = [lm.new_conversation(), lm.new_conversation()]
        for round_ in range(2):
            streams = [iter(lm.stream(conv, TextInput(f"turn {round_} of {n}"), GREEDY)) for n, conv in enumerate(convs)]
            while streams:
                for stream in list(streams):
                    if isinstance(next(stream, None) or TurnEnd(StopReason.USER, 0), TurnEnd):
                        streams.remove(stream)
        return [list(conv.ids) for conv in convs]

    assert interleaved(pooled) == interleaved(eager)

    single = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype="fp32"))
    single.enable_static(compiled=False, slots=1)
    first, second = single.new_conversation(), single.new_conversation()
    answering = iter(single.stream(first, TextInput("one"), GREEDY))
    next(answering)
    with pytest.raises(LMSlotsBusy, match="1 static-cache slots"):
        single.stream(second, TextInput("two"), GREEDY)
    assert second.ids == [] and second.system_mode is None  # refused before anything changed
    for _ in answering:
        pass
    _turn(single, second, TextInput("two"), GREEDY)  # the slot is free between turns: it is taken over
    assert second.slot is single.slots[0] and first.slot is None and first.cache is None
    alone = eager.new_conversation()
    _turn(eager, alone, TextInput("two"), GREEDY)
    assert second.ids == alone.ids
    # a server grows the pool to one slot per session; an ended conversation hands its slot back at once
    single.ensure_slots(3)
    assert len(single.slots) == 3 and single.slots[1].mode == "eager"
    single.release(second)
    assert single.slots[0].owner is None and second.slot is None and second.cache is None
    eager.ensure_slots(2)  # no static cache: nothing to grow
    assert eager.slots == []


def test_in_bf16_the_two_cache_paths_differ_but_are_equally_accurate(tmp_path: Path) -> None:
    """The documented cache policy (README, cache paths): in fp32 the eager loop (dynamic cache) and the static
    cache give the same greedy ids; in bf16 they round differently (other ids after a while) and neither is less
    accurate: each loop's greedy choices agree with fp32's (given the same prefix) about as often. The measured
    spread (benchmarks/results/cache-paths-cpu.json) was under 0.02; 0.05 leaves room for another machine."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from cache_paths import WIDE, _agreement, _first_difference, _greedy

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = write_tiny_lm(tmp_path / "lm", WIDE)
        loops: dict[str, tuple[VoiceLM, VoiceLM]] = {}
        for dtype in ("fp32", "bf16"):
            eager = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype=dtype))
            static = VoiceLM.from_folder(folder, LoadOptions(device="cpu", dtype=dtype))
            static.enable_static(compiled=False, max_len=WIDE.seq_length)
            loops[dtype] = eager, static
        prompt = "What is the weather like today?"
        start = len(turn_ids(loops["fp32"][0].text_tokenizer, TextInput(prompt), None))
        a, b = (_greedy(lm, prompt, 150) for lm in loops["fp32"])
        assert _first_difference(a, b, start) is None  # fp32: the same ids
        a, b = (_greedy(lm, prompt, 150) for lm in loops["bf16"])
        reference = loops["fp32"][0]
        agree = [_agreement(reference, ids, start) for ids in (a, b)]
        assert min(agree) > 0.9 and abs(agree[0] - agree[1]) <= 0.05, agree
    finally:
        torch.set_num_threads(before)
