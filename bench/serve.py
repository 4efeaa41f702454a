"""`forkdec bench serve`: forkdec's OpenAI server against llama.cpp's, same client, same load.

Each server runs in its own process with its own defaults (llama-cpp-python's
server: `python -m llama_cpp.server` from the interpreter given by
--peer-python, with n_threads = the machine's cores, its documented setting,
instead of its default of half of them, and interrupt_requests off, without
which each new request cuts the streaming one short). The load (bench/serve_load.py): GSM8K
test questions as chat completions with n choices, temperature 0.7, streamed,
from C concurrent clients; a server that ignores `n` is asked for the missing
choices by further requests. Reported per server and client count: requests/s,
generated tokens/s, time to first token and per-token latency (gaps between a
choice's chunks) percentiles, and forkdec's tokens/s over the peer's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report
from forkdec.bench.serve_load import run_load

TARGET = "at least 2x llama.cpp's server in generated tokens/s at n = 8"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command in its own process and session, up once GET /v1/models answers."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"forkdec-bench-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> str:
        """The model id the server reports."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited ({self.proc.returncode}); log: {self.log.name}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200:
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server did not start in {timeout} s; log: {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def peer_env() -> dict[str, str]:
    """The peer's environment: ours minus anything tuned for forkdec's threads."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TRITON_INTERPRET")}


def questions(path: str, count: int) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows[:count]]


def gguf_path(model: str | None) -> str:
    if model:
        return model
    from forkdec.models import default_model_path
    return default_model_path()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkdec bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="4,16", help="concurrent clients, comma-separated (default 4,16)")
    p.add_argument("-n", type=int, default=8, help="choices per request (default 8)")
    p.add_argument("--questions", type=int, default=16, help="requests per client count (default 16)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-seconds", type=float, default=300, help="stop starting requests after this (per cell)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"))
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--peer-python", default=None, help="a python with llama-cpp-python[server] (default: skip the peer)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the peer's n_threads")
    p.add_argument("--out", default=None)
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    if not Path(args.data).is_file():
        raise ValueError(f"data: no such file {args.data}")
    qs = questions(args.data, args.questions)
    gguf = gguf_path(args.model)
    servers: dict[str, list[str]] = {
        "forkdec": [sys.executable, "-m", "forkdec", "serve", "--model", gguf, "--log-level", "warning"]}
    peer_version = "not run (no --peer-python)"
    if args.peer_python:
        servers["llama.cpp"] = [args.peer_python, "-m", "llama_cpp.server", "--model", gguf,
                                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                                "--n_ctx", "4096", "--interrupt_requests", "False"]
        peer_version = subprocess.run([args.peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                      capture_output=True, text=True).stdout.strip()
    results: dict[tuple[str, int], dict[str, float]] = {}
    for name, argv_ in servers.items():
        port = free_port()
        proc = ServerProcess(name, argv_ + ["--port", str(port)], port, env=peer_env() if name != "forkdec" else None)
        try:
            model = proc.wait_ready()
            run_load(proc.url, model, qs[:2], 2, args.n, 8, 60)  # warm-up
            for c in clients:
                res = run_load(proc.url, model, qs, c, args.n, args.max_tokens, args.max_seconds)
                results[(name, c)] = s = res.summary()
                print(f"{name:>9} clients={c:<3} {s['requests']} requests ({s['errors']} errors) in "
                      f"{s['seconds']:.1f} s: {s['tokens_per_s']:.1f} tok/s, TTFT p50 {s['ttft_p50']:.2f} s", flush=True)
        finally:
            proc.stop()
    report(args, clients, results, peer_version)
    return 0


def report(args: Any, clients: list[int], results: dict, peer_version: str) -> None:
    rows = []
    for (name, c), s in results.items():
        ratio = ""
        if name == "forkdec" and ("llama.cpp", c) in results:
            ratio = f"{s['tokens_per_s'] / results[('llama.cpp', c)]['tokens_per_s']:.2f}x"
        rows.append([name, str(c), f"{s['requests']} ({s['errors']} err)", f"{s['seconds']:.1f}",
                     f"{s['requests_per_s']:.2f}", f"{s['tokens_per_s']:.1f}", ratio,
                     f"{s['ttft_p50']:.2f} / {s['ttft_p90']:.2f}", f"{1e3 * s['itl_p50']:.0f} / {1e3 * s['itl_p90']:.0f}"])
    facts = machine_facts({"load": f"{args.questions} GSM8K test questions per cell, chat, n = {args.n}, "
                                   f"max_tokens {args.max_tokens}, temperature 0.7, streamed",
                           "forkdec": "forkdec serve, its defaults (embedded model, KV budget half the free memory)",
                           "llama.cpp": f"llama-cpp-python {peer_version} `python -m llama_cpp.server`, n_threads "
                                        f"{args.threads}, n_ctx 4096, interrupt_requests False (its default, True, "
                                        "cuts a streaming request short whenever another arrives), its other "
                                        "defaults; it serves one request at a time and returns one choice per "
                                        "request, so the client asks again for each missing choice"})
    body = (f"Target: {TARGET}.\n\n"
            + markdown_table(["server", "clients", "requests", "seconds", "requests/s", "generated tok/s",
                              "vs llama.cpp", "TTFT p50 / p90 (s)", "per-token p50 / p90 (ms)"], rows))
    write_report(results_dir(args.out) / "serve.md", "forkdec serve vs llama.cpp's server", facts, body)
