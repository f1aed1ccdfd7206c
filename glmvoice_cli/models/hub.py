"""The three model stages on the Hugging Face Hub: which files each needs, whether a folder holds
them, and how to fetch them.

Pure with respect to location: every function takes the stage folder it works on, and
`settings.py` decides where that folder is. huggingface_hub is imported inside `download_stage`,
so listing or inspecting models never pays for it. Nothing here prints; progress goes to an
optional `DownloadReporter`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from glmvoice_cli.errors import CheckpointError, GlmVoiceError, HubUnreachableError, ModelNotFoundError
from glmvoice_cli.files import loads_json, read_limited
from glmvoice_cli.models.progress import DownloadReporter, reporter_bar

DEFAULT_REVISION = "main"
INDEX_MAX_BYTES = 16 << 20  # a safetensors index is a few dozen KiB
DEFAULT_ENDPOINT = "https://huggingface.co"
DOWNLOAD_WORKERS = 8  # files fetched at once (huggingface_hub's own snapshot_download default)
REACH_TIMEOUT_S = 5.0  # to open a connection to the Hub before any download
_PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}
_MAX_REASON_CHARS = 200  # of the library's message, inside our one-line error
_AUTH_STATUSES = (401, 403)
_HTTP_CLIENT_MODULES = {"httpx", "httpx2", "httpcore", "requests", "urllib3"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One model of the pipeline and the files a folder of it must hold."""

    name: str  # "tokenizer" | "lm" | "decoder": also the folder name under the models root
    repo_id: str  # official Hugging Face repository
    files: tuple[str, ...]  # fetched, and required for the folder to count as complete
    extra_files: tuple[str, ...] = ()  # fetched when the repository has them, never required
    weights_index: str | None = None  # JSON index whose "weight_map" names the weight shards
    single_weights: str | None = None  # an unsharded file that may stand in for the index and shards
    approx_bytes: int = 0  # published download size, shown before a download is offered
    title: str = ""  # what the stage does, for listings
    fetch_flags: str = ""  # appended to the download command (a partial stage's option)

    @property
    def fetch_command(self) -> str:
        return f"glmvoice models download {self.name}{' ' + self.fetch_flags if self.fetch_flags else ''}"


TOKENIZER = Stage(
    name="tokenizer",
    repo_id="THUDM/glm-4-voice-tokenizer",
    files=("config.json", "preprocessor_config.json", "model.safetensors"),
    approx_bytes=1_458_349_056 + 4_000,  # fp32 Whisper-VQ encoder + two JSON files
    title="speech tokenizer (16 kHz speech -> audio tokens)",
)
LM = Stage(
    name="lm",
    repo_id="THUDM/glm-4-voice-9b",
    files=("config.json", "tokenizer.model", "tokenizer_config.json"),
    # transformers runs without generation_config.json, and locally written folders omit it
    extra_files=("generation_config.json",),
    weights_index="model.safetensors.index.json",
    single_weights="model.safetensors",
    approx_bytes=19_090_000_000 + 6_000_000,  # 4 bf16 shards + tokenizer files
    title="GLM-4-Voice-9B language model (text and audio tokens)",
)
DECODER = Stage(
    name="decoder",
    repo_id="THUDM/glm-4-voice-decoder",
    files=("config.yaml", "flow.pt", "hift.pt"),
    approx_bytes=445_000_000 + 81_900_000 + 4_447,
    title="speech decoder (audio tokens -> 22.05 kHz speech)",
)

TURN = Stage(
    name="turn",
    repo_id="pipecat-ai/smart-turn-v3",
    files=("smart-turn-v3.2-cpu.onnx",),
    approx_bytes=8_679_182,
    title="Smart Turn v3 end-of-turn detector (optional: --turn-detector smart)",
)

STAGES: dict[str, Stage] = {s.name: s for s in (TOKENIZER, LM, DECODER)}  # the pipeline
ALL_STAGES: dict[str, Stage] = {**STAGES, TURN.name: TURN}  # and the optional models, for `glmvoice models`

# With the LM on a server (--lm-url), this machine needs only the LM's config and tokenizer files.
LM_WITHOUT_WEIGHTS = replace(
    LM, weights_index=None, single_weights=None, approx_bytes=6_000_000, fetch_flags="--no-weights",
    title="GLM-4-Voice-9B config and tokenizer (the LM itself runs on a server)",
)


