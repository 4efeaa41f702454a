"""Perplexity vs KV memory of every cache kind: `forkdec bench xquant-ppl`.

SmolLM2-135M-Instruct (fp32 weights and activations), WikiText-2 test,
non-overlapping windows fed in chunks through each kind's cache
(forkdec.eval.perplexity). Every kind reads the file's first windows; a row
keeps each window's NLL and is saved after every window, so a sweep resumes
and a later run extends a kind to more windows (--resume). Each kind's ΔPPL is
taken against fp32 over the same windows. Writes xquant.md (table, targets)
and xquant.png (memory fraction vs ΔPPL).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report
from forkdec.eval import perplexity, read_tokens

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
DEFAULT_DATA = os.path.join(SHARED, "wikitext-2", "test.txt")
CALIB_DATA = os.path.join(SHARED, "gsm8k", "test.jsonl")
SWEEP = ["fp32", "bf16", "fp16", "xquant-8", "xquant-4", "xquant-3", "xquant-2",
         "xquant-latent-8", "xquant-latent-4", "xquant-latent-3", "xquant-latent-2",
         "xquant-cl-4", "xquant-cl-3", "xquant-cl-2", "kivi-4", "kivi-3", "kivi-2",
         # near the targets: smaller groups, smaller or no window
         "xquant-latent-4-g32", "kivi-4-g32", "xquant-latent-4-r64", "kivi-4-r64", "xquant-latent-3-g32",
         "kivi-3-g32", "xquant-latent-2-g32", "kivi-2-g32", "xquant-latent-2-r0", "kivi-2-r0", "xquant-cl-2-r0",
         # ~10x smaller: rank-truncated latents (-kR) at <= 10% of fp16 at 2048
         # (plain SVD truncation, then activation-calibrated -cal; V needs more rank than K)
         "xquant-latent-2-k96-g32-r0", "xquant-latent-2-k96-g32-r0-cal", "xquant-latent-4-k64-r0-cal",
         "xquant-latent-3-k64-g32-r64-cal", "xquant-latent-2-k53-v192-r0-cal", "xquant-latent-2-k40-v160-g32-r0-cal",
         "xquant-latent-3-k47-v128-r0-cal", "xquant-latent-3-k61-v128-g128-r0-cal",
         "xquant-latent-2-k145-v128-g128-r0-cal"]
MARKERS = {"fp": "o", "xquant": "s", "xquant-latent": "^", "xquant-cl": "D", "kivi": "x"}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="forkdec bench xquant-ppl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 test.txt (default: ../shared/data in CI)")
    p.add_argument("--windows", type=int, default=8, help="windows per kind (default 8; 0: all whole windows)")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--kinds", default=",".join(SWEEP), help="comma-separated cache kinds")
    p.add_argument("--calib-tokens", type=int, default=4096,
                   help="-cal kinds: GSM8K test tokens that calibrate the latent ranks (default 4096)")
    p.add_argument("--calib-data", default=CALIB_DATA, help="-cal kinds: GSM8K test.jsonl (default: ../shared/data)")
    p.add_argument("--resume", action="store_true",
                   help="keep the windows xquant.json holds (same window and chunk) and measure only the missing ones")
    p.add_argument("--report-only", action="store_true", help="rewrite xquant.md/png from xquant.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on cores shared with other jobs, 2 threads ran 4-7x slower)")
    p.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    return p.parse_args(argv)


def _row(kind: str, config, window_nll: list[float], seconds: float, args) -> dict:
    from forkdec.xquant.accounting import fp16_fraction
    from forkdec.xquant.kinds import parse_kind

    k = parse_kind(kind)
    return {"kind": kind, "family": k.family, "bits": k.bits, "group": k.group_size, "residual": k.residual,
            "rank": k.rank, "rank_v": k.rank_v, "ppl": _ppl(window_nll), "nll": sum(window_nll) / len(window_nll),
            "tokens": len(window_nll) * (args.window - 1), "windows": len(window_nll), "seconds": seconds,
            "frac_2048": fp16_fraction(kind, config, 2048), "frac_8192": fp16_fraction(kind, config, 8192),
            "bytes_2048": fp16_fraction(kind, config, 2048) * 4 * config.num_layers * config.num_kv_heads
            * config.head_dim, "window_nll": window_nll}


def _ppl(window_nll: list[float]) -> float:
    return math.exp(sum(window_nll) / len(window_nll))  # every window scores the same number of predictions


def _delta(row: dict, base: dict, m: int | None = None) -> tuple[float, float]:
    """(fp32 PPL, relative ΔPPL) over the first m windows (default: all both rows hold)."""
    m = min(len(row["window_nll"]), len(base["window_nll"]), m or len(row["window_nll"]))
    ref = _ppl(base["window_nll"][:m])
    return ref, _ppl(row["window_nll"][:m]) / ref - 1


def _targets(rows: list[dict]) -> str:
    base = next((r for r in rows if r["kind"] == "fp32"), None)
    if base is None:
        return "No fp32 row: targets not evaluated."
    d = {r["kind"]: _delta(r, base)[1] for r in rows}
    lines = []
    for ctx in ("2048", "8192"):
        ok = [r for r in rows if r["family"].startswith("xquant") and r["bits"] == 4 and r[f"frac_{ctx}"] <= 0.30]
        best = min(ok, key=lambda r: d[r["kind"]], default=None)
        lines.append(f"- 4-bit XQuant at <= 30% of fp16 KV (context {ctx}): " + (
            f"`{best['kind']}` {best[f'frac_{ctx}']:.1%}, ΔPPL {d[best['kind']]:+.2%} over {best['windows']} windows -> "
            f"{'met' if d[best['kind']] <= 0.01 else 'NOT met'} (ΔPPL <= 1%)" if best else "no such config measured"))
    pairs = []
    for r in rows:
        if r["family"] == "kivi":
            twin = next((t for t in rows if t["kind"] == f"xquant-latent-{r['kind'][len('kivi-'):]}"), None)
            if twin is not None:  # same bits, group and window: identical bytes (both cache 2 x 192 per token)
                m = min(len(r["window_nll"]), len(twin["window_nll"]))  # compared on the same windows
                dk, dx = _delta(r, base, m)[1], _delta(twin, base, m)[1]
                pairs.append(f"`{r['kind']}` {dk:+.2%} vs `{twin['kind']}` {dx:+.2%} over {m} windows "
                             f"({'XQuant <= KIVI' if dx <= dk else 'KIVI better'})")
    lines.append("- XQuant vs KIVI at equal memory: " + ("; ".join(pairs) or "no pairs measured"))
    tenx = sorted((r for r in rows if r["frac_2048"] <= 0.1), key=lambda r: d[r["kind"]])
    lines.append("- ~10x smaller than fp16 (<= 10% at 2048), best first: " + ("; ".join(
        f"`{r['kind']}` {r['frac_2048']:.1%}, ΔPPL {d[r['kind']]:+.2%} ({r['windows']} windows"
        f"{', calibrated on ' + r['calib_data'] if r.get('calib_data') else ''})" for r in tenx) if tenx else
        "no kind reaches it: 2-bit codes plus fp16 scale/zero over the 2 x 192 latents (or K/V) already cost "
        "15.6% of fp16 with no window; going further needs fewer numbers per token (lower-rank latents, -kR)"))
    small = sorted((r for r in rows if r["family"] != "fp"), key=lambda r: r["frac_2048"])[:4]
    lines.append("- Smallest configs (fraction of fp16 at 2048): " + "; ".join(
        f"`{r['kind']}` {r['frac_2048']:.1%} ({1 / r['frac_2048']:.1f}x smaller), ΔPPL {d[r['kind']]:+.2%}"
        for r in small))
    return "\n".join(lines)


X_MAX, Y_MAX = 1.05, 300.0  # the plot's range: fraction of fp16, ΔPPL %


def _plot(rows: list[dict], path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    base = next(r for r in rows if r["kind"] == "fp32")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    every = len(base["window_nll"])

    def point(r: dict) -> tuple[float, float, str]:  # off-scale points sit on the edge, their values in the label
        x, y, name = r["frac_2048"], 100 * _delta(r, base)[1], r["kind"].replace("xquant-", "xq-")
        if x > X_MAX or y > Y_MAX:
            return min(x, X_MAX), min(y, Y_MAX), f"{name} ({x:.2f}, {y:+.0f}%, off scale)"
        return x, y, name

    for i, (family, marker) in enumerate(MARKERS.items()):
        pts = [r for r in rows if r["family"] == family]
        for full in (True, False):  # hollow: fewer windows than fp32 holds
            sel = [point(r) for r in pts if (len(r["window_nll"]) >= every) == full]
            if sel:
                color = f"C{i}"
                style = ({"color": color} if full else {"color": color, "alpha": 0.4} if marker == "x"
                         else {"facecolors": "none", "edgecolors": color})
                ax.scatter([x for x, _, _ in sel], [y for _, y, _ in sel], marker=marker,
                           s=40, label=family + ("" if full else " (fewer windows)"), **style, clip_on=False)
            for x, y, name in sel:
                edge = name.endswith("off scale)")
                ax.annotate(name, (x, y), fontsize=6, xytext=(-4, -9) if edge else (3, 2), textcoords="offset points",
                            ha="right" if x >= X_MAX else "left", alpha=1.0 if full else 0.7)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlim(0, X_MAX)
    ax.set_ylim(top=Y_MAX)
    ax.axhline(1.0, color="gray", lw=0.6, ls="--")
    ax.axvline(0.30, color="gray", lw=0.6, ls="--")
    ax.axvline(0.10, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("KV bytes/token as a fraction of fp16 K/V (context 2048)")
    ax.set_ylabel("ΔPPL vs fp32 cache (%)")
    ax.set_title(f"SmolLM2-135M, WikiText-2: filled {every} x 2048-token windows (all), hollow fewer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# the kinds the table names: fp, raw and latent XQuant and KIVI at each bit width, XQuant-CL
REQUIRED = SWEEP[:17]


def _table(rows: list[dict], base: dict | None) -> str:
    table = []
    for r in rows:
        ref, rel = _delta(r, base) if base is not None else (float("nan"), float("nan"))
        table.append([f"`{r['kind']}`", r["family"], str(r["bits"] or "-"), str(r["group"] or "-"),
                      str(r["residual"] if r["family"] != "fp" else "-"), f"{r['bytes_2048']:.0f}",
                      f"{r['frac_2048']:.3f}", f"{r['frac_8192']:.3f}", str(len(r["window_nll"])),
                      f"{r['ppl']:.3f}", f"{ref:.3f}", f"{r['ppl'] - ref:+.3f} ({rel:+.2%})", f"{r['seconds']:.0f}"])
    return markdown_table(["kind", "family", "bits", "group", "window R", "bytes/token @2048",
                           "fraction of fp16 @2048", "@8192", "windows", "PPL", "fp32 PPL", "ΔPPL vs fp32",
                           "seconds"], table)


def report(rows: list[dict], args: argparse.Namespace, out) -> None:
    base = next((r for r in rows if r["kind"] == "fp32"), None)
    every = len(base["window_nll"]) if base is not None else 0
    full = [r for r in rows if len(r["window_nll"]) >= every]
    part = [r for r in rows if len(r["window_nll"]) < every]
    missing = [k for k in REQUIRED if k not in {r["kind"] for r in full}]
    body = (f"## Perplexity by cache kind, every window\n\nNon-overlapping windows of {args.window} tokens from "
            f"the start of the file ({args.window - 1} scored predictions each), fed in chunks of {args.chunk}; "
            f"the kinds below hold all {every} windows of the file. 'fp32 PPL' is the fp32 cache over the same "
            "windows, and ΔPPL is taken against it.\n\n" + _table(full, base)
            + ("\n\nOf the kinds the issue's table names, these do not hold every window yet (they are in the "
               "next table, over fewer windows; the sweep resumes with --resume --windows 0): "
               + ", ".join(f"`{k}`" for k in missing) if missing else "")
            + "\n\n## Fewer windows\n\nKinds measured over the first windows only (the screening that chose "
              "the configurations above, and kinds whose all-window run has not finished): ΔPPL against fp32 "
              "over the same windows.\n\n" + _table(part, base)
            + "\n\nBytes per token are exact (forkdec.xquant.accounting.bytes_per_token): codes, fp16 scales and "
              "zeros, and the 16-bit full-precision window (R newest tokens plus the partly filled page) amortized "
              "over the stated context; fp16 K/V of SmolLM2 is 23,040 bytes per token (30 layers x 2 x 192 x 2).\n\n"
              "`-cal` kinds (lower-rank latents chosen from activations, forkdec.xquant.calibration) are "
              "calibrated on 4,096 tokens that no row scores: rows measured over all windows on the first 4,096 "
              "tokens of GSM8K test questions and answers (another domain; row field calib_data), rows of 8 "
              "windows (calib_data unset) on the WikiText-2 tokens that follow those 8 windows.\n\n"
              "'seconds' is wall time per kind on cores shared with other jobs (and paused while tests ran): "
              "not a speed measurement.\n\n"
              "## Targets\n\n" + _targets(rows) + "\n\n![Pareto](xquant.png)\n")
    facts = machine_facts({"threads": f"{args.threads} (torch.set_num_threads)", "model": "SmolLM2-135M-Instruct Q4_1 GGUF, fp32 compute",
                           "data": os.path.relpath(args.data) if os.path.exists(args.data) else args.data,
                           "load average at the end (1/5/15 min)": " ".join(f"{v:.1f}" for v in os.getloadavg()),
                           "total seconds": f"{sum(r['seconds'] for r in rows):.0f}"})
    write_report(out / "xquant.md", "XQuant / KIVI cache kinds: perplexity and memory", facts, body)
    if base is not None and _plot(rows, out / "xquant.png"):
        print(f"wrote {out / 'xquant.png'}")


def _calib_name(path: str) -> str:
    return "/".join(os.path.normpath(path).split(os.sep)[-2:])  # e.g. gsm8k/test.jsonl


def _calibration_tokens(path: str, tokenizer, n: int) -> list[int]:
    """The first n tokens of GSM8K questions and answers (one per line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = "\n\n".join(f"{r['question']}\n{r['answer']}" for r in map(json.loads, f))
    except OSError as e:
        raise ValueError(f"calib-data: cannot read {path}: {e.strerror or e}") from None
    return list(tokenizer.encode(text[:n * 8]))[:n]  # ~4 characters per token: 8 is plenty


def _measure(model, ids: list[int], kind: str, row: dict | None, want: int, args, save) -> dict:
    """Extend `row` (or a new one) window by window up to `want` windows, saving after each."""
    nll = list(row["window_nll"]) if row else []
    seconds = row["seconds"] if row else 0.0
    for w in range(len(nll), want):
        r = perplexity(model, ids, kind, window=args.window, chunk=args.chunk, windows=1, first=w)
        nll += r.window_nll
        seconds += r.seconds
        cal = kind.endswith("-cal")
        row = {**_row(kind, model.config, nll, seconds, args), "calib_tokens": args.calib_tokens if cal else 0,
               "calib_data": _calib_name(args.calib_data) if cal else None}
        save(row)
        print(f"  {kind}: window {w + 1}/{want}, ppl {row['ppl']:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return row


def run(argv: list[str] | None = None) -> int:
    args = _args(argv)
    out = results_dir(args.out)
    store = out / "xquant.json"
    settings = {"window": args.window, "chunk": args.chunk}
    saved = json.loads(store.read_text()) if store.exists() and (args.resume or args.report_only) else {}
    same = {k: v for k, v in saved.get("settings", {}).items() if k != "windows"} == settings
    rows = {r["kind"]: r for r in saved.get("rows", [])} if same else {}
    if not args.report_only:
        torch.set_num_threads(args.threads)
        from forkdec.models import load_model

        model, tok = load_model(dtype=torch.float32)
        ids = read_tokens(args.data, tok, args.windows * args.window if args.windows else None)
        want = args.windows or len(ids) // args.window
        kinds = [k for k in args.kinds.split(",") if k]
        if any(k.endswith("-cal") for k in kinds):
            from forkdec.xquant.calibration import calibrate

            calibrate(model, _calibration_tokens(args.calib_data, tok, args.calib_tokens))

        def save(row: dict) -> None:
            rows[row["kind"]] = row
            store.write_text(json.dumps({"settings": settings, "rows": list(rows.values())}, indent=1))

        for kind in kinds:
            row = rows.get(kind)
            if kind.endswith("-cal") and row and row.get("calib_data") != _calib_name(args.calib_data):
                row = None  # calibrated on other text: measure again from the first window
            row = _measure(model, ids, kind, row, want, args, save)
            print(f"{kind}: ppl {row['ppl']:.4f} over {row['windows']} windows in {row['seconds']:.0f} s", flush=True)
    report(list(rows.values()), args, out)
    return 0


main = run
