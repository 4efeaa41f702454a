"""Every Triton kernel compiled for sm_80 (A100) and sm_90 (H100), no GPU needed.

The interpreter checks what the kernels compute, not whether they compile or
what they cost on a GPU. Here each launcher runs on small CPU tensors of
SmolLM2, Llama-3-8B, head-dim-96 and head-dim-256 shapes in fp32, fp16 and bf16
(vocabularies 49,152 and 151,936 for sampling, softmax and verification) with
the launch recorded instead of run, so the configuration compiled is the one the
launcher picks (forkdec/testing_triton_compile.py). A configuration fails on a
compile error, on any spill in a decode, sampling, merge, verification or
elementwise configuration, on shared memory over the target's per-block limit,
and, where the roofline says it is memory bound, on fewer than 8 resident warps
per SM. Spills allowed by design (prefill and tree configurations): docs/triton_verification.md.

All compilations run once per session in one subprocess (Triton cannot compile
for a GPU in interpreter mode, which tests/conftest.py switches on); Triton's
own cache (~/.triton/cache) makes later sessions fast.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from forkdec import testing_triton_compile as tc

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict[str, list[dict]]:
    """Rows of every scenario, by scenario name (one subprocess for the session)."""
    out = tmp_path_factory.mktemp("triton_compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "forkdec.testing_triton_compile", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    print(f"\ncompiled every Triton kernel for sm_80 and sm_90 in {time.perf_counter() - start:.0f} s "
          f"({run.stderr.splitlines()[0] if run.stderr else ''})")
    rows: dict[str, list[dict]] = {}
    for row in json.loads(out.read_text()):
        rows.setdefault(row["scenario"], []).append(row)
    return rows


SCENARIOS = list(tc.scenarios())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kernel_compiles_within_the_targets_limits(compiled, scenario):
    rows = compiled.get(scenario)
    assert rows, f"{scenario} launched no kernel"
    assert {r["arch"] for r in rows} == set(tc.TARGETS)
    bad = [f"sm_{r['arch']} {r['kernel']} [{r['config']}]: {'; '.join(tc.problems(r))}"
           for r in rows if tc.problems(r)]
    assert not bad, "\n".join(bad)


def test_every_kernel_is_covered(compiled):
    """Every @triton.jit kernel of forkdec's Triton modules is compiled by some scenario."""
    import forkdec.triton_kernels as pkg
    seen = {r["kernel"] for rows in compiled.values() for r in rows}
    defined = set()
    for name in ("attention", "xquant", "speculative", "layer_ops", "softmax", "sampling"):
        with open(os.path.join(os.path.dirname(pkg.__file__), f"{name}.py")) as f:
            defined |= set(re.findall(r"@triton\.jit\ndef (_\w+_kernel)\(", f.read()))
    assert defined and defined <= seen, sorted(defined - seen)


def test_checks_can_fail():
    """The rules flag what they should (a spilling decode row, a shared-memory overflow, low occupancy)."""
    row = dict(error="", phase="decode", local_bytes=88, spill_stores=88, shared=0, arch=80, memory_bound=True,
               warps_per_sm=8)
    assert any("spills" in p for p in tc.problems(row))
    assert any("shared memory" in p for p in tc.problems({**row, "local_bytes": 0, "shared": 167_936}))
    assert not tc.problems({**row, "local_bytes": 0, "arch": 90, "shared": 167_936})
    assert any("resident warps" in p for p in tc.problems({**row, "local_bytes": 0, "warps_per_sm": 4}))
    assert tc.problems({**row, "error": "CompilationError: arange's range must be a power of 2"})
    assert not tc.problems({**row, "phase": "prefill", "memory_bound": False, "warps_per_sm": 4})
    # The occupancy arithmetic: 255 registers x 4 warps fit twice (8 warps); 32 registers, 4 warps, 96 KB
    # shared fit once on an A100 (4 warps), twice on an H100.
    assert tc.occupancy_warps(255, 0, 4, 90) == 8
    assert tc.occupancy_warps(32, 98_304, 4, 80) == 4 and tc.occupancy_warps(32, 98_304, 4, 90) == 8


def _ptx_of_greedy(arch: int) -> str:
    script = (
        "import torch, json, sys\n"
        "from forkdec import testing_triton_compile as tc\n"
        "name = 'speculative/v49152/fp32/verify_greedy'\n"
        "(launch, kernel, args, kwargs), = tc._record(name, tc.scenarios()[name])\n"
        f"target, src, options, _ = tc._specialise(kernel, args, kwargs, {arch})\n"
        "import triton\n"
        "sys.stdout.write(triton.compile(src, target=target, options=options.__dict__).asm['ptx'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def greedy_root_stores_are_fenced(ptx: str) -> bool:
    """In the PTX of _greedy_kernel: does a bar.sync follow the root's scratch stores
    (the first st.global) before control leaves their basic block (the next branch)?"""
    lines = [ln.strip() for ln in ptx[ptx.index(".entry _greedy_kernel"):].splitlines()]
    first_store = next(i for i, ln in enumerate(lines) if "st.global" in ln)
    branch = next(i for i in range(first_store, len(lines)) if re.search(r"\bbra(\.uni)?\b", lines[i]))
    return any("bar.sync" in ln or "barrier.sync" in ln for ln in lines[first_store:branch])


@pytest.mark.parametrize("arch", [80, 90])
def test_greedy_kernel_syncs_before_reading_back_its_scratch(arch):
    """The root's argmax and best child are stored by one thread and read back by
    all: a barrier must separate them (issue 19: the sm_90 PTX had none, so warps
    could read stale scratch and, for an empty tree, walk out of bounds)."""
    assert greedy_root_stores_are_fenced(_ptx_of_greedy(arch))