def stage_files(name: str, *, weights: bool = True) -> Stage:
    """The stage called `name`; `weights=False` asks for the LM's config and tokenizer only."""
    stage = get_stage(name)
    return LM_WITHOUT_WEIGHTS if stage is LM and not weights else stage


def get_stage(name: str) -> Stage:
    """The stage called `name`, or a ModelNotFoundError listing the valid names."""
    try:
        return ALL_STAGES[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model {name!r}; choose one of {', '.join(ALL_STAGES)}") from None


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class StageStatus:
    """What a folder holds of one stage."""

    stage: Stage
    path: Path
    required: tuple[str, ...]  # every file the folder needs, in fetch order
    missing: tuple[str, ...]  # required files absent or empty (an unreadable index is listed too)
    size_bytes: int  # all files under the folder

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    @property
    def complete(self) -> bool:
        return self.exists and not self.missing

    @property
    def state(self) -> str:
        """One word for listings: complete, incomplete or absent."""
        if self.complete:
            return "complete"
        return "incomplete" if self.exists and any(self.path.iterdir()) else "absent"


def _is_safe_name(name: str) -> bool:
    """A shard name must stay inside its folder: no separators, no dot-files, no drive letters."""
    return (
        bool(name) and "/" not in name and "\\" not in name and ":" not in name and not name.startswith(".")
    )


def read_shard_names(index_path: Path) -> tuple[str, ...]:
    """Sorted, unique weight files named by a safetensors index's "weight_map"."""
    try:
        weight_map = loads_json(read_limited(index_path, INDEX_MAX_BYTES).decode("utf-8"))["weight_map"]
        names = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: unreadable weight index, key 'weight_map' ({e})") from e
    unsafe = [n for n in names if not _is_safe_name(n)]
    if unsafe or not names:
        what = f"unsafe file name {unsafe[0]!r}" if unsafe else "no weight files"
        raise CheckpointError(f"{index_path}: key 'weight_map' names {what}")
    return tuple(names)


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def required_files(stage: Stage, folder: Path) -> tuple[str, ...]:
    """The files `folder` must hold; for a sharded stage this depends on the index found there.

    Raises CheckpointError when the index exists but cannot be read.
    """
    files = list(stage.files)
    if stage.weights_index is None:
        return tuple(files)
    index = folder / stage.weights_index
    if _nonempty(index):
        return (*files, stage.weights_index, *read_shard_names(index))
    if stage.single_weights is not None and _nonempty(folder / stage.single_weights):
        return (*files, stage.single_weights)
    return (*files, stage.weights_index)  # the official layout: its shards are known once it exists


def folder_size(folder: Path) -> int:
    """Bytes of the files under `folder`, following links (a cache snapshot is links to blobs), each once;
    0 when it does not exist."""
    from glmvoice_cli.models.cache import true_size

    return true_size(folder)


def inspect_stage(stage: Stage, folder: Path) -> StageStatus:
    """Which of the stage's files `folder` holds (present means present and non-empty)."""
    folder = Path(folder)
    try:
        required = required_files(stage, folder)
        missing = tuple(f for f in required if not _nonempty(folder / f))
    except CheckpointError:
        required = (*stage.files, stage.weights_index or "")
        missing = (
            *(f for f in stage.files if not _nonempty(folder / f)),
            f"{stage.weights_index} (unreadable)",
        )
    return StageStatus(stage, folder, required, missing, folder_size(folder))


def require_complete(stage: Stage, folder: Path, source: str | None = None) -> Path:
    """`folder` if it holds every file of `stage`, else ModelNotFoundError saying what to do, on one line.

    `source` names where the folder came from when the user chose it (e.g. "--lm" or
    "GLMVOICE_MODELS"); None means the download cache.
    """
    unreadable = _unreadable(stage, Path(folder))
    if unreadable is not None:  # present but closed to us: "missing" would send the user to download it again
        chosen = "" if source is None else f" (from {source})"
        raise ModelNotFoundError(f"the {stage.name} model folder {folder}{chosen} cannot be read: {unreadable} "
                                 "(permission denied); fix its permissions")
    status = inspect_stage(stage, folder)
    if status.complete:
        return status.path
    what = "folder does not exist" if not status.exists else f"missing {short_list(status.missing)}"
    if source is None:
        raise ModelNotFoundError(
            f"the {stage.name} model is not downloaded ({folder}: {what}); "
            f"fetch it with `{stage.fetch_command}`"
        )
    raise ModelNotFoundError(
        f"the {stage.name} model folder {folder} (from {source}) is incomplete: {what}; "
        f"fix that path or fetch the model with `{stage.fetch_command}`"
    )


def _unreadable(stage: Stage, folder: Path) -> str | None:
    """The folder, or the first of the stage's files in it, that exists but this user may not read."""
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        return str(folder)
    for name in (*stage.files, stage.weights_index or "", stage.single_weights or ""):
        path = folder / name
        if name and path.is_file() and not os.access(path, os.R_OK):
            return str(path)
    return None


def short_list(names: Iterable[str], limit: int = 3) -> str:
    """ "a, b, c, ..." : enough names to act on while keeping an error on one line."""
    names = list(names)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def remove_stage(folder: Path) -> int:
    """Delete a stage folder and return the bytes freed (0 when it was absent)."""
    if folder.is_symlink():  # a link the user made: drop the link, never what it points to
        folder.unlink()
        return 0
    freed = folder_size(folder)
    if folder.is_dir():
        shutil.rmtree(folder)
    elif folder.exists():
        folder.unlink()
    return freed


# --------------------------------------------------------------------------- download


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; huggingface_hub itself reads it at import."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in _OFFLINE_ENVS)


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as set now (a mirror), or None for huggingface.co."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def download_stage(
    stage: Stage,
    folder: Path | None = None,
    *,
    revision: str = DEFAULT_REVISION,
    endpoint: str | None = None,
    reporter: DownloadReporter | None = None,
    force: bool = False,
    workers: int = DOWNLOAD_WORKERS,
) -> StageStatus:
    """Fetch the files of `stage` and return the final status of the folder holding them.

    `folder` None: into the Hugging Face cache (`cache.hub_cache_dir()`, the layout `hf download`,
    transformers and vLLM share); else into that plain folder. huggingface_hub's `snapshot_download`
    fetches only the stage's files (allow_patterns), `workers` at a time; files already there and
    unchanged on the Hub are kept; a transfer cut mid-file is resumed with HTTP Range requests. The
    sharded LM takes two batches: its small files and weight index, then the shards that index names.
    `endpoint` defaults to HF_ENDPOINT and the token to HF_TOKEN (huggingface_hub's own lookup). A host
    that cannot be reached fails at once, in one line. Offline (HF_HUB_OFFLINE), nothing is fetched: a
    complete folder is returned, anything else is a ModelNotFoundError.
    """
    from glmvoice_cli.models import cache

    if is_offline():
        return _offline_status(stage, folder)
    endpoint = endpoint or hub_endpoint()
    try:
        check_reachable(endpoint)
    except HubUnreachableError as e:
        present = None if force else complete_copy(stage, folder)
        if present is None:
            raise
        log.warning("%s; the %s model is complete in %s and kept as it is (not checked for updates)",
                    str(e).split(";")[0], stage.name, present.path)
        return present
    commit, listed = _resolve(stage, revision, endpoint, folder)
    index = [stage.weights_index] if stage.weights_index is not None else []
    absent = [f for f in (*stage.files, *index) if f not in listed]
    if absent:
        raise ModelNotFoundError(f"{stage.repo_id}@{revision} has no file {short_list(absent)}")
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    if folder is None:  # the branch's ref, as huggingface_hub writes it when given a branch
        cache.write_ref(stage.repo_id, revision, commit)
    where = Path(folder) if folder is not None else cache.repo_dir(stage.repo_id) / "snapshots" / commit
    fetch = functools.partial(_snapshot, stage, folder, where, commit=commit, endpoint=endpoint,
                              reporter=reporter, force=force, workers=workers)
    fetch("files", [n for n in (*stage.files, *stage.extra_files, *index) if n in listed])
    if stage.weights_index is not None:
        shards = read_shard_names(where / stage.weights_index)
        absent = [s for s in shards if s not in listed]
        if absent:
            raise ModelNotFoundError(f"{stage.repo_id}@{revision} has no file {short_list(absent)} "
                                     f"(named by {stage.weights_index})")
        fetch("weights", list(shards))
    status = inspect_stage(stage, where)
    if not status.complete:
        raise CheckpointError(
            f"{stage.name}: download finished but {where} still lacks {short_list(status.missing)}"
        )
    return status


