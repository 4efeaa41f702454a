"""Compile every Triton kernel for real GPU targets without a GPU, and read its resources.

The launchers run on small CPU tensors of the real models' shapes with the
kernel launch intercepted (`JITFunction.run` records its arguments instead of
launching), so every block size, num_warps, num_stages and integer
specialisation (a stride of 1, a multiple of 16) is the one the launcher picks.
Each recorded launch is then compiled with `triton.compile` for sm_80 (A100)
and sm_90 (H100), and the bundled `cuobjdump --dump-resource-usage` reads
registers and local memory from the cubin (ptxas -v gives the spill bytes when
there is local memory); shared memory is `compiled.metadata.shared`.

Needs Triton in compile mode (TRITON_INTERPRET unset): tests run `main()` in a
subprocess (tests/test_triton_compile.py). `python -m forkdec.testing_triton_compile`
prints the table.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import torch

# Per-block shared-memory limits and per-SM resources (CUDA occupancy calculator).
TARGETS = {80: dict(name="A100", shared_per_block=166_912, shared_per_sm=167_936),
           90: dict(name="H100", shared_per_block=232_448, shared_per_sm=233_472)}
REGS_PER_SM = 65_536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
RESERVED_SHARED_PER_BLOCK = 1024
MIN_WARPS_MEMORY_BOUND = 8

MODELS = {  # name: (hq, hkv, head_dim, hidden, intermediate)
    "smollm2": (9, 3, 64, 576, 1536),
    "llama8b": (32, 8, 128, 4096, 14336),
    "d96": (12, 4, 96, 1536, 4096),      # no named model: the head dim HEAD_DIMS allows
    "d256": (8, 4, 256, 2048, 8192),     # Gemma-style
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VOCABS = (49_152, 151_936)
PATHS = 64  # paths decoded together (scaled decoding's usual batch)


@dataclass
class Launch:
    """One recorded launch: which scenario, kernel and phase it belongs to."""
    scenario: str
    kernel: str
    phase: str            # decode, prefill, tree, sampling, elementwise, merge, verify
    memory_bound: bool    # the roofline's verdict for this phase


@dataclass
class Resources:
    scenario: str
    kernel: str
    phase: str
    memory_bound: bool
    arch: int
    config: str           # constexprs, num_warps, num_stages
    num_warps: int
    regs: int = 0
    local_bytes: int = 0  # local memory per thread (spills and stack arrays)
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    warps_per_sm: int = 0
    error: str = ""


# ---------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def record_launches(sink: list):
    """Inside, `kernel[grid](...)` appends (kernel, args, kwargs) to sink instead of launching."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def run(self, *args, grid, warmup, **kwargs):
        sink.append((self, args, kwargs))
        return None

    for cls in originals:
        cls.run = run
    try:
        yield sink
    finally:
        for cls, original in originals.items():
            cls.run = original


