"""Run a llama.cpp peer function in its own process, with the interpreter that has llama-cpp-python.

forkdec's process never imports llama_cpp: `run_llama_jobs` starts `python` (by default
/work/llamavenv's), whose environment is ours minus OMP_WAIT_POLICY (llama.cpp's OpenMP
barriers sleep under PASSIVE and its decode halves). There the bench/ folder is loaded as
`forkdec.bench` without the rest of forkdec: the peer modules need only
`forkdec.validation.require`, stubbed here with the same contract. Each job is a dict of
keyword arguments to one function; each result comes back as one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_LLAMA_PYTHON = "/work/llamavenv/bin/python"

_RUNNER = r"""
import importlib, json, sys, types
def require(condition, arg, message):
    if not condition:
        raise ValueError(f"{arg}: {message}")
forkdec = types.ModuleType("forkdec"); forkdec.__path__ = []
bench = types.ModuleType("forkdec.bench"); bench.__path__ = [sys.argv[1]]
validation = types.ModuleType("forkdec.validation"); validation.require = require
sys.modules.update({"forkdec": forkdec, "forkdec.bench": bench, "forkdec.validation": validation})
function = getattr(importlib.import_module("forkdec.bench." + sys.argv[2]), sys.argv[3])
for job in json.loads(sys.stdin.read()):
    print(json.dumps(function(**job)), flush=True)
"""


def llama_python(given: str | None) -> str:
    """`--llama-python` if given, else /work/llamavenv's interpreter if present, else this one."""
    if given:
        return given
    return DEFAULT_LLAMA_PYTHON if os.path.exists(DEFAULT_LLAMA_PYTHON) else sys.executable


def llama_available(python: str) -> str | None:
    """None when `python` can import llama_cpp, else the reason it cannot."""
    if not os.path.exists(python):
        return f"no interpreter at {python}"
    probe = subprocess.run([python, "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('llama_cpp') is None)"], capture_output=True)
    return None if probe.returncode == 0 else f"llama_cpp is not importable by {python}"


def run_llama_jobs(python: str, module: str, function: str, jobs: list[dict], timeout: float | None = None) -> list[dict]:
    """`forkdec.bench.<module>.<function>(**job)` for each job, in a child process of `python`, in order.

    The child's stderr is ours (its progress lines show); a failure raises CalledProcessError."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    bench_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run([python, "-c", _RUNNER, bench_dir, module, function], input=json.dumps(jobs), env=env,
                          stdout=subprocess.PIPE, stderr=None, text=True, check=True, timeout=timeout)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
