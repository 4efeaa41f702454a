"""What every GPU microbenchmark shares: the device's nominal and measured memory bandwidth."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import torch

# Nominal peaks from the vendors' data sheets: (substring of the device name as
# torch reports it, min memory GiB, HBM GB/s, dense bf16 tensor-core TFLOP/s).
# First match wins, so the more specific names come first.
PEAKS = [("H200", 0, 4800, 989), ("H100 NVL", 0, 3900, 835), ("H100 PCIe", 0, 2000, 756),
         ("H100 80GB HBM3", 0, 3350, 989), ("H100 SXM", 0, 3350, 989),
         ("A100", 60, 2039, 312), ("A100", 0, 1555, 312)]


def nominal_peaks(name: str, memory_bytes: int) -> tuple[Optional[float], Optional[float]]:
    """(GB/s, bf16 TFLOP/s) of the table for a device name, or (None, None)."""
    for key, min_gib, gbs, tflops in PEAKS:
        if key in name and memory_bytes >= min_gib * 2**30:
            return float(gbs), float(tflops)
    return None, None


def nominal_peak_gbs(name: str, memory_bytes: int) -> Optional[float]:
    """The table's peak GB/s for a device name, or None if the device is not in it."""
    return nominal_peaks(name, memory_bytes)[0]


def device_bandwidth(device: torch.device) -> tuple[float, Optional[float]]:
    """(measured copy GB/s over 256 MiB, nominal peak GB/s or None) of a CUDA device."""
    from triton.testing import do_bench

    props = torch.cuda.get_device_properties(device)
    src = torch.empty(2**28 // 4, dtype=torch.float32, device=device)  # 256 MiB, far out of L2
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3) / 1e9
    return copy_gbs, nominal_peak_gbs(props.name, props.total_memory)


def parse_shape_cases(prog: str, doc: str | None, shapes: list[tuple[int, int]], dtypes: dict,
                      argv: Optional[list[str]]) -> tuple[list[tuple[tuple[int, int], str]], argparse.Namespace]:
    """The command line of a [rows, cols] x dtype GPU benchmark: (cases, args with .out and .dry_run)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in shapes),
                        help="comma-separated ROWSxCOLS shapes")
    parser.add_argument("--dtypes", default=",".join(dtypes), help=f"comma-separated, of {', '.join(dtypes)}")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check the plumbing on a tiny CPU input")
    args = parser.parse_args(argv)
    parsed = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtype_names = args.dtypes.split(",")
    unknown = [d for d in dtype_names if d not in dtypes]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; expected {', '.join(dtypes)}")
    return [(shape, d) for d in dtype_names for shape in parsed], args


def gpu_facts(device: torch.device, copy_gbs: float, peak: Optional[float], extra: dict[str, str]) -> dict[str, str]:
    """The machine facts every GPU report states, then the benchmark's own."""
    from forkdec.bench.common import machine_facts

    props = torch.cuda.get_device_properties(device)
    return machine_facts({
        "gpu": f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
        "torch CUDA": str(torch.version.cuda),
        "copy bandwidth (measured)": f"{copy_gbs:.0f} GB/s (256 MiB device-to-device copy_, 1 read + 1 write)",
        "nominal peak": f"{peak:.0f} GB/s" if peak else "device not in the table (see 'of copy')",
        **extra,
    })


def timed_row(label: list[str], impl, check, call, nbytes: float, copy_gbs: float, peak: Optional[float],
              blanks: int = 5) -> tuple[list[str], Optional[float]]:
    """One table row for `impl` (a callable, or a string saying why it cannot run):
    check() first (its text ends the row: an error, a count), then call() timed with
    do_bench: label + [ms, GB/s, of copy, of peak, check] (+ note). Returns (row, ms or None)."""
    from triton.testing import do_bench

    if isinstance(impl, str):
        return label + ["-"] * blanks + [f"n/a: {impl}"], None
    try:
        checked = check()
        ms = do_bench(call, return_mode="median")
    except Exception as e:  # e.g. a dtype or shape an external kernel does not take
        return label + ["-"] * blanks + [f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"], None
    gbs = nbytes / (ms * 1e-3) / 1e9
    row = label + [f"{ms:.3f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}", f"{gbs / peak:.0%}" if peak else "-", checked]
    print(" | ".join(row))
    return row, ms


def timed_rows(cases: list, make: Callable[[Any], Any], impls: dict, label: Callable[[Any, str], list[str]],
               check: Callable[[Any, Any], str], nbytes: Callable[[Any], float], copy_gbs: float,
               peak: Optional[float]) -> list[list[str]]:
    """timed_row for every case x implementation, plus a note column: make(case) builds a
    case's inputs once (freed before the next case), label(case, name) starts its rows,
    check(impl, inputs) ends them and nbytes(inputs) is what one call moves."""
    rows = []
    for case in cases:
        x = make(case)
        for name, impl in impls.items():
            row, ms = timed_row(label(case, name), impl, lambda: check(impl, x), lambda: impl(x), nbytes(x),
                                copy_gbs, peak)
            rows.append(row + ([""] if ms is not None else []))
        x = None  # freed before the next case's inputs
        torch.cuda.empty_cache()
    return rows