def _resolve(stage: Stage, revision: str, endpoint: str | None, folder: Path | None) -> tuple[str, set[str]]:
    """The commit `revision` points to and the files the repository holds there (one API call).

    Resolving first pins both batches to one commit, and tells a file the repository lacks from one
    that failed to download (snapshot_download skips the first and falls back to disk on the second).
    """
    import huggingface_hub as hf

    with _hub_errors(stage, revision, endpoint, stage.files, folder):  # a failure names the files lacking
        info = hf.HfApi(endpoint=endpoint).model_info(stage.repo_id, revision=revision)
    if not info.sha:
        raise GlmVoiceError(f"{endpoint or DEFAULT_ENDPOINT} gave no commit for {stage.repo_id}@{revision}")
    return info.sha, {s.rfilename for s in info.siblings or ()}


def _snapshot(stage: Stage, folder: Path | None, where: Path, batch: str, names: list[str], *, commit: str,
              endpoint: str | None, reporter: DownloadReporter | None, force: bool, workers: int) -> None:
    """One `snapshot_download` of exactly `names` at `commit` into `where` (the cache snapshot, or `folder`
    as local_dir); a failure names the files still missing."""
    import huggingface_hub as hf

    from glmvoice_cli.models import cache

    target: dict[str, Any] = {"local_dir": folder} if folder is not None else {"cache_dir": cache.hub_cache_dir()}
    kept = set() if force else {n for n in names if _nonempty(where / n)}  # checked when they arrived
    with _quiet_hf_logs(), _hub_errors(stage, commit, endpoint, names, where):
        hf.snapshot_download(
            stage.repo_id,
            revision=commit,
            allow_patterns=[glob_escape(n) for n in names],
            **target,
            endpoint=endpoint,
            force_download=force,
            max_workers=max(1, workers),
            tqdm_class=reporter_bar(reporter, f"{stage.name}/{batch}"),
        )
    missing = [n for n in names if not _nonempty(where / n)]
    if missing:  # snapshot_download returns what is on disk when the file listing fails mid-way
        raise GlmVoiceError(_network_line(stage, missing, endpoint, "the file listing could not be read"))
    for name in names:  # bytes that arrived in this call: checked before the stage counts as complete
        if name not in kept:
            _verify_transfer(stage, where / name, name, endpoint)


