"""`dsv4 serve`: load a run and serve it with the OpenAI-compatible app of dsv4.infer.server.

The wiring a command needs and the library does not: the serving context (the run's training seq_len
unless --max-context says otherwise), the API key (--api-key, else $DSV4_API_KEY, so it stays out of
`ps`), the engine and its background thread, uvicorn, and the start-up line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from dsv4.infer.engine import BackgroundEngine
from dsv4.infer.server import Server, create_app
from dsv4.run import CheckpointError, RunDir

API_KEY_ENV = "DSV4_API_KEY"


def resolve_api_key(api_key: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key the server requires: api_key, else $DSV4_API_KEY (so it stays out of `ps`); None (or "") = none."""
    if api_key is None:
        api_key = (os.environ if environ is None else environ).get(API_KEY_ENV)
    return api_key or None


def train_seq_len(ckpt: str | Path) -> int | None:
    """The training sequence length of a run (train_config.json "seq_len" of the run folder that RunDir.of
    finds for a run, checkpoint or model path), or None when there is none."""
    try:
        n = RunDir.of(ckpt).train_settings().get("seq_len")
    except CheckpointError:
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def serving_context(ckpt: str | Path, model_limit: int, max_context: int | None = None) -> int:
    """Tokens per request (prompt + output): max_context when given, else the run's training seq_len, else the
    model's position limit; never above that limit."""
    n = max_context or train_seq_len(ckpt) or model_limit
    return min(n, model_limit)


def build(
    ckpt: str | Path,
    api_key: str | None = None,
    max_batch: int = 8,
    max_waiting: int = 64,
    max_context: int | None = None,
    prefill_chunk: int = 2048,
    model_name: str | None = None,
    default_max_tokens: int = 256,
    device: str = "cpu",
    compile: bool = False,
    keep_quantized: bool = False,
    max_resident_gb: float | None = None,
    official_quant: bool = False,
) -> tuple[FastAPI, BackgroundEngine, str]:
    """(app, BackgroundEngine, model_name) for a run directory; the model runs on `device`; compile: decode
    steps through torch.compile; max_context: default serving_context (the run's training seq_len)."""
    from dsv4.infer.chat import load_template
    from dsv4.infer.engine import Engine
    from dsv4.run import load_run

    model, tok = load_run(
        ckpt,
        device=device,
        keep_quantized=keep_quantized,
        max_resident_gb=max_resident_gb,
        official_quant=official_quant,
    )
    max_context = serving_context(ckpt, model.cfg.max_position_embeddings, max_context)
    engine = Engine(
        model, tok, max_batch=max_batch, max_context=max_context, prefill_chunk=prefill_chunk, compile=compile
    )
    bg = BackgroundEngine(engine, max_waiting=max_waiting)
    name = model_name or Path(ckpt).resolve().name
    srv = Server(
        bg,
        tok,
        name,
        api_key=api_key,
        max_context=max_context,
        chat_template=load_template(ckpt),
        default_max_tokens=default_max_tokens,
    )
    app = create_app(srv)
    return app, bg, name


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options: Any) -> None:
    """Load a run and serve it until interrupted (binds 127.0.0.1 unless told otherwise); options: build()'s
    keyword arguments (api_key: default $DSV4_API_KEY, none when unset)."""
    import uvicorn

    options["api_key"] = resolve_api_key(options.get("api_key"))
    app, bg, name = build(ckpt, **options)
    srv = app.state.server
    print(
        f"dsv4: serving model '{name}' on {bg.engine.device} at http://{host}:{port}/v1 "
        f"(max_batch {bg.engine.max_batch}, max_waiting {bg.max_waiting}, context {srv.max_context} tokens"
        f"{', API key required' if srv.api_key else ''})",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        bg.close()
