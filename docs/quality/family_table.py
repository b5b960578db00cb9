"""Summarise `compare` runs of the whole family over seeds, on one axis: mean L0.

Every SAE of every seed is a set of lines: a family served by k (fixed-k SAEs share one line), served by threshold at
each target mean L0, or at its own thresholds (BatchTopK, Matryoshka). For each line and mean L0 this writes FVU and
CE-loss score as mean ± half the range over seeds; HierarchicalTopK served by threshold against every other line as
per-seed ratios (same seed, same batches), then aggregated; and, for the SAEs served both ways, threshold against
fixed k of the same SAE.

Usage: python docs/quality/family_table.py RESULTS_DIR OUTPUT_STEM
RESULTS_DIR holds seed<S>/comparison.json (docs/quality/family.sh). Writes OUTPUT_STEM.md, OUTPUT_STEM.json,
OUTPUT_STEM.png (FVU and CE-loss score against mean L0, every line, error bars over seeds) and OUTPUT_STEM_readme.md
(the README's two tables: the lines a researcher compares, short names, the best of each row in bold).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sae_lens_hierarchical.evaluation import BudgetMetrics
from sae_lens_hierarchical.interpretability.spread import format_mean_spread
from sae_lens_hierarchical.interpretability.spread import spread as seed_spread
from sae_lens_hierarchical.reporting import FAMILY_LABELS, mean_l0_label, mean_l0_lines

METRICS = {"fvu": "FVU", "ce_loss_score": "CE-loss score"}
Line = tuple[str, str]  # (family, serving)


def load(results: Path) -> dict[int, dict[Line, dict[float, BudgetMetrics]]]:
    """``{seed: {(family, serving): {mean L0: metrics}}}`` from every ``seed<S>/comparison.json``."""
    seeds = {}
    for path in sorted(results.glob("seed*/comparison.json")):
        saes = json.loads(path.read_text())["saes"]
        families = {name: sae["family"] for name, sae in saes.items()}
        by_k = {name: [BudgetMetrics(**row) for row in sae["results"]] for name, sae in saes.items()}
        by_l0 = {name: [BudgetMetrics(**row) for row in sae.get("mean_l0_results", [])] for name, sae in saes.items()}
        seeds[int(path.parent.name.removeprefix("seed"))] = mean_l0_lines(by_k, by_l0, families)
    if not seeds:
        raise SystemExit(f"no seed*/comparison.json under {results}")
    return seeds


def spread(values: list[float]) -> dict[str, float]:
    """The package's one seed rule (mean and half the range), as the JSON this writes records it."""
    runs = seed_spread(values)
    return {"mean": runs.mean, "half_range": runs.half_range, "n": runs.runs}


def cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    return "" if stats is None else format_mean_spread(stats["mean"], stats["half_range"], stats["n"], digits)


def order(lines: set[Line]) -> list[Line]:
    """HierarchicalTopK by threshold, then by k, then the baselines in FAMILY_LABELS order, k before threshold."""
    rank = {family: i for i, family in enumerate(FAMILY_LABELS)}
    serving_rank = {"threshold": 0, "k": 1, "saved": 2}
    return sorted(lines, key=lambda line: (rank[line[0].partition(":")[0]], serving_rank[line[1]]))


def summarise(seeds: dict[int, dict[Line, dict[float, BudgetMetrics]]]) -> dict[str, Any]:
    lines = order({line for per_seed in seeds.values() for line in per_seed if line[1] != "saved"})
    budgets = sorted({key for per_seed in seeds.values() for line in lines for key in per_seed.get(line, {})})
    values: dict[str, Any] = {metric: {} for metric in METRICS}
    for metric in METRICS:
        for line in lines:
            for budget in budgets:
                found = [
                    getattr(per_seed[line][budget], metric)
                    for per_seed in seeds.values()
                    if budget in per_seed.get(line, {}) and getattr(per_seed[line][budget], metric) is not None
                ]
                if found:
                    values[metric].setdefault(mean_l0_label(*line), {})[budget] = spread(found)
    mine = ("hierarchical", "threshold")
    ratios: dict[str, dict[float, dict[str, float]]] = {}
    for line in lines:
        if line == mine:
            continue
        for budget in budgets:
            found = [
                per_seed[mine][budget].fvu / per_seed[line][budget].fvu
                for per_seed in seeds.values()
                if budget in per_seed.get(mine, {}) and budget in per_seed.get(line, {})
            ]
            if found:
                ratios.setdefault(mean_l0_label(*line), {})[budget] = spread(found)
    threshold_vs_k: dict[str, dict[float, dict[str, float]]] = {}
    for family in sorted({line[0] for line in lines}):
        for budget in budgets:
            found = [
                per_seed[(family, "threshold")][budget].fvu / per_seed[(family, "k")][budget].fvu
                for per_seed in seeds.values()
                if budget in per_seed.get((family, "threshold"), {}) and budget in per_seed.get((family, "k"), {})
            ]
            if found:
                threshold_vs_k.setdefault(FAMILY_LABELS[family.partition(":")[0]], {})[budget] = spread(found)
    saved = {}
    for line in order({line for per_seed in seeds.values() for line in per_seed if line[1] == "saved"}):
        rows = sorted(
            ((seed, row) for seed, per_seed in seeds.items() for row in per_seed.get(line, {}).values()),
            key=lambda pair: (pair[1].l0, pair[0]),
        )
        saved[FAMILY_LABELS[line[0]]] = [
            {"seed": seed, "l0": row.l0, "fvu": row.fvu, "ce": row.ce_loss_score, "p90": row.l0_p90, "max": row.l0_max}
            for seed, row in rows
        ]
    return {
        "seeds": sorted(seeds),
        "budgets": budgets,
        "lines": [mean_l0_label(*line) for line in lines],
        "values": values,
        "htopk_threshold_fvu_ratio": ratios,
        "threshold_over_fixed_k_fvu": threshold_vs_k,
        "own_thresholds": saved,
    }


