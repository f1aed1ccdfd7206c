"""`glmvoice serve-lm`: start vLLM's OpenAI-compatible server on the downloaded LM, for `--lm-url`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from glmvoice_cli.commands.common import LmOpt, ModelsOpt

MAX_DEFAULT_CONTEXT = 8192  # tokens: the official demo's vLLM setting; bounds the KV cache a GPU must hold


def serve_lm(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 to serve other machines).")] = "127.0.0.1",
    max_model_len: Annotated[int | None, typer.Option(
        min=16, help="Context length in tokens (history + answer); default min(seq_length, 8192).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's bf16), bfloat16, float16 or float32.")
                     ] = "auto",
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        min=0.05, max=1.0, help="Share of each GPU's memory vLLM may use (vLLM's default 0.9).")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(
        min=1, help="Split the model across this many GPUs.")] = None,
    quantization: Annotated[str | None, typer.Option(
        help="Quantise the weights on load, e.g. fp8 (halves the memory of bf16 on Hopper/Ada GPUs).")] = None,
    cpu_kv_cache_gib: Annotated[float | None, typer.Option(
        min=0.1, max=65536.0, help="vLLM's CPU build: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require this API key from clients (--lm-api-key).")
                       ] = None,
    served_name: Annotated[str, typer.Option(help="Model name the server reports.")] = "glm-4-voice-9b",
    python: Annotated[str | None, typer.Option(
        help="The Python that has vLLM (default: GLMVOICE_VLLM_PYTHON, else this one).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")
                       ] = False,
    extra: Annotated[list[str] | None, typer.Argument(
        help="More vLLM options, after `--` (e.g. -- --enable-chunked-prefill).", show_default=False)] = None,
    models: ModelsOpt = None, lm: LmOpt = None,
) -> None:
    """Serve the language model with vLLM; then talk through it with `glmvoice chat --lm-url http://HOST:PORT`."""
    from glmvoice_cli.lm.checkpoint import DEFAULT_SEQ_LENGTH, read_chatglm_config
    from glmvoice_cli.lm.remote import check_servable
    from glmvoice_cli.lm.serving import VllmServerConfig, check_vllm, run_server, server_command, vllm_python
    from glmvoice_cli.models.settings import resolve_model_dir

    folder = resolve_model_dir("lm", models=models, override=lm)
    raw = read_chatglm_config(folder)
    check_servable(raw, folder)
    seq_length = raw.get("seq_length")
    context = max_model_len or min(seq_length if isinstance(seq_length, int) else DEFAULT_SEQ_LENGTH,
                                   MAX_DEFAULT_CONTEXT)
    config = VllmServerConfig(
        model_dir=Path(folder).resolve(), max_model_len=context, host=host, port=port, dtype=dtype,
        served_name=served_name, gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size, quantization=quantization, api_key=api_key,
        cpu_kv_cache_gib=cpu_kv_cache_gib, extra_args=tuple(extra or ()))
    interpreter = vllm_python(python)
    if dry_run:
        typer.echo(shlex.join(server_command(interpreter, config)))
        return
    check_vllm(interpreter)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    typer.echo(f"starting vLLM on {folder} (1-2 minutes); then: glmvoice chat --lm-url http://{shown}:{port}",
               err=True)
    code = run_server(interpreter, config)
    if code:
        raise typer.Exit(code)
