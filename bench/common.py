"""Shared benchmark plumbing: steady-state timing, machine facts, result files."""
from __future__ import annotations

import ctypes
import datetime
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def keep_freed_memory() -> bool:
    """Make glibc keep freed large blocks instead of returning them to the OS.

    Otherwise every 64 MiB output is a fresh mmap whose page faults cost more
    than the kernel itself, for every candidate alike; a serving process reuses
    its memory, so steady state is what we measure. Returns False off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, -1))


def time_interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 15,
                     min_seconds: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in interleaved rounds
    so that a noisy neighbour hurts every candidate alike."""
    calls = {}
    for name, f in candidates.items():  # warm up (first touch, thread pools), then calibrate
        f()
        t0 = time.perf_counter()
        f()
        calls[name] = max(1, round(min_seconds / max(time.perf_counter() - t0, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, f in candidates.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                f()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(extra: dict[str, str] | None = None) -> dict[str, str]:
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "torch": f"{torch.__version__} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()})",
        "python": platform.python_version(),
    }
    facts.update(extra or {})
    return facts


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_dir(out: str | None) -> Path:
    """`--out`, else bench/results in a forkdec checkout, else ./forkdec-bench-results."""
    if out:
        path = Path(out)
    elif (Path.cwd() / "bench" / "results").is_dir():
        path = Path.cwd() / "bench" / "results"
    else:
        path = Path.cwd() / "forkdec-bench-results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_report(path: Path, title: str, facts: dict[str, str], body: str) -> None:
    lines = [f"# {title}", "", "Machine and settings:", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    path.write_text("\n".join(lines) + "\n\n" + body.strip() + "\n")
    print(f"wrote {path}")

