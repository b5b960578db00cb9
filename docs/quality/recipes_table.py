"""Recipes against the price at K: each recipe's HierarchicalTopK SAE, served by k and by threshold, against the TopK
SAEs trained at each k on the same batches (same seed), FVU ratio mean ± half the range over seeds.

Usage: python docs/quality/recipes_table.py BASELINES_DIR RECIPES_DIR OUTPUT_STEM
BASELINES_DIR holds seed<S>/baselines/comparison.json (docs/quality/search.sh: TopK at 4, 8, 16, 32 and the uniform
HierarchicalTopK) or seed<S>/comparison.json (docs/quality/family.sh, at the preset's size); RECIPES_DIR holds
seed<S>/<run>/comparison.json (docs/quality/recipes.sh, recipes_preset.sh). Writes OUTPUT_STEM.md and OUTPUT_STEM.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def topk_fvu(path: Path) -> dict[int, float]:
    """``{k: FVU of the TopK SAE trained at k}`` of one baselines run (the one at K counts at K)."""
    fvu: dict[int, float] = {}
    for sae in json.loads(path.read_text())["saes"].values():
        if sae["family"] == "topk_fixed":
            fvu.update({row["k"]: row["fvu"] for row in sae["results"]})
        elif sae["family"] == "topk_truncated":
            largest = max(sae["results"], key=lambda row: row["k"])
            fvu[largest["k"]] = largest["fvu"]
    return fvu


def baselines_json(baselines: Path, seed: str) -> Path | None:
    """A seed's baselines run: ``seed<S>/baselines/comparison.json`` (search.sh) or ``seed<S>/comparison.json`` (a
    family run, family.sh); None when neither exists."""
    for path in (baselines / seed / "baselines" / "comparison.json", baselines / seed / "comparison.json"):
        if path.exists():
            return path
    return None


def recipe_lines(path: Path, run: str) -> dict[str, dict[float, float]]:
    """``{line: {budget: FVU}}`` of every HierarchicalTopK SAE of a run, by k and by threshold."""
    lines: dict[str, dict[float, float]] = {}
    for name, sae in json.loads(path.read_text())["saes"].items():
        if sae["family"] != "hierarchical":
            continue
        label = f"{run}: {sae.get('objective') or name}"
        lines[f"{label}, by k"] = {float(row["k"]): row["fvu"] for row in sae["results"]}
        lines[f"{label}, by threshold"] = {
            float(row["mean_l0_target"]): row["fvu"] for row in sae["mean_l0_results"] if row["mean_l0_target"]
        }
    return lines


def main() -> None:
    baselines, recipes, stem = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    ratios: dict[str, dict[float, list[float]]] = {}
    seeds = []
    for seed_dir in sorted(recipes.glob("seed*")):
        baselines_run = baselines_json(baselines, seed_dir.name)
        if baselines_run is None:
            print(f"{seed_dir.name}: no baselines run, left out", file=sys.stderr)
            continue
        reference = topk_fvu(baselines_run)
        seeds.append(seed_dir.name)
        lines = {"uniform (default, the baselines run): by k": {}}
        for sae in json.loads(baselines_run.read_text())["saes"].values():
            if sae["family"] == "hierarchical":
                lines["uniform (default, the baselines run): by k"] = {float(r["k"]): r["fvu"] for r in sae["results"]}
        for run_dir in sorted(seed_dir.iterdir()):
            lines |= recipe_lines(run_dir / "comparison.json", run_dir.name)
        for line, budgets in lines.items():
            for budget, fvu in budgets.items():
                if int(budget) in reference:
                    ratios.setdefault(line, {}).setdefault(budget, []).append(fvu / reference[int(budget)])
    budgets = sorted({budget for line in ratios.values() for budget in line})
    summary: dict[str, Any] = {
        line: {
            str(b): {"mean": statistics.fmean(v), "half_range": (max(v) - min(v)) / 2, "n": len(v)}
            for b, v in row.items()
        }
        for line, row in ratios.items()
    }
    out = [
        f"FVU / FVU of TopK trained at k (same seed and batches; {', '.join(seeds)}; mean ± half the range); by "
        "threshold: at mean L0 = k. < 1: better than TopK trained at k.",
        "",
        "| recipe, serving | " + " | ".join(f"k = {b:g}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for line, row in summary.items():
        cells = [
            f"{row[str(b)]['mean']:.3f} ± {row[str(b)]['half_range']:.3f}" if str(b) in row else "" for b in budgets
        ]
        out.append(f"| {line} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(out) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print("\n".join(out))


if __name__ == "__main__":
    main()
