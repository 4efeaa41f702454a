"""Model step benchmark: fp32 vs bf16 weights on CPU, for choosing `default_dtype`.

Run: forkdec bench model [--rounds N] [--out DIR]
Measures, on the embedded SmolLM2-135M (or --model), the time of
- decode: one step of 32 paths (32 tokens, one per path, all 32 logits rows),
  with attention replaced by a stub (each query reads its own token's V) so the
  number is the model's own cost; the engine adds its cascade attention;
- prefill: 256 tokens of one sequence, causal attention over them
  (ContiguousAttention, forkdec.ops.attention cpu backend), last row's logits.
Writes <out>/model.md.

--breakdown N: instead, profile the engine decoding N paths (torch.profiler) and
print where a decode step's time goes, by kind of op, plus the wall time the
ops do not account for (Python and engine bookkeeping).
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import Tensor

import forkdec
from forkdec.bench.common import (keep_freed_memory, machine_facts, markdown_table, results_dir,
                                  time_interleaved, write_report)
from forkdec.models import ContiguousAttention, load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def own_token_attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention when each query sees only its own key: out = V of its KV head."""
    return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


# Op name -> kind, for the breakdown; anything else is "other tensor ops".
KINDS = {"aten::mm": "linear layers (GEMM)", "aten::addmm": "linear layers (GEMM)",
         "forkdec::cascade_attention": "attention", "forkdec::attention": "attention",
         "forkdec::append_kv": "attention", "forkdec::rms_norm": "RMSNorm (fused op)",
         "forkdec::add_rms_norm": "RMSNorm (fused op)", "forkdec::rope_qkv": "RoPE + qkv split (fused op)",
         "forkdec::silu_and_mul": "SiLU x up (fused op)", "forkdec::sample": "sampling (forkdec.ops.sample)",
         "aten::embedding": "embedding", "aten::index_select": "embedding"}


def step_breakdown(model: str | None, n: int, steps: int) -> str:
    """Where a decode step of n paths spends its time: self CPU time of the profiled ops by
    kind, per step, and the wall time left over (Python, engine bookkeeping)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from forkdec.engine import Engine, SamplingParams

    engine = Engine(model)
    prompt = "Janet's ducks lay 16 eggs per day. How many eggs does she have after a week?"
    params = SamplingParams(temperature=0.7, max_new_tokens=steps + 1, ignore_eos=True, seed=0)
    engine.generate(prompt, n, params)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        engine.generate(prompt, n, params)
        wall = time.perf_counter() - t0
    stats = engine.last_stats
    per_kind: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "forkdec::")):
            kind = KINDS.get(e.key, "other tensor ops")
            per_kind[kind] = per_kind.get(kind, 0.0) + e.self_cpu_time_total / 1e6
    prefill_share = stats.prefill_seconds / wall
    decode = wall * (1 - prefill_share)
    rows = [[k, f"{v * (1 - prefill_share) / stats.decode_steps * 1e3:.2f}", f"{v / wall * 100:.0f}%"]
            for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])]
    rest = wall - sum(per_kind.values())
    rows.append(["not in ops (Python, engine)", f"{rest * (1 - prefill_share) / stats.decode_steps * 1e3:.2f}",
                 f"{rest / wall * 100:.0f}%"])
    head = (f"{n} paths, {stats.decode_steps} decode steps, {decode / stats.decode_steps * 1e3:.1f} ms per step "
            f"(profiler on), {torch.get_num_threads()} threads, dtype {engine.model.dtype}, "
            f"load average {os.getloadavg()[0]:.1f}\n")
    return head + markdown_table(["kind", "ms per step", "share"], rows)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file or HF directory (default: SmolLM2-135M)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    parser.add_argument("--paths", type=int, default=32, help="tokens in the decode step")
    parser.add_argument("--prompt", type=int, default=256, help="tokens in the prefill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--breakdown", type=int, default=None, metavar="N",
                        help="profile an engine decode of N paths instead (prints a table, writes nothing)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled with --breakdown")
    args = parser.parse_args(argv)
    keep_freed_memory()
    if args.breakdown:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(step_breakdown(args.model, args.breakdown, args.steps))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: load_model(args.model, dtype=dt)[0] for name, dt in DTYPES.items()}
    cfg = models["fp32"].config
    g = torch.Generator().manual_seed(0)
    dec_tokens = torch.randint(0, cfg.vocab_size, (args.paths,), generator=g)
    dec_pos = torch.randint(0, 2048, (args.paths,), generator=g)
    pre_tokens = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g)
    pre_pos = torch.arange(args.prompt)
    last = torch.tensor([args.prompt - 1])

    def decode(m):
        return lambda: m(dec_tokens, dec_pos, own_token_attend)

    def prefill(m):
        return lambda: m(pre_tokens, pre_pos, ContiguousAttention(cfg.num_layers, backend="cpu"), logits_rows=last)

    with forkdec.validation(False):
        t_dec = time_interleaved({n: decode(m) for n, m in models.items()}, rounds=args.rounds, min_seconds=0.2)
        t_pre = time_interleaved({n: prefill(m) for n, m in models.items()}, rounds=args.rounds, min_seconds=0.2)
    rows = []
    for n in DTYPES:
        rows.append([n, f"{t_dec[n] * 1e3:.1f}", f"{args.paths / t_dec[n]:.0f}",
                     f"{t_pre[n] * 1e3:.0f}", f"{args.prompt / t_pre[n]:.0f}"])
    rows.append(["bf16 speed-up", f"{t_dec['fp32'] / t_dec['bf16']:.2f}x", "",
                 f"{t_pre['fp32'] / t_pre['bf16']:.2f}x", ""])
    header = ["weights", f"decode step, {args.paths} paths (ms)", "tokens/s", f"prefill {args.prompt} tokens (ms)",
              "tokens/s"]
    table = markdown_table(header, rows)
    print(table)
    facts = machine_facts({"model": args.model or "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized",
                           "rounds": f"{args.rounds} interleaved, median",
                           "decode attention": "stub (own token only): model cost without the engine's attention",
                           "prefill attention": "ContiguousAttention, forkdec.ops.attention cpu backend, causal",
                           "default dtype chosen": str(forkdec.models.default_dtype("cpu")),
                           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins)"),
                           "load average (1, 5, 15 min) at the end": ", ".join(f"{x:.1f}" for x in os.getloadavg())})
    write_report(results_dir(args.out) / "model.md", "Model step: fp32 vs bf16 weights", facts, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
