"""A small HTTP/1.1 client for an OpenAI-compatible LM server, standard library only.

Two kinds of call: JSON in, JSON out (`get_json`, `post_json`), and a streamed completion read as
server-sent events (`open_events`). Every call is bounded in time and size: connecting by
`connect_timeout_s`; the headers, a whole JSON body and the gap between two events by `read_timeout_s`
as a deadline (a server that trickles a byte at a time, or sends only `: keepalive` comments, does not
reset it); a JSON body by MAX_JSON_BYTES and an event by MAX_EVENT_BYTES. A server that stalls, dawdles
or floods is an error after that long, never a hang or a memory blow-up. A streamed answer is read by its own thread into a
queue; the consumer waits on the queue in short steps and checks its cancel Event in between, so
a barge-in closes the connection at once, whatever the server is doing (and closing it is how the
server learns to stop generating). Every failure is an `LMServerError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from glmvoice_cli.errors import LMServerError, UsageError
from glmvoice_cli.files import loads_json

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

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"


class HttpClient:
    """JSON and event-stream calls to one server. A connection whose last answer was read to its end is kept
    and used again by the next call (HTTP/1.1 keep-alive: no new TCP handshake per turn); one that failed or
    was cut is closed. A kept connection the server has closed meanwhile is replaced once, at once."""

    def __init__(self, url: ServerURL, api_key: str | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> None:
        self.url, self.api_key = url, api_key
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self._idle: http.client.HTTPConnection | None = None  # kept for the next call
        self._idle_lock = threading.Lock()
        self.connections_opened = 0  # new connections made so far (tests, diagnostics)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def connect(self) -> http.client.HTTPConnection:
        """An open connection whose socket reads time out after `read_timeout_s`."""
        cls: Any = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        kwargs: dict[str, Any] = {"context": ssl.create_default_context()} if self.url.scheme == "https" else {}
        conn = cls(self.url.host, self.url.port, timeout=self.connect_timeout_s, **kwargs)
        self.connections_opened += 1
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._error(e, "connect") from e
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout_s)
        return conn

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """The kept connection (True) or a new one (False)."""
        with self._idle_lock:
            conn, self._idle = self._idle, None
        if conn is not None and conn.sock is not None:
            return conn, True
        return self.connect(), False

    def keep(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep `conn` for the next call if `response` was read to its end and the server keeps it open."""
        if not response.isclosed() or response.will_close or conn.sock is None:
            conn.close()
            return
        with self._idle_lock:
            old, self._idle = self._idle, conn
        if old is not None:
            old.close()

    def request(self, method: str, endpoint: str, body: Any = None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request -> (its connection, the response: status checked; the caller reads the body and
        hands both to `keep`).

        `body` is JSON-encoded, unless it is bytes already.
        """
        data = body if isinstance(body, bytes) or body is None else json.dumps(body, separators=(",", ":")).encode()
        conn, reused = self._take()
        try:
            with _deadline(conn.sock, self.read_timeout_s) as late:  # a status line trickled byte by byte too
                conn.request(method, self.url.path(endpoint), body=data, headers=self._headers(data))
                response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if reused and not late.is_set():  # the server closed the kept connection: once more, on a new one
                return self.request(method, endpoint, body)
            raise self._error(TimeoutError() if late.is_set() else e, "answer") from e
        if response.status >= 400:
            try:
                detail = response.read(READ_BYTES)
            except (OSError, http.client.HTTPException):
                detail = b""
            conn.close()
            raise self._status_error(response.status, response.reason, detail)
        return conn, response

    def get_json(self, endpoint: str) -> Any:
        return self._read_json(*self.request("GET", endpoint), endpoint)

    def post_json(self, endpoint: str, body: Any) -> Any:
        return self._read_json(*self.request("POST", endpoint, body), endpoint)

    def get_text(self, endpoint: str) -> str:
        return self._read_body(*self.request("GET", endpoint), endpoint).decode("utf-8", errors="replace")

    def _read_body(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, endpoint: str
                   ) -> bytes:
        """The whole body, within the read deadline and MAX_JSON_BYTES; the connection kept if it can be."""
        try:
            with _deadline(_socket_of(response), self.read_timeout_s) as late:
                data = response.read(MAX_JSON_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._error(TimeoutError() if late.is_set() else e, "answer") from e
        if len(data) > MAX_JSON_BYTES:
            conn.close()
            raise LMServerError(f"the LM server at {self.url} sent over {MAX_JSON_BYTES >> 20} MiB for "
                                f"/{endpoint}: not an answer an LM server gives")
        self.keep(conn, response)
        return data

    def _read_json(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, endpoint: str
                   ) -> Any:
        data = self._read_body(conn, response, endpoint)
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

    def _error(self, error: BaseException, stage: str) -> LMServerError:
        if isinstance(error, (TimeoutError, socket.timeout)):
            limit = self.connect_timeout_s if stage == "connect" else self.read_timeout_s
            what = "accept a connection" if stage == "connect" else "answer"
            return LMServerError(f"the LM server at {self.url} did not {what} within {limit:g} s")
        if stage == "connect":
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
    `cancel` is set (after closing the connection), and LMServerError when the server fails,
    stalls longer than the read timeout, or cuts the stream before [DONE].
    """

    def __init__(self, client: HttpClient, endpoint: str, body: Any) -> None:
        self._client, self._endpoint, self._body = client, endpoint, body
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._response: http.client.HTTPResponse | None = None
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
            response = self._response
        if response is not None:
            _shutdown(response)

    def _read(self) -> None:
        response, conn, done = None, None, False
        try:
            conn, response = self._client.request("POST", self._endpoint, self._body)
            with self._lock:
                self._response = response
                closed = self._closed
            if closed:
                return
            for event in _parse_events(response, self._client.url, self._client.read_timeout_s):
                self._queue.put(event)
            done = _read_to_end(response, self._client.read_timeout_s)  # then the connection can serve again
            self._queue.put(_END)
        except LMServerError as e:
            self._queue.put(e)
        except Exception as e:  # noqa: BLE001 - a socket shut from another thread fails in many ways
            if not self._closed:
                self._queue.put(self._client._error(e, "answer"))
        finally:
            if conn is not None and response is not None and done and not self._closed:
                self._client.keep(conn, response)
            elif conn is not None:
                conn.close()


def _read_to_end(response: http.client.HTTPResponse, seconds: float) -> bool:
    """Read what follows `data: [DONE]` (the chunked body's end) within `seconds`; True if the body ended."""
    try:
        with _deadline(_socket_of(response), seconds):
            while not response.isclosed() and response.read(READ_BYTES):
                pass
    except (OSError, http.client.HTTPException):
        return False
    return response.isclosed()


def _socket_of(response: http.client.HTTPResponse) -> socket.socket | None:
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _shut(sock: socket.socket | None) -> None:
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _shutdown(response: http.client.HTTPResponse) -> None:
    """Shut the socket under a response being read in another thread; that thread then closes it."""
    _shut(_socket_of(response))


@contextlib.contextmanager
def _deadline(sock: socket.socket | None, seconds: float) -> Iterator[threading.Event]:
    """Shut `sock` if the block is still running after `seconds`: the socket's own timeout bounds each read,
    not a reply sent a byte at a time. The Event says whether it fired (the failure was the deadline)."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        _shut(sock)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def _parse_events(response: http.client.HTTPResponse, url: ServerURL,
                  silence_s: float = DEFAULT_READ_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """The JSON object of each `data:` event until `data: [DONE]`; a cut stream, an event over MAX_EVENT_BYTES,
    anything but a JSON object, and `silence_s` without a complete event (comments and trickled bytes do not
    count) are each an LMServerError."""
    buffer, data, size = b"", [], 0
    last_event = time.monotonic()
    while True:
        chunk = response.read1(READ_BYTES)
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