def _pages(lens: list[int], page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A page table for requests of `lens` keys: (indptr, indices, last_page_len, num_pages)."""
    needed = [max(1, math.ceil(n / page_size)) if n else 0 for n in lens]
    indptr = torch.tensor([0] + list(torch.tensor(needed).cumsum(0).tolist()), dtype=torch.int32)
    indices = torch.arange(int(indptr[-1]), dtype=torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in lens], dtype=torch.int32)
    return indptr, indices, last, max(int(indptr[-1]), 1)


def _indptr(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


def _attention_scenarios(model: str, dtype_name: str) -> dict[str, Callable[[], None]]:
    from forkdec.triton_kernels import attention as ka
    hq, hkv, d, _, _ = MODELS[model]
    dtype = DTYPES[dtype_name]
    page = 16
    prompt, own = 600, 40

    def caches(num_pages):
        shape = (num_pages, page, hkv, d)
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def decode():  # the engine's cascade: all paths' rows over the prompt, then each path's own pages
        p_indptr, p_idx, p_last, n0 = _pages([prompt], page)
        o_indptr, o_idx, o_last, n1 = _pages([own] * PATHS, page)
        k, v = caches(n0 + n1)
        q = torch.zeros(PATHS, hq, d, dtype=dtype)
        ka.cascade_attention(q, k, v, [torch.tensor([0, PATHS], dtype=torch.int32), _indptr([1] * PATHS)],
                             [p_indptr, o_indptr], [p_idx, o_idx + n0], [p_last, o_last], [False, False],
                             [None, None], 0.1)

    def prefill():
        indptr, idx, last, n = _pages([prompt], page)
        k, v = caches(n)
        q = torch.zeros(prompt, hq, d, dtype=dtype)
        ka.attention(q, torch.tensor([0, prompt], dtype=torch.int32), k, v, indptr, idx, last, True, None, 0.1)

    def tree(packed):
        def run():
            nodes, paths = 48, 4  # 48 nodes x 3 heads (SmolLM2) fill a 128-row block
            indptr, idx, last, n = _pages([prompt + nodes] * paths, page)
            k, v = caches(n)
            q = torch.zeros(paths * nodes, hq, d, dtype=dtype)
            mask = torch.ones(paths * nodes * (prompt + nodes), dtype=torch.bool)
            if packed:
                mask = torch.zeros((mask.numel() + 7) // 8, dtype=torch.uint8)
            ka.attention(q, _indptr([nodes] * paths), k, v, indptr, idx, last, False, mask, 0.1)
        return run

    def append():
        n = _pages([prompt], page)[3]
        k, v = caches(n)
        new = torch.zeros(PATHS, hkv, d, dtype=dtype)
        ka.append_kv(k, v, new, new, torch.arange(PATHS, dtype=torch.int32))

    def merge_two():  # a quantized cache's window level merged with its X̂ level
        o = torch.zeros(PATHS, hq, d, dtype=dtype)
        lse = torch.zeros(PATHS, hq)
        ka.merge_state(o, lse, o, lse)

    return {"decode": decode, "prefill": prefill, "tree_bool": tree(False), "tree_packed": tree(True),
            "append_kv": append, "merge_state": merge_two}


def _xquant_scenarios(model: str, dtype_name: str) -> dict[str, Callable[[], None]]:
    from forkdec.ops.xquant import page_args
    from forkdec.triton_kernels import xquant as kx
    from forkdec.xquant.pages import QuantizedPages
    hq, hkv, d, hidden, _ = MODELS[model]
    dtype = DTYPES[dtype_name]
    page = 64

    def run(qo_lens, kv_lens, causal):
        indptr, idx, last, n = _pages(kv_lens, page)
        x = QuantizedPages.empty(n, page, hidden, 4, 64, "channel")
        q = torch.zeros(sum(qo_lens), hq, d, dtype=dtype)
        w = torch.zeros(hidden, hkv * d)
        cos = torch.zeros(max(kv_lens) + 1, d)
        kx.xquant_attention(q, _indptr(qo_lens), *page_args(x), *page_args(x), page, indptr, idx, last,
                            torch.zeros(len(kv_lens), dtype=torch.int32), w, w, None, None, cos, cos, causal,
                            None, 0.1)

    return {"decode": lambda: run([PATHS], [640], False),      # the shared prompt level: all paths' rows
            "prefill": lambda: run([256], [256], True)}


def _speculative_scenarios(vocab: int, dtype_name: str) -> dict[str, Callable[[], None]]:
    from forkdec.triton_kernels import speculative as ks
    dtype = DTYPES[dtype_name]
    nodes, batch = 16, 4
    tok = torch.zeros(batch * nodes, dtype=torch.int32)
    par = torch.full((batch * nodes,), -1, dtype=torch.int32)
    ip = _indptr([nodes] * batch)
    rows = torch.zeros(batch * (nodes + 1), vocab, dtype=dtype)
    return {
        "verify_greedy": lambda: ks.verify_tree_greedy(tok, par, ip, rows, 8),
        "verify_sampling": lambda: ks.verify_tree_sampling(tok, par, ip, rows, rows, torch.zeros(rows.shape[0],
                                                                                                   dtype=torch.float64),
                                                            8, True)}


def _sampling_scenarios(vocab: int, dtype_name: str) -> dict[str, Callable[[], None]]:
    from forkdec.triton_kernels.sampling import sample_rows, token_signals
    from forkdec.triton_kernels.softmax import softmax_rows
    dtype = DTYPES[dtype_name]
    x = torch.zeros(PATHS, vocab, dtype=dtype)
    r = PATHS
    f32 = torch.zeros(r)
    return {
        "sample": lambda: sample_rows(x, torch.arange(r), f32, f32 + 1, torch.zeros(r, dtype=torch.int64), f32 + 1,
                                      f32, torch.zeros(r, dtype=torch.int64)),
        "softmax": lambda: softmax_rows(x, 1.0, None, torch.zeros(PATHS, vocab)),
        # DeepConf's k = 20: the top-k slots the engine asks for with confidences
        "signals": lambda: token_signals(x, torch.arange(r), torch.zeros(r, dtype=torch.int64), 20, f32.clone(),
                                         torch.zeros(r, 20), torch.zeros(r, 20, dtype=torch.int64), f32.clone()),
    }


def _layer_scenarios(model: str, dtype_name: str) -> dict[str, Callable[[], None]]:
    from forkdec.triton_kernels import layer_ops as kl
    hq, hkv, d, hidden, inter = MODELS[model]
    dtype = DTYPES[dtype_name]
    t = PATHS
    x = torch.zeros(t, hidden, dtype=dtype)
    qkv = torch.zeros(t, (hq + 2 * hkv) * d, dtype=dtype)
    cs = torch.zeros(t, d // 2)
    return {
        "add_rms_norm": lambda: kl.rms_norm_rows(x, x, torch.zeros(hidden, dtype=dtype), 1e-5, x.clone(), x.clone()),
        "rope_qkv": lambda: kl.rope_qkv_rows(qkv, cs, cs, hq, hkv, torch.zeros(t, hq, d, dtype=dtype),
                                             torch.zeros(t, hkv, d, dtype=dtype), torch.zeros(t, hkv, d, dtype=dtype)),
        "silu_and_mul": lambda: kl.silu_and_mul_rows(torch.zeros(t, 2 * inter, dtype=dtype),
                                                     torch.zeros(t, inter, dtype=dtype)),
    }


PHASES = {  # scenario suffix -> (phase, memory bound by the roofline)
    "decode": ("decode", True), "prefill": ("prefill", False), "tree_bool": ("tree", False),
    "tree_packed": ("tree", False), "append_kv": ("elementwise", True), "merge_state": ("merge", True),
    "verify_greedy": ("verify", True),
    "verify_sampling": ("verify", True), "sample": ("sampling", True), "softmax": ("sampling", True),
    "signals": ("sampling", True),
    "add_rms_norm": ("elementwise", True), "rope_qkv": ("elementwise", True), "silu_and_mul": ("elementwise", True),
}


def scenarios() -> dict[str, Callable[[], None]]:
    """Every scenario by name: family/shape/dtype/what, e.g. attention/llama8b/bf16/decode."""
    out = {}
    for dn in DTYPES:
        for model in MODELS:
            for what, fn in _attention_scenarios(model, dn).items():
                out[f"attention/{model}/{dn}/{what}"] = fn
            for what, fn in _xquant_scenarios(model, dn).items():
                out[f"xquant/{model}/{dn}/{what}"] = fn
        for model in ("smollm2", "llama8b"):
            for what, fn in _layer_scenarios(model, dn).items():
                out[f"layer_ops/{model}/{dn}/{what}"] = fn
        for vocab in VOCABS:
            for what, fn in {**_sampling_scenarios(vocab, dn), **_speculative_scenarios(vocab, dn)}.items():
                out[f"{'speculative' if what.startswith('verify') else 'sampling'}/v{vocab}/{dn}/{what}"] = fn
    return out


def _record(name: str, fn: Callable[[], None]) -> list[tuple]:
    sink: list = []
    with record_launches(sink), _gpu_sm_count(132):
        fn()
    phase, memory_bound = PHASES[name.rsplit("/", 1)[1]]
    out = []
    for kernel, args, kwargs in sink:
        kname = kernel.fn.__name__
        # A decode step's LSE merges are memory bound whatever the phase.
        mb = memory_bound or kname.startswith("_merge")
        out.append((Launch(name, kname, "merge" if kname.startswith("_merge") else phase, mb), kernel, args, kwargs))
    return out


@contextlib.contextmanager
def _gpu_sm_count(sms: int):
    """The split heuristic (attention's, which xquant shares) sized for a GPU with `sms` SMs."""
    from forkdec.triton_kernels import attention as ka
    ka.COMPILE_TARGET.sms = sms
    try:
        yield
    finally:
        ka.COMPILE_TARGET.sms = None


# ---------------------------------------------------------------------------
# Compiling and reading resources
# ---------------------------------------------------------------------------

def _specialise(kernel, args, kwargs, arch: int):
    """(ASTSource, options) exactly as JITFunction.run would build them for `arch`."""
    from triton._utils import find_paths_if, get_iterable_path
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, _ = binder(*args, **kwargs)
    opts = {k: v for k, v in kwargs.items() if k not in bound}
    options = backend.parse_options(opts)
    sigvals = [x[0] for x in spec]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    constexprs = {p: get_iterable_path(list(bound.values()), p)
                  for p in find_paths_if(sigvals, lambda _, v: v == "constexpr")}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in spec]
    attrs = {p: backend.parse_attr(get_iterable_path(attrvals, p))
             for p in find_paths_if(attrvals, lambda _, x: isinstance(x, str))}
    config = {kernel.params[p[0]].name: constexprs[p] for p in constexprs if kernel.params[p[0]].is_constexpr}
    config = {k: (str(v) if not isinstance(v, (int, float, bool, str)) else v) for k, v in config.items()}
    return target, ASTSource(kernel, signature, constexprs, attrs), options, config


def _bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself runs for `arch` (Triton 3.9 has one per architecture range)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except ImportError:  # older Triton: one bundled ptxas
        return _bin("ptxas")


def _resource_usage(cubin: bytes, ptx: str, arch: int) -> dict:
    """Registers and per-thread local memory (spills live in the stack frame) from
    cuobjdump; spill stores/loads from ptxas -v when there is any local memory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
        out = dict(regs=int(found[1]), local_bytes=int(found[2]) + int(found[4]), spill_stores=0, spill_loads=0)
        if out["local_bytes"]:  # how much of it is spills: ptxas -v says
            ptx_path = os.path.join(tmp, "k.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            log = subprocess.run([_ptxas(arch), "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", ptx_path, "-o",
                                  os.path.join(tmp, "k.o")], capture_output=True, text=True).stderr
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            if spill:
                out["spill_stores"], out["spill_loads"] = int(spill[1]), int(spill[2])
    return out


def occupancy_warps(regs: int, shared: int, num_warps: int, arch: int) -> int:
    """Resident warps per SM (CUDA occupancy calculator: registers allocated per warp
    in units of 256, at most 64 warps and 32 blocks per SM)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_shared = TARGETS[arch]["shared_per_sm"] // (shared + RESERVED_SHARED_PER_BLOCK)
    blocks = min(by_regs, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)
    return blocks * num_warps


def _compile_one(job) -> Resources:
    launch, kernel, args, kwargs, arch = job
    import triton
    target, src, options, config = _specialise(kernel, args, kwargs, arch)
    config_str = ", ".join(f"{k}={v}" for k, v in config.items() if k.isupper()) + \
        f", num_warps={options.num_warps}, num_stages={options.num_stages}"
    res = Resources(launch.scenario, launch.kernel, launch.phase, launch.memory_bound, arch, config_str,
                    options.num_warps)
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 (reported, the test fails on it)
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return res
    usage = _resource_usage(compiled.asm["cubin"], compiled.asm["ptx"], arch)
    res.regs, res.local_bytes = usage["regs"], usage["local_bytes"]
    res.spill_stores, res.spill_loads = usage["spill_stores"], usage["spill_loads"]
    res.shared = int(compiled.metadata.shared)
    res.warps_per_sm = occupancy_warps(res.regs, res.shared, res.num_warps, arch)
    return res


def _job_key(launch: Launch, kernel, args, kwargs, arch: int) -> str:
    _, src, options, config = _specialise(kernel, args, kwargs, arch)
    return json.dumps([launch.kernel, arch, sorted(map(str, src.signature.items())),
                       sorted(map(str, src.constants.items())), sorted(map(str, src.attrs.items())),
                       options.num_warps, options.num_stages])


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)


