"""GPU microbenchmark of the Two-Pass Softmax: torch.softmax, forkdec's Triton
kernel, forkdec's CUDA op and FlashInfer's softmax, on [rows, cols] fp32 and bf16
inputs with fp32 output, timed with triton.testing.do_bench (median).

Achieved GB/s counts 2 reads of x + 1 fp32 write, and is compared with this
device's copy bandwidth (a device-to-device copy_, 1 read + 1 write, timed the
same way) and with the nominal peak of the device. On a GPU it writes
bench/results/gpu_softmax.md. `--dry-run` (no GPU needed, TRITON_INTERPRET=1 for
the Triton kernel) lists the cases and runs every implementation once on a tiny
CPU input to check the plumbing.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch

from forkdec.bench.gpu_common import device_bandwidth, gpu_facts, parse_shape_cases, timed_rows

SHAPES = [(64, 262144), (512, 49152), (4096, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 1.0
DRY_RUN_SHAPE = (3, 300)
Impl = Callable[[torch.Tensor], torch.Tensor]


def implementations(device: torch.device) -> dict[str, Impl | str]:
    """Each implementation as x -> fp32 softmax(x / TEMPERATURE, -1), or a string
    saying why it cannot run on `device`."""
    # torch has no temperature argument; at 1.0 skip the division so that only softmax is timed.
    scaled = (lambda x: x) if TEMPERATURE == 1.0 else (lambda x: x / TEMPERATURE)
    impls: dict[str, Impl | str] = {"torch.softmax": lambda x: torch.softmax(scaled(x), -1, dtype=torch.float32)}

    if importlib.util.find_spec("triton") is None:
        impls["forkdec triton"] = "triton is not installed"
    elif device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        impls["forkdec triton"] = "CPU tensors need TRITON_INTERPRET=1"
    else:
        from forkdec.triton_kernels.softmax import softmax_rows

        def triton_softmax(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            softmax_rows(x, 1.0 / TEMPERATURE, None, out)
            return out
        impls["forkdec triton"] = triton_softmax

    from forkdec import _extension
    key = "CUDA" if device.type == "cuda" else "CPU"  # dry run: the same op call, on the CPU kernel
    if _extension.load() is None:
        impls["forkdec cuda"] = _extension.error() or "forkdec._C is not built"
    elif not torch._C._dispatch_has_kernel_for_dispatch_key("forkdec::softmax", key):
        impls["forkdec cuda"] = f"forkdec._C has no {key} kernel for softmax"
    else:
        impls["forkdec cuda"] = lambda x: torch.ops.forkdec.softmax(x, -1, TEMPERATURE, None)

    if importlib.util.find_spec("flashinfer") is None:
        impls["flashinfer"] = "flashinfer is not installed"
    elif device.type != "cuda":
        impls["flashinfer"] = "flashinfer runs on CUDA tensors only"
    else:
        import flashinfer  # softmax(logits, temperature=None, enable_pdl=None) -> probs

        impls["flashinfer"] = lambda x: flashinfer.sampling.softmax(x, temperature=TEMPERATURE)
    return impls


def make_input(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(shape, generator=g, device=device) * 5).to(dtype)


def max_error(impl: Impl, x: torch.Tensor) -> float:
    """Max abs difference from torch.softmax(x.float() / TEMPERATURE, -1)."""
    out = impl(x)
    assert out.dtype == torch.float32 and out.shape == x.shape, (out.dtype, out.shape)
    return (out - torch.softmax(x.float() / TEMPERATURE, -1)).abs().max().item()


def dry_run(cases: list[tuple[tuple[int, int], str]]) -> int:
    device = torch.device("cpu")
    print("dry run: on a GPU this would time, with triton.testing.do_bench (median ms):")
    for shape, dtype_name in cases:
        nbytes = shape[0] * shape[1] * (2 * DTYPES[dtype_name].itemsize + 4)
        print(f"  {shape[0]}x{shape[1]} {dtype_name}: {', '.join(implementations(device))}; {nbytes / 2**20:.0f} MiB moved")
    print("  plus a device-to-device copy for the measured bandwidth; peak from the device name table")
    print(f"plumbing check on CPU tensors {DRY_RUN_SHAPE[0]}x{DRY_RUN_SHAPE[1]}:")
    for dtype_name in sorted({d for _, d in cases}):
        x = make_input(DRY_RUN_SHAPE, DTYPES[dtype_name], device)
        for name, impl in implementations(device).items():
            status = f"skipped ({impl})" if isinstance(impl, str) else f"ran, max abs error {max_error(impl, x):.1e}"
            print(f"  {dtype_name} {name}: {status}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    cases, args = parse_shape_cases("forkdec bench gpu-softmax", __doc__, SHAPES, DTYPES, argv)
    if args.dry_run:
        return dry_run(cases)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_softmax: no CUDA device (use --dry-run to check the plumbing)")
    return measure(cases, args.out)


def measure(cases: list[tuple[tuple[int, int], str]], out_dir: Optional[str]) -> int:
    from forkdec.bench.common import markdown_table, results_dir, write_report

    device = torch.device("cuda")
    copy_gbs, peak = device_bandwidth(device)
    rows = timed_rows(cases, lambda c: make_input(c[0], DTYPES[c[1]], device), implementations(device),
                      lambda c, name: [f"{c[0][0]}x{c[0][1]}", c[1], name],
                      lambda impl, x: f"{max_error(impl, x):.1e}",
                      lambda x: x.numel() * (2 * x.element_size() + 4), copy_gbs, peak)  # 2 reads + 1 fp32 write

    header = ["shape", "dtype", "implementation", "ms", "GB/s", "of copy", "of peak", "max abs err", "note"]
    table = markdown_table(header, rows)
    print(table)
    facts = gpu_facts(device, copy_gbs, peak, {
        "timing": "triton.testing.do_bench, median ms; outputs allocated per call (caching allocator)",
        "GB/s": "2 reads of x + 1 fp32 write; temperature 1.0 passed to every implementation",
    })
    write_report(results_dir(out_dir) / "gpu_softmax.md", "Two-Pass Softmax on the GPU", facts, table)
    return 0


run = main  # `forkdec bench <area>` calls run(argv)

if __name__ == "__main__":
    raise SystemExit(main())
