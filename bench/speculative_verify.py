"""Speculative tree verification benchmark: verify_tree_sampling (SpecInfer
multi-step speculative sampling) for a batch of draft trees over a large
vocabulary, C++ kernel vs the PyTorch reference, and its cost next to the
forward pass that produced the target rows.

Workload: `--requests` trees of `--nodes` nodes (random shapes, deep and
bushy), vocabulary `--vocab` (SmolLM2's 49,152), target p = softmax(z) and
draft q = softmax(z + noise) per row (correlated, so paths of several nodes
are accepted), each child drawn from its parent's q.

Forward proxy, measured in the same run: the linear layers of SmolLM2-135M
(30 layers of [576 -> 960] QKV, [576 -> 576] O, [576 -> 3072] gate+up,
[1536 -> 576] down; LM head [576 -> 49152]) applied to the
requests x (nodes + 1) tokens of one verification forward, as torch matmuls
in fp32 and bf16: one layer is timed and multiplied by 30, plus the LM head.
A plain decode step of `--requests` tokens is timed whole (30 layers with
their own weights, then the head).
"""
from __future__ import annotations

import argparse
import os

import torch

import forkdec
from forkdec.bench.common import (keep_freed_memory, machine_facts, markdown_table, results_dir,
                                  time_interleaved, write_report)
from forkdec.reference.speculative import speculative_uniforms

