"""bench/results/tree.png: the tree decode's step time per level, and tokens/s per workload, per engine."""
from __future__ import annotations

import statistics
from pathlib import Path


def plot_tree(path: Path, decode: dict[str, dict], throughput: dict[str, dict[str, float]]) -> bool:
    """decode: engine name -> {"levels": [{"nodes", "step_seconds"}]}; throughput: workload ->
    {engine name: tokens/s}. Returns False (and draws nothing) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in decode.items():
        nodes = [v["nodes"] for v in r["levels"]]
        left.plot(nodes, [statistics.median(v["step_seconds"]) * 1e3 for v in r["levels"]], marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="live paths (nodes of the level)", ylabel="median step time (ms)",
             title="Tree decode: step time per level")
    left.legend()
    colors = {}
    x = 0.0
    centers = []
    for workload, by_engine in throughput.items():
        xs = [x + i for i in range(len(by_engine))]
        for xi, (engine, value) in zip(xs, by_engine.items()):
            first = engine not in colors  # one legend entry per engine
            color = colors.setdefault(engine, f"C{len(colors)}")
            right.bar(xi, value, 0.8, color=color, label=engine if first else None)
        centers.append(sum(xs) / len(xs))
        x += len(by_engine) + 1
    right.set_xticks(centers, list(throughput))
    right.set(ylabel="generated tokens/s", title="Throughput per workload (same steps for every engine)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