def glob_escape(name: str) -> str:
    """`name` as an fnmatch pattern that matches only itself (allow_patterns are globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextmanager
def _quiet_hf_logs() -> Iterator[None]:
    """huggingface_hub logs each retry as a warning: our one-line error says what failed instead."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_reachable(endpoint: str | None = None, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to the Hub, or its HTTPS proxy, or raise one line with the cause.

    huggingface_hub retries an unreachable host for a minute with a log line per try; this answers in
    seconds.
    """
    import socket
    from urllib.parse import urlsplit

    url = endpoint or hub_endpoint() or DEFAULT_ENDPOINT
    proxy = next((os.environ[k] for k in _PROXY_ENVS if os.environ.get(k, "").strip()), None)
    parts = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        via = f" through the proxy {host}:{port}" if proxy else ""
        cause = e.strerror or str(e) or type(e).__name__
        raise HubUnreachableError(
            f"cannot reach {url}{via}: {cause}; check the network connection, or set HF_ENDPOINT to a mirror"
        ) from e


def complete_copy(stage: Stage, folder: Path | None) -> StageStatus | None:
    """The status of a complete copy of `stage` on disk (`folder`, or a snapshot in the cache), or None."""
    from glmvoice_cli.models import cache

    candidates = [folder] if folder is not None else cache.snapshots(stage.repo_id)
    for candidate in candidates:
        status = inspect_stage(stage, candidate)
        if status.complete:
            return status
    return None


def _offline_status(stage: Stage, folder: Path | None) -> StageStatus:
    from glmvoice_cli.models import cache

    present = complete_copy(stage, folder)
    if present is not None:
        return present
    candidates = [folder] if folder is not None else cache.snapshots(stage.repo_id)
    where = candidates[0] if candidates else cache.repo_dir(stage.repo_id)
    status = inspect_stage(stage, where)
    missing = short_list(status.missing) if status.exists else "all files"
    raise ModelNotFoundError(
        f"HF_HUB_OFFLINE is set and the {stage.name} model in {where} is missing {missing}; "
        f"unset HF_HUB_OFFLINE and run `{stage.fetch_command}`"
    )


@contextmanager
def _hub_errors(stage: Stage, revision: str, endpoint: str | None, names: Iterable[str],
                where: Path | None = None) -> Iterator[None]:
    """huggingface_hub's errors as one line; `names` (those not yet in `where`) say what is missing."""
    from huggingface_hub import errors as hf_errors

    def missing() -> list[str]:
        return [n for n in names if where is None or not _nonempty(where / n)] or [stage.repo_id]

    try:
        yield
    except hf_errors.OfflineModeIsEnabled as e:
        raise ModelNotFoundError(_offline_line(stage, where, missing())) from e
    except hf_errors.LocalEntryNotFoundError as e:  # before EntryNotFoundError: it subclasses it
        cause = e.__cause__
        if isinstance(cause, hf_errors.OfflineModeIsEnabled):
            raise ModelNotFoundError(_offline_line(stage, where, missing())) from e
        raise GlmVoiceError(_network_line(stage, missing(), endpoint, cause or e)) from e
    except hf_errors.EntryNotFoundError:  # a listed file vanished from the repository (HTTP 404)
        raise ModelNotFoundError(f"{stage.repo_id}@{revision} has no file {short_list(missing())}") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise GlmVoiceError(_network_line(stage, missing(), endpoint, e)) from e
    except Exception as e:  # transport errors of the HTTP client share no base class we can import cheaply
        if type(e).__module__.split(".")[0] not in _HTTP_CLIENT_MODULES:
            raise
        raise GlmVoiceError(_network_line(stage, missing(), endpoint, e)) from e


