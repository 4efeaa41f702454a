"""GPU microbenchmark of XQuant attention: a shared-prompt decode step's prompt
level with the prompt cached as 4-bit X̂ (raw X, or SVD latents) through
forkdec's Triton xquant_attention, against forkdec's Triton attention over a
bf16 K/V cache of the same prompt, timed with triton.testing.do_bench (median).

It also prints (and with --roofline-out writes) a roofline estimate for an
H100 SXM: decode attention is memory-bound, so XQuant pays off when the bytes
it saves take longer to read than its added FLOPs take to compute. No GPU is
needed for the estimate. `--dry-run` (no GPU; TRITON_INTERPRET=1 for the
Triton kernels) lists the cases and runs each implementation once on a tiny CPU
input to check the plumbing. On a GPU it writes bench/results/gpu_xquant.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# H100 SXM nominal peaks: HBM3 bandwidth, dense bf16 tensor-core and fp32 (non-tensor) FLOP/s.
H100 = {"name": "H100 SXM", "bytes_per_s": 3.35e12, "bf16_flops": 989e12, "fp32_flops": 67e12}


@dataclass
class Model:
    name: str
    hidden: int
    hq: int
    hkv: int
    d: int

    @property
    def kv_width(self) -> int:
        return self.hkv * self.d


MODELS = {"smollm2": Model("SmolLM2-135M", 576, 9, 3, 64), "llama3-8b": Model("Llama-3-8B", 4096, 32, 8, 128)}
# (paths, prompt tokens, own tokens per path)
STEPS = [(64, 4096, 256), (1, 4096, 256)]
BITS, GROUP = 4, 64
DRY_RUN = dict(paths=3, prompt=64, own=0)


def cache_bytes_per_token(m: Model, variant: str) -> float:
    """Prompt cache bytes per token: bf16 K and V, or 4-bit X̂ with an fp16 scale and zero per 64 values."""
    if variant == "bf16 K/V":
        return 2 * m.kv_width * 2
    width = m.hidden if variant == "raw X" else 2 * m.kv_width  # latents: K and V latents, KV width each
    return width * (BITS / 8 + 4 / GROUP)


def remat_flops_per_token(m: Model, variant: str) -> float:
    if variant == "bf16 K/V":
        return 0.0
    w = m.hidden if variant == "raw X" else m.kv_width
    return 2 * 2 * w * m.kv_width  # K and V, each [1, W] x [W, Hkv*D]


def roofline_rows(peaks: dict = H100) -> list[list[str]]:
    """Estimated microseconds of one layer's decode attention (prompt level + own tokens in bf16)."""
    rows = []
    for m in MODELS.values():
        for paths, prompt, own in STEPS:
            attn = 4.0 * m.hq * m.d * paths * (prompt + own)
            own_bytes = paths * own * 2 * m.kv_width * 2
            base = None
            for variant in ("bf16 K/V", "raw X", "latent"):
                weights = 0 if variant == "bf16 K/V" else 2 * (m.hidden if variant == "raw X" else m.kv_width) * m.kv_width * 2
                nbytes = prompt * cache_bytes_per_token(m, variant) + own_bytes + weights
                flops = attn + prompt * remat_flops_per_token(m, variant)
                t_mem = nbytes / peaks["bytes_per_s"] * 1e6
                t_bf16 = flops / peaks["bf16_flops"] * 1e6
                t_fp32 = flops / peaks["fp32_flops"] * 1e6
                est = max(t_mem, t_bf16)
                base = base or est
                saved = prompt * (cache_bytes_per_token(m, "bf16 K/V") - cache_bytes_per_token(m, variant))
                added = prompt * remat_flops_per_token(m, variant)
                rows.append([m.name, str(paths), str(prompt), str(own), variant, f"{nbytes / 2**20:.2f}",
                             f"{flops / 1e9:.2f}", f"{added / saved:.0f}" if saved > 0 else "-",
                             f"{t_mem:.2f}", f"{t_bf16:.2f}", f"{t_fp32:.2f}", f"{est:.2f}", f"{est / base:.2f}x"])
    return rows


ROOFLINE_HEADER = ["model", "paths", "prompt", "own", "prompt cache", "MiB read", "GFLOP", "FLOP added per byte saved",
                   "t_mem us", "t_flops bf16 us", "t_flops fp32 us", "estimate us (max of mem, bf16)", "vs bf16 K/V"]


