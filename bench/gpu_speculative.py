"""GPU microbenchmark of speculative verification: forkdec's Triton kernels for
tree sampling (SpecInfer multi-step speculative sampling) and chain sampling,
and FlashInfer's chain_speculative_sampling when installed, timed with
triton.testing.do_bench (median).

Effective GB/s counts one read of draft_probs and target_probs in their dtype
(what a kernel that visits every row once moves; forkdec's kernels read a whole
row only after a rejection, so they can beat it), compared with this device's
copy bandwidth (a device-to-device copy_, timed the same way) and with the
nominal peak of the device. On a GPU it writes bench/results/gpu_speculative.md.
`--dry-run` (no GPU needed, TRITON_INTERPRET=1 for the Triton kernels) lists the
cases and runs every implementation once on a tiny CPU input to check the
plumbing.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Callable, Optional

import torch

from forkdec.bench.gpu_common import device_bandwidth, gpu_facts, timed_rows


# (kind, requests, nodes or chain length, vocab)
CASES = [("tree", 64, 64, 49152), ("tree", 256, 16, 128256), ("chain", 64, 4, 49152), ("chain", 256, 8, 128256)]
QUICK_CASES = [CASES[0], CASES[3]]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DRY_RUN_CASES = [("tree", 3, 5, 50), ("chain", 2, 3, 50)]

Inputs = dict
Impl = Callable[[Inputs], object]


def make_inputs(kind: str, requests: int, nodes: int, vocab: int, dtype: torch.dtype, device) -> Inputs:
    """Correlated target/draft distributions; children drawn from their parent's draft row."""
    g = torch.Generator(device=device).manual_seed(0)
    rows = requests * (nodes + 1)
    z = torch.randn(rows, vocab, generator=g, device=device) * 3
    target = torch.softmax(z, -1)
    draft = torch.softmax(z + torch.randn(rows, vocab, generator=g, device=device), -1)
    if kind == "chain":
        parents = torch.arange(-1, nodes - 1, device=device, dtype=torch.int32).repeat(requests)
    else:  # random deep-and-bushy trees
        i = torch.arange(nodes, device=device).repeat(requests)
        chain = torch.rand(i.shape, generator=g, device=device) < 0.6
        anywhere = (torch.rand(i.shape, generator=g, device=device) * (i + 1)).long() - 1
        parents = torch.where(chain & (i > 0), i - 1, anywhere).to(torch.int32)
    indptr = torch.arange(requests + 1, device=device, dtype=torch.int32) * nodes
    req = torch.repeat_interleave(torch.arange(requests, device=device), nodes)
    parent_row = indptr.long()[req] + req + 1 + parents.long()
    tokens = torch.multinomial(draft[parent_row], 1, generator=g).reshape(-1).to(torch.int32)
    out = dict(kind=kind, tokens=tokens, parents=parents, indptr=indptr, draft=draft.to(dtype),
               target=target.to(dtype), requests=requests, nodes=nodes, vocab=vocab)
    if kind == "chain":
        out["chain_draft"] = draft.to(dtype).reshape(requests, nodes + 1, vocab)[:, :nodes].contiguous()
        out["chain_target"] = target.to(dtype).reshape(requests, nodes + 1, vocab)
        out["chain_tokens"] = tokens.reshape(requests, nodes)
    out["uniforms"] = torch.rand(rows, dtype=torch.float64, generator=g, device=device)
    return out


def implementations(device: torch.device) -> dict[str, Impl | str]:
    """Each implementation as inputs -> num_accepted [B], or why it cannot run on `device`."""
    impls: dict[str, Impl | str] = {}
    if importlib.util.find_spec("triton") is None:
        impls["forkdec triton"] = "triton is not installed"
    elif device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        impls["forkdec triton"] = "CPU tensors need TRITON_INTERPRET=1"
    else:
        from forkdec.triton_kernels import speculative as kernels

        def triton_verify(x: Inputs):
            match = x["kind"] == "tree"
            draft = x["draft"] if match else x["chain_draft"].reshape(-1, x["vocab"])
            return kernels.verify_tree_sampling(x["tokens"], x["parents"], x["indptr"], draft, x["target"],
                                                x["uniforms"], x["nodes"], match)[2]
        impls["forkdec triton"] = triton_verify

    from forkdec import _extension
    if device.type == "cpu":  # dry run: the C++ op stands in for a device kernel
        if _extension.load() is None:
            impls["forkdec cpu"] = _extension.error() or "forkdec._C is not built"
        else:
            impls["forkdec cpu"] = lambda x: torch.ops.forkdec.verify_tree_sampling(
                x["tokens"], x["parents"], x["indptr"], x["draft"] if x["kind"] == "tree" else
                x["chain_draft"].reshape(-1, x["vocab"]), x["target"], x["uniforms"], x["nodes"],
                x["kind"] == "tree")[2]

    if importlib.util.find_spec("flashinfer") is None:
        impls["flashinfer (chain only)"] = "flashinfer is not installed"
    elif device.type != "cuda":
        impls["flashinfer (chain only)"] = "flashinfer runs on CUDA tensors only"
    else:
        import flashinfer

        def flashinfer_chain(x: Inputs):
            if x["kind"] != "chain":
                raise NotImplementedError("FlashInfer has no multi-draft tree sampling op")
            out = flashinfer.sampling.chain_speculative_sampling(x["chain_draft"], x["chain_tokens"],
                                                                 x["chain_target"])
            return flashinfer_accepted(out)
        impls["flashinfer (chain only)"] = flashinfer_chain
    return impls


