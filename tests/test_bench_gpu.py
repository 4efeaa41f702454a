"""The plumbing of `forkdec bench gpu` (bench/gpu_all.py) and of the GPU
benchmarks' fixes, on CPU: a stand-in runner replaces the subprocesses, so the
plan, the time budget and the combined report are checked without a GPU."""
import sys
from pathlib import Path

import pytest
import torch

from forkdec.bench import gpu_all
from forkdec.bench.gpu_common import nominal_peak_gbs, nominal_peaks
from forkdec.cli import BENCH_AREAS

ROOT = Path(__file__).resolve().parents[1]


class FakeRunner:
    """Records every command; a benchmark 'writes' its report as the real one would."""

    def __init__(self, fail: str = "", hang: str = ""):
        self.calls, self.fail, self.hang = [], fail, hang

    def __call__(self, argv, timeout_s, cwd):
        self.calls.append((argv, timeout_s))
        if "pytest" in argv:
            return 0, "....\nFAILED tests/test_x.py::test_y - boom\n== 120 passed, 1 failed, 3 skipped in 99.0s ==\n"
        module = argv[2].rsplit(".", 1)[1]
        if module == self.hang:
            return None, "started\n"
        out = Path(argv[argv.index("--out") + 1])
        if module != self.fail:
            (out / f"{module}.md").write_text(f"# {module} title\n\n| case | GB/s | of peak |\n|---|---|---|\n| a | 1 | 2% |\n")
        return (1, "Traceback: it broke\n") if module == self.fail else (0, "ok\n")


def test_gpu_is_a_bench_area():
    assert BENCH_AREAS["gpu"] == "forkdec.bench.gpu_all"


def test_every_gpu_benchmark_and_kernel_test_file_is_planned(tmp_path):
    modules = sorted(p.stem for p in (ROOT / "bench").glob("gpu_*.py")) 
    planned = gpu_all.plan(ROOT, tmp_path, dry_run=False)
    assert [s.name for s in planned[1:]] == [m for m in modules if m not in ("gpu_common", "gpu_all")]
    for step in planned[1:]:
        assert step.argv[-2:] == ["--out", str(tmp_path)]
        assert step.argv[3:-2] == gpu_all.QUICK_ARGS.get(step.name, [])
    pytest_argv = planned[0].argv
    assert pytest_argv[pytest_argv.index("-k") + 1] == "triton or cuda"
    for test in gpu_all.KERNEL_TESTS:
        assert (ROOT / test).exists(), f"{test} is listed but missing"
        assert test in pytest_argv
    assert set(gpu_all.QUICK_ARGS) <= {s.name for s in planned}
    dry = gpu_all.plan(ROOT, tmp_path, dry_run=True)
    assert "--collect-only" in dry[0].argv and all(s.argv[-1] == "--dry-run" for s in dry[1:])


def test_quick_args_parse_in_every_benchmark():
    """The reduced shapes are real options of each module (a typo would only show on the GPU)."""
    import importlib
    for module, args in gpu_all.QUICK_ARGS.items():
        m = importlib.import_module(f"forkdec.bench.{module}")
        assert hasattr(m, "main"), module
        with pytest.raises(SystemExit) as e:
            m.main([*args, "--help"])
        assert e.value.code == 0, module


def test_report_collects_tests_and_benchmarks(tmp_path, monkeypatch):
    runner = FakeRunner(fail="gpu_softmax")
    assert gpu_all.main(["--dry-run", "--out", str(tmp_path)], runner=runner) == 1  # one benchmark failed
    report = (tmp_path / "gpu_dry_run.md").read_text()
    assert "120 passed, 1 failed, 3 skipped" in report
    assert "FAILED tests/test_x.py::test_y" in report
    assert "## gpu_attention" in report and "## gpu_attention title" in report  # its report, demoted
    assert "| gpu_softmax | failed (exit 1) |" in report and "Traceback: it broke" in report
    assert "`--shapes 512x49152,64x262144 --dtypes bf16 --dry-run`" in report
    assert "FlashInfer (peer)" in report and "flash-attn (peer)" in report
    assert len(runner.calls) == 1 + len(gpu_all.bench_modules())
    assert not (tmp_path / "gpu_parts").exists()  # the per-benchmark parts live in a temporary folder