def _verify_transfer(stage: Stage, path: Path, filename: str, endpoint: str | None) -> None:
    """The bytes just downloaded against the checksum the hub sent with them (the ETag: sha256 of a large
    file, git blob id of a small one): a mirror or proxy serving other bytes of the same size passes
    huggingface_hub's own size check. A mismatch discards the file and raises one line."""
    from glmvoice_cli.models.cache import discard_download, matches_etag, recorded_etag

    etag = recorded_etag(path.parent, filename)
    verdict = matches_etag(path, etag) if etag else None
    if verdict is None or etag is None:
        log.warning("%s/%s: the hub sent no checksum to verify it against", stage.repo_id, filename)
        return
    if not verdict:
        discard_download(path.parent, filename)
        where = endpoint or DEFAULT_ENDPOINT
        raise CheckpointError(
            f"{stage.repo_id}/{filename} from {where} does not match the checksum the hub recorded for it "
            f"({etag[:16]}...): discarded; run `{stage.fetch_command}` again, or set HF_ENDPOINT to another mirror"
        )


def _offline_line(stage: Stage, where: Path | None, missing: list[str]) -> str:
    place = f" in {where}" if where is not None else ""
    return (
        f"HF_HUB_OFFLINE is set and the {stage.name} model{place} is missing {short_list(missing)}; "
        f"unset HF_HUB_OFFLINE and run `{stage.fetch_command}`"
    )


def _reason(error: BaseException) -> str:
    """A short cause: "HTTP 401 Unauthorized (server's message)" or the error's first line."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        phrase = str(getattr(response, "reason_phrase", "") or "")
        detail = getattr(response, "headers", {}).get("X-Error-Message")
        reason = f"HTTP {status} {phrase}".strip() + (f" ({detail})" if detail else "")
        if status in _AUTH_STATUSES:
            reason += "; check HF_TOKEN: it is missing, invalid or lacks access to the repository"
        return reason
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."


def _network_line(stage: Stage, missing: list[str], endpoint: str | None, error: BaseException | str) -> str:
    where = endpoint or DEFAULT_ENDPOINT
    what = stage.repo_id if missing == [stage.repo_id] else f"{stage.repo_id} ({short_list(missing)})"
    reason = error if isinstance(error, str) else _reason(error)
    return f"could not download {what} from {where}: {reason}; run `{stage.fetch_command}` again to resume"


def describe_missing(statuses: Iterable[StageStatus]) -> list[str]:
    """One line per incomplete stage, naming the command that completes it."""
    return [
        f"{s.stage.name}: {s.state} in {s.path}; run `{s.stage.fetch_command}`"
        for s in statuses
        if not s.complete
    ]
