"""`glmvoice doctor`: what this machine has, what the assistant needs, and what to do about each gap.

Each check is a `Check(area, status, detail, fix)`; nothing here raises for a failed check, and the
heavy packages are imported inside the checks so that a broken install is reported, not crashed on.
"""

from __future__ import annotations

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
    livekit = _version("livekit")
    checks.append(Check("livekit", OK, f"{livekit} (WebRTC echo cancellation)") if livekit else
                  Check("livekit", WARN, "not installed: echo cancellation falls back to a slower NLMS filter",
                        "pip install livekit"))
    try:
        import soundfile

        checks.append(Check("libsndfile", OK, soundfile.__libsndfile_version__))
    except (ImportError, OSError) as e:
        checks.append(Check("libsndfile", FAIL, f"cannot load: {e}", "apt install libsndfile1 / brew install libsndfile"))
    return checks


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
    return [Check("device", WARN, f"CPU only ({torch.get_num_threads()} threads): answers will be far slower than "
                  "real time with the 9B model", "use a CUDA GPU with 24 GB, or 12 GB with --quantize 4")]


def check_audio() -> list[Check]:
    from glmvoice_cli.audio.devices import list_devices

    try:
        devices = list_devices()
    except GlmVoiceError as e:
        return [Check("audio", FAIL, str(e), "tts -o FILE and transcribe work without audio devices")]
    inputs = [d for d in devices if d.max_input_channels > 0]
    outputs = [d for d in devices if d.max_output_channels > 0]
    checks = [Check("microphone", OK, f"{len(inputs)} input device(s)") if inputs else
              Check("microphone", FAIL, "no input device", "plug in a microphone; chat --input-file FILE works without")]
    checks.append(Check("speaker", OK, f"{len(outputs)} output device(s)") if outputs else
                  Check("speaker", FAIL, "no output device", "use -o FILE / --output-file FILE"))
    return checks


def check_models() -> list[Check]:
    checks = []
    for name in hub.STAGES:
        stage = hub.get_stage(name)
        try:
            where = settings.locate(name)
        except GlmVoiceError as e:
            checks.append(Check(f"model {name}", FAIL, str(e), f"fix {settings.config_path()}"))
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
    root = settings.cache_root()
    free = shutil.disk_usage(_existing_parent(root)).free / GIB
    disk = Check("cache", OK, f"{root}, {free:.0f} GiB free on its disk")
    if free < ALL_STAGES_BF16_GIB:
        disk = Check("cache", WARN, disk.detail + f" (the models need about {ALL_STAGES_BF16_GIB} GiB)",
                     "set GLMVOICE_HOME to a bigger disk")
    checks.append(disk)
    offline = hub.is_offline()
    endpoint = hub.hub_endpoint() or "https://huggingface.co"
    checks.append(Check("hub", WARN if offline else OK, f"{endpoint}{' (offline mode)' if offline else ''}",
                        "unset HF_HUB_OFFLINE to download" if offline else ""))
    return checks


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


CHECKS: tuple[Callable[[], list[Check]], ...] = (check_packages, check_device, check_audio, check_models,
                                                 check_settings)


def run_checks() -> list[Check]:
    results: list[Check] = []
    for check in CHECKS:
        try:
            results.extend(check())
        except Exception as e:  # noqa: BLE001 - a doctor must report a broken environment, not crash on it
            results.append(Check(check.__name__.removeprefix("check_"), FAIL, f"{type(e).__name__}: {e}"))
    return results