def markdown(summary: dict[str, Any]) -> str:
    budgets, seeds = summary["budgets"], summary["seeds"]
    out = [f"Seeds {seeds}: mean ± half the range over seeds.", ""]
    for metric, name in METRICS.items():
        columns = [line for line in summary["lines"] if line in summary["values"][metric]]
        if not columns:
            continue
        out += [f"**{name} by mean L0**", "", "| mean L0 | " + " | ".join(columns) + " |"]
        out.append("|---:|" + "---:|" * len(columns))
        for budget in budgets:
            cells = [cell(summary["values"][metric][column].get(budget)) for column in columns]
            out.append(f"| {budget:g} | " + " | ".join(cells) + " |")
        out.append("")
    ratios = summary["htopk_threshold_fvu_ratio"]
    if ratios:
        columns = list(ratios)
        out += [
            "**FVU of HierarchicalTopK served by threshold / FVU of each line, same seed** (< 1: HierarchicalTopK "
            "by threshold better)",
            "",
            "| mean L0 | " + " | ".join(columns) + " |",
            "|---:|" + "---:|" * len(columns),
        ]
        for budget in budgets:
            cells = [cell(ratios[column].get(budget)) for column in columns]
            if any(cells):
                out.append(f"| {budget:g} | " + " | ".join(cells) + " |")
        out.append("")
    both = summary["threshold_over_fixed_k_fvu"]
    if both:
        columns = list(both)
        out += [
            "**Does threshold serving help every SAE? FVU by threshold / FVU at fixed k = that mean L0, same SAE**",
            "",
            "| mean L0 | " + " | ".join(columns) + " |",
            "|---:|" + "---:|" * len(columns),
        ]
        for budget in budgets:
            cells = [cell(both[column].get(budget)) for column in columns]
            if any(cells):
                out.append(f"| {budget:g} | " + " | ".join(cells) + " |")
        out.append("")
    if summary["own_thresholds"]:
        out += ["**At their own thresholds** (every seed)", ""]
        out += ["| SAE | seed | mean L0 | L0 p90 / max | FVU | CE-loss score |", "|---|---:|---:|---:|---:|---:|"]
        for name, rows in summary["own_thresholds"].items():
            for row in rows:
                ce = "" if row["ce"] is None else f"{row['ce']:.3f}"
                spread_text = f"{row['p90']:g} / {row['max']:g}"
                out.append(f"| {name} | {row['seed']} | {row['l0']:.2f} | {spread_text} | {row['fvu']:.4f} | {ce} |")
    return "\n".join(out)


# The README's columns: (short name, line label).
README_COLUMNS = (
    ("HTopK, by threshold", "HierarchicalTopK (one SAE, any k), served by threshold"),
    ("HTopK, by k", "HierarchicalTopK (one SAE, any k)"),
    ("TopK at k", "TopK trained at k (one SAE per k)"),
    ("BatchTopK at k, re-thresholded", "BatchTopK trained at k (one SAE per k), re-thresholded"),
    ("Matryoshka, re-thresholded", "Matryoshka BatchTopK at K, re-thresholded"),
    ("Multi-TopK, by k", "Multi-TopK, L(K/4) + L(K)/8"),
    ("TopK@64 truncated", "TopK trained at K, truncated to k"),
)


def readme_tables(summary: dict[str, Any]) -> str:
    """FVU and CE-loss score by mean L0 for the README's columns; the best mean of each row in bold."""
    out = []
    for metric, title in (("fvu", "FVU (lower is better)"), ("ce_loss_score", "CE-loss score (higher is better)")):
        out += [f"**{title}** by mean L0:", "", "| mean L0 | " + " | ".join(name for name, _ in README_COLUMNS) + " |"]
        out.append("|---:|" + "---:|" * len(README_COLUMNS))
        for budget in summary["budgets"]:
            stats = [summary["values"][metric].get(line, {}).get(budget) for _, line in README_COLUMNS]
            means = [entry["mean"] for entry in stats if entry]
            if not means:
                continue
            best = min(means) if metric == "fvu" else max(means)
            cells = [cell(entry) if entry else "" for entry in stats]
            cells = [
                f"**{text}**" if entry and entry["mean"] == best else text
                for text, entry in zip(cells, stats, strict=True)
            ]
            out.append(f"| {budget:g} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    metrics = [metric for metric in METRICS if summary["values"][metric]]
    figure, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 5), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for line in summary["lines"]:
            points = summary["values"][metric].get(line)
            if not points:
                continue
            budgets = sorted(points)
            thick = line.startswith("HierarchicalTopK")
            axis.errorbar(
                budgets,
                [points[b]["mean"] for b in budgets],
                yerr=[points[b]["half_range"] for b in budgets],
                label=line,
                marker="o" if thick else ".",
                linewidth=2.5 if thick else 1.2,
                linestyle="--" if "threshold" in line else "-",
                capsize=2,
            )
        axis.set(xscale="log", xlabel="mean L0 (active latents per token, averaged)", ylabel=METRICS[metric])
        if metric == "fvu":
            axis.set_yscale("log")
        axis.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    results, stem = Path(sys.argv[1]), Path(sys.argv[2])
    summary = summarise(load(results))
    stem.with_suffix(".md").write_text(markdown(summary) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    stem.with_name(f"{stem.name}_readme.md").write_text(readme_tables(summary))
    plot(summary, stem.with_suffix(".png"), f"{results}: every SAE by mean L0 ({len(summary['seeds'])} seeds)")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
