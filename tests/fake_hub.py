"""A tiny Hugging Face Hub on 127.0.0.1 for download tests: no network, no Xet.

Use `serving()` from a fixture; its docstring lists the huggingface_hub settings it pins.

It answers only the requests `huggingface_hub.snapshot_download` makes for plain HTTP downloads
(read from huggingface_hub 2.4's _snapshot_download.py, hf_api.py and file_download.py):

* ``GET /api/models/{repo}/revision/{rev}`` (model_info): ``id``, ``sha`` (the commit) and
  ``siblings`` (the file names); ``GET /api/models/{repo}/tree/{rev}`` (the recursive file listing):
  one page of ``{"type": "file", "path", "size", "oid", "lfs"}`` entries.
* ``HEAD /{repo}/resolve/{rev}/{file}``: small files answer 200 with ``ETag`` (a git-style sha1),
  ``Content-Length`` and ``X-Repo-Commit``; large ("LFS") files answer 302 with ``Location`` on a
  second server (the "CDN", another port, so huggingface_hub does not follow it and reads the
  metadata from the 302 itself), ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``. A missing file or repository answers 404 with ``X-Error-Code``.
* ``GET`` of the same URL (small files) or of the CDN location (large files) returns the bytes,
  honouring ``Range: bytes=N-`` with 206 and ``Content-Range``, which is how a cut transfer
  resumes. No ``X-Xet-*`` header is ever sent, so huggingface_hub never tries Xet.

Faults are injected per file name: ``cut`` sends half of the first full GET and closes the
connection (Content-Length promises more, so the client sees a protocol error), ``fail_resume``
answers 503 to Range requests, ``scramble`` serves the bytes reversed under the true headers (a
mirror or proxy that corrupts content). Every request is recorded for assertions.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".pt", ".model", ".bin")
HANDLER_SOCKET_TIMEOUT_S = 5  # an idle or stuck client never holds a server thread longer
SHUTDOWN_JOIN_TIMEOUT_S = 5


@dataclass(frozen=True)
class Seen:
    """One request the fake hub received."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    """Serves `repos` ({repo_id: {filename: bytes}}) like the Hub; start() before use, stop() after."""

    repos: dict[str, dict[str, bytes]]
    # files are named "<repo_id>/<filename>" in the fault sets and in queries
    cut: set[str] = field(default_factory=set)  # files whose first full GET is cut mid-file
    fail_resume: set[str] = field(default_factory=set)  # files whose Range GETs answer 503
    scramble: set[str] = field(default_factory=set)  # files served reversed: right size and headers, wrong bytes
    token: str | None = None  # when set, hub requests without "Bearer <token>" answer 401
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs = {
            hashlib.sha256(b).hexdigest(): b for files in self.repos.values() for b in files.values()
        }
        self._blob_names = {
            hashlib.sha256(b).hexdigest(): f"{repo}/{name}"
            for repo, files in self.repos.items()
            for name, b in files.items()
        }
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self, role))
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._servers.append((server, thread))
        return self

    def stop(self) -> None:
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(SHUTDOWN_JOIN_TIMEOUT_S)
        self._servers.clear()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0][0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1][0].server_address[1]}"

    # ------------------------------------------------------------------ queries for tests

    @staticmethod
    def commit(repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def gets(self, name: str) -> list[Seen]:
        """GET requests for the bytes of `name` ("<repo_id>/<filename>"), from the hub or the CDN."""
        with self._lock:
            return [s for s in self.seen if s.method == "GET" and self.name_of(s.path) == name]

    def fetched(self) -> set[str]:
        """Files ("<repo_id>/<filename>") whose bytes were requested at least once."""
        with self._lock:
            return {n for s in self.seen if s.method == "GET" and (n := self.name_of(s.path)) is not None}

    def name_of(self, path: str) -> str | None:
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "blobs":
            return self._blob_names.get(parts[2])
        repo, sep, tail = path.lstrip("/").partition("/resolve/")
        return f"{repo}/{tail.partition('/')[2]}" if sep else None

    def blob(self, sha256: str) -> bytes | None:
        return self._blobs.get(sha256)

    def take_cut(self, name: str) -> bool:
        with self._lock:
            if name in self.cut:
                self.cut.discard(name)
                return True
            return False


def _handler_for(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub, Handler.role = hub, role
    return Handler


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    role: str
    timeout = HANDLER_SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers at shutdown

    def log_message(self, format: str, *args: object) -> None:  # silence the default stderr log
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.record(
            Seen(self.role, self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
        )
        if self.role == "cdn":
            parts = path.split("/")
            data = self.hub.blob(parts[2]) if len(parts) == 3 and parts[1] == "blobs" else None
            if data is None:
                return self._empty(404)
            return self._content(data, self.hub.name_of(path) or "", {}, send_body)
        if path.startswith("/api/models/"):
            return self._api(path[len("/api/models/"):])
        self._resolve(path, send_body)

    def _api(self, tail: str) -> None:
        """model_info ("<repo>/revision/<rev>") and the file listing ("<repo>/tree/<rev>")."""
        repo, kind, revision = tail, "", ""
        for marker in ("/revision/", "/tree/"):
            if marker in tail:
                repo, _, revision = tail.partition(marker)
                kind = marker.strip("/")
        if self.hub.token and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            return self._empty(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        files = self.hub.repos.get(repo)
        if files is None or not kind:
            return self._empty(404, {"X-Error-Code": "RepoNotFound"})
        commit = self.hub.commit(repo)
        if revision not in ("main", commit):
            return self._empty(404, {"X-Error-Code": "RevisionNotFound"})
        if kind == "revision":
            body: object = {"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in files]}
        else:
            body = [_tree_entry(name, data) for name, data in files.items()]
        data = json.dumps(body).encode()
        self._content(data, "", {"Content-Type": "application/json", "X-Repo-Commit": commit}, True)

    def _resolve(self, path: str, send_body: bool) -> None:
        head, sep, tail = path.lstrip("/").partition("/resolve/")
        revision, _, filename = tail.partition("/")
        files = self.hub.repos.get(head) if sep else None
        if self.hub.token and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            return self._empty(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        if files is None:
            return self._empty(404, {"X-Error-Code": "RepoNotFound"})
        commit = self.hub.commit(head)
        if revision not in ("main", commit):
            return self._empty(404, {"X-Error-Code": "RevisionNotFound"})
        data = files.get(filename)
        if data is None:
            return self._empty(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        if filename.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            return self._empty(
                302,
                {
                    "Location": f"{self.hub.cdn}/blobs/{sha}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{_git_sha1(data[:64])}"',  # the pointer file's, as on the Hub
                },
            )
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_git_sha1(data)}"'}
        self._content(data, f"{head}/{filename}", headers, send_body)

    def _content(self, data: bytes, name: str, headers: dict[str, str], send_body: bool) -> None:
        start = _range_start(self.headers.get("Range"), len(data)) if send_body else None
        if start is not None and name in self.hub.fail_resume:
            return self._empty(503)
        cut = send_body and start is None and self.hub.take_cut(name)
        data = data[::-1] if name in self.hub.scramble else data  # a bad mirror: same size, other bytes
        body = data if start is None else data[start:]
        self.send_response(200 if start is None else 206)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if start is not None:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if send_body:
            self.wfile.write(body[: len(body) // 2] if cut else body)
            self.wfile.flush()
        self.close_connection = True

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = True


def _range_start(header: str | None, size: int) -> int | None:
    """N from "bytes=N-" when 0 < N < size; anything else serves the whole file."""
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    try:
        start = int(header[len("bytes=") : -1])
    except ValueError:
        return None
    return start if 0 < start < size else None


def _tree_entry(name: str, data: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": name, "size": len(data), "oid": _git_sha1(data)}
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------- the three official repos, tiny

LM_SHARDS = 3  # any count works: the download follows the index


def _bytes(tag: str, size: int) -> bytes:
    """Deterministic, distinct content per file (so every blob has its own sha256)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{tag}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def official_repos(shard_bytes: int = 5_000) -> dict[str, dict[str, bytes]]:
    """Tiny stand-ins for the three repositories and Smart Turn's, with the extra files the real ones carry."""
    shards = [f"model-{i:05d}-of-{LM_SHARDS:05d}.safetensors" for i in range(1, LM_SHARDS + 1)]
    index = {"metadata": {"total_size": shard_bytes * LM_SHARDS}, "weight_map": {}}
    for i, shard in enumerate(shards):
        index["weight_map"][f"transformer.encoder.layers.{i}.weight"] = shard
        index["weight_map"][f"transformer.encoder.layers.{i}.bias"] = shard
    repos: dict[str, dict[str, bytes]] = {
        "THUDM/glm-4-voice-tokenizer": {
            "config.json": b'{"model_type": "whisper"}',
            "preprocessor_config.json": b'{"sampling_rate": 16000}',
            "model.safetensors": _bytes("tokenizer-weights", shard_bytes),
            "README.md": b"# tokenizer",
            ".gitattributes": b"*.safetensors filter=lfs",
        },
        "THUDM/glm-4-voice-9b": {
            "config.json": b'{"model_type": "chatglm"}',
            "generation_config.json": b'{"do_sample": true}',
            "tokenizer.model": _bytes("lm-tokenizer", 700),
            "tokenizer_config.json": b'{"added_tokens_decoder": {}}',
            "model.safetensors.index.json": json.dumps(index).encode(),
            "modeling_chatglm.py": b"# remote code we never fetch",
            "README.md": b"# lm",
        },
        "THUDM/glm-4-voice-decoder": {
            "config.yaml": b"sample_rate: 22050\n",
            "flow.pt": _bytes("flow", shard_bytes),
            "hift.pt": _bytes("hift", shard_bytes // 2),
            "README.md": b"# decoder",
        },
        "pipecat-ai/smart-turn-v3": {
            "smart-turn-v3.2-cpu.onnx": _bytes("smart-turn", shard_bytes // 5),
            "smart-turn-v3.2-gpu.onnx": _bytes("smart-turn-gpu", shard_bytes // 5),  # never fetched: not ours
            "README.md": b"# smart turn",
        },
    }
    for shard in shards:
        repos["THUDM/glm-4-voice-9b"][shard] = _bytes(shard, shard_bytes)
    return repos


SMALL_CHUNK_BYTES = 1024  # written to disk per chunk, so a cut mid-file leaves bytes to resume from


@contextmanager
def serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A started FakeHub serving `official_repos()`, with huggingface_hub pointed at it.

    For a test module's fixture: ``with serving(monkeypatch, tmp_path) as hub: yield hub``.
    huggingface_hub reads its environment once, at import (huggingface_hub.constants), and the
    test session may have imported it under conftest's HF_HUB_OFFLINE=1; so both the
    environment (read by glmvoice_cli.models.hub at call time) and the module constants are patched:
    online, Xet off, no telemetry, a 1 KiB download chunk (huggingface_hub buffers whole chunks
    before writing, so only a small chunk lets a cut transfer keep bytes), an empty HF cache and
    token file of its own (never the user's). The servers stop on exit.
    """
    import huggingface_hub.constants as hf_constants

    hub = FakeHub(official_repos()).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", SMALL_CHUNK_BYTES)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_token"))
        yield hub
    finally:
        hub.stop()