def compile_all(names: list[str] | None = None, workers: int = 2, progress: bool = True) -> list[dict]:
    """Resources of every (scenario, launch, arch); identical compilations run once."""
    table = scenarios()
    jobs, keys, rows = [], {}, []
    for name in names or list(table):
        for launch, kernel, args, kwargs in _record(name, table[name]):
            for arch in TARGETS:
                key = _job_key(launch, kernel, args, kwargs, arch)
                if key not in keys:
                    keys[key] = len(jobs)
                    jobs.append((launch, kernel, args, kwargs, arch))
                rows.append((launch, arch, keys[key]))
    results: list[Resources | None] = [None] * len(jobs)
    if progress:
        print(f"compiling {len(jobs)} kernels for {len(rows)} launches", file=sys.stderr, flush=True)
    # Kernels are pickled by reference: workers import them in compile mode.
    picklable = [(j[0], (j[1].fn.__module__, j[1].fn.__name__), _cpu_args(j[2]), j[3], j[4]) for j in jobs]
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        for i, res in enumerate(pool.map(_compile_by_name, picklable)):
            results[i] = res
            if progress and (i + 1) % 10 == 0:
                print(f"  {i + 1}/{len(jobs)}", file=sys.stderr, flush=True)
    out = []
    for launch, arch, i in rows:
        r = asdict(results[i])
        r["scenario"], r["phase"], r["memory_bound"] = launch.scenario, launch.phase, launch.memory_bound
        out.append(r)
    return out


