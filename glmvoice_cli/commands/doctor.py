"""`glmvoice doctor`: what this machine has, what the assistant needs, and what to do about each gap.

Each check is a `Check(area, status, detail, fix)`; nothing here raises for a failed check, and the
heavy packages are imported inside the checks so that a broken install is reported, not crashed on.
"""

from __future__ import annotations

import functools
import importlib
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from glmvoice_cli import __version__
from glmvoice_cli.errors import GlmVoiceError
from glmvoice_cli.models import hub, settings

OK, WARN, FAIL = "ok", "warn", "fail"
GIB = 2**30
LM_BF16_GIB = 19.1  # language model weights in bf16
HUB_PROBE_TIMEOUT_S = 3.0  # doctor must not hang on a dead network
ALL_STAGES_BF16_GIB = 22  # LM bf16 + tokenizer + decoder (fp32) + a KV cache: what one GPU needs


@dataclass(frozen=True)
class Check:
    area: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_packages() -> list[Check]:
    checks = [Check("glmvoice", OK, f"{__version__} on Python {platform.python_version()} ({sys.platform})")]
    required = ("torch", "transformers", "numpy", "soundfile", "soxr", "safetensors", "huggingface_hub", "tiktoken",
                "webrtcvad-wheels", "sounddevice", "typer", "rich")
    for dist in required:
        version = _version(dist)
        checks.append(Check(dist, OK, version) if version else
                      Check(dist, FAIL, "not installed", f"pip install '{dist}' (or reinstall glmvoice)"))
    checks.append(check_echo())
    checks.append(check_server())
    checks.append(check_turn_detector())
    try:
        import soundfile

        checks.append(Check("libsndfile", OK, soundfile.__libsndfile_version__))
    except (ImportError, OSError) as e:
        checks.append(Check("libsndfile", FAIL, f"cannot load: {e}", "apt install libsndfile1 / brew install libsndfile"))
    return checks


def check_server() -> Check:
    """Whether `glmvoice serve` can run: its optional extra (Starlette, uvicorn, websockets)."""
    missing = [dist for dist in ("starlette", "uvicorn", "websockets") if _version(dist) is None]
    if missing:
        return Check("glmvoice serve", WARN, f"not available ({', '.join(missing)} not installed)",
                     "pip install 'glmvoice[server]' (only needed to serve the Realtime API)")
    return Check("glmvoice serve", OK, f"Realtime API server ready (starlette {_version('starlette')}, "
                 f"uvicorn {_version('uvicorn')})")


def check_turn_detector() -> Check:
    """The optional smart end-of-turn detector (`--turn-detector smart`, `semantic_vad`): its model and runtime."""
    import importlib.util

    from glmvoice_cli.models.settings import turn_model_path

    path = turn_model_path()
    runtime = importlib.util.find_spec("onnxruntime") is not None
    if path is not None and runtime:
        return Check("turn detector", OK, f"Smart Turn v3 at {path} (onnxruntime {_version('onnxruntime')})")
    missing = [what for what, ok in (("its model", path is not None), ("onnxruntime", runtime)) if not ok]
    return Check("turn detector", WARN, f"smart turn detection unavailable ({' and '.join(missing)} missing); "
                 "turns end on silence", "glmvoice models download turn; pip install 'glmvoice[turn]'")


def check_echo() -> Check:
    """Which echo canceller `chat` uses: WebRTC AEC3 (the optional livekit) or the numpy NLMS filter."""
    from glmvoice_cli.audio.echo import webrtc_available

    if webrtc_available():
        return Check("echo canceller", OK, f"WebRTC AEC3 (livekit {_version('livekit')})")
    return Check("echo canceller", WARN, "numpy NLMS filter (livekit is not installed): less suppression "
                 "of the assistant's own voice", "pip install 'glmvoice[aec]', or use headphones (--headphones)")


def check_device() -> list[Check]:
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        return [Check("device", FAIL, f"torch does not import: {e}", "pip install torch")]
    if torch.cuda.is_available():
        checks = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            detail = f"cuda:{i} {name}, {free / GIB:.1f} of {total / GIB:.1f} GiB free"
            if free / GIB >= ALL_STAGES_BF16_GIB:
                checks.append(Check("device", OK, detail))
            else:
                checks.append(Check("device", WARN, detail + f" (bf16 needs about {ALL_STAGES_BF16_GIB} GiB)",
                                    "load the language model in 4 bits: --quantize 4 (pip install 'glmvoice[quant]')"))
        return checks
    if torch.backends.mps.is_available():
        return [Check("device", OK, "Apple MPS")]
    # The thread count is the threads line's business (one figure, from the same rule chat uses).
    return [Check("device", WARN, "CPU only: answers will be far slower than real time with the 9B model",
                  "use a CUDA GPU with 24 GB, or 12 GB with --quantize 4")]


