"""The metadata fuzzer (tests/fuzz/ops_fuzz.py) over every CPU op with validation
off: every input must raise a clear error or compute within bounds.

- every case in tests/fuzz/corpus/ (inputs that once crashed, hung or read out
  of bounds) is replayed in process;
- a bounded, derandomized run (FUZZ_EXAMPLES inputs per op, the same inputs
  every time) runs in a subprocess, so that a crash or a hang in C++ fails this
  test with the input that caused it instead of killing pytest.
A longer, random run: docs/verification.md.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ_DIR))
import ops_fuzz  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("FORKDEC_FUZZ_EXAMPLES", "150"))
FUZZ_TIMEOUT_S = 900
CORPUS = sorted(ops_fuzz.CORPUS.glob("*.json"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_regression_corpus(path):
    entry = json.loads(path.read_text())
    assert entry["op"] in ops_fuzz.OPS, f"{path.name}: unknown op {entry['op']}"
    assert ops_fuzz.run_case(entry["op"], entry["case"]) in ("ok", "error")


def test_corpus_is_not_empty():
    assert CORPUS, "tests/fuzz/corpus/ lost its regression cases"


def test_every_op_is_fuzzed():
    import torch
    import forkdec  # noqa: F401  (registers the ops)
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("forkdec::")}
    cpu_ops = {name for name in schemas if not name.endswith("_triton")}
    assert cpu_ops, "no forkdec ops registered (is forkdec._C built?)"
    assert cpu_ops <= set(ops_fuzz.OPS), f"ops without a fuzz target: {sorted(cpu_ops - set(ops_fuzz.OPS))}"


def test_bounded_fuzz_run_finds_nothing(tmp_path):
    current = tmp_path / "current.json"
    try:
        run = subprocess.run([sys.executable, str(FUZZ_DIR / "ops_fuzz.py"), "--examples", str(FUZZ_EXAMPLES),
                              "--current", str(current)], capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fuzzer hung; last input: {current.read_text() if current.exists() else '?'}\n"
                    f"{(e.stdout or b'')[-3000:]!r}")
    last = current.read_text() if current.exists() else "?"
    assert run.returncode == 0, (f"fuzzer failed (exit {run.returncode}; a negative code is a signal, i.e. a "
                                 f"crash); last input: {last}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    lines = [line for line in run.stdout.splitlines() if line.startswith("fuzz ")]
    print("\n".join(lines))
    assert len(lines) == len(ops_fuzz.OPS), run.stdout
    for line in lines:
        assert f": {FUZZ_EXAMPLES} inputs" in line, line
