"""A small OpenAI-compatible completions server for the remote-LM protocol tests (stdlib http.server).

It answers like vLLM with `--skip-tokenizer-init`: `/v1/models`, `/v1/completions` (token-id prompts,
one server-sent event per token with `token_ids`, the stop token included, a usage event, `[DONE]`)
and `/metrics`. Tokens come from the in-process `VoiceLM` on the same folder, so an answer through
it equals the in-process one; `allowed_token_ids` without audio ids means text-only decoding. Faults
(an HTTP status, a stall, a cut stream, an error event) are set per completion request, and the
server counts the tokens it generated, so a test sees when it stopped.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from glmvoice_cli.lm.voice_lm import (
    AudioTokens,
    Conversation,
    GenerationOptions,
    StopReason,
    TextPiece,
    TurnEnd,
    VoiceLM,
)


@dataclass
class Fault:
    status: int | None = None  # answer with this HTTP status and an OpenAI-style error body
    stall_after: int | None = None  # stop sending after this many tokens, keeping the connection open
    cut_after: int | None = None  # drop the connection after this many tokens (no [DONE])
    error_after: int | None = None  # send an error event after this many tokens
    burst: int | None = None  # ignore max_tokens: one first event with this many (valid) token ids
    keepalive_after: int | None = None  # after this many tokens send only `: keepalive` comments, forever
    trickle_after: int | None = None  # after this many tokens send one byte of an event that never ends, slowly
    garbage: Any = None  # send this JSON document as the first event
    endless_after: int | None = None  # after this many tokens, a `data:` line without end, as fast as it goes


@dataclass
class FakeState:
    models: list[str] = field(default_factory=lambda: ["tiny-voice"])
    max_model_len: int | None = 4096
    vocab_size: int = 0  # ids >= this are refused in allowed_token_ids (like vLLM)
    api_key: str | None = None
    faults: dict[int, Fault] = field(default_factory=dict)  # completion request index -> fault
    masks: bool = True  # False: ignore allowed_token_ids (like a server without it)
    bias: bool = True  # False: ignore logit_bias (then the client keeps sending allowed_token_ids)
    token_ids: bool = True  # False: no token_ids in answers
    models_padding: int = 0  # bytes of padding in /v1/models (a listing no real server sends)
    header_trickle_s: float | None = None  # send the completion's status line a byte per this many seconds
    requests: list[dict[str, Any]] = field(default_factory=list)
    generated: int = 0  # tokens generated over all requests
    active: int = 0  # streams being generated now
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeLMServer:
    def __init__(self, lm: VoiceLM, state: FakeState | None = None, port: int = 0) -> None:
        self.lm, self.state = lm, state or FakeState(vocab_size=lm.model.config.vocab_size)
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = _QuietServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def completions(self) -> list[dict[str, Any]]:
        return [r for r in self.state.requests if r.get("stream")]

    def __enter__(self) -> FakeLMServer:  # noqa: PYI034 - Self needs Python 3.11
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()  # the listening socket first: a request after this cannot connect
        self.stopping.set()  # then the open answers end

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.state.active and time.monotonic() < deadline:
            time.sleep(0.01)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer is what the tests do on purpose


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_ref: FakeLMServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _json(self, status: int, doc: Any) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        key = self.server_ref.state.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._json(401, {"error": {"message": "Unauthorized", "code": 401}})
        return False

    def do_GET(self) -> None:
        state = self.server_ref.state
        if not self._authorized():
            return
        if self.path == "/v1/models":
            cards = [{"id": name, "object": "model", "max_model_len": state.max_model_len} for name in state.models]
            listing: dict[str, Any] = {"object": "list", "data": cards}
            if state.models_padding:
                listing["padding"] = "x" * state.models_padding
            self._json(200, listing)
        elif self.path == "/metrics":
            text = f"vllm:generation_tokens_total {state.generated}.0\nvllm:num_requests_running {state.active}.0\n"
            data = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        state = self.server_ref.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            state.requests.append(body)
            index = sum(1 for r in state.requests if r.get("stream")) - 1
        if not self._authorized():
            return
        if self.path != "/v1/completions":
            self._json(404, {"detail": "Not Found"})
            return
        if body.get("model") not in state.models:
            self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}})
            return
        allowed = body.get("allowed_token_ids")
        if allowed is not None and any(i >= state.vocab_size for i in allowed):
            self._json(400, {"error": {"message": "allowed_token_ids contains out-of-vocab token id!", "code": 400}})
            return
        fault = state.faults.get(index, Fault()) if body.get("stream") else Fault()
        if fault.status is not None:
            self._json(fault.status, {"error": {"message": "injected failure", "code": fault.status}})
            return
        if not body.get("stream"):
            self._probe(body)
            return
        self._stream(body, fault)

    def _forbidden(self, body: dict[str, Any]) -> set[int]:
        """The ids logit_bias puts at vLLM's floor (-100), when this server honours logit_bias."""
        bias = body.get("logit_bias") or {}
        if not self.server_ref.state.bias:
            return set()
        return {int(i) for i, value in bias.items() if value <= -100}

    def _probe(self, body: dict[str, Any]) -> None:
        allowed = body.get("allowed_token_ids")
        forbidden = self._forbidden(body)
        token = allowed[0] if allowed and self.server_ref.state.masks else min(
            i for i in range(self.server_ref.state.vocab_size) if i not in forbidden)
        choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length"}
        if self.server_ref.state.token_ids:
            choice["token_ids"] = [token]
        self._json(200, {"choices": [choice]})

    def _generate(self, body: dict[str, Any]):  # type: ignore[no-untyped-def]
        """(token id, finish reason) pairs from the in-process model, the stop id included."""
        lm = self.server_ref.lm
        allowed = body.get("allowed_token_ids")
        forbidden = self._forbidden(body)
        audio = [i for i in range(self.server_ref.state.vocab_size) if lm.text_tokenizer.is_audio(i)]
        text_only = (allowed is not None and self.server_ref.state.masks and not any(
            lm.text_tokenizer.is_audio(i) for i in allowed)) or (bool(forbidden) and forbidden.issuperset(audio))
        options = GenerationOptions(temperature=body["temperature"], top_p=body["top_p"],
                                    max_new_tokens=body["max_tokens"], seed=body["seed"], text_only=text_only)
        conv = Conversation()
        for event in lm.stream_ids(conv, list(body["prompt"]), options):
            if isinstance(event, (AudioTokens, TextPiece)) and not (isinstance(event, TextPiece) and event.token_id < 0):
                yield conv.ids[-1], None
            elif isinstance(event, TurnEnd):
                if event.reason is StopReason.USER:
                    yield lm.user_id, "stop"
                elif event.reason is StopReason.EOS:
                    yield lm.text_tokenizer.token_id("<|endoftext|>"), "stop"
                else:
                    yield None, "length"

    def _chunk(self, payload: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def _event(self, doc: Any) -> None:
        self._chunk(b"data: " + json.dumps(doc).encode() + b"\n\n")

    def _forever(self, fault: Fault) -> None:
        """The hostile endings: comments, a trickle or an endless line, until the client goes or the server stops."""
        server = self.server_ref
        if fault.keepalive_after is not None:
            while not server.stopping.wait(0.05):
                self._chunk(b": keepalive\n\n")
        elif fault.trickle_after is not None:
            self._chunk(b"data: {")
            while not server.stopping.wait(0.05):
                self._chunk(b" ")
        else:
            block = b"x" * 65536
            self._chunk(b"data: ")
            while not server.stopping.is_set():
                self._chunk(block)

    def _stream(self, body: dict[str, Any], fault: Fault) -> None:
        state, server = self.server_ref.state, self.server_ref
        if state.header_trickle_s is not None:  # a status line that takes its time, a byte at a time
            for byte in b"HTTP/1.1 200 OK\r\n":
                if server.stopping.wait(state.header_trickle_s):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with state.lock:
            state.active += 1
        sent = 0
        try:
            if fault.garbage is not None:
                self._event(fault.garbage)
            if fault.burst is not None:
                token = next(iter(self._generate(body)))[0] or 0
                self._event({"choices": [{"index": 0, "text": "", "finish_reason": None,
                                          "token_ids": [token] * fault.burst}]})
            for token, finish in self._generate(body):
                if any(after is not None and sent >= after for after in
                       (fault.keepalive_after, fault.trickle_after, fault.endless_after)):
                    self._forever(fault)
                    return
                if fault.stall_after is not None and sent >= fault.stall_after:
                    if server.stopping.wait(30):  # the server goes away: its sockets close, as a dead process's do
                        self.close_connection = True
                        self.connection.shutdown(2)
                    return
                if fault.cut_after is not None and sent >= fault.cut_after:
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                if fault.error_after is not None and sent >= fault.error_after:
                    self._event({"error": {"message": "engine died", "code": 500}})
                    return
                with state.lock:
                    state.generated += token is not None
                choice = {"index": 0, "text": "", "finish_reason": finish, "stop_reason": token if finish else None,
                          "token_ids": [] if token is None else [token]}
                self._event({"choices": [choice]})
                sent += 1
            self._event({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": sent}})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except OSError:
            return  # the client went away: stop generating, as vLLM aborts the request
        finally:
            with state.lock:
                state.active -= 1