def check_decode_loop(device: str | None = None, dtype: str | None = None) -> list[Check]:
    """Which language-model decode loop a chat on this machine runs, and what that means for its ids: in fp32
    the eager loop (dynamic cache) and the static cache (--compile) give the same ids; in bf16 or fp16 they
    round differently, so the same seed gives other (equally accurate) answers on the two (README)."""
    import torch

    from glmvoice_cli.device import DTYPES, pick_device

    chosen = pick_device(device)
    if dtype and dtype != "auto":
        half = DTYPES.get(dtype.lower(), torch.float32) != torch.float32
    else:
        half = chosen.type == "cuda"  # the default: bf16 on CUDA
    loop = "static cache, compiled" if chosen.type == "cuda" else "eager, dynamic cache"
    name = "bf16/fp16" if half else "fp32"
    if not half:
        return [Check("LM decode loop", OK, f"{loop}, {name}: --compile and --no-compile give the same ids")]
    other = "--no-compile (dynamic cache)" if chosen.type == "cuda" else "--compile (static cache)"
    return [Check("LM decode loop", OK, f"{loop}, {name}: {other} rounds differently, so the same seed gives "
                  "other, equally accurate answers with it (README: cache paths)")]


def check_audio() -> list[Check]:
    from glmvoice_cli.audio.devices import list_devices, portaudio_problem

    problem = portaudio_problem()
    if problem is not None:
        return [Check("portaudio", FAIL, problem)]  # the message names the package to install
    checks = [Check("portaudio", OK, "loaded")]
    try:
        devices = list_devices()
    except GlmVoiceError as e:
        return [Check("audio", FAIL, str(e), "tts -o FILE and transcribe work without audio devices")]
    inputs = [d for d in devices if d.max_input_channels > 0]
    outputs = [d for d in devices if d.max_output_channels > 0]
    checks += [Check("microphone", OK, f"{len(inputs)} input device(s)") if inputs else
              Check("microphone", FAIL, "no input device", "plug in a microphone; chat --input-file FILE works without")]
    checks.append(Check("speaker", OK, f"{len(outputs)} output device(s)") if outputs else
                  Check("speaker", FAIL, "no output device", "use -o FILE / --output FILE"))
    return checks


def check_models() -> list[Check]:
    checks = []
    for name in hub.STAGES:
        stage = hub.get_stage(name)
        try:
            where = settings.locate(name)
        except GlmVoiceError as e:
            checks.append(Check(f"model {name}", FAIL, str(e), "fix the setting named above"))
            continue
        status = hub.inspect_stage(stage, where.path)
        detail = f"{where.path} ({where.source_label}), {status.size_bytes / GIB:.2f} GiB"
        if status.complete:
            checks.append(Check(f"model {name}", OK, detail, f"checksums: glmvoice models verify {name}"))
        else:
            what = "absent" if not status.exists else f"incomplete, missing {hub.short_list(status.missing)}"
            checks.append(Check(f"model {name}", FAIL, f"{detail}: {what}", f"glmvoice models download {name}"))
        if name == "lm" and status.exists:
            checks.append(_sampling_check(where.path))
    return checks


def _sampling_check(folder: Path) -> Check:
    """The sampling a chat would use with this LM folder (its generation_config.json, else the demo's)."""
    from glmvoice_cli.lm.sampling import read_sampling

    try:
        return Check("sampling", OK, read_sampling(folder).describe(), "--temperature/--top-p override it")
    except GlmVoiceError as e:
        return Check("sampling", FAIL, str(e), "fix or remove the file")


def check_settings() -> list[Check]:
    path = settings.config_path()
    try:
        settings.load_config(path)
        detail = f"{path}" if path.is_file() else f"{path} (not present; defaults in use)"
        checks = [Check("config", OK, detail)]
    except GlmVoiceError as e:
        checks = [Check("config", FAIL, str(e), f"fix or remove {path}")]
    from glmvoice_cli.models.cache import hub_cache_dir

    root = hub_cache_dir()
    free = shutil.disk_usage(_existing_parent(root)).free / GIB
    elsewhere = _set_elsewhere()
    if len(elsewhere) == len(hub.STAGES):
        # Every model comes from a setting: the download cache is not where they are, so do not suggest it is.
        disk = Check("cache", OK, f"{root}, {free:.0f} GiB free (unused: every model comes from "
                     f"{_sources(elsewhere)})")
    elif free < ALL_STAGES_BF16_GIB:
        disk = Check("cache", WARN, f"{root}, {free:.0f} GiB free on its disk (the models need about "
                     f"{ALL_STAGES_BF16_GIB} GiB)", "set HF_HOME (or GLMVOICE_HOME) to a folder on a bigger disk")
    else:
        disk = Check("cache", OK, f"{root}, {free:.0f} GiB free on its disk")
    checks.append(disk)
    checks.append(check_hub(elsewhere))
    return checks


