"""`glmvoice transcribe`: speech files to text with the language model, one model load for all."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from glmvoice_cli.commands.common import (
    CompileOpt,
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
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TokenizerOpt,
    TopPOpt,
    lm_server,
    load_assistant,
    sampling,
    use_threads,
)
from glmvoice_cli.config import WINDOW_SECONDS

SILENCE_PEAK = 1e-4  # -80 dBFS: below this a file holds no speech, only digital silence


def transcribe(
    files: Annotated[list[Path], typer.Argument(help="Audio files (wav, flac, ogg, mp3; any rate or channels).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per file: file, text, seconds, "
                                          "tokens, timings.")] = False,
    prompt: Annotated[str | None, typer.Option(help="Replace the transcription instruction.")] = None,
    window: Annotated[float, typer.Option(min=1.0, help="Seconds of audio per model call.")] = WINDOW_SECONDS,
    models: ModelsOpt = None, tokenizer: TokenizerOpt = None, lm: LmOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None, compile_lm: CompileOpt = None,
    max_new_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    seed: SeedOpt = None, threads: ThreadsOpt = None,
    lm_url: LmUrlOpt = None, lm_api_key: LmApiKeyOpt = None, lm_model: LmModelOpt = None,
    lm_timeout: LmTimeoutOpt = None,
) -> None:
    """Transcribe each FILE with GLM-4-Voice (the speech plus an instruction, text-only output)."""
    import numpy as np
    from rich.console import Console

    from glmvoice_cli.audio.io import load_audio
    from glmvoice_cli.errors import AudioError, UsageError
    from glmvoice_cli.pipeline.transcribe import WINDOW_TRANSCRIPT_MAX_TOKENS
    from glmvoice_cli.pipeline.transcribe import transcribe as run

    if not window < float("inf"):
        raise UsageError("--window must be a finite number of seconds")
    err = Console(stderr=True)
    audios = [load_audio(f) for f in files]  # every file is checked before the models load
    for audio in audios:
        if float(np.abs(audio.samples).max()) < SILENCE_PEAK:
            raise AudioError(f"{audio.source} is silent (no signal above -80 dBFS): there is nothing to transcribe")
    use_threads(threads)
    start = time.perf_counter()
    assistant = load_assistant(("tokenizer", "lm"), models=models, overrides={"tokenizer": tokenizer, "lm": lm},
                               device=device, dtype=dtype, quantize=quantize,
                               compile=compile_lm,
                               server=lm_server(lm_url, lm_api_key, lm_model, lm_timeout))
    load_s = time.perf_counter() - start
    for path, audio in zip(files, audios):
        for warning in audio.warnings:
            err.print(f"[yellow]warning:[/] {warning}", highlight=False)
        with err.status(f"transcribing {path.name}") as status:
            def progress(done: int, total: int, name: str = path.name) -> None:
                status.update(f"transcribing {name}: window {done}/{total}")

            result = run(assistant, audio.samples, prompt=prompt, window_s=window,
                         max_new_tokens=max_new_tokens or WINDOW_TRANSCRIPT_MAX_TOKENS, on_window=progress,
                         seed=seed, **sampling(temperature, top_p))
        if as_json:
            typer.echo(json.dumps({"file": str(path), "text": result.text, "seconds": round(result.seconds, 3),
                                   "tokens": result.speech_tokens, "generated_tokens": result.generated_tokens,
                                   "timings": {"load_s": round(load_s, 3), **result.timings}}, ensure_ascii=False))
        elif len(files) == 1:
            typer.echo(result.text)
        else:
            typer.echo(f"{path}: {result.text}")
