"""`elfctl serve`: an OpenAI-compatible completion server, with a playground page at /."""

from __future__ import annotations

import os

import typer

from elfctl.cli.app import app, console, handle_errors
from elfctl.cli.options import Cpu, Precision, check_precision
from elfctl.cli.sample import TOKENIZER_OPTION

API_KEY_ENV = "ELFCTL_API_KEY"


@app.command(
    epilog=(
        "Examples:\n\n"
        "  elfctl serve --repo runs/tiny\n\n"
        "  elfctl serve --repo runs/tiny --max-batch 64 --batch-window-ms 20\n\n"
        "  ELFCTL_API_KEY=secret elfctl serve --repo runs/tiny --host 0.0.0.0\n\n"
        "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' "
        '-d \'{"prompt": "the dog", "max_tokens": 16, "seed": 1}\''
    )
)
@handle_errors
def serve(
    repo: str = typer.Option(
        ..., "--repo", help="Hub repo id, hub sub-path, local file or directory, or a run dir."
    ),
    preset: str = typer.Option(
        None, "--preset", help="Preset for official checkpoints (tokenizer, sampling defaults)."
    ),
    tokenizer: str = TOKENIZER_OPTION,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    max_batch: int = typer.Option(
        32, "--max-batch", min=1, help="Rows sampled together at most (also a request's limit)."
    ),
    batch_window_ms: float = typer.Option(
        10.0,
        "--batch-window-ms",
        min=0.0,
        help="How long a request waits for others to share its batch.",
    ),
    api_key: str = typer.Option(
        None,
        "--api-key",
        help=f"Require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set).",
    ),
    model_id: str = typer.Option(
        None, "--model-id", help="The model name clients send and /v1/models lists."
    ),
    frames: int = typer.Option(
        8, "--frames", min=1, help="Texts a stream sends while the text forms (K)."
    ),
    precision: Precision = "auto",
    cpu: Cpu = False,
) -> None:
    """Serve a checkpoint over HTTP: OpenAI's /v1/completions (prompts, infill, streams of
    the text forming), /v1/models, /health, and a playground page at / (docs/serving.md)."""
    from pathlib import Path

    from elfctl.distributed import processes
    from elfctl.runs import load_for_sampling
    from elfctl.serve import Engine, Server, check_extra

    check_precision(precision)
    check_extra()
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    procs = processes(cpu)
    loaded = load_for_sampling(repo, preset, tokenizer, procs.device, for_prompting=True)
    name = model_id or Path(repo.rstrip("/")).name or repo
    engine = Engine(loaded, name, max_batch=max_batch, frames=frames, precision=precision)
    server = Server(engine, batch_window_ms, api_key, log=lambda m: console.print(m))
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    console.print(
        f"serving {name} ({repo}) on http://{shown}:{port} "
        f"({procs.device}, precision {engine.precision.describe()}, max batch {max_batch}, "
        f"window {batch_window_ms:g} ms{', API key required' if api_key else ''}); "
        "playground at /, Ctrl-C or SIGTERM to stop",
        highlight=False,
    )
    server.run(host, port)
    console.print("stopped: every request in flight was answered", highlight=False)
