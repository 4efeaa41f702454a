"""The CLI's error handling and the benchmarks' plumbing (tiny sizes; benchmarks
measure nothing in tests: speed targets live in bench/results)."""
import subprocess
import sys

import pytest
import torch

import forkdec
from forkdec.cli import main

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "forkdec.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,word", [(["frobnicate"], "command"), (["bench", "nope"], "area"),
                                       (["bench"], "usage")])
def test_user_errors_exit_2_with_one_line(args, word):
    run = _cli(*args)
    assert run.returncode == 2, run
    lines = (run.stderr + run.stdout).strip().splitlines()
    assert len(lines) == 1 and word in lines[0], lines
    assert "Traceback" not in run.stderr


@needs_ext
def test_softmax_bench_writes_its_report(tmp_path):
    assert main(["bench", "softmax", "--shapes", "3x1000,2x33", "--rounds", "1", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "softmax.md").read_text()
    assert "3x1000" in report and "copy GB/s" in report and "cpu:" in report
    assert (tmp_path / "softmax.png").stat().st_size > 0


def test_gpu_softmax_bench_plumbing_runs_on_cpu():
    from forkdec.bench import gpu_softmax

    assert gpu_softmax.main(["--dry-run"]) == 0


def test_gpu_attention_bench_plumbing_runs_on_cpu():
    from forkdec.bench import gpu_attention

    assert gpu_attention.main(["--dry-run"]) == 0


def test_every_bench_area_imports_and_has_run():
    import importlib

    from forkdec.cli import BENCH_AREAS
    for area, module in BENCH_AREAS.items():
        assert callable(importlib.import_module(module).run), area


def test_gpu_timed_row_reports_unavailable_failed_and_timed_implementations(monkeypatch):
    pytest.importorskip("triton", reason="the GPU benchmarks time with triton.testing.do_bench")
    import triton.testing

    from forkdec.bench.gpu_common import timed_row

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode: (fn(), 2.0)[1])  # 2 ms, no GPU needed
    row, ms = timed_row(["a"], "flashinfer is not installed", None, None, 1e9, 500.0, None)
    assert ms is None and row == ["a", "-", "-", "-", "-", "-", "n/a: flashinfer is not installed"]
    row, ms = timed_row(["a"], lambda: 0, lambda: 1 / 0, None, 1e9, 500.0, None)
    assert ms is None and row[-1].startswith("error: ZeroDivisionError")
    row, ms = timed_row(["a"], lambda: 0, lambda: "ok", lambda: None, 4e9, 1000.0, 4000.0)
    assert ms == 2.0 and row == ["a", "2.000", "2000", "200%", "50%", "ok"]


def test_gpu_timed_rows_build_each_case_once_and_add_a_note_column(monkeypatch):
    pytest.importorskip("triton", reason="the GPU benchmarks time with triton.testing.do_bench")
    import triton.testing

    from forkdec.bench.gpu_common import timed_rows

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode: (fn(), 2.0)[1])
    built = []
    rows = timed_rows([1, 3], lambda c: built.append(c) or torch.ones(c), {"sum": lambda x: x.sum(), "ext": "absent"},
                      lambda c, name: [f"n={c}", name], lambda impl, x: f"{float(impl(x)):.0f}",
                      lambda x: 2e9 * x.numel(), 1000.0, None)
    assert built == [1, 3]
    assert rows == [["n=1", "sum", "2.000", "1000", "100%", "-", "1", ""],
                    ["n=1", "ext", "-", "-", "-", "-", "-", "n/a: absent"],
                    ["n=3", "sum", "2.000", "3000", "300%", "-", "3", ""],
                    ["n=3", "ext", "-", "-", "-", "-", "-", "n/a: absent"]]


def test_xquant_ppl_report_separates_every_window_rows_from_fewer(tmp_path):
    import json
    from types import SimpleNamespace

    from forkdec.bench import xquant_ppl as xp

    cfg = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576)  # SmolLM2's shapes
    settings = SimpleNamespace(window=2048, chunk=128)
    rows = [xp._row(kind, cfg, nll, 1.0, settings) for kind, nll in [
        ("fp32", [2.0, 3.0, 2.5]), ("xquant-latent-4", [2.001, 3.002, 2.5]), ("kivi-4", [2.002, 3.004, 2.5]),
        ("xquant-latent-3", [2.03, 3.01]), ("kivi-3", [2.05, 3.02])]]
    (tmp_path / "xquant.json").write_text(json.dumps({"settings": {"window": 2048, "chunk": 128}, "rows": rows}))
    assert xp.run(["--report-only", "--out", str(tmp_path)]) == 0
    every, fewer = (tmp_path / "xquant.md").read_text().split("## Fewer windows")
    table = every.split("do not hold every window yet")[0]
    assert "| `kivi-4` |" in table and "| `xquant-latent-4` |" in table and "`kivi-3`" not in table
    assert "| `kivi-3` |" in fewer and "| `fp32` |" not in fewer
    assert "`bf16`, `fp16`" in every  # the named kinds still short of every window are listed
    # pairs are compared over the windows both hold; ΔPPL against fp32 over those windows
    ref = xp._ppl([2.0, 3.0])
    assert f"`kivi-3` {xp._ppl([2.05, 3.02]) / ref - 1:+.2%} vs `xquant-latent-3` " \
           f"{xp._ppl([2.03, 3.01]) / ref - 1:+.2%} over 2 windows (XQuant <= KIVI)" in fewer


@needs_ext
def test_qlinear_bench_writes_its_report(tmp_path, monkeypatch):
    """The qlinear bench's plumbing at its smallest: one row count, one profiled step of each
    layer loop, the roofline from the bandwidth measured around them."""
    from forkdec.bench import qlinear

    monkeypatch.setattr(qlinear, "read_bandwidth", lambda rounds=7: 50.0)
    monkeypatch.setattr(qlinear, "SHAPES", [("o", 576, 576, "Q4_1")])
    assert qlinear.run(["--m", "1", "--rounds", "1", "--n", "1", "--weights", "gguf,gguf:python",
                        "--new-tokens", "3", "--timed-tokens", "3", "--repeats", "1",
                        "--out", str(tmp_path)]) == 0
    text = (tmp_path / "qlinear.md").read_text()
    assert "| o | Q4_1 | 576x576 | 1 |" in text
    assert "| gguf:python | 1 |" in text and "read bandwidth 50.0 GB/s" in text
    roofline = [line for line in text.splitlines() if line.startswith("| gguf | ") and line.count("|") == 6]
    assert len(roofline) == 1 and roofline[0].endswith("x |"), text
