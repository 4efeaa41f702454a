"""`forkdec serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--kv KIND] [--max-kv-bytes N] ...`"""
from __future__ import annotations

import argparse
import os
from typing import Any

from forkdec.validation import require


def parser() -> argparse.ArgumentParser:
    from forkdec.engine.cli import DTYPES, OneLineParser

    p = OneLineParser(prog="forkdec serve", description="An OpenAI-compatible server: n > 1 costs one prompt.")
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file's stem)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: the loader's)")
    p.add_argument("--kv", default=None, metavar="KIND", help="KV cache kind (see forkdec generate --help)")
    p.add_argument("--max-kv-bytes", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued for admission before 429")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def build_service(model: Any, tokenizer: Any, name: str, *, kv: str | None = None,
                  max_kv_bytes: int | None = None, max_waiting: int = 64) -> Any:
    """A Service over a forkdec Engine on `model` (as forkdec.Engine takes it)."""
    from forkdec.engine.engine import Engine
    from forkdec.serve.driver import EngineDriver
    from forkdec.serve.service import Service

    engine = Engine(model, tokenizer=tokenizer, kv_budget_bytes=max_kv_bytes, kv=kv)
    cfg = engine.model.config
    return Service(EngineDriver(engine), engine.tokenizer, name, cfg.max_position_embeddings, cfg.vocab_size,
                   max_waiting=max_waiting)


def run(argv: list[str]) -> int:
    from forkdec.engine.cli import DTYPES, load

    args = parser().parse_args(argv)
    require(1 <= args.port <= 65535, "port", f"must be in 1..65535, got {args.port}")
    require(args.max_kv_bytes is None or args.max_kv_bytes > 0, "max-kv-bytes", "must be positive")
    require(args.max_waiting >= 1, "max-waiting", f"must be >= 1, got {args.max_waiting}")
    try:
        import uvicorn

        from forkdec.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"serve: the server needs its extra: pip install 'forkdec[serve]' ({e})") from None
    model, tokenizer = load(args.model, DTYPES.get(args.dtype))
    name = args.served_model_name or (os.path.splitext(os.path.basename(args.model))[0] if args.model
                                      else "SmolLM2-135M-Instruct")
    try:
        service = build_service(model, tokenizer, name, kv=args.kv, max_kv_bytes=args.max_kv_bytes,
                                max_waiting=args.max_waiting)
    except ValueError as e:
        raise ValueError(str(e).replace("kv_budget_bytes:", "max-kv-bytes:", 1)) from None
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
    return 0
