"""HTTP calls to an OpenAI-compatible LM server, through httpx2 (the httpx line huggingface_hub installs).

Two kinds of call: JSON in, JSON out (`get_json`, `post_json`), and a streamed completion read as
server-sent events (`open_events`). httpx2 keeps one connection alive across calls (no new TCP handshake
per turn; a kept connection the server has closed meanwhile is replaced at once) and bounds connecting and
each read. What it does not bound is added here: the headers, a whole JSON body and the gap between two
events each get `read_timeout_s` as a deadline (a server that trickles a byte at a time, or sends only
`: keepalive` comments, does not reset it; past the deadline the socket is shut), a JSON body is capped at
MAX_JSON_BYTES and an event at MAX_EVENT_BYTES. A server that stalls, dawdles or floods is an error after
that long, never a hang or a memory blow-up. A streamed answer is read by its own thread into a queue; the
consumer waits on the queue in short steps and checks its cancel Event in between, so a barge-in shuts the
connection at once, whatever the server is doing (and that is how the server learns to stop generating).
Every failure is an `LMServerError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2

from glmvoice_cli.errors import LMServerError, UsageError
from glmvoice_cli.files import loads_json
from glmvoice_cli.threads import after

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 60.0  # longest wait for the headers or the next token (a long prefill included)
POLL_S = 0.02  # the consumer's wait on the event queue between cancel checks
READ_BYTES = 65536
MAX_ERROR_CHARS = 200  # of a server's error message, inside our one-line error
MAX_JSON_BYTES = 4 << 20  # a model listing or a probe answer is a few KiB
MAX_EVENT_BYTES = 1 << 20  # one streamed event carries a token or a few; vLLM's are under 1 KiB
_API_PREFIX = "/v1"


@dataclass(frozen=True)
class ServerURL:
    """Where the server is: `http://host:port` with an optional path prefix (a trailing /v1 is dropped)."""

    scheme: str
    host: str
    port: int
    prefix: str  # path before /v1, "" for most servers

    @classmethod
    def parse(cls, url: str) -> ServerURL:
        text = url.strip()
        parts = urlsplit(text if "://" in text else f"http://{text}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"LM server URL {url!r} is not an http(s)://host[:port] address")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise UsageError(f"LM server URL {url!r} has an invalid port") from e
        prefix = parts.path.rstrip("/")
        prefix = prefix.removesuffix(_API_PREFIX)
        return cls(parts.scheme, parts.hostname, port, prefix)

    def path(self, endpoint: str) -> str:
        """`models` -> `/v1/models` (under the prefix); `/metrics` stays at the root of the prefix."""
        return f"{self.prefix}{endpoint}" if endpoint.startswith("/") else f"{self.prefix}{_API_PREFIX}/{endpoint}"

    @property
    def origin(self) -> str:
        """`http://host:port`, an IPv6 host in brackets (paths come from `path`, prefix included)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"