def roofline_markdown(peaks: dict = H100) -> str:
    from forkdec.bench.common import markdown_table
    return ("## Roofline estimate, " + peaks["name"] + f" ({peaks['bytes_per_s'] / 1e12:.2f} TB/s, "
            f"{peaks['bf16_flops'] / 1e12:.0f} TFLOP/s bf16 tensor, {peaks['fp32_flops'] / 1e12:.0f} TFLOP/s fp32)\n\n"
            + markdown_table(ROOFLINE_HEADER, roofline_rows(peaks)) + "\n\n"
            "One layer's decode attention: the prompt level (bf16 K/V, or 4-bit X̂ with fp16 scale/zero per 64 "
            "values plus the bf16 wk/wv it is projected with) and every path's own tokens in bf16 K/V. The ridge "
            f"point is {peaks['bf16_flops'] / peaks['bytes_per_s']:.0f} FLOP/byte (bf16 tensor cores): a variant "
            "whose 'FLOP added per byte saved' is above it trades cheap bytes for dearer FLOPs. For a GQA model "
            "raw X is wider than K/V per KV head (576 vs 192 for SmolLM2), so raw X rematerialization is far "
            "above the ridge; the latent variant sits near it. The Triton kernel multiplies fp16 operands on "
            "tensor cores for fp16/bf16 q (the bf16 column's peak applies) and IEEE fp32 for fp32 q (the fp32 "
            "column).")


# ---------------------------------------------------------------------------
# Measured (GPU) and plumbing (--dry-run) parts
# ---------------------------------------------------------------------------

def build_case(m: Model, paths: int, prompt: int, device: torch.device, page: int = 64) -> dict:
    from forkdec.xquant.pages import QuantizedPages
    g = torch.Generator(device="cpu").manual_seed(0)
    pages = max(1, math.ceil(prompt / page))
    x = torch.randn(pages, page, m.hidden, generator=g)

    def quantized(t: torch.Tensor, axis: str) -> QuantizedPages:
        qp = QuantizedPages.empty(pages, page, t.shape[2], BITS, GROUP, axis)
        for p in range(pages):
            qp.write(p, t[p])
        return QuantizedPages(qp.codes.to(device), qp.scale.to(device), qp.zero.to(device), qp.bits, qp.group_size,
                              qp.axis, qp.page_size, qp.width)

    kvw = m.kv_width
    ang = torch.arange(prompt + 1).float()[:, None] * 1e5 ** (-torch.arange(0, m.d, 2).float() / m.d)
    case = {
        # bf16 as the kernels take them, converted here, outside every timed call
        "q": torch.randn(paths, m.hq, m.d, generator=g).to(device=device, dtype=torch.bfloat16),
        "raw": quantized(x, "channel"),
        "lat_k": quantized(x[..., :kvw].contiguous(), "channel"),
        "lat_v": quantized(x[..., kvw:2 * kvw].contiguous() if m.hidden >= 2 * kvw else x[..., :kvw].contiguous(),
                           "token"),
        "wk": (torch.randn(m.hidden, kvw, generator=g) / m.hidden ** 0.5).to(device),
        "wv": (torch.randn(m.hidden, kvw, generator=g) / m.hidden ** 0.5).to(device),
        "uk": (torch.randn(kvw, kvw, generator=g) / kvw ** 0.5).to(device),
        "uv": (torch.randn(kvw, kvw, generator=g) / kvw ** 0.5).to(device),
        "cos": torch.cat([ang.cos()] * 2, -1).to(device), "sin": torch.cat([ang.sin()] * 2, -1).to(device),
        "qo": torch.tensor([0, paths], dtype=torch.int32, device=device),
        "indptr": torch.tensor([0, pages], dtype=torch.int32, device=device),
        "indices": torch.randperm(pages, generator=g).to(torch.int32).to(device),
        "last": torch.tensor([prompt - (pages - 1) * page], dtype=torch.int32, device=device),
        "start": torch.zeros(1, dtype=torch.int32, device=device),
        "k_cache": torch.randn(pages, page, m.hkv, m.d, generator=g).to(device=device, dtype=torch.bfloat16),
        "v_cache": torch.randn(pages, page, m.hkv, m.d, generator=g).to(device=device, dtype=torch.bfloat16),
    }
    return case


def implementations(device: torch.device) -> dict[str, Callable[[dict], object] | str]:
    """Each implementation as case -> result, or a string saying why it cannot run on `device`."""
    import forkdec
    impls: dict[str, Callable[[dict], object] | str] = {}
    why = None
    if importlib.util.find_spec("triton") is None:
        why = "triton is not installed"
    elif device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "CPU tensors need TRITON_INTERPRET=1"

    def xq(raw: bool):
        def f(c):
            xk, xv = (c["raw"], c["raw"]) if raw else (c["lat_k"], c["lat_v"])
            wk, wv = (c["wk"], c["wv"]) if raw else (c["uk"], c["uv"])
            with forkdec.validation(False):  # the hot path: no input checks inside the timed call
                return forkdec.ops.xquant_attention(c["q"], c["qo"], xk, xv, c["indptr"], c["indices"], c["last"],
                                                    c["start"], wk, wv, c["cos"], c["sin"], backend="triton")
        return f

    def kv(c):
        with forkdec.validation(False):
            return forkdec.ops.attention(c["q"], c["qo"], c["k_cache"], c["v_cache"], c["indptr"], c["indices"],
                                         c["last"], backend="triton")

    for name, f in [("triton xquant raw X 4-bit", xq(True)), ("triton xquant latent 4-bit", xq(False)),
                    ("triton attention bf16 K/V", kv)]:
        impls[name] = why or f
    return impls


