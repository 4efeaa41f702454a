"""The `forkdec` command line: `forkdec generate "PROMPT" -n 16 ...`, `forkdec serve`, `forkdec bench <area>`
(also `python -m forkdec ...`).

User errors print one line to stderr and exit with code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

BENCH_AREAS: dict[str, str] = {
    "softmax": "forkdec.bench.softmax",
    "attention": "forkdec.bench.attention",
    "sampling": "forkdec.bench.sampling",
    "sampling-signals": "forkdec.bench.sampling_signals",
    "gpu": "forkdec.bench.gpu_all",  # every kernel test on CUDA, then every gpu-* benchmark, one report
    "gpu-softmax": "forkdec.bench.gpu_softmax",
    "gpu-attention": "forkdec.bench.gpu_attention",
    "gpu-sampling": "forkdec.bench.gpu_sampling",
    "engine": "forkdec.bench.engine",
    "tree": "forkdec.bench.tree",
    "qlinear": "forkdec.bench.qlinear",
    "model": "forkdec.bench.model",
    "speculative-verify": "forkdec.bench.speculative_verify",
    "speculative": "forkdec.bench.speculative",
    "gpu-speculative": "forkdec.bench.gpu_speculative",
    "xquant-attention": "forkdec.bench.xquant_attention",
    "gpu-xquant": "forkdec.bench.gpu_xquant",
    "integrations": "forkdec.bench.integrations",
    "xquant-ppl": "forkdec.bench.xquant_ppl",
    "serve": "forkdec.bench.serve",
}


def _bench(argv: list[str]) -> int:
    import importlib

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: forkdec bench {" + ",".join(BENCH_AREAS) + "} [options]", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    area, rest = argv[0], argv[1:]
    if area not in BENCH_AREAS:
        raise ValueError(f"area: unknown benchmark {area!r}; expected one of {', '.join(BENCH_AREAS)}")
    return importlib.import_module(BENCH_AREAS[area]).run(rest)


def _generate(argv: list[str]) -> int:
    from forkdec.engine.cli import run  # lazy: `forkdec bench` should not pay for the engine

    return run(argv)


def _eval(argv: list[str]) -> int:
    from forkdec.eval.cli import run

    return run(argv)


def _serve(argv: list[str]) -> int:
    from forkdec.serve.cli import run

    return run(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"bench": _bench, "eval": _eval, "generate": _generate,
                                                   "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="forkdec", description="forkdec: scaled decoding kernels and engine")
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"forkdec: command: unknown command {argv[0]!r}; expected one of {', '.join(sorted(COMMANDS))}",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ValueError as e:
        print(f"forkdec {argv[0]}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
