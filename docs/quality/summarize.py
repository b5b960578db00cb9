"""Summarise the issue-14 runs over seeds: each HierarchicalTopK objective's FVU (and CE-loss score, where measured)
per k as mean ± half the range over seeds, and its comparison with the TopK SAEs trained on the same batches (same
seed): FVU ratio to TopK trained at k (at k = K: TopK trained at K), FVU ratio to TopK@K truncated, CE-score
difference to TopK trained at k.

Usage: python docs/quality/summarize.py RESULTS_DIR OUTPUT_STEM
RESULTS_DIR holds seed<S>/baselines/comparison.json (the TopK SAEs, the default HierarchicalTopK, Multi-TopK if run)
and seed<S>/<variant>/comparison.json (one HierarchicalTopK objective each), as docs/quality/*.sh write them.
Writes OUTPUT_STEM.md (tables), OUTPUT_STEM.json (every number), OUTPUT_STEM.png (FVU ratios against k) and
OUTPUT_STEM_tradeoff.png (each objective's ratio at K against its worst ratio below K).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DEFAULT = "uniform (default)"
METRICS = ("fvu", "ce_loss_score")

# {kind: {seed: {k: {metric: value}}}}; kinds: HTopK objectives by name, "topk_fixed", "topk_truncated", "multi_topk"
Runs = dict[str, dict[int, dict[int, dict[str, float]]]]


def load(results: Path) -> Runs:
    runs: Runs = {}
    for path in sorted(results.glob("seed*/*/comparison.json")):
        seed, variant = int(path.parent.parent.name.removeprefix("seed")), path.parent.name
        for sae in json.loads(path.read_text())["saes"].values():
            rows = {row["k"]: {m: row[m] for m in METRICS if row.get(m) is not None} for row in sae["results"]}
            family = sae["family"]
            # a compare --objectives run holds several HierarchicalTopK SAEs, each named by its objective
            objective = sae.get("objective") or (DEFAULT if variant == "baselines" else variant)
            kind = objective if family == "hierarchical" else family
            runs.setdefault(kind, {}).setdefault(seed, {}).update(rows)
            if family == "topk_truncated":  # TopK trained at K is also "TopK trained at k" for k = K
                largest = max(rows)
                runs.setdefault("topk_fixed", {}).setdefault(seed, {})[largest] = rows[largest]
    return runs


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def text(stats: dict[str, float] | None, digits: int = 3) -> str:
    if stats is None:
        return ""
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {(stats['max'] - stats['min']) / 2:.{digits}f}"


def compare(runs: Runs, kind: str, baseline: str, metric: str, ratio: bool) -> dict[int, dict[str, float]]:
    """Per k, over the seeds both ran: ``kind / baseline`` (ratio) or ``kind - baseline``."""
    result = {}
    for k in sorted({k for seed in runs[kind].values() for k in seed}):
        values = []
        for seed, rows in runs[kind].items():
            other = runs.get(baseline, {}).get(seed, {}).get(k, {})
            if metric in rows.get(k, {}) and metric in other:
                mine = rows[k][metric]
                values.append(mine / other[metric] if ratio else mine - other[metric])
        if values:
            result[k] = spread(values)
    return result


def summarize(results: Path) -> dict:
    runs = load(results)
    max_k = max(k for seed in runs["topk_fixed"].values() for k in seed)
    objectives = [kind for kind in runs if kind not in ("topk_fixed", "topk_truncated", "multi_topk")]
    objectives.sort(key=lambda kind: (kind != DEFAULT, kind))
    summary: dict = {"max_k": max_k, "objectives": {}, "per_k": {}}
    for kind in objectives:
        summary["objectives"][kind] = {
            "seeds": sorted(runs[kind]),
            "fvu_vs_topk_at_k": compare(runs, kind, "topk_fixed", "fvu", ratio=True),
            "fvu_vs_truncated": compare(runs, kind, "topk_truncated", "fvu", ratio=True),
            "ce_vs_topk_at_k": compare(runs, kind, "topk_fixed", "ce_loss_score", ratio=False),
        }
    for kind, seeds in runs.items():
        ks = sorted({k for rows in seeds.values() for k in rows})
        summary["per_k"][kind] = {
            metric: {
                k: spread([rows[k][metric] for rows in seeds.values() if metric in rows.get(k, {})])
                for k in ks
                if any(metric in rows.get(k, {}) for rows in seeds.values())
            }
            for metric in METRICS
        }
    return summary


def table(header: str, columns: list[int], rows: dict[str, dict[int, dict[str, float]]], digits: int = 3) -> list[str]:
    lines = [header, "", "| | " + " | ".join(f"k={k}" for k in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(text(values.get(k), digits) for k in columns) + " |")
    return [*lines, ""]


def markdown(summary: dict) -> str:
    max_k, objectives, per_k = summary["max_k"], summary["objectives"], summary["per_k"]
    seeds = sorted({seed for row in objectives.values() for seed in row["seeds"]})
    lines = [f"Seeds {seeds}; every cell is the mean ± half the range over the seeds that ran it.", ""]
    fixed_ks = sorted(per_k["topk_fixed"]["fvu"])
    lines += table(
        f"**FVU / FVU of TopK trained at k** (same seed; < 1: HierarchicalTopK better). Targets: <= 1.03 at k = K = "
        f"{max_k}, <= 0.97 at every k <= K/2.",
        fixed_ks,
        {name: row["fvu_vs_topk_at_k"] for name, row in objectives.items()},
    )
    small = [k for k in sorted(per_k[next(iter(objectives))]["fvu"]) if k <= max_k // 8]
    lines += table(
        f"**FVU / FVU of TopK trained at K = {max_k}, truncated to k** (target <= 0.5 for k <= K/8).",
        small,
        {name: row["fvu_vs_truncated"] for name, row in objectives.items()},
    )
    if any(row["ce_vs_topk_at_k"] for row in objectives.values()):
        lines += table(
            "**CE-loss score minus that of TopK trained at k** (same seed; > 0: HierarchicalTopK better).",
            fixed_ks,
            {name: row["ce_vs_topk_at_k"] for name, row in objectives.items()},
        )
    names = {"topk_fixed": "TopK trained at k", "topk_truncated": f"TopK@{max_k} truncated", "multi_topk": "Multi-TopK"}
    for metric, title in (("fvu", "FVU"), ("ce_loss_score", "CE-loss score")):
        rows = {names.get(kind, f"HTopK {kind}"): values[metric] for kind, values in per_k.items() if values[metric]}
        if rows:
            all_ks = sorted({k for values in rows.values() for k in values})
            lines += table(f"**{title}**", all_ks, rows, digits=4)
    return "\n".join(lines)


def readme_table(summary: dict) -> str:
    """The README's comparison layout: per k, FVU then CE-loss score of HTopK (default), TopK trained at k, TopK@K
    truncated and Multi-TopK, each mean ± half the range over seeds."""
    max_k, per_k = summary["max_k"], summary["per_k"]
    kinds = [DEFAULT, "topk_fixed", "topk_truncated", "multi_topk"]
    names = ["HTopK", "TopK trained at k", f"TopK@{max_k} truncated", "Multi-TopK"]
    kinds, names = zip(*[(kind, name) for kind, name in zip(kinds, names, strict=True) if kind in per_k], strict=True)
    header = [f"FVU: {name}" for name in names] + [f"CE score: {name}" for name in names]
    lines = ["| k | " + " | ".join(header) + " |", "|---:|" + "---:|" * len(header)]
    for k in sorted(per_k[DEFAULT]["fvu"]):
        cells = [text(per_k[kind]["fvu"].get(k), 3) for kind in kinds]
        cells += [text(per_k[kind]["ce_loss_score"].get(k), 3) for kind in kinds]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, row in summary["objectives"].items():
        ratios = row["fvu_vs_topk_at_k"]
        ks = sorted(ratios)
        means = [ratios[k]["mean"] for k in ks]
        below = [ratios[k]["mean"] - ratios[k]["min"] for k in ks]
        errors = [below, [ratios[k]["max"] - ratios[k]["mean"] for k in ks]]
        axis.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=name)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("k")
    axis.set_ylabel("FVU / FVU of TopK trained at k")
    axis.set_title("HierarchicalTopK objectives against TopK trained at each k (bars: range over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_tradeoff(summary: dict, path: Path) -> None:
    """Each objective as a point: FVU ratio at k = K against its worst ratio at the k <= K/2, with the target box."""
    max_k = summary["max_k"]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    in_box = []
    for name, row in summary["objectives"].items():
        ratios = row["fvu_vs_topk_at_k"]
        if max_k not in ratios:
            continue
        worst_small = max(ratios[k]["mean"] for k in ratios if k <= max_k // 2)
        if ratios[max_k]["mean"] <= 1.03 and worst_small <= 0.97:
            in_box.append(name)
        axis.scatter(ratios[max_k]["mean"], worst_small)
        axis.annotate(name, (ratios[max_k]["mean"], worst_small), fontsize=7, xytext=(4, 2), textcoords="offset points")
    axis.axvline(1.03, color="green", linestyle="--", linewidth=0.8)
    axis.axhline(0.97, color="green", linestyle="--", linewidth=0.8)
    axis.set_xlabel(f"FVU / TopK trained at K, at k = K = {max_k}  (target <= 1.03)")
    axis.set_ylabel("worst FVU / TopK trained at k, k <= K/2  (target <= 0.97)")
    axis.set_title(f"Objectives meeting both targets (lower left): {', '.join(in_box) or 'none'}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    results, stem = Path(sys.argv[1]), Path(sys.argv[2])
    summary = summarize(results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    report = markdown(summary)
    if "ce_loss_score" in {m for values in summary["per_k"].values() for m, v in values.items() if v}:
        report += "\n**The README's layout** (FVU and CE-loss score per SAE):\n\n" + readme_table(summary)
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, stem.with_suffix(".png"))
    plot_tradeoff(summary, stem.parent / f"{stem.name}_tradeoff.png")
    print(report)


if __name__ == "__main__":
    main()