def bytes_read(c: dict, impl_name: str) -> int:
    """What one call must read at least: the prompt's pages and, for XQuant, the projections."""
    def size(*ts):
        return sum(t.numel() * t.element_size() for t in ts)
    if "raw X" in impl_name:
        return size(c["raw"].codes, c["raw"].scale, c["raw"].zero, c["wk"], c["wv"])
    if "latent" in impl_name:
        return size(c["lat_k"].codes, c["lat_k"].scale, c["lat_k"].zero, c["lat_v"].codes, c["lat_v"].scale,
                    c["lat_v"].zero, c["uk"], c["uv"])
    return size(c["k_cache"], c["v_cache"])


def dry_run(model_names: list[str]) -> int:
    device = torch.device("cpu")
    print("dry run: on a GPU this would time, with triton.testing.do_bench (median ms):")
    for name in model_names:
        for paths, prompt, own in STEPS:
            print(f"  {MODELS[name].name}, {paths} paths, {prompt}-token prompt: {', '.join(implementations(device))}")
    print(roofline_markdown())
    print(f"plumbing check on CPU tensors ({DRY_RUN}):")
    m = Model("tiny", 64, 4, 2, 32)
    c = build_case(m, DRY_RUN["paths"], DRY_RUN["prompt"], device)
    for name, impl in implementations(device).items():
        print(f"  {name}: " + (f"skipped ({impl})" if isinstance(impl, str) else
                                f"ran, output {tuple(impl(c).shape)}"))
    return 0


def measure(model_names: list[str], out_dir: Optional[str]) -> int:
    from triton.testing import do_bench

    from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report

    from forkdec.bench.gpu_common import nominal_peaks

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    peak_gbs, _ = nominal_peaks(props.name, props.total_memory)
    rows = []
    for name in model_names:
        m = MODELS[name]
        for paths, prompt, _own in STEPS:
            c = build_case(m, paths, prompt, device)
            for impl_name, impl in implementations(device).items():
                label = [m.name, str(paths), str(prompt), impl_name]
                if isinstance(impl, str):
                    rows.append(label + ["-", "-", "-", f"n/a: {impl}"])
                    continue
                ms = do_bench(lambda: impl(c), return_mode="median")
                gbs = bytes_read(c, impl_name) / (ms * 1e-3) / 1e9
                rows.append(label + [f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{gbs / peak_gbs:.0%}" if peak_gbs else "-", ""])
                print(" | ".join(rows[-1]))
            c = None  # freed before the next case
            torch.cuda.empty_cache()
    body = ("## Prompt level of a decode step (one layer)\n\n"
            + markdown_table(["model", "paths", "prompt", "implementation", "us", "GB/s (pages + projections read)",
                             "of peak GB/s", "note"], rows) + "\n\n"
            + roofline_markdown())
    facts = machine_facts({"gpu": f"{props.name}, {props.total_memory / 2**30:.0f} GiB",
                           "timing": "triton.testing.do_bench, median",
                           "q dtype": "bf16 (fp16 tensor-core products in xquant, bf16 in attention)"})
    write_report(results_dir(out_dir) / "gpu_xquant.md", "XQuant attention on the GPU", facts, body)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forkdec.bench.gpu_xquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check the plumbing on a tiny CPU input")
    parser.add_argument("--roofline-out", action="store_true",
                        help="write the H100 roofline estimate to <results>/gpu_xquant_roofline.md and exit")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected {', '.join(MODELS)}")
    if args.roofline_out:
        from forkdec.bench.common import results_dir
        path = results_dir(args.out) / "gpu_xquant_roofline.md"
        path.write_text("# XQuant attention: H100 roofline estimate\n\n" + roofline_markdown() + "\n")
        print(f"wrote {path}")
        return 0
    if args.dry_run:
        return dry_run(names)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_xquant: no CUDA device (use --dry-run to check the plumbing)")
    return measure(names, args.out)


run = main  # `forkdec bench <area>` calls run(argv)

if __name__ == "__main__":
    raise SystemExit(main())