def flashinfer_accepted(out) -> torch.Tensor:
    """Draft tokens accepted per request from FlashInfer's chain_speculative_sampling result:
    a 3-tuple (output_token_ids [B, L + 1], accepted counts, emitted draft counts [B]) in
    current releases, the token ids alone in old ones (-1 after the bonus token)."""
    if isinstance(out, (tuple, list)):
        return out[2]  # emitted: the accepted prefix actually output (out[1] counts every accepted draft)
    return (out >= 0).sum(-1) - 1


def nbytes(x: Inputs) -> int:
    return x["draft"].numel() * x["draft"].element_size() + x["target"].numel() * x["target"].element_size()


def dry_run(dtype_names: list[str], cases: list = CASES) -> int:
    device = torch.device("cpu")
    print("dry run: on a GPU this would time, with triton.testing.do_bench (median ms):")
    for kind, b, n, v in cases:
        print(f"  {kind} B={b} nodes={n} V={v}: {', '.join(implementations(device))}")
    print("  plus a device-to-device copy for the measured bandwidth; peak from the device name table")
    for dtype_name in dtype_names:
        for case in DRY_RUN_CASES:
            x = make_inputs(*case, DTYPES[dtype_name], device)
            results = {}
            for name, impl in implementations(device).items():
                if isinstance(impl, str):
                    print(f"  {dtype_name} {case} {name}: skipped ({impl})")
                    continue
                results[name] = impl(x)
                print(f"  {dtype_name} {case} {name}: ran, mean accepted {results[name].float().mean():.2f}")
            values = list(results.values())
            if len(values) > 1 and not all(torch.equal(values[0].cpu(), r.cpu()) for r in values[1:]):
                raise AssertionError(f"forkdec backends disagree on {case}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forkdec.bench.gpu_speculative", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check the plumbing on a tiny CPU input")
    parser.add_argument("--quick", action="store_true", help="one tree and one chain case (forkdec bench gpu)")
    args = parser.parse_args(argv)
    dtype_names = args.dtypes.split(",")
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; expected {', '.join(DTYPES)}")
    cases = QUICK_CASES if args.quick else CASES
    if args.dry_run:
        return dry_run(dtype_names, cases)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_speculative: no CUDA device (use --dry-run to check the plumbing)")
    return measure(dtype_names, args.out, cases)


def measure(dtype_names: list[str], out_dir: Optional[str], cases_run: list = CASES) -> int:
    from forkdec.bench.common import markdown_table, results_dir, write_report

    device = torch.device("cuda")
    copy_gbs, peak = device_bandwidth(device)
    cases = [(dtype_name, case) for dtype_name in dtype_names for case in cases_run]
    rows = timed_rows(cases, lambda c: make_inputs(*c[1], DTYPES[c[0]], device), implementations(device),
                      lambda c, name: [f"{c[1][0]} B={c[1][1]} n={c[1][2]} V={c[1][3]}", c[0], name],
                      lambda impl, x: f"{float(impl(x).float().mean()):.2f}", nbytes, copy_gbs, peak)
    header = ["case", "dtype", "implementation", "ms", "effective GB/s", "of copy", "of peak", "mean accepted",
              "note"]
    table = markdown_table(header, rows)
    print(table)
    facts = gpu_facts(device, copy_gbs, peak, {
        "timing": "triton.testing.do_bench, median ms",
        "GB/s": "one read of draft_probs + target_probs; FlashInfer draws its own uniforms (different draws)",
    })
    write_report(results_dir(out_dir) / "gpu_speculative.md", "Speculative verification on the GPU", facts, table)
    return 0


run = main  # `forkdec bench <area>` calls run(argv)

if __name__ == "__main__":
    raise SystemExit(main())
