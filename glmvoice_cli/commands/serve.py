"""`glmvoice serve`: the OpenAI Realtime API on a WebSocket, every connection a conversation on one model worker."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from glmvoice_cli.commands import signals
from glmvoice_cli.commands.common import (
    CompileOpt,
    DecoderOpt,
    DeviceOpt,
    DtypeOpt,
    LmApiKeyOpt,
    LmModelOpt,
    LmOpt,
    LmTimeoutOpt,
    LmUrlOpt,
    MaxTokensOpt,
    ModelsOpt,
    QuantizeOpt,
    ScheduleOpt,
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TokenizerOpt,
    TopPOpt,
    lm_server,
    load_assistant,
    load_turn_judge,
    use_threads,
    with_sampling,
)
from glmvoice_cli.errors import UsageError

log = logging.getLogger("glmvoice_cli")

SERVER_EXTRA_HINT = "glmvoice serve needs the server extra: pip install 'glmvoice[server]'"
DEFAULT_MAX_SESSIONS = 4
MAX_SESSIONS_LIMIT = 256
DEFAULT_CLIENT_BUFFER_MB = 32  # about ten minutes of answer audio a client has not read
# A client that answers no ping for PING_INTERVAL_S + PING_TIMEOUT_S (it vanished, or reads nothing) is dropped:
# with the client buffer, what bounds the memory one connection can hold.
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        help="Require this key (Authorization: Bearer, or the openai-insecure-api-key.<key> subprotocol).")
                       ] = None,
    max_sessions: Annotated[int, typer.Option(
        min=1, max=MAX_SESSIONS_LIMIT, help="Connections served at once; one more gets an error and a close.")
                            ] = DEFAULT_MAX_SESSIONS,
    session_dir: Annotated[Path | None, typer.Option(
        help="Save each connection's session in a new folder under this one (default: the data folder).")
                           ] = None,
    save: Annotated[bool, typer.Option(help="Save each connection as a session (see glmvoice sessions).")] = True,
    client_buffer_mb: Annotated[int, typer.Option(
        min=1, max=4096, help="Unsent output (MiB) a connection may hold before a client that reads nothing is "
        "closed.")] = DEFAULT_CLIENT_BUFFER_MB,
    models: ModelsOpt = None, tokenizer: TokenizerOpt = None, lm: LmOpt = None, decoder: DecoderOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None, compile_lm: CompileOpt = None,
    max_new_tokens: MaxTokensOpt = None, seed: SeedOpt = None, schedule: ScheduleOpt = "default",
    temperature: TemperatureOpt = None, top_p: TopPOpt = None, threads: ThreadsOpt = None,
    lm_url: LmUrlOpt = None, lm_api_key: LmApiKeyOpt = None, lm_model: LmModelOpt = None,
    lm_timeout: LmTimeoutOpt = None,
) -> None:
    """Serve the OpenAI Realtime API at ws://HOST:PORT/v1/realtime (one conversation per connection)."""
    api_key = (api_key or "").strip() or None
    _check_exposure(host, api_key)
    if session_dir is not None and not save:
        raise UsageError("--session-dir and --no-save contradict each other: give one")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError(SERVER_EXTRA_HINT) from None
    from glmvoice_cli.lm.voice_lm import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
    from glmvoice_cli.serve.app import HARD_MESSAGE_BYTES, RealtimeServer, ServeOptions

    listener = _bind(host, port)  # a busy port fails now, not after a minute of loading
    with signals.interrupts_as_keyboard():
        try:
            use_threads(threads)
            assistant = load_assistant(("tokenizer", "lm", "decoder"), models=models,
                                       overrides={"tokenizer": tokenizer, "lm": lm, "decoder": decoder},
                                       device=device, dtype=dtype, quantize=quantize, seed=seed, compile=compile_lm,
                                       server=lm_server(lm_url, lm_api_key, lm_model, lm_timeout),
                                       schedule=schedule,  # every session's: the Realtime session has no field
                                       for_other_thread=True)  # the model worker runs them
            assistant.lm.ensure_slots(max_sessions)  # a compiled LM keeps every session's cache at once
            generation = with_sampling(GenerationOptions(max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                                         seed=seed), temperature, top_p)
            if session_dir is not None:
                session_dir.mkdir(parents=True, exist_ok=True)
            judge = load_turn_judge(required=False, models=models)  # semantic_vad where its model is here
            server = RealtimeServer(assistant, generation, ServeOptions(api_key, max_sessions, save, session_dir,
                                                                         client_buffer_bytes=client_buffer_mb << 20,
                                                                         turn_judge=judge))
            config = uvicorn.Config(server.app(), log_level="warning", ws_max_size=HARD_MESSAGE_BYTES,
                                    ws_ping_interval=PING_INTERVAL_S, ws_ping_timeout=PING_TIMEOUT_S,
                                    ws_per_message_deflate=False, timeout_graceful_shutdown=5)
            bound = listener.getsockname()
            typer.echo(f"glmvoice serve: ws://{_show(bound[0])}:{bound[1]}/v1/realtime "
                       f"(up to {max_sessions} sessions; Ctrl-C stops)", err=True)
            sys.stderr.flush()
            uvicorn.Server(config).run(sockets=[listener])
        except KeyboardInterrupt as e:  # uvicorn closed every connection first, then re-raised the signal
            typer.echo(f"glmvoice serve stopped ({signals.describe(e)})", err=True)
        except OSError as e:
            raise UsageError(f"cannot serve: {e.strerror or e}") from e
        finally:
            listener.close()


def _check_exposure(host: str, api_key: str | None) -> None:
    """Loopback is the default; any other address is reachable by others: refuse it without a key."""
    if api_key is None and not _is_loopback(host):
        raise UsageError(f"--host {host} serves other machines: give --api-key KEY (clients send it as their "
                         "API key), or keep the default 127.0.0.1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host
