"""Options shared by the commands that load models (types only: nothing heavy is imported)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from glmvoice_cli.pipeline import Assistant

ModelsOpt = Annotated[Path | None, typer.Option(
    "--models", help="A folder holding tokenizer/, lm/ and decoder/ (default: the download cache).")]
TokenizerOpt = Annotated[Path | None, typer.Option("--tokenizer", help="Speech tokenizer folder.")]
LmOpt = Annotated[Path | None, typer.Option("--lm", help="Language model folder (glm-4-voice-9b).")]
DecoderOpt = Annotated[Path | None, typer.Option("--decoder", help="Speech decoder folder.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="Language model precision: auto (bf16 on CUDA, else fp32), fp32, bf16 or fp16.")]
QuantizeOpt = Annotated[int | None, typer.Option(
    "--quantize", help="Load the language model in 4 or 8 bits (CUDA; pip install 'glmvoice\\[quant]').")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    "--max-new-tokens", min=1, help="Cap on generated tokens per answer (or per piece / window).")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", min=0, max=2**64 - 1, help="Seed for sampling and the decoder's noise (0 to 2**64-1).")]
CompileOpt = Annotated[bool | None, typer.Option(
    "--compile/--no-compile", help="Static cache + compiled LM decode step (default: on with CUDA, off on CPU).")]


def load_assistant(stages: tuple[str, ...], *, models: Path | None, overrides: dict[str, Path | None],
                   device: str | None, dtype: str | None, quantize: int | None = None, seed: int | None = None,
                   compile: bool | None = None) -> Assistant:
    """Find (or offer to fetch) the stages' folders and load them; slow steps show a status line."""
    from rich.console import Console

    from glmvoice_cli.commands.models import ensure_models
    from glmvoice_cli.options import LoadOptions
    from glmvoice_cli.pipeline import Assistant

    dirs = ensure_models(stages, models=models, overrides=overrides)
    options = LoadOptions(device=device, dtype=dtype, quantize_bits=quantize, seed=seed, compile=compile)
    err = Console(stderr=True)
    with err.status("loading the models") as status:
        assistant = Assistant.load(dirs, options, on_status=lambda text: status.update(text))
    for warning in assistant.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return assistant
