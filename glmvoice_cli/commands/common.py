"""Options shared by the commands that load models (types only: nothing heavy is imported)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glmvoice_cli.commands.conventions import is_quiet

if TYPE_CHECKING:
    from glmvoice_cli.audio.end_of_turn import TurnJudge
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.options import LMServer
    from glmvoice_cli.pipeline.assistant import Assistant

log = logging.getLogger("glmvoice_cli")

# Bounds of the options with a physical meaning, checked when the command line is parsed (a value past them
# is a typo or a test of our patience, and would fail only after a minute of loading, or abort in a library).
MAX_THREADS = 1024  # libgomp aborts on absurd counts; no CPU here has more
MAX_TEMPERATURE = 10.0  # past a few the output is noise; inf and 1e308 break the softmax
MAX_LM_TIMEOUT_S = 3600.0  # silence allowed mid-answer: an hour is already "never"


def _positive_top_p(value: float | None) -> float | None:
    """--top-p 0 would keep no token at all: refused with the flag's other limits, before anything loads."""
    if value is not None and value <= 0.0:
        raise typer.BadParameter("Input should be greater than 0 (1 disables nucleus sampling)")
    return value


ModelsOpt = Annotated[Path | None, typer.Option(
    "--models", help="A folder holding tokenizer/, lm/ and decoder/ (default: the download cache).", rich_help_panel="Models")]
TokenizerOpt = Annotated[Path | None, typer.Option("--tokenizer", help="Speech tokenizer folder.", rich_help_panel="Models")]
LmOpt = Annotated[Path | None, typer.Option("--lm", help="Language model folder (glm-4-voice-9b).", rich_help_panel="Models")]
DecoderOpt = Annotated[Path | None, typer.Option("--decoder", help="Speech decoder folder.", rich_help_panel="Models")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel="Models")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="Language model precision: auto (bf16 on CUDA, else fp32), fp32, bf16 or fp16.", rich_help_panel="Models")]
QuantizeOpt = Annotated[int | None, typer.Option(
    "--quantize", help="Load the language model in 4 or 8 bits (CUDA; pip install 'glmvoice\\[quant]').", rich_help_panel="Models")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    "--max-new-tokens", min=1, max=1_000_000, help="Cap on generated tokens per answer (or per piece / window).", rich_help_panel="Sampling")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", min=0, max=2**64 - 1, help="Seed for sampling and the decoder's noise (0 to 2**64-1).", rich_help_panel="Sampling")]
SCHEDULE_NAMES = ("default", "reference")  # decoder.speech_decoder.SCHEDULES' keys, without importing torch


def known_schedule(value: str) -> str:
    """`--schedule`'s check, at parse time (every command that takes it)."""
    if value not in SCHEDULE_NAMES:
        raise typer.BadParameter(f"unknown schedule {value!r}: not one of {', '.join(SCHEDULE_NAMES)}")
    return value


ScheduleOpt = Annotated[str, typer.Option(
    "--schedule", callback=known_schedule, autocompletion=lambda incomplete: [n for n in SCHEDULE_NAMES if n.startswith(incomplete)],
    help="Speech decoder blocks: 'default' (first audio after 10 tokens) or 'reference' (the GLM-4-Voice demo's: "
    "first block 25 tokens, the whole answer re-encoded as prompt, noise re-seeded per block).", rich_help_panel="Models")]
CompileOpt = Annotated[bool | None, typer.Option(
    "--compile/--no-compile", help="Static cache + compiled LM decode step (default: on with CUDA, off on CPU).", rich_help_panel="Models")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, max=MAX_THREADS, help="CPU threads for torch (default: the CPUs not already busy; see glmvoice doctor).", rich_help_panel="Models")]
TemperatureOpt = Annotated[float | None, typer.Option(
    "--temperature", min=0.0, max=MAX_TEMPERATURE, help="Sampling temperature; 0 = greedy (default: 0.2, transcribe: 0).", rich_help_panel="Sampling")]
TopPOpt = Annotated[float | None, typer.Option(
    "--top-p", min=0.0, max=1.0, callback=_positive_top_p, help="Nucleus sampling mass kept; 1 disables (default: 0.8).", rich_help_panel="Sampling")]


def with_sampling(options: GenerationOptions, temperature: float | None, top_p: float | None
                  ) -> GenerationOptions:
    """`options` with the sampling values given (None keeps the default)."""
    from dataclasses import replace

    if temperature is not None:
        options = replace(options, temperature=temperature)
    if top_p is not None:
        options = replace(options, top_p=top_p)
    return options


def sampling(temperature: float | None, top_p: float | None) -> dict[str, float]:
    """GenerationOptions keyword arguments for the values given; the others keep their defaults."""
    given = {"temperature": temperature, "top_p": top_p}
    return {k: v for k, v in given.items() if v is not None}


def use_threads(threads: int | None) -> int:
    """Set torch's thread count (given, else the default of glmvoice_cli.threads) and return it."""
    import torch

    from glmvoice_cli.threads import default_threads

    count = threads or default_threads().count
    torch.set_num_threads(count)
    return count


LmUrlOpt = Annotated[str | None, typer.Option(
    "--lm-url", help="Run the LM on this OpenAI-compatible server (vLLM, see `glmvoice serve-lm`).", rich_help_panel="LM server")]
