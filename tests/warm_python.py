"""A Python that has already imported torch and transformers, forking a fresh process for each run.

Tests that must run the CLI in a process of its own (to send it a signal, to block an import, to put it
under an address-space limit) paid about 5 s of CPU each for importing torch and transformers, most of
the process's life. The server (this file, run as a script) imports them once, runs no torch operation
(no OpenMP or other threads exist yet, so forking is safe), and forks one child per request. A child is
a real process with its own pid: it takes the request's stdin/stdout/stderr (passed as file
descriptors), working folder, environment and argv, runs the script like `python SCRIPT ARGS`, and ends
as Python ends (non-daemon threads joined, atexit handlers run, SystemExit codes, a traceback and status
1 for an exception, death by SIGINT for an uncaught KeyboardInterrupt). Signals sent to its pid reach it
as they would reach a `subprocess.Popen` child. The client (`WarmPython.popen`) gives a small Popen-like
object; the server reports each child's wait status over the request's connection.

Only torch, transformers and numpy are imported in advance: they read none of the variables the tests
change (GLMVOICE_*, HF_HOME is read by huggingface_hub, which tests that use the hub do not run here).
The server's OpenMP settings are those of the process that starts it, like its children's would be.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

PRELOADED = ("numpy", "torch", "transformers", "transformers.models.glm.modeling_glm", "safetensors.torch")
READY = "ready"
POLL_S = 0.02  # how often the server reaps finished children


# --------------------------------------------------------------------------- the child


def _std_streams() -> None:
    """New sys.stdin/stdout/stderr over fds 0-2 (the request's), built as Python builds them at start."""
    def stream(fd: int, mode: str, **kw: Any) -> IO[str]:
        return open(fd, mode, closefd=False, encoding="utf-8", **kw)

    sys.stdin = sys.__stdin__ = stream(0, "r")
    sys.stdout = sys.__stdout__ = stream(1, "w", buffering=1 if os.isatty(1) else -1)  # 1: by line
    sys.stderr = sys.__stderr__ = stream(2, "w", errors="backslashreplace", buffering=1)


def _run_script(argv: list[str]) -> None:
    """`python argv[0] argv[1:]` (or `python -c CODE ARGS`) in this process."""
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        main = type(sys)("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)  # noqa: S102 - the test's own code
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def _child(request: dict, fds: list[int], base_path: list[str]) -> None:
    """In the forked process: become `python SCRIPT ARGS` with the request's stdio, folder and environment.

    Whatever the script raises (SystemExit too) leaves through the server's frames to the interpreter, which
    ends this process as it ends any: non-daemon threads joined, atexit handlers, finalizers (native
    modules' leak reports among them), a traceback and status 1, death by SIGINT for a KeyboardInterrupt.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    script_dir = "" if argv[0] == "-c" else str(Path(argv[0]).resolve().parent)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [script_dir, *extra, *(p for p in base_path if p not in extra)]
    _std_streams()
    _run_script(argv)


# --------------------------------------------------------------------------- the server


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data.decode()), list(fds)


def serve(path: str) -> None:
    """Accept requests on the unix socket `path` until stdin closes (the test session ended)."""
    for name in PRELOADED:
        __import__(name)
    own = {str(Path(__file__).resolve().parent), *os.environ.get("PYTHONPATH", "").split(os.pathsep)}
    base_path = [p for p in sys.path if p not in own]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    print(READY, flush=True)
    while True:
        for key, _ in selector.select(POLL_S):
            if key.fileobj is sys.stdin:
                return  # the session is over (stdin closed): children still running are the tests' to end
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            pid = os.fork()
            if pid == 0:
                for own_fd in (selector, listener, conn, *waiting.values()):
                    own_fd.close()
                _child(request, fds, base_path)
                return  # the script ended without SystemExit: the interpreter ends with status 0
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        _reap(waiting)


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):  # the test gave up on it
                conn.sendall(f"{status}\n".encode())
            conn.close()


# --------------------------------------------------------------------------- the client (in the tests)


class WarmProcess:
    """The part of subprocess.Popen the tests use, for a child of the warm server."""

    def __init__(self, conn: socket.socket, stdin: IO[str] | None, stdout: IO[str] | None,
                 stderr: IO[str] | None) -> None:
        self._conn = conn
        self._reply = conn.makefile("r")
        self.pid = int(self._reply.readline())
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self._status: list[int] = []
        self._done = threading.Event()
        threading.Thread(target=self._wait_status, daemon=True).start()

    def _wait_status(self) -> None:
        line = self._reply.readline()
        status = int(line) if line.strip() else 255 << 8  # the server died: report a failure
        self._status.append(status)
        self._done.set()

    def poll(self) -> int | None:
        if self.returncode is None and self._done.is_set():
            self.returncode = os.waitstatus_to_exitcode(self._status[0])
            self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return self.poll()  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        """Send `input`, close stdin, read stdout and stderr to their ends and wait, like Popen's."""
        if self.stdin is not None and not self.stdin.closed:
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass
        out: dict[str, str] = {}
        readers = [threading.Thread(target=lambda n=name, s=stream: out.__setitem__(n, s.read()), daemon=True)
                   for name, stream in (("out", self.stdout), ("err", self.stderr)) if stream is not None]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return out.get("out", ""), out.get("err", "")


class WarmPython:
    """One server per test worker (conftest's `warm_python` fixture), started on first use."""

    def __init__(self, folder: Path) -> None:
        self.path = str(folder / "warm.sock")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.server = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)
        assert self.server.stdout is not None
        line = self.server.stdout.readline().strip()
        if line != READY:
            raise RuntimeError(f"the warm Python did not start: {line!r}")

    def popen(self, argv: list[str], env: dict[str, str], cwd: Path | str | None = None,
              stdin: int | None = subprocess.DEVNULL) -> WarmProcess:
        """Start `python *argv` (argv[0] a script, or "-c", CODE) with stdout and stderr piped (text).

        `stdin`: subprocess.PIPE (then `.stdin` is a text pipe), DEVNULL, or a file descriptor to hand over.
        """
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        ours: list[int] = []  # our ends of the pipes
        theirs: list[int] = []  # the child's stdin, stdout, stderr
        if stdin == subprocess.PIPE:
            read, write = os.pipe()
            theirs.append(read)
            ours.append(write)
        else:
            theirs.append(os.open(os.devnull, os.O_RDONLY) if stdin == subprocess.DEVNULL else os.dup(stdin))
        for _ in range(2):
            read, write = os.pipe()
            theirs.append(write)
            ours.append(read)
        request = {"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd or os.getcwd())}
        conn.sendmsg([json.dumps(request).encode()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs).tobytes())])
        for fd in theirs:
            os.close(fd)
        files = [os.fdopen(fd, "w" if i == 0 and stdin == subprocess.PIPE else "r", encoding="utf-8")
                 for i, fd in enumerate(ours)]
        child_in = files.pop(0) if stdin == subprocess.PIPE else None
        return WarmProcess(conn, child_in, files[0], files[1])

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