@dataclass
class _Socket:
    """The socket a call runs on, learnt from httpx2's trace (a new connection) or the last call (a kept one),
    so that a deadline or a cancel can shut it from another thread."""

    sock: socket.socket | None = None
    late: threading.Event = field(default_factory=threading.Event)  # a deadline shut it

    def shut(self) -> None:
        with contextlib.suppress(OSError):
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Shut the socket if the block still runs after `seconds` (httpx2 bounds each read, not a reply sent
        a byte at a time)."""
        def expire() -> None:
            self.late.set()
            self.shut()

        with after(seconds, expire):
            yield


class HttpClient:
    """JSON and event-stream calls to one server over one kept-alive connection (see the module docstring)."""

    def __init__(self, url: ServerURL, api_key: str | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> None:
        self.url, self.api_key = url, api_key
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        headers = {"Accept": "application/json, text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # trust_env off: a proxy set for the internet must not carry the requests to a local LM server
        self._http = httpx2.Client(
            base_url=url.origin, headers=headers, trust_env=False, follow_redirects=False,
            timeout=httpx2.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx2.Limits(max_keepalive_connections=1, keepalive_expiry=None))
        self._kept: socket.socket | None = None  # the socket of the connection the last finished call left open
        self.connections_opened = 0  # new connections made so far (tests, diagnostics)

    def _trace(self, holder: _Socket) -> Any:
        def trace(name: str, info: dict[str, Any]) -> None:
            if name == "connection.connect_tcp.complete":
                self.connections_opened += 1
                stream = info.get("return_value")
                holder.sock = stream.get_extra_info("socket") if stream is not None else None
        return trace

    @contextlib.contextmanager
    def request(self, method: str, endpoint: str, body: Any = None
                ) -> Iterator[tuple[httpx2.Response, _Socket]]:
        """One request, its response's status checked: (the response, its socket) while the caller reads the
        body. A response read to its end leaves its connection for the next call; one cut short closes it.

        `body` is JSON-encoded, unless it is bytes already.
        """
        data = body if isinstance(body, bytes) or body is None else json.dumps(body, separators=(",", ":")).encode()
        holder = _Socket(self._kept)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        request = self._http.build_request(method, self.url.path(endpoint), content=data, headers=headers,
                                           extensions={"trace": self._trace(holder)})
        try:
            with holder.deadline(self.read_timeout_s):  # a status line trickled byte by byte too
                response = self._http.send(request, stream=True)
        except httpx2.HTTPError as e:
            raise self._error(TimeoutError() if holder.late.is_set() else e) from e
        try:
            stream = response.extensions.get("network_stream")
            holder.sock = stream.get_extra_info("socket") if stream is not None else holder.sock
            if response.status_code >= 400:
                detail = b""
                with contextlib.suppress(httpx2.HTTPError), holder.deadline(self.read_timeout_s):
                    for chunk in response.iter_raw():
                        detail += chunk
                        if len(detail) >= READ_BYTES:
                            break
                raise self._status_error(response.status_code, response.reason_phrase, detail)
            yield response, holder
            self._kept = holder.sock if response.is_stream_consumed else None
        finally:
            response.close()

    def get_json(self, endpoint: str) -> Any:
        return self._json(self._body("GET", endpoint, None), endpoint)

    def post_json(self, endpoint: str, body: Any) -> Any:
        return self._json(self._body("POST", endpoint, body), endpoint)

    def get_text(self, endpoint: str) -> str:
        return self._body("GET", endpoint, None).decode("utf-8", errors="replace")

    def _body(self, method: str, endpoint: str, body: Any) -> bytes:
        """The whole body, within the read deadline and MAX_JSON_BYTES."""
        with self.request(method, endpoint, body) as (response, holder):
            data = b""
            try:
                with holder.deadline(self.read_timeout_s):
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > MAX_JSON_BYTES:
                            raise LMServerError(f"the LM server at {self.url} sent over {MAX_JSON_BYTES >> 20} MiB "
                                                f"for /{endpoint}: not an answer an LM server gives")
            except httpx2.HTTPError as e:
                raise self._error(TimeoutError() if holder.late.is_set() else e) from e
        return data

    def _json(self, data: bytes, endpoint: str) -> Any:
        try:
            return loads_json(data)
        except ValueError as e:
            raise LMServerError(f"the LM server at {self.url} sent malformed JSON for /{endpoint}") from e

    def open_events(self, endpoint: str, body: Any) -> EventStream:
        """Start a streamed POST; its events are read in a thread (see EventStream)."""
        stream = EventStream(self, endpoint, body)
        stream.start()
        return stream

    # ------------------------------------------------------------------ errors

    def _error(self, error: BaseException) -> LMServerError:
        if isinstance(error, (httpx2.ConnectTimeout, httpx2.PoolTimeout)):
            return LMServerError(f"the LM server at {self.url} did not accept a connection within "
                                 f"{self.connect_timeout_s:g} s")
        if isinstance(error, (TimeoutError, httpx2.TimeoutException)):
            return LMServerError(f"the LM server at {self.url} did not answer within {self.read_timeout_s:g} s")
        if isinstance(error, httpx2.ConnectError):
            return LMServerError(f"cannot reach the LM server at {self.url} ({_reason(error)}); "
                                 "is it running? (start one with `glmvoice serve-lm`)")
        return LMServerError(f"the LM server at {self.url} failed mid-answer ({_reason(error)})")

    def _status_error(self, status: int, reason: str, detail: bytes) -> LMServerError:
        message = _server_message(detail)
        line = f"the LM server at {self.url} answered HTTP {status} {reason}".rstrip()
        if message:
            line += f": {message}"
        if status in (401, 403):
            line += "; check the API key (--lm-api-key or GLMVOICE_LM_API_KEY)"
        return LMServerError(line)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:MAX_ERROR_CHARS] if text else type(error).__name__


def _server_message(detail: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}} or {"message": ...})."""
    text = detail.decode("utf-8", errors="replace").strip()
    try:
        doc = loads_json(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        inner = doc.get("error", doc)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message is None:
            message = doc.get("detail") or doc.get("message")
        text = str(message) if message is not None else text
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


_END = object()


class Cancelled(Exception):
    """The consumer's cancel Event was set: the stream was closed."""


class EventStream:
    """One streamed completion: a reader thread turns server-sent events into parsed JSON objects.

    `events(cancel)` yields them in order and ends at `data: [DONE]`; it raises Cancelled when
    `cancel` is set (after shutting the connection), and LMServerError when the server fails,
    stalls longer than the read timeout, or cuts the stream before [DONE].
    """

    def __init__(self, client: HttpClient, endpoint: str, body: Any) -> None:
        self._client, self._endpoint, self._body = client, endpoint, body
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._socket: _Socket | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="glmvoice-lm-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def events(self, cancel: threading.Event | None = None) -> Iterator[dict[str, Any]]:
        while True:
            if cancel is not None and cancel.is_set():
                self.close()
                raise Cancelled
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue  # the reader thread's own read timeout bounds this wait
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Drop the connection (from any thread): the server sees the client go and stops generating."""
        with self._lock:
            self._closed = True
            holder = self._socket
        if holder is not None:
            holder.shut()

    def _read(self) -> None:
        client = self._client
        try:
            with client.request("POST", self._endpoint, self._body) as (response, holder):
                with self._lock:
                    self._socket = holder
                    closed = self._closed
                if closed:
                    return
                chunks = response.iter_bytes()
                for event in _parse_events(chunks, client.url, client.read_timeout_s):
                    self._queue.put(event)
                with contextlib.suppress(httpx2.HTTPError), holder.deadline(client.read_timeout_s):
                    for _ in chunks:  # what follows [DONE] (the chunked body's end): then the connection can serve again
                        pass
                with self._lock:
                    self._socket = None  # the connection goes back to the pool: a late close() must not shut it
            self._queue.put(_END)
        except LMServerError as e:
            self._queue.put(e)
        except Exception as e:  # noqa: BLE001 - a socket shut from another thread fails in many ways
            if not self._closed:
                self._queue.put(client._error(e))


def _parse_events(chunks: Iterator[bytes], url: ServerURL,
                  silence_s: float = DEFAULT_READ_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """The JSON object of each `data:` event until `data: [DONE]`; a cut stream, an event over MAX_EVENT_BYTES,
    anything but a JSON object, and `silence_s` without a complete event (comments and trickled bytes do not
    count) are each an LMServerError."""
    buffer, data, size = b"", [], 0
    last_event = time.monotonic()
    while True:
        chunk = next(chunks, b"")
        if not chunk:
            raise LMServerError(f"the LM server at {url} closed the stream before the answer ended")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
                size += len(line)
            elif not line and data:
                payload, data, size = b"\n".join(data), [], 0
                last_event = time.monotonic()
                if payload == b"[DONE]":
                    return
                yield _event_object(payload, url)
        if size + len(buffer) > MAX_EVENT_BYTES:
            raise LMServerError(f"the LM server at {url} sent an event over {MAX_EVENT_BYTES >> 20} MiB: "
                                "not a streamed answer")
        if time.monotonic() - last_event > silence_s:
            raise LMServerError(f"the LM server at {url} did not answer within {silence_s:g} s "
                                "(it sent only keep-alives or a trickle)")


def _event_object(payload: bytes, url: ServerURL) -> dict[str, Any]:
    try:
        event = loads_json(payload)
    except ValueError as e:
        raise LMServerError(f"the LM server at {url} sent a malformed event") from e
    if not isinstance(event, dict):
        raise LMServerError(f"the LM server at {url} sent an event that is not a JSON object")
    if "error" in event:
        raise LMServerError(f"the LM server at {url} failed mid-answer: "
                            f"{_server_message(json.dumps(event).encode())}")
    return event
