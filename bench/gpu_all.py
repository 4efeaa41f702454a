"""`forkdec bench gpu`: what a borrowed GPU has to prove, in one command.

1. The kernel tests on CUDA tensors: pytest over the shared harness and the op
   test files (every Triton and CUDA kernel against `reference`; on a machine
   with a GPU the harness runs the Triton backend on CUDA tensors).
2. Every bench/gpu_*.py at a reduced set of shapes (QUICK_ARGS), each in its own
   process with its own time limit.
3. bench/results/gpu_<device>.md: the machine, the test summary (failures by
   name), then each benchmark's table: achieved GB/s and TFLOP/s against the
   device's nominal peak (bench/gpu_common.PEAKS), with flash-attn / FlashInfer
   rows where they are installed.

Budget: the whole command is meant to fit, with `pip install` of forkdec (CUDA
kernels built), in 8 minutes on one H100 or A100 (16 cores):

    pip install -q --no-build-isolation -e . && forkdec bench gpu

Each step gets the smaller of its own limit and what is left of --budget-s; a
step that runs out is reported as such and the report is still written.
`--dry-run` checks the plumbing without a GPU: pytest only collects the test
files and every benchmark runs its own --dry-run.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# The test files that compare kernels against the reference (tests/harness.py and the op tests).
KERNEL_TESTS = ["tests/test_harness.py", "tests/test_attention.py", "tests/test_softmax.py", "tests/test_sampling.py",
                "tests/test_speculative.py", "tests/test_xquant_attention.py", "tests/test_layer_ops.py",
                "tests/test_opcheck.py", "tests/test_compile_ops.py"]
TEST_SELECTION = "triton or cuda"
TESTS_TIMEOUT_S = 170
# Reduced shapes per benchmark module (bench/gpu_<name>.py); a module not listed runs with its defaults.
QUICK_ARGS: dict[str, list[str]] = {
    "gpu_softmax": ["--shapes", "512x49152,64x262144", "--dtypes", "bf16"],
    "gpu_sampling": ["--shapes", "64x49152,256x151936", "--dtypes", "bf16"],
    "gpu_attention": ["--quick"],
    "gpu_speculative": ["--quick", "--dtypes", "bf16"],
    "gpu_xquant": ["--models", "llama3-8b"],
}
BENCH_TIMEOUT_S = 60
DEFAULT_BUDGET_S = 420  # 8 minutes less about one for installing forkdec

# run(argv, timeout_s, cwd) -> (exit code or None on timeout, combined output)
Runner = Callable[[list[str], float, Path], tuple[Optional[int], str]]


def subprocess_runner(argv: list[str], timeout_s: float, cwd: Path) -> tuple[Optional[int], str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # what a step printed survives its time limit
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=max(timeout_s, 1), env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out
    return done.returncode, done.stdout + done.stderr


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float
    rc: Optional[int] = None
    output: str = ""
    seconds: float = 0.0
    ran: bool = False
    report: str = ""  # the markdown a benchmark wrote
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.ran:
            return "not run: the time budget was spent"
        if self.rc is None:
            return f"timed out after {self.seconds:.0f} s"
        return "ok" if self.rc == 0 else f"failed (exit {self.rc})"


def checkout_root() -> Optional[Path]:
    """The forkdec checkout holding tests/ (this file's parent's parent in an editable install, else cwd)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "tests" / "harness.py").exists():
            return root
    return None


def bench_modules() -> list[str]:
    """Every bench/gpu_*.py benchmark (not the shared helpers nor this driver)."""
    here = Path(__file__).resolve().parent
    names = sorted(p.stem for p in here.glob("gpu_*.py"))
    return [n for n in names if n not in ("gpu_common", "gpu_all")]


def plan(root: Path, out_dir: Path, dry_run: bool) -> list[Step]:
    tests = [t for t in KERNEL_TESTS if (root / t).exists()]
    # -v: one line per test as it finishes, so a run cut by its time limit still says what passed
    # -k: the Triton and CUDA cases (the cpu and reference ones are the CPU test suite's)
    pytest_argv = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-k", TEST_SELECTION,
                   *tests]
    if dry_run:
        pytest_argv.append("--collect-only")
    steps = [Step("kernel tests (pytest)", pytest_argv, TESTS_TIMEOUT_S)]
    for module in bench_modules():
        argv = [sys.executable, "-m", f"forkdec.bench.{module}", *QUICK_ARGS.get(module, []), "--out", str(out_dir)]
        if dry_run:
            argv.append("--dry-run")
        steps.append(Step(module, argv, BENCH_TIMEOUT_S))
    return steps


