"""GPU microbenchmark of sampling with top-k + top-p from logits: the PyTorch
pipeline (bench/sampling.py torch_sample), forkdec's Triton kernel and
FlashInfer's top_k_top_p_sampling_from_logits, timed with
triton.testing.do_bench (median).

Achieved GB/s counts one read of the logits (a sampler's minimum traffic) and
is compared with this device's copy bandwidth (1 read + 1 write, timed the same
way) and its nominal peak. On a GPU it writes bench/results/gpu_sampling.md.
`--dry-run` (no GPU needed; TRITON_INTERPRET=1 for the Triton kernel) lists the
cases and runs every implementation once on a tiny CPU input, checking that
each token lies in the support of forkdec.reference.filtered_probs.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch

from forkdec.bench.gpu_common import device_bandwidth, gpu_facts, parse_shape_cases, timed_rows

from forkdec.bench.sampling import torch_sample

SHAPES = [(64, 49152), (256, 151936)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE, TOP_K, TOP_P = 0.8, 50, 0.9
DRY_RUN_SHAPE = (3, 300)

Impl = Callable[[torch.Tensor], torch.Tensor]


def implementations(device: torch.device) -> dict[str, Impl | str]:
    """Each implementation as logits -> int64 tokens [rows], or why it cannot run on `device`."""
    impls: dict[str, Impl | str] = {
        "torch (sort + multinomial)": lambda x: torch_sample(x.float(), TEMPERATURE, TOP_K, TOP_P).squeeze(1)}

    if importlib.util.find_spec("triton") is None:
        impls["forkdec triton"] = "triton is not installed"
    elif device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        impls["forkdec triton"] = "CPU tensors need TRITON_INTERPRET=1"
    else:
        from forkdec.triton_kernels.sampling import sample_rows

        def triton_sample(x: torch.Tensor) -> torch.Tensor:
            rows = x.shape[0]
            tokens = torch.empty(rows, dtype=torch.int64, device=x.device)
            full = lambda v, dtype: torch.full((rows,), v, dtype=dtype, device=x.device)  # noqa: E731
            sample_rows(x, torch.arange(rows, device=x.device), torch.rand(rows, device=x.device),
                        full(TEMPERATURE, torch.float32), full(TOP_K, torch.int64), full(TOP_P, torch.float32),
                        full(0.0, torch.float32), tokens)
            return tokens
        impls["forkdec triton"] = triton_sample

    if importlib.util.find_spec("flashinfer") is None:
        impls["flashinfer"] = "flashinfer is not installed"
    elif device.type != "cuda":
        impls["flashinfer"] = "flashinfer runs on CUDA tensors only"
    else:
        import flashinfer

        # top_k_top_p_sampling_from_logits(logits, top_k, top_p, ...) applies top-k then top-p.
        impls["flashinfer"] = lambda x: flashinfer.sampling.top_k_top_p_sampling_from_logits(
            x / TEMPERATURE, TOP_K, TOP_P).long()
    return impls


def make_input(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(shape, generator=g, device=device) * 4).to(dtype)


def out_of_support(impl: Impl, x: torch.Tensor) -> int:
    """How many rows got a token outside the filtered distribution's support."""
    from forkdec import reference

    tokens = impl(x)
    assert tokens.dtype == torch.int64 and tokens.shape == (x.shape[0],), (tokens.dtype, tokens.shape)
    probs = reference.filtered_probs(x, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
    return int((probs.gather(1, tokens[:, None].clamp(0, x.shape[1] - 1)) == 0).sum())


def dry_run(cases: list[tuple[tuple[int, int], str]]) -> int:
    device = torch.device("cpu")
    print("dry run: on a GPU this would time, with triton.testing.do_bench (median ms):")
    for shape, dtype_name in cases:
        nbytes = shape[0] * shape[1] * DTYPES[dtype_name].itemsize
        print(f"  {shape[0]}x{shape[1]} {dtype_name}: {', '.join(implementations(device))}; "
              f"{nbytes / 2**20:.0f} MiB of logits read")
    print("  plus a device-to-device copy for the measured bandwidth; peak from the device name table")
    print(f"plumbing check on CPU tensors {DRY_RUN_SHAPE[0]}x{DRY_RUN_SHAPE[1]}:")
    failures = 0
    for dtype_name in sorted({d for _, d in cases}):
        x = make_input(DRY_RUN_SHAPE, DTYPES[dtype_name], device)
        for name, impl in implementations(device).items():
            if isinstance(impl, str):
                print(f"  {dtype_name} {name}: skipped ({impl})")
                continue
            bad = out_of_support(impl, x)
            failures += bad
            print(f"  {dtype_name} {name}: ran, {bad} token(s) outside the filtered support")
    return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
    cases, args = parse_shape_cases("forkdec bench gpu-sampling", __doc__, SHAPES, DTYPES, argv)
    if args.dry_run:
        return dry_run(cases)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_sampling: no CUDA device (use --dry-run to check the plumbing)")
    return measure(cases, args.out)


def measure(cases: list[tuple[tuple[int, int], str]], out_dir: Optional[str]) -> int:
    from forkdec.bench.common import markdown_table, results_dir, write_report

    device = torch.device("cuda")
    copy_gbs, peak = device_bandwidth(device)
    rows = timed_rows(cases, lambda c: make_input(c[0], DTYPES[c[1]], device), implementations(device),
                      lambda c, name: [f"{c[0][0]}x{c[0][1]}", c[1], name],
                      lambda impl, x: str(out_of_support(impl, x)),
                      lambda x: x.numel() * x.element_size(), copy_gbs, peak)  # one read of the logits

    header = ["shape", "dtype", "implementation", "ms", "GB/s", "of copy", "of peak", "off-support tokens", "note"]
    table = markdown_table(header, rows)
    print(table)
    facts = gpu_facts(device, copy_gbs, peak, {
        "settings": f"temperature {TEMPERATURE}, top_k {TOP_K}, top_p {TOP_P}",
        "timing": "triton.testing.do_bench, median ms",
        "GB/s": "one read of the logits",
    })
    write_report(results_dir(out_dir) / "gpu_sampling.md", "Sampling on the GPU", facts, table)
    return 0


run = main  # `forkdec bench <area>` calls run(argv)

if __name__ == "__main__":
    raise SystemExit(main())