def test_a_test_run_cut_short_still_reports_what_ran():
    step = gpu_all.Step("kernel tests (pytest)", [], 10, rc=None, ran=True, seconds=10,
                        output="tests/test_a.py::test_1 PASSED [ 1%]\ntests/test_a.py::test_2 FAILED [ 2%]\n"
                               "tests/test_b.py::test_3 SKIPPED (no GPU) [ 3%]\n")
    lines = "\n".join(gpu_all.test_summary(step))
    assert "timed out" in lines and "partial, 1 passed, 1 failed, 1 skipped, 0 error" in lines
    assert "FAILED tests/test_a.py::test_2" in lines


def test_budget_and_hangs_are_reported(tmp_path, monkeypatch):
    runner = FakeRunner(hang="gpu_sampling")
    clock = iter(range(0, 10_000, 100))  # every step 'takes' 100 s
    monkeypatch.setattr(gpu_all.time, "monotonic", lambda: next(clock))
    gpu_all.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "450"], runner=runner)
    report = (tmp_path / "gpu_dry_run.md").read_text()
    assert "not run: the time budget was spent" in report
    for argv, limit in runner.calls:
        assert limit <= max(gpu_all.TESTS_TIMEOUT_S, gpu_all.BENCH_TIMEOUT_S)


def test_no_gpu_without_dry_run_is_a_clear_exit(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real command would run")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_all.main(["--out", str(tmp_path)], runner=FakeRunner())


def test_subprocess_runner_reports_exit_codes_and_timeouts(tmp_path):
    assert gpu_all.subprocess_runner([sys.executable, "-c", "print('hi')"], 30, tmp_path) == (0, "hi\n")
    rc, _ = gpu_all.subprocess_runner([sys.executable, "-c", "import time; time.sleep(30)"], 1, tmp_path)
    assert rc is None


@pytest.mark.parametrize("name, gib, gbs, tflops", [
    ("NVIDIA H100 80GB HBM3", 80, 3350, 989), ("NVIDIA H100 PCIe", 80, 2000, 756), ("NVIDIA H200", 141, 4800, 989),
    ("NVIDIA H100 NVL", 94, 3900, 835), ("NVIDIA A100-SXM4-80GB", 80, 2039, 312), ("NVIDIA A100-PCIE-40GB", 40, 1555, 312)])
def test_peak_table(name, gib, gbs, tflops):
    assert nominal_peaks(name, gib * 2**30) == (gbs, tflops)
    assert nominal_peak_gbs(name, gib * 2**30) == gbs
    assert nominal_peaks("NVIDIA L4", 24 * 2**30) == (None, None)


def test_flashinfer_chain_result_is_read_as_a_tuple():
    from forkdec.bench.gpu_speculative import flashinfer_accepted
    tokens = torch.tensor([[5, 6, -1, -1], [1, 2, 3, 4]])
    accepted, emitted = torch.tensor([2, 3]), torch.tensor([1, 3])
    assert torch.equal(flashinfer_accepted((tokens, accepted, emitted)), emitted)
    assert torch.equal(flashinfer_accepted(tokens), torch.tensor([1, 3]))  # old releases: token ids only


def test_xquant_baseline_times_no_conversion_or_validation(monkeypatch):
    import forkdec
    from forkdec.bench import gpu_xquant
    seen = []

    def record(name):
        def f(q, *args, **kwargs):
            caches = [a for a in args[1:3] if isinstance(a, torch.Tensor)]
            seen.append((name, q.dtype, [c.dtype for c in caches], forkdec.validation_enabled()))
            return q
        return f

    monkeypatch.setattr(forkdec.ops, "attention", record("attention"))
    monkeypatch.setattr(forkdec.ops, "xquant_attention", record("xquant"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = gpu_xquant.build_case(gpu_xquant.Model("tiny", 64, 4, 2, 32), 3, 64, torch.device("cpu"))
    impls = gpu_xquant.implementations(torch.device("cpu"))
    for impl in impls.values():
        if not isinstance(impl, str):
            impl(case)
    assert {s[0] for s in seen} == {"attention", "xquant"}
    for name, q_dtype, cache_dtypes, validating in seen:
        assert q_dtype == torch.bfloat16 and not validating, name
        assert all(d == torch.bfloat16 for d in cache_dtypes), name