HIDDEN, QKV, FFN, VOCAB, LAYERS = 576, 576 + 2 * 192, 1536, 49152, 30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def workload(requests: int, nodes: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """(draft_tokens, parents, tree_indptr, draft_probs, target_probs) built row chunk by row chunk
    (no full-size temporaries)."""
    g = torch.Generator().manual_seed(seed)
    parents = []
    for _ in range(requests):
        for i in range(nodes):
            chain = i > 0 and float(torch.rand(1, generator=g)) < 0.6
            parents.append(i - 1 if chain else int(torch.randint(-1, i, (1,), generator=g)))
    parents_t = torch.tensor(parents, dtype=torch.int32)
    indptr = torch.arange(requests + 1, dtype=torch.int32) * nodes
    rows = requests * (nodes + 1)
    target = torch.empty(rows, vocab, dtype=dtype)
    draft = torch.empty(rows, vocab, dtype=dtype)
    for r0 in range(0, rows, 256):
        z = torch.randn(min(256, rows - r0), vocab, generator=g) * 3
        target[r0:r0 + z.shape[0]] = torch.softmax(z, -1)
        draft[r0:r0 + z.shape[0]] = torch.softmax(z + torch.randn(z.shape, generator=g), -1)
    req = torch.repeat_interleave(torch.arange(requests), nodes)
    parent_row = indptr.long()[req] + req + 1 + parents_t.long()
    tokens = torch.cat([torch.multinomial(draft[parent_row[i:i + 512]].float(), 1, generator=g).reshape(-1)
                        for i in range(0, parent_row.numel(), 512)]).to(torch.int32)
    return tokens, parents_t, indptr, draft, target


def forward_proxy(tokens: int, dtype: torch.dtype, rounds: int, whole: bool) -> float:
    """Seconds for SmolLM2-135M's linear layers on `tokens` tokens (nn.Linear layout,
    weight [out, in]). whole: all 30 layers with their own weights, then the LM
    head, timed as one call; else one layer timed, times 30, plus the LM head
    (for big token counts, where one call takes seconds)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    h = torch.randn(tokens, FFN, generator=g).to(dtype)
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN), (HIDDEN, FFN)]
    layers = [[(torch.randn(s, generator=g) * 0.02).to(dtype) for s in shapes] for _ in range(LAYERS if whole else 1)]
    head = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(dtype)
    linear = torch.nn.functional.linear

    def layer(w):
        linear(x, w[0])
        linear(x, w[1])
        linear(x, w[2])
        linear(h, w[3])

    if whole:
        def step():
            for w in layers:
                layer(w)
            linear(x, head)
        return time_interleaved({"step": step}, rounds=rounds)["step"]
    t = time_interleaved({"layer": lambda: layer(layers[0]), "head": lambda: linear(x, head)}, rounds=rounds,
                         min_seconds=0.0)
    return LAYERS * t["layer"] + t["head"]


def best_of_threads(measure) -> float:
    """The faster of measure() with torch's thread count and with one thread: on
    a machine shared with other jobs, a thread pool that waits for a descheduled
    thread at every barrier can be slower than one thread."""
    threads = torch.get_num_threads()
    try:
        times = [measure()]
        if threads > 1:
            torch.set_num_threads(1)
            times.append(measure())
    finally:
        torch.set_num_threads(threads)
    return min(times)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench speculative-verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=64, help="draft tree nodes per request")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--dtypes", default="fp32,bf16", help="probability dtypes, of fp32, bf16")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    parser.add_argument("--reference-rounds", type=int, default=2, help="rounds for the (slow) reference")
    parser.add_argument("--proxy-rounds", type=int, default=5, help="rounds for the forward proxy")
    parser.add_argument("--no-proxy", action="store_true", help="skip the forward proxy (tests)")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    args = parser.parse_args(argv)
    dtype_names = args.dtypes.split(",")
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes: unknown {', '.join(unknown)}; expected {', '.join(DTYPES)}")
    steady = keep_freed_memory()
    ext = forkdec._extension.load()
    if ext is None:
        raise SystemExit(f"forkdec bench speculative-verify: {forkdec._extension.error()}")

    verify_tokens = args.requests * (args.nodes + 1)
    proxy = {}
    if not args.no_proxy:
        for name in ("bf16", "fp32"):
            proxy[name] = (best_of_threads(lambda: forward_proxy(verify_tokens, DTYPES[name], args.proxy_rounds,
                                                                 whole=False)),
                           best_of_threads(lambda: forward_proxy(args.requests, DTYPES[name], args.proxy_rounds,
                                                                 whole=True)))
            print(f"forward proxy {name}: verification forward ({verify_tokens} tokens) {proxy[name][0] * 1e3:.1f} ms, "
                  f"decode step ({args.requests} tokens) {proxy[name][1] * 1e3:.1f} ms")

    rows, accepted = [], {}
    for name in dtype_names:
        tokens, parents, indptr, draft, target = workload(args.requests, args.nodes, args.vocab, DTYPES[name])
        u = speculative_uniforms(tokens.numel() + args.requests, "cpu", seed=1)
        common = (tokens, parents, indptr, draft, target)
        with forkdec.validation(False):
            out = forkdec.ops.verify_tree_sampling(*common, uniforms=u, backend="cpu")
            ref = forkdec.ops.verify_tree_sampling(*common, uniforms=u, backend="reference")
            assert all(torch.equal(a, b) for a, b in zip(out, ref)), "cpu and reference disagree"
            accepted[name] = float(out.num_accepted.float().mean())
            cpu = lambda: forkdec.ops.verify_tree_sampling(*common, uniforms=u, backend="cpu")  # noqa: E731
            t_cpu = time_interleaved({"cpu": cpu}, rounds=args.rounds)["cpu"]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # on a busy machine a second thread can cost more than it gives
            t_one = time_interleaved({"cpu": cpu}, rounds=args.rounds)["cpu"]
            torch.set_num_threads(threads)
            t_ref = time_interleaved({"reference": lambda: forkdec.ops.verify_tree_sampling(
                *common, uniforms=u, backend="reference")}, rounds=args.reference_rounds, min_seconds=0.0)["reference"]
        best = min(t_cpu, t_one)
        row = [name, f"{t_cpu * 1e3:.2f}", f"{t_one * 1e3:.2f}", f"{t_ref * 1e3:.1f}", f"{t_ref / best:.0f}x",
               f"{accepted[name]:.2f}"]
        for p in ("bf16", "fp32"):
            if p in proxy:
                row += [f"{best / proxy[p][0]:.3%}", f"{best / proxy[p][1]:.1%}"]
        rows.append(row)
        print(rows[-1])
        del tokens, parents, indptr, draft, target, common
    header = ["probs dtype", "cpu ms", "cpu ms, 1 thread", "reference ms", "reference / best cpu", "mean accepted"]
    for p in ("bf16", "fp32"):
        if p in proxy:
            header += [f"of {p} verify forward", f"of {p} decode step"]
    table = markdown_table(header, rows)
    print(table)

    proxy_text = ""
    if proxy:
        proxy_rows = [[p, f"{proxy[p][0] * 1e3:.0f}", f"{proxy[p][1] * 1e3:.1f}"] for p in proxy]
        proxy_text = ("\n\nForward proxy (torch matmuls, SmolLM2-135M linear layers: 30 x [576->960, 576->576, "
                      "576->3072, 1536->576] + LM head 576->49152, nn.Linear layout; the faster of torch's thread count and 1 thread; verify forward: one layer timed, x30, plus the head; decode step: all 30 layers with their own weights and the head, timed as one call):\n\n" +
                      markdown_table(["dtype", f"verify forward, {verify_tokens} tokens, ms",
                                      f"decode step, {args.requests} tokens, ms"], proxy_rows))
    out_dir = results_dir(args.out)
    facts = machine_facts({
        "forkdec CPU kernels": ext.cpu_isa(),
        "workload": f"{args.requests} requests x {args.nodes}-node random trees, V = {args.vocab}, "
                    "p = softmax(3 z), q = softmax(3 z + noise), children drawn from q",
        "load average at the end (other jobs share the 2 cores)": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "timing": f"median of {args.rounds} rounds (reference: {args.reference_rounds}); validation off; "
                  "uniforms drawn once outside the timed call"
                  + ("; freed memory kept by the allocator" if steady else ""),
    })
    write_report(out_dir / "speculative_verify.md", "Speculative tree verification on the CPU", facts,
                 table + proxy_text + "\n\n'of ... verify forward': verification time / the proxy's time for "
                 "the forward that produced the target rows; 'of ... decode step': / one plain decode step of "
                 "the same requests; both use the faster of the two cpu timings. On a machine shared with other "
                 "jobs (see the load average) the multi-threaded time includes waiting for descheduled threads "
                 "at every barrier; the 1-thread column is the kernel's own cost.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
