"""The remote LM backend (--lm-url) against an in-test OpenAI-compatible server: same events and history
as in-process, explicit sampling and masks, cancellation that stops the server, and every failure as
one line with the conversation intact. The real engine is tested in test_vllm.py."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from glmvoice_cli.errors import CheckpointMismatchError, ContextLengthError, LMServerError, UsageError
from glmvoice_cli.lm.context import plan_context
from glmvoice_cli.lm.http_client import ServerURL
from glmvoice_cli.lm.prompts import InputMode, SpeechInput, TextInput, turn_ids
from glmvoice_cli.lm.remote import RemoteVoiceLM
from glmvoice_cli.lm.text_tokenizer import TextTokenizer
from glmvoice_cli.lm.voice_lm import AudioTokens, GenerationOptions, StopReason, TurnEnd, VoiceLM
from glmvoice_cli.options import LMServer
from glmvoice_cli.tiny.lm import TinyLMSpec, write_tiny_lm

from .fake_lm_server import FakeLMServer, FakeState, Fault

GREEDY = GenerationOptions(temperature=0.0, max_new_tokens=40)
FAST_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", TinyLMSpec(n_audio_tokens=64))


@pytest.fixture(scope="module")
def local(lm_dir: Path) -> VoiceLM:
    return VoiceLM.from_folder(lm_dir)


@pytest.fixture
def server(local: VoiceLM):  # type: ignore[no-untyped-def]
    with FakeLMServer(local) as fake:
        yield fake


def connect(lm_dir: Path, fake: FakeLMServer, **kwargs) -> RemoteVoiceLM:  # type: ignore[no-untyped-def]
    return RemoteVoiceLM.connect(lm_dir, LMServer(fake.url, timeout_s=kwargs.pop("timeout_s", 10.0), **kwargs))


def remote_padded(lm_dir: Path) -> int:
    return int(json.loads((lm_dir / "config.json").read_text())["padded_vocab_size"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(("url", "expected"), [
    ("http://h:8000", "http://h:8000"), ("http://h:8000/v1/", "http://h:8000"), ("h:9", "http://h:9"),
    ("https://h/proxy/v1", "https://h:443/proxy"),
])
def test_server_urls_are_normalised(url: str, expected: str) -> None:
    parsed = ServerURL.parse(url)
    assert str(parsed) == expected and parsed.path("models").endswith("/v1/models")


@pytest.mark.parametrize("url", ["ftp://h", "http://", "http://h:99999"])
def test_a_bad_url_is_a_usage_error(url: str) -> None:
    with pytest.raises(UsageError, match="LM server URL"):
        ServerURL.parse(url)


# ------------------------------------------------------------------ same answers as in-process


def test_greedy_turns_match_in_process_events_and_history(lm_dir: Path, local: VoiceLM, server: FakeLMServer) -> None:
    remote = connect(lm_dir, server)
    mine, theirs = remote.new_conversation(), local.new_conversation()
    for user in (TextInput("Hello there"), SpeechInput((1, 2, 3, 4, 5)), TextInput("and then?")):
        got = list(remote.stream(mine, user, GREEDY))
        want = list(local.stream(theirs, user, GREEDY))
        assert got == want
        assert mine.ids == theirs.ids and mine.last_output == theirs.last_output
    assert any(isinstance(e, AudioTokens) for e in got) or any(
        remote.text_tokenizer.is_audio(i) for i in mine.ids[mine.last_output_start:])


def test_every_sampling_choice_is_sent_explicitly(lm_dir: Path, server: FakeLMServer) -> None:
    remote = connect(lm_dir, server)
    options = GenerationOptions(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=5)
    list(remote.stream(remote.new_conversation(), TextInput("hi"), options))
    body = server.completions[-1]
    tok = remote.text_tokenizer
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["top_k"] == remote.sampling.top_k
    assert body["seed"] == 5
    assert body["repetition_penalty"] == 1.0 and body["presence_penalty"] == 0.0 and body["min_p"] == 0.0
    assert body["max_tokens"] == 12 and sorted(body["stop_token_ids"]) == sorted(tok.eos_ids)
    assert body["return_token_ids"] is True and body["detokenize"] is False and body["skip_special_tokens"] is False
    padded = remote_padded(lm_dir)
    forbidden = {int(i) for i, bias in body["logit_bias"].items() if bias == -100}
    assert forbidden == set(range(padded)) - set(tok.named_ids())  # padding rows are never sampled
    assert "allowed_token_ids" not in body
    list(remote.stream(remote.new_conversation(), TextInput("hi"), GenerationOptions(max_new_tokens=3)))
    assert isinstance(server.completions[-1]["seed"], int)  # drawn here when none is given, never the server's


def test_text_only_decoding_masks_every_audio_id(lm_dir: Path, local: VoiceLM, server: FakeLMServer) -> None:
    remote = connect(lm_dir, server)
    options = GenerationOptions(temperature=0.0, max_new_tokens=30, text_only=True)
    user = SpeechInput((3, 1, 4, 1, 5), instruction="Transcribe")
    got = list(remote.stream(remote.new_conversation(), user, options))
    assert got == list(local.stream(local.new_conversation(), user, options))
    tok = remote.text_tokenizer
    forbidden = {int(i) for i in server.completions[-1]["logit_bias"]}
    audio = {tok.audio_offset + i for i in range(tok.n_audio_tokens)}
    assert forbidden == audio | (set(range(remote_padded(lm_dir))) - set(tok.named_ids()))


@pytest.mark.parametrize("text_only", [False, True])
def test_a_server_that_ignores_logit_bias_gets_the_allowed_list(lm_dir: Path, local: VoiceLM,
                                                                text_only: bool) -> None:
    state = FakeState(vocab_size=local.model.config.vocab_size, bias=False)
    options = GenerationOptions(temperature=0.0, max_new_tokens=20, text_only=text_only)
    with FakeLMServer(local, state) as fake:
        remote = connect(lm_dir, fake)
        got = list(remote.stream(remote.new_conversation(), TextInput("hi"), options))
        body = fake.completions[-1]
    assert got == list(local.stream(local.new_conversation(), TextInput("hi"), options))
    tok = remote.text_tokenizer
    named = set(tok.named_ids())
    assert "logit_bias" not in body
    assert set(body["allowed_token_ids"]) == ({i for i in named if not tok.is_audio(i)} if text_only else named)


def test_the_request_no_longer_carries_the_whole_vocabulary(tmp_path: Path) -> None:
    """With a vocabulary the size of the real one (16,384 audio ids, 168,960 rows), the spoken request holds
    the few ids to forbid, not every id to allow (the official vocabulary leaves ~1,200 rows unnamed)."""
    folder = write_tiny_lm(tmp_path / "lm", TinyLMSpec(n_audio_tokens=16_384, padded_vocab_size=16_384 + 1_024))
    tok = TextTokenizer.from_folder(folder)
    local = VoiceLM.from_folder(folder)
    with FakeLMServer(local) as fake:
        remote = connect(folder, fake)
        spoken = remote.request_body([1, 2, 3], GenerationOptions(), 10)
        text = remote.request_body([1, 2, 3], GenerationOptions(text_only=True), 10)
    allowed_json_bytes = len(json.dumps(tok.named_ids()))
    assert len(spoken) < allowed_json_bytes / 5
    assert len(text) > len(spoken)  # text only forbids the 16,384 audio ids as well


def test_the_history_trims_after_barge_in_like_in_process(lm_dir: Path, local: VoiceLM, server: FakeLMServer) -> None:
    remote = connect(lm_dir, server)
    mine, theirs = remote.new_conversation(), local.new_conversation()
    for conv, lm in ((mine, remote), (theirs, local)):
        list(lm.stream(conv, TextInput("tell me"), GREEDY))
        conv.keep_heard(len(conv.last_output) // 2)
        list(lm.stream(conv, TextInput("go on"), GREEDY))
    assert mine.ids == theirs.ids
    assert server.completions[-1]["prompt"] == theirs.ids[: theirs.last_output_start]


# ------------------------------------------------------------------ cancellation


def test_cancel_stops_within_a_token_and_the_server_stops_generating(lm_dir: Path, server: FakeLMServer) -> None:
    remote = connect(lm_dir, server)
    conv, cancel = remote.new_conversation(), threading.Event()
    events = []
    for event in remote.stream(conv, TextInput("speak at length"), GenerationOptions(max_new_tokens=3000,
                                                                                     seed=1), cancel):
        events.append(event)
        if len(events) == 4:
            cancel.set()
    assert events[-1] == TurnEnd(StopReason.CANCELLED, 4)
    assert len(conv.last_output) == 4  # tokens taken before the cancel, none after
    server.wait_idle()
    assert server.state.active == 0 and server.state.generated < 40  # closed, so it stopped (not 3000)


def test_a_turn_cancelled_before_it_starts_sends_nothing(lm_dir: Path, server: FakeLMServer) -> None:
    remote = connect(lm_dir, server)
    cancel = threading.Event()
    cancel.set()
    conv = remote.new_conversation()
    assert list(remote.stream(conv, TextInput("x"), GREEDY, cancel)) == [TurnEnd(StopReason.CANCELLED, 0)]
    assert not server.completions and conv.last_output == []


# ------------------------------------------------------------------ connect-time checks


def test_unreachable_server_is_one_line(lm_dir: Path) -> None:
    """A refused connection is one line saying how to start a server (a silent one is the stall test's)."""
    with pytest.raises(LMServerError, match=r"cannot reach the LM server at http://127.0.0.1:\d+ .*serve-lm"):
        RemoteVoiceLM.connect(lm_dir, LMServer(f"http://127.0.0.1:{free_port()}"))


def test_several_models_need_a_name_and_a_wrong_name_is_refused(lm_dir: Path, local: VoiceLM) -> None:
    state = FakeState(models=["a", "b"], vocab_size=local.model.config.vocab_size)
    with FakeLMServer(local, state) as fake:
        with pytest.raises(LMServerError, match=r"serves 2 models .*--lm-model"):
            connect(lm_dir, fake)
        with pytest.raises(LMServerError, match="does not serve 'c'"):
            connect(lm_dir, fake, model="c")
        assert connect(lm_dir, fake, model="b").served.name == "b"


def test_a_server_with_fewer_token_ids_is_another_model(lm_dir: Path, local: VoiceLM) -> None:
    state = FakeState(vocab_size=local.text_tokenizer.vocab_size - 5)
    with FakeLMServer(local, state) as fake, pytest.raises(LMServerError, match="serves another model"):
        connect(lm_dir, fake)


def test_a_server_with_more_token_ids_is_another_model(lm_dir: Path, local: VoiceLM) -> None:
    state = FakeState(vocab_size=local.model.config.vocab_size + 64)
    with FakeLMServer(local, state) as fake, pytest.raises(LMServerError, match="more than"):
        connect(lm_dir, fake)


def test_a_server_without_token_ids_or_masks_is_refused_where_it_matters(lm_dir: Path, local: VoiceLM) -> None:
    vocab = local.model.config.vocab_size
    with FakeLMServer(local, FakeState(vocab_size=vocab, token_ids=False)) as fake, \
            pytest.raises(LMServerError, match="return_token_ids"):
        connect(lm_dir, fake)
    with FakeLMServer(local, FakeState(vocab_size=vocab, masks=False)) as fake:
        remote = connect(lm_dir, fake)
        with pytest.raises(LMServerError, match="cannot decode text only"):
            list(remote.stream(remote.new_conversation(), TextInput("x"),
                               GenerationOptions(text_only=True, max_new_tokens=3)))


def test_a_non_square_checkpoint_is_refused_before_any_request(tmp_path: Path) -> None:
    folder = write_tiny_lm(tmp_path / "lm")
    config = json.loads((folder / "config.json").read_text())
    config["kv_channels"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"kv_channels .* vLLM"):
        RemoteVoiceLM.connect(folder, LMServer(f"http://127.0.0.1:{free_port()}"))


def test_api_key_is_sent_and_a_missing_one_is_explained(lm_dir: Path, local: VoiceLM) -> None:
    state = FakeState(vocab_size=local.model.config.vocab_size, api_key="sesame")
    with FakeLMServer(local, state) as fake:
        with pytest.raises(LMServerError, match=r"HTTP 401.*--lm-api-key"):
            connect(lm_dir, fake)
        remote = connect(lm_dir, fake, api_key="sesame")
        assert list(remote.stream(remote.new_conversation(), TextInput("x"), GREEDY))[-1].reason


# ------------------------------------------------------------------ failures mid-conversation


def _fault_run(lm_dir: Path, local: VoiceLM, fault: Fault, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    state = FakeState(vocab_size=local.model.config.vocab_size, faults={1: fault})
    with FakeLMServer(local, state) as fake:
        remote = connect(lm_dir, fake, timeout_s=timeout_s)
        conv = remote.new_conversation()
        list(remote.stream(conv, TextInput("first"), GREEDY))
        before = conv.ids.copy()
        got: list[object] = []
        with pytest.raises(LMServerError) as failure:
            for event in remote.stream(conv, TextInput("second"), GenerationOptions(max_new_tokens=3000, seed=2)):
                got.append(event)  # noqa: PERF402 - keep the events received before the failure
        third = list(remote.stream(conv, TextInput("third"), GREEDY))  # the server is fine again
    return before, conv, got, str(failure.value), third


def test_an_http_error_undoes_the_turn_and_the_next_one_works(lm_dir: Path, local: VoiceLM) -> None:
    before, conv, got, message, third = _fault_run(lm_dir, local, Fault(status=500))
    assert message.startswith("the LM server at http://127.0.0.1:") and "HTTP 500" in message
    assert "\n" not in message and not got
    assert isinstance(third[-1], TurnEnd) and conv.ids[: len(before)] == before
    assert conv.ids[conv.last_output_start - 1] != before[-1]  # the failed turn left nothing in the history
    expected = local.new_conversation()
    list(local.stream(expected, TextInput("first"), GREEDY))
    list(local.stream(expected, TextInput("third"), GREEDY))
    assert conv.ids == expected.ids


@pytest.mark.parametrize(("fault", "words"), [
    (Fault(cut_after=3), "closed the stream|failed mid-answer"),
    (Fault(error_after=3), "failed mid-answer: engine died"),
])
def test_a_stream_cut_halfway_keeps_the_tokens_received(lm_dir: Path, local: VoiceLM, fault: Fault,
                                                        words: str) -> None:
    before, conv, got, message, third = _fault_run(lm_dir, local, fault)
    import re

    assert re.search(words, message) and "\n" not in message
    assert len(got) >= 3 and isinstance(third[-1], TurnEnd)
    assert conv.ids[: len(before)] == before


def test_a_stalled_server_is_an_error_after_the_timeout_not_a_hang(lm_dir: Path, local: VoiceLM) -> None:
    _, _, got, message, third = _fault_run(lm_dir, local, Fault(stall_after=2), timeout_s=FAST_TIMEOUT_S)
    # the stalled server keeps its connection open for 30 s: the timeout, not the server, ended the turn
    assert "did not answer within 1 s" in message and len(got) >= 2
    assert isinstance(third[-1], TurnEnd)


def test_a_server_that_dies_mid_answer_and_comes_back(lm_dir: Path, local: VoiceLM) -> None:
    port = free_port()
    vocab = local.model.config.vocab_size
    fake = FakeLMServer(local, FakeState(vocab_size=vocab, faults={0: Fault(stall_after=2)}), port=port)
    fake.thread.start()
    remote = connect(lm_dir, fake, timeout_s=30.0)
    conv = remote.new_conversation()
    stream = remote.stream(conv, TextInput("hello"), GenerationOptions(max_new_tokens=3000, seed=3))
    next(stream)
    threading.Timer(0.2, fake.stop).start()  # the whole server goes away mid-answer
    with pytest.raises(LMServerError):
        list(stream)
    with pytest.raises(LMServerError, match="cannot reach"):
        list(remote.stream(conv, TextInput("anyone?"), GREEDY))
    with FakeLMServer(local, FakeState(vocab_size=vocab), port=port):  # back on the same port
        assert isinstance(list(remote.stream(conv, TextInput("again"), GREEDY))[-1], TurnEnd)


def test_a_conversation_longer_than_the_server_context_drops_old_turns_like_in_process(lm_dir: Path,
                                                                                       local: VoiceLM) -> None:
    tok = TextTokenizer.from_folder(lm_dir)
    question = TextInput("a much longer question " * 5)
    first_ids = turn_ids(tok, TextInput("hi"), None)
    # Room for the system prompt, the question and its answer, but not also for the first turn.
    limit = len(first_ids) + len(turn_ids(tok, question, InputMode.TEXT)) + GREEDY.max_new_tokens
    state = FakeState(vocab_size=local.model.config.vocab_size, max_model_len=limit)
    with FakeLMServer(local, state) as fake:
        remote = connect(lm_dir, fake)
        conv = remote.new_conversation()
        list(remote.stream(conv, TextInput("hi"), GenerationOptions(temperature=0, max_new_tokens=20)))
        assert server_budget(fake) == 20
        new_ids = turn_ids(remote.text_tokenizer, question, conv.system_mode)
        plan = plan_context(conv.ids, new_ids, user_id=remote.user_id, seq_length=limit,
                            max_new_tokens=GREEDY.max_new_tokens)
        assert plan.dropped_turns == 1  # the case under test: the first turn no longer fits
        list(remote.stream(conv, question, GREEDY))
        assert fake.completions[-1]["prompt"] == [*plan.history, *new_ids]
        assert server_budget(fake) == plan.max_answer_tokens and conv.dropped_turns == 1
        with pytest.raises(ContextLengthError):  # a turn that alone leaves no room is refused, as in-process
            list(remote.stream(conv, TextInput("far too long " * 200), GREEDY))


def server_budget(fake: FakeLMServer) -> int:
    return int(fake.completions[-1]["max_tokens"])


# ------------------------------------------------------------------ a hostile or broken server


def test_a_server_that_ignores_max_tokens_is_held_to_it(lm_dir: Path, local: VoiceLM) -> None:
    state = FakeState(vocab_size=local.model.config.vocab_size, faults={0: Fault(burst=500)})
    with FakeLMServer(local, state) as fake:
        remote = connect(lm_dir, fake)
        conv = remote.new_conversation()
        events = list(remote.stream(conv, TextInput("hello"), GenerationOptions(max_new_tokens=40, seed=1)))
    end = events[-1]
    assert isinstance(end, TurnEnd) and end.reason is StopReason.MAX_TOKENS and len(conv.last_output) == 40


@pytest.mark.parametrize(("fault", "words"), [
    (Fault(burst=2_000_000), "sent an event over 1 MiB"),
    (Fault(endless_after=2), "sent an event over 1 MiB"),
    (Fault(keepalive_after=2), "did not answer within 1 s"),
    (Fault(trickle_after=2), "did not answer within 1 s"),
    (Fault(garbage={"choices": [{"index": 0, "token_ids": ["abc"]}]}), "token id that is not an integer ('abc')"),
    (Fault(garbage={"choices": [{"index": 0, "token_ids": [True]}]}), "token id that is not an integer"),
    (Fault(garbage={"choices": [{"index": 0, "token_ids": "12"}]}), "token_ids that are not a list"),
    (Fault(garbage=[1, 2, 3]), "sent an event that is not a JSON object"),
    (Fault(garbage={"choices": "all of them"}), "without choices"),
])
def test_each_hostile_stream_is_one_line_within_the_timeout(lm_dir: Path, local: VoiceLM, fault: Fault,
                                                            words: str) -> None:
    # the size cases get a timeout that a busy machine's fake server (building a 14 MB event) never reaches
    timeout_s = FAST_TIMEOUT_S if "within" in words else 30.0
    # the hostile servers never end on their own: the turn ends by the deadline or a cap, as the message says
    before, conv, _, message, third = _fault_run(lm_dir, local, fault, timeout_s=timeout_s)
    assert words in message and "\n" not in message, message
    assert isinstance(third[-1], TurnEnd) and conv.ids[: len(before)] == before  # the conversation goes on


def test_a_status_line_trickled_byte_by_byte_is_bounded(lm_dir: Path, local: VoiceLM) -> None:
    state = FakeState(vocab_size=local.model.config.vocab_size, header_trickle_s=0.2)
    with FakeLMServer(local, state) as fake:
        remote = connect(lm_dir, fake, timeout_s=FAST_TIMEOUT_S)
        # 17 bytes at 0.2 s would complete a status line after 3.4 s: the 1 s deadline is what ended it
        with pytest.raises(LMServerError, match="did not answer within 1 s"):
            list(remote.stream(remote.new_conversation(), TextInput("hello"), GREEDY))


def test_a_model_listing_of_megabytes_is_refused(lm_dir: Path, local: VoiceLM) -> None:
    state = FakeState(vocab_size=local.model.config.vocab_size, models_padding=5 << 20)
    with FakeLMServer(local, state) as fake, pytest.raises(LMServerError, match="sent over 4 MiB for /models"):
        connect(lm_dir, fake)


@pytest.mark.parametrize("server_closes", [False, True])
def test_a_kept_connection_serves_the_next_call_and_a_closed_one_is_replaced(server_closes: bool) -> None:
    """Keep-alive: two calls on one connection; when the server dropped the kept one meanwhile (its idle timeout),
    the next call goes over a new connection at once instead of failing."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from glmvoice_cli.lm.http_client import HttpClient

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = server_closes  # closed after the answer, without saying so

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = HttpClient(ServerURL.parse(f"http://127.0.0.1:{httpd.server_address[1]}"), read_timeout_s=10.0)
        assert client.get_json("models") == {"ok": True}
        assert client.get_json("models") == {"ok": True}
        assert client.connections_opened == (2 if server_closes else 1)
    finally:
        httpd.shutdown()
        httpd.server_close()