def _set_elsewhere() -> dict[str, str]:
    """Stage -> the setting that places it outside the download cache (a flag, a variable, config.toml)."""
    found: dict[str, str] = {}
    for name in hub.STAGES:
        try:
            source = settings.locate(name).source
        except GlmVoiceError:
            continue  # the model lines report a broken setting
        if source is not None:
            found[name] = source
    return found


def _sources(elsewhere: dict[str, str]) -> str:
    return ", ".join(dict.fromkeys(elsewhere.values()))


def _where_models_are(elsewhere: dict[str, str]) -> str:
    """Where the models are read from, in words: the cache, the settings, or both."""
    from glmvoice_cli.models.cache import hub_cache_dir

    if not elsewhere:
        return f"in {hub_cache_dir()}"
    if len(elsewhere) == len(hub.STAGES):
        return f"where {_sources(elsewhere)} says"
    return f"where {_sources(elsewhere)} says ({', '.join(elsewhere)}) or in {hub_cache_dir()}"


def check_hub(elsewhere: dict[str, str] | None = None) -> Check:
    """Offline mode is fine when every model is present; online, the Hub must answer. `elsewhere`: the models
    a setting places outside the cache (`_set_elsewhere`, looked up when not given)."""
    from glmvoice_cli.models.cache import hub_cache_dir

    endpoint = hub.hub_endpoint() or hub.DEFAULT_ENDPOINT
    if hub.is_offline():
        missing = [n for n in hub.STAGES if not hub.inspect_stage(hub.STAGES[n], settings.locate(n).path).complete]
        if not missing:
            return Check("hub", OK, f"offline mode (HF_HUB_OFFLINE); every model is present, "
                         f"{_where_models_are(_set_elsewhere() if elsewhere is None else elsewhere)}")
        return Check("hub", WARN, f"offline mode (HF_HUB_OFFLINE) and {', '.join(missing)} missing",
                     "unset HF_HUB_OFFLINE to download the missing models")
    try:
        hub.check_reachable(endpoint, timeout_s=HUB_PROBE_TIMEOUT_S)
    except GlmVoiceError as e:
        return Check("hub", WARN, f"unreachable: {e}", "models already downloaded still work; "
                     "check the network or set HF_ENDPOINT to a mirror to download")
    return Check("hub", OK, f"{endpoint} reachable; downloads go to {hub_cache_dir()}")


def check_memory(device: str | None = None, dtype: str | None = None, quantize: int | None = None) -> list[Check]:
    """Whether the three models fit in the chosen device's memory at the chosen dtype, and what to do if not."""
    from glmvoice_cli.models.memory_need import memory_need

    need = memory_need(tuple(hub.STAGES), models=None, overrides={}, device=device, dtype=dtype, quantize=quantize)
    have = "unknown" if need.available_bytes is None else f"{need.available_bytes / 1e9:.1f} GB available"
    detail = f"the models need about {need.needed_bytes / 1e9:.0f} GB of {need.where} in {need.dtype}; {have}"
    if need.fits:
        return [Check("memory", OK, detail)]
    return [Check("memory", FAIL, detail, need.advice().split(": ", 1)[-1])]


def check_threads(threads: int | None = None) -> list[Check]:
    """The CPU threads torch will use, and why (a busy CPU with too many threads is several times slower)."""
    from glmvoice_cli.threads import default_threads

    auto = default_threads()
    load = "" if auto.load is None else f", load {auto.load:.1f}"
    if threads is not None:
        detail = f"{threads} (set by --threads / GLMVOICE_THREADS / config threads; {auto.cpus} CPUs{load})"
        status = WARN if threads > auto.cpus else OK
        return [Check("threads", status, detail, f"use at most {auto.cpus}: more threads than CPUs slow runs down")]
    return [Check("threads", OK, f"{auto.count} (automatic: {auto.cpus} CPUs{load}; set --threads to choose)")]


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


CHECKS: tuple[Callable[[], list[Check]], ...] = (check_packages, check_device, check_audio, check_models,
                                                 check_settings)


def run_checks(threads: int | None = None, device: str | None = None, dtype: str | None = None,
               quantize: int | None = None) -> list[Check]:
    results: list[Check] = []
    checks: list[Callable[[], list[Check]]] = [*CHECKS, functools.partial(check_memory, device, dtype, quantize),
                                               functools.partial(check_decode_loop, device, dtype),
                                               functools.partial(check_threads, threads)]
    for check in checks:
        try:
            results.extend(check())
        except Exception as e:  # noqa: BLE001 - a doctor must report a broken environment, not crash on it
            name = getattr(getattr(check, "func", check), "__name__", "check").removeprefix("check_")
            results.append(Check(name, FAIL, f"{type(e).__name__}: {e}"))
    return results
