"""Summarise the issue-14 runs: for each objective, FVU per k as mean and range over seeds, and its ratios to the TopK
SAEs trained on the same batches (same seed): TopK trained at k, and TopK trained at K (at k = K, and truncated to k).

Usage: python docs/quality/summarize.py RESULTS_DIR OUTPUT_STEM
RESULTS_DIR holds seed<S>/baselines/comparison.json (TopK at every budget and the default HierarchicalTopK) and
seed<S>/<variant>/comparison.json (one HierarchicalTopK objective each), as docs/quality/search.sh writes them.
Writes OUTPUT_STEM.md (tables), OUTPUT_STEM.json (every number) and OUTPUT_STEM.png (ratios against k).
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


def load(results: Path) -> tuple[dict[str, dict[int, dict]], dict[int, dict]]:
    """``({variant: {seed: {k: htopk fvu}}}, {seed: {"fixed": {k: fvu}, "truncated": {k: fvu}}})``."""
    variants: dict[str, dict[int, dict]] = {}
    baselines: dict[int, dict] = {}
    for path in sorted(results.glob("seed*/*/comparison.json")):
        seed, variant = int(path.parent.parent.name.removeprefix("seed")), path.parent.name
        saes = json.loads(path.read_text())["saes"]
        for sae in saes.values():
            fvu = {row["k"]: row["fvu"] for row in sae["results"]}
            if sae["family"] == "hierarchical":
                variants.setdefault(DEFAULT if variant == "baselines" else variant, {})[seed] = fvu
            elif sae["family"] == "topk_fixed":
                baselines.setdefault(seed, {"fixed": {}, "truncated": {}})["fixed"].update(fvu)
            elif sae["family"] == "topk_truncated":
                entry = baselines.setdefault(seed, {"fixed": {}, "truncated": {}})
                entry["truncated"] = fvu
                entry["fixed"][max(fvu)] = fvu[max(fvu)]
    return variants, baselines


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def text(stats: dict[str, float], digits: int = 3) -> str:
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    half_range = (stats["max"] - stats["min"]) / 2
    return f"{stats['mean']:.{digits}f} ± {half_range:.{digits}f}"


def summarize(results: Path) -> dict:
    variants, baselines = load(results)
    summary: dict = {"variants": {}, "baselines": {}}
    fixed_ks = sorted({k for entry in baselines.values() for k in entry["fixed"]})
    max_k = fixed_ks[-1]
    for kind in ("fixed", "truncated"):
        ks = sorted({k for entry in baselines.values() for k in entry[kind]})
        summary["baselines"][kind] = {
            k: spread([entry[kind][k] for entry in baselines.values() if k in entry[kind]]) for k in ks
        }
    for variant, seeds in variants.items():
        shared = [seed for seed in seeds if seed in baselines]
        ks = sorted(seeds[shared[0]])
        row: dict = {"seeds": shared, "fvu": {}, "vs_topk_at_k": {}, "vs_truncated": {}}
        for k in ks:
            row["fvu"][k] = spread([seeds[seed][k] for seed in shared])
            if k in fixed_ks:
                row["vs_topk_at_k"][k] = spread([seeds[seed][k] / baselines[seed]["fixed"][k] for seed in shared])
            if k <= max_k // 8:
                row["vs_truncated"][k] = spread([seeds[seed][k] / baselines[seed]["truncated"][k] for seed in shared])
        summary["variants"][variant] = row
    summary["max_k"] = max_k
    return summary


def markdown(summary: dict) -> str:
    max_k = summary["max_k"]
    variants = summary["variants"]
    fixed_ks = sorted(summary["baselines"]["fixed"])
    lines = [
        "FVU ratio to the TopK SAE trained at k on the same batches (mean ± half the range over seeds; < 1: "
        f"HierarchicalTopK better). Targets: <= 1.03 at k = K = {max_k}, <= 0.97 at every k <= K/2.",
        "",
        "| objective | seeds | " + " | ".join(f"k={k}" for k in fixed_ks) + " |",
        "|---|---:|" + "---:|" * len(fixed_ks),
    ]
    for name, row in variants.items():
        cells = [text(row["vs_topk_at_k"][k]) if k in row["vs_topk_at_k"] else "" for k in fixed_ks]
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    small = sorted({k for row in variants.values() for k in row["vs_truncated"]})
    lines += [
        "",
        f"FVU ratio to TopK trained at K = {max_k} and truncated to k (target <= 0.5 for k <= K/8):",
        "",
        "| objective | " + " | ".join(f"k={k}" for k in small) + " |",
        "|---|" + "---:|" * len(small),
    ]
    for name, row in variants.items():
        lines.append(f"| {name} | " + " | ".join(text(row["vs_truncated"][k]) for k in small) + " |")
    all_ks = sorted({k for row in variants.values() for k in row["fvu"]})
    lines += ["", "FVU (mean ± half the range over seeds):", ""]
    lines += ["| SAE | " + " | ".join(f"k={k}" for k in all_ks) + " |", "|---|" + "---:|" * len(all_ks)]
    for name, row in variants.items():
        lines.append(f"| HTopK {name} | " + " | ".join(text(row["fvu"][k], 4) for k in all_ks) + " |")
    fixed = summary["baselines"]["fixed"]
    lines.append("| TopK trained at k | " + " | ".join(text(fixed[k], 4) if k in fixed else "" for k in all_ks) + " |")
    truncated = summary["baselines"]["truncated"]
    cells = [text(truncated[k], 4) if k in truncated else "" for k in all_ks]
    lines.append(f"| TopK@{max_k} truncated | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, row in summary["variants"].items():
        ks = sorted(row["vs_topk_at_k"])
        means = [row["vs_topk_at_k"][k]["mean"] for k in ks]
        errors = [
            [row["vs_topk_at_k"][k]["mean"] - row["vs_topk_at_k"][k]["min"] for k in ks],
            [row["vs_topk_at_k"][k]["max"] - row["vs_topk_at_k"][k]["mean"] for k in ks],
        ]
        axis.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=name)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("k")
    axis.set_ylabel("FVU / FVU of TopK trained at k")
    axis.set_title("HierarchicalTopK objectives against TopK trained at each k (range over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    results, stem = Path(sys.argv[1]), Path(sys.argv[2])
    summary = summarize(results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown(summary))
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, stem.with_suffix(".png"))
    print(markdown(summary))


if __name__ == "__main__":
    main()