def _cpu_args(args):
    # Tensors travel as tiny stand-ins of their dtype (only dtype and alignment matter).
    return tuple(torch.empty(1, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


def _compile_by_name(job) -> Resources:
    launch, (module, name), args, kwargs, arch = job
    import importlib
    kernel = getattr(importlib.import_module(module), name)
    return _compile_one((launch, kernel, args, kwargs, arch))


def problems(row: dict) -> list[str]:
    """What the compile test fails on for one row (docs/triton_verification.md)."""
    arch = row["arch"]
    out = []
    if row["error"]:
        return [f"compile error: {row['error']}"]
    if row["phase"] in ("decode", "sampling", "merge", "elementwise", "verify") and row["local_bytes"]:
        out.append(f"spills in a {row['phase']} configuration: {row['local_bytes']} B local "
                   f"({row['spill_stores']} B spill stores)")
    if row["shared"] > TARGETS[arch]["shared_per_block"]:
        out.append(f"shared memory {row['shared']} B over the {TARGETS[arch]['name']} limit "
                   f"{TARGETS[arch]['shared_per_block']} B")
    if row["memory_bound"] and row["warps_per_sm"] < MIN_WARPS_MEMORY_BOUND:
        out.append(f"memory bound but only {row['warps_per_sm']} resident warps per SM")
    return out


def format_table(rows: list[dict]) -> str:
    lines = ["| scenario | kernel | sm | config | regs | local B (spill st) | shared B | warps/SM | problems |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['kernel']} | {r['arch']} | {r['config']} | {r['regs']} | "
                     f"{r['local_bytes']} ({r['spill_stores']}) | {r['shared']} | {r['warps_per_sm']} | "
                     f"{'; '.join(problems(r)) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only", help="regular expression on scenario names")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: Triton cannot compile for a GPU in interpreter mode")
    names = [n for n in scenarios() if not args.only or re.search(args.only, n)]
    rows = compile_all(names, workers=args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