def run_steps(steps: list[Step], root: Path, out_dir: Path, budget_s: float, runner: Runner) -> None:
    deadline = time.monotonic() + budget_s
    for step in steps:
        left = deadline - time.monotonic()
        if left < 5:
            continue
        print(f"[forkdec bench gpu] {step.name} (limit {min(step.limit_s, left):.0f} s) ...", flush=True)
        start = time.monotonic()
        step.rc, step.output = runner(step.argv, min(step.limit_s, left), root)
        step.seconds = time.monotonic() - start
        step.ran = True
        written = out_dir / f"{step.name}.md"
        if step.name.startswith("gpu_") and written.exists():
            step.report = written.read_text()
        print(f"[forkdec bench gpu] {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)


def test_summary(step: Step) -> list[str]:
    """The pytest step as lines: its final count line, then every failure by name."""
    lines = [ln.strip() for ln in step.output.splitlines()]
    counts = [ln for ln in lines if re.search(r"\b(passed|failed|error|skipped|tests? collected)\b", ln)
              and ("=" in ln or " in " in ln)]
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if counts:
        summary = counts[-1].strip("= ")
    else:  # cut short: count the verbose per-test lines printed so far
        tally = {word: sum(f" {word}" in ln and "::" in ln for ln in lines) for word in ("PASSED", "FAILED", "SKIPPED",
                                                                                          "ERROR")}
        summary = "partial, " + ", ".join(f"{n} {w.lower()}" for w, n in tally.items()) + " before it stopped"
        failures += [f"FAILED {ln.split(' FAILED')[0]}" for ln in lines if " FAILED" in ln and "::" in ln]
    out = [f"- status: {step.status}, {step.seconds:.0f} s", f"- summary: {summary}"]
    out += [f"- {ln}" for ln in failures[:40]]
    if len(failures) > 40:
        out.append(f"- ... and {len(failures) - 40} more")
    return out


def peers() -> dict[str, str]:
    found = {}
    for name, module in (("flash-attn", "flash_attn"), ("FlashInfer", "flashinfer")):
        if importlib.util.find_spec(module) is None:
            found[name] = "not installed (its rows say n/a)"
        else:
            try:
                from importlib.metadata import version
                found[name] = version(name.lower().replace("-", "_") if name == "flash-attn" else "flashinfer-python")
            except Exception:  # noqa: BLE001 - a version is a nicety
                found[name] = "installed"
    return found


def device_facts() -> tuple[str, dict[str, str]]:
    """(file name slug, facts) of the CUDA device, or of the CPU in a dry run."""
    import torch

    from forkdec.bench.gpu_common import nominal_peaks

    if not torch.cuda.is_available():
        return "dry_run", {"device": "none (dry run on CPU: nothing was timed)"}
    props = torch.cuda.get_device_properties(0)
    gbs, tflops = nominal_peaks(props.name, props.total_memory)
    slug = re.sub(r"[^a-z0-9]+", "_", props.name.lower().replace("nvidia", "")).strip("_")
    return slug, {
        "device": f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
        "nominal peak": f"{gbs:.0f} GB/s, {tflops:.0f} TFLOP/s dense bf16" if gbs else
                        "not in bench/gpu_common.PEAKS (ratios to peak are '-')",
    }


def write_summary(path: Path, steps: list[Step], facts: dict[str, str], total_s: float) -> None:
    from forkdec.bench.common import machine_facts, write_report

    body = ["## Kernels against the reference (pytest on CUDA tensors)", "", *test_summary(steps[0]), ""]
    body += ["## Benchmarks at reduced shapes", "", "| benchmark | status | s | arguments |", "|---|---|---|---|"]
    for step in steps[1:]:
        shown = step.argv[3:]
        if "--out" in shown:  # the temporary folder says nothing
            i = shown.index("--out")
            shown = shown[:i] + shown[i + 2:]
        args = " ".join(shown)
        body.append(f"| {step.name} | {step.status} | {step.seconds:.0f} | `{args}` |")
    for step in steps[1:]:
        body += ["", f"## {step.name}", ""]
        if step.report:
            # the benchmark's own report, its title demoted one level
            body.append("\n".join(("#" + ln) if ln.startswith("#") else ln for ln in step.report.splitlines()))
        else:
            body.append("No report written. Last output lines:")
            body += ["", "```", *step.output.strip().splitlines()[-15:], "```"]
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = "not installed"
    facts = machine_facts({**facts, **{f"{k} (peer)": v for k, v in peers().items()},
                           "command": "forkdec bench gpu",
                           "total time": f"{total_s:.0f} s"})
    write_report(path, "forkdec on a GPU: kernels checked and timed", facts, "\n".join(body))


def main(argv: Optional[list[str]] = None, runner: Runner = subprocess_runner) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget of all steps")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: collect the tests and dry-run every benchmark")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args(argv)

    import torch

    from forkdec.bench.common import results_dir

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("forkdec bench gpu: no CUDA device (use --dry-run to check the plumbing)")
    root = checkout_root()
    if root is None:
        raise SystemExit("forkdec bench gpu: run it from a forkdec checkout (tests/ not found)")
    out_dir = results_dir(args.out)
    parts = Path(tempfile.mkdtemp(prefix="forkdec-bench-gpu-"))  # each benchmark's own report, merged below
    steps = plan(root, parts, args.dry_run)
    if args.skip_tests:
        steps[0].argv = [sys.executable, "-c", "print('kernel tests skipped (--skip-tests)')"]
    start = time.monotonic()
    run_steps(steps, root, parts, args.budget_s, runner)
    slug, facts = device_facts()
    path = out_dir / f"gpu_{slug}.md"
    write_summary(path, steps, facts, time.monotonic() - start)
    return 0 if all(s.ran and s.rc == 0 for s in steps) else 1


run = main  # `forkdec bench <area>` calls run(argv)

if __name__ == "__main__":
    raise SystemExit(main())