LmApiKeyOpt = Annotated[str | None, typer.Option(
    "--lm-api-key", help="API key of the --lm-url server.", rich_help_panel="LM server")]
LmModelOpt = Annotated[str | None, typer.Option(
    "--lm-model", help="Model name on the --lm-url server (default: its only model).", rich_help_panel="LM server")]
LmTimeoutOpt = Annotated[float | None, typer.Option(
    "--lm-timeout", min=0.1, max=MAX_LM_TIMEOUT_S, help="Seconds the --lm-url server may stay silent mid-answer (default 60).", rich_help_panel="LM server")]


def lm_server(url: str | None, api_key: str | None, model: str | None, timeout_s: float | None) -> LMServer | None:
    """The --lm-url server (flag, GLMVOICE_LM_URL or lm_url in config.toml); None: the LM runs in-process.

    An empty value counts as unset, so `GLMVOICE_LM_URL=` in a shell turns a configured server off.
    """
    from glmvoice_cli.options import DEFAULT_LM_TIMEOUT_S, LMServer

    url = (url or "").strip()
    if not url:
        return None
    return LMServer(url, (api_key or "").strip() or None, (model or "").strip() or None,
                    timeout_s or DEFAULT_LM_TIMEOUT_S)


def load_turn_judge(*, required: bool, models: Path | None = None) -> TurnJudge | None:
    """The Smart Turn detector (models cache, then an installed pipecat-ai). Missing: a one-line error naming the
    download when `required` (`--turn-detector smart`), else None (`serve` offers semantic_vad only with it)."""
    from glmvoice_cli.audio.end_of_turn import SmartTurn
    from glmvoice_cli.errors import GlmVoiceError, ModelNotFoundError
    from glmvoice_cli.models.settings import turn_model_path

    path = turn_model_path(models)
    if path is None:
        if required:
            raise ModelNotFoundError("--turn-detector smart needs the Smart Turn model: glmvoice models download turn")
        return None
    try:
        return SmartTurn(path)
    except GlmVoiceError as e:
        if required:
            raise
        log.warning("semantic_vad is off: %s", e)  # one line: the server runs on with server_vad
        return None


def load_assistant(stages: tuple[str, ...], *, models: Path | None, overrides: dict[str, Path | None],
                   device: str | None, dtype: str | None, quantize: int | None = None, seed: int | None = None,
                   compile: bool | None = None, server: LMServer | None = None, schedule: str = "default",
                   for_other_thread: bool = False) -> Assistant:
    """Check memory, find (or offer to fetch) the stages' folders and load them, showing each stage and slow
    steps (the LM's compile) on stderr. `server` runs the LM remotely (only its config and tokenizer are needed).

    `for_other_thread`: the models will run on another thread (the chat's model thread), so they load on a
    thread that ends (see `threads.on_passing_thread`); otherwise on the caller's, which runs them (its CUDA
    graphs, recorded while loading, then serve the first turn)."""
    from glmvoice_cli.commands.models import ensure_models
    from glmvoice_cli.errors import UsageError
    from glmvoice_cli.models.memory_need import memory_need
    from glmvoice_cli.options import LoadOptions
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.threads import on_passing_thread

    if server is not None and quantize is not None:
        raise UsageError("--quantize applies to the in-process LM; with --lm-url the server chooses its weights "
                         "(e.g. `glmvoice serve-lm --quantization fp8`)")
    # With a remote LM only the tokenizer and decoder take memory here.
    local = tuple(s for s in stages if server is None or s != "lm")
    need = memory_need(local, models=models, overrides=overrides, device=device, dtype=dtype, quantize=quantize)
    dirs = ensure_models(stages, models=models, overrides=overrides, memory=need, lm_weights=server is None)
    if not need.fits:
        log.warning(need.advice())
    options = LoadOptions(device=device, dtype=dtype, quantize_bits=quantize, seed=seed, compile=compile,
                          lm_server=server, schedule=schedule)
    with stage_progress("loading") as (on_stage, on_status):
        def load() -> Assistant:
            return Assistant.load(dirs, options, on_status=on_status, on_stage=on_stage)

        assistant = on_passing_thread(load) if for_other_thread else load()
    for warning in assistant.warnings:
        log.warning(warning)
    return assistant


@contextmanager
def status_line(text: str) -> Iterator[None]:
    """A spinner with `text` on stderr while a long step runs; nothing when stderr is not a terminal or -q."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal or is_quiet():
        yield
        return
    with console.status(text):
        yield


StageCallback = Callable[[str, str, float | None], None]


@contextmanager
def stage_progress(verb: str) -> Iterator[tuple[StageCallback, Callable[[str], None]]]:
    """Two callbacks for Assistant.load: (stage, folder, seconds or None when starting) and a slow step's
    text. On a terminal, a spinner per stage and a line when each is loaded; piped, nothing (-v logs them)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal or is_quiet():
        def quiet(stage: str, folder: str, seconds: float | None) -> None:
            if seconds is not None:
                log.info("%s the %s from %s: %.1f s", verb, stage, folder, seconds)

        yield quiet, lambda text: log.info("%s", text)
        return
    with console.status(f"{verb} the models") as status:
        def show(stage: str, folder: str, seconds: float | None) -> None:
            if seconds is None:
                status.update(f"{verb} the {stage} from {folder}")
            else:
                console.print(f"[dim]{verb} the {stage}: {seconds:.1f} s[/]", highlight=False)

        yield show, status.update
