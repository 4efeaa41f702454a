"""The test-time-scaling report: accuracy against generated tokens per strategy
and budget, from the JSON files of `forkdec eval reasoning --json`.

    python -m forkdec.bench.reasoning RESULT.json [RESULT.json ...] [--out DIR] [--note TEXT]

writes DIR/reasoning.md (a table per data set, the runs' settings, the
machine) and DIR/reasoning.png (accuracy against generated tokens per
question, one line per strategy through its budgets).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report
from forkdec.eval.reasoning import accuracy_interval


def table(result: dict) -> str:
    rows = []
    for strategy, by_n in result["strategies"].items():
        for n, d in by_n.items():
            low, high = accuracy_interval(d["correct"], d["questions"])
            q = max(1, d["questions"])
            rows.append([strategy, n, f"{d['accuracy']:.2f} ({d['correct']}/{d['questions']}; 95% CI "
                         f"{low:.2f}-{high:.2f})", f"{d['generated_tokens'] / q:.0f}",
                         f"{d['seconds'] / q:.1f}{' (est.)' if d.get('seconds_estimated') else ''}"])
    return markdown_table(["strategy", "n", "accuracy", "generated tokens / question", "seconds / question"], rows)


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results):
        for strategy, by_n in result["strategies"].items():
            points = sorted((d["generated_tokens"] / max(1, d["questions"]), d["accuracy"], n)
                            for n, d in by_n.items())
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o", label=strategy)
            for x, y, n in points:
                ax.annotate(f"n={n}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per question")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} ({result['config']['questions']} questions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forkdec.bench.reasoning", description=__doc__)
    parser.add_argument("results", nargs="+", help="JSON files written by forkdec eval reasoning --json")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--model", default="embedded SmolLM2-135M-Instruct (Q4_1 GGUF), forkdec.Engine defaults",
                        help="what the runs used, for the report")
    parser.add_argument("--load", default="", help="the machine's load during the runs, for the report")
    parser.add_argument("--note", default="", help="text added under the tables (findings, caveats)")
    args = parser.parse_args(argv)
    merged: dict[str, dict] = {}  # runs of one data set (e.g. one per budget) become one table
    for f in args.results:
        with open(f) as handle:
            r = json.load(handle)
        name = r["config"].get("data", Path(f).stem)
        if name not in merged:
            merged[name] = r
            continue
        into = merged[name]
        into["config"]["budgets"] = sorted(set(into["config"]["budgets"]) | set(r["config"]["budgets"]))
        for strategy, by_n in r["strategies"].items():
            into["strategies"].setdefault(strategy, {}).update(by_n)
    results = list(merged.items())
    out = results_dir(args.out)
    plot(results, out / "reasoning.png")
    body = []
    for name, r in results:
        c = r["config"]
        body.append(f"## {name}: {c['questions']} questions, budgets {c['budgets']}\n\n"
                    f"Sampling: temperature {c['temperature']}, top_p {c['top_p']}, max {c['max_new_tokens']} new "
                    f"tokens, seed {c['seed']}; DeepConf window {c['window']} tokens, confidence over the top "
                    f"{c['confidence_k']} logprobs from the sampler; DeepConf online: warm-up "
                    f"{c.get('warmup', 'max(2, n // 8)')} paths, consensus tau {c.get('tau', 0.95)}. Prompt: `{c['prompt']!r}` in the chat template.\n\n" + table(r))
    body.append("![accuracy against generated tokens](reasoning.png)")
    if args.note:
        body.append(args.note)
    facts = machine_facts({"model": args.model,
                           "load": args.load or "load average (1, 5, 15 min) when the report was written: "
                                   + ", ".join(f"{x:.1f}" for x in os.getloadavg())})
    write_report(out / "reasoning.md", "Reasoning: what each strategy buys", facts, "\n\n".join(body) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
