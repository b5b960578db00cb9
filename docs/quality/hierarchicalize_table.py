"""Hierarchical fine-tunes of a pretrained TopK SAE against the source, HierarchicalTopK from scratch and TopK at k.

For each seed with a family run (docs/quality/family.sh: the source TopK@64 SAE, TopK trained at each k, and the
from-scratch HierarchicalTopK SAE on the same 600k tokens) and hierarchicalize runs (docs/quality/hierarchicalize.sh),
FVU (and CE-loss score where measured) at every k of every line; mean ± half the range over seeds. Each line's ratio
to the source at K and to the from-scratch HierarchicalTopK SAE at each k <= K/2 answers the issue's two questions.

Usage: python docs/quality/hierarchicalize_table.py FAMILY_DIR HIERARCHICALIZE_DIR OUTPUT_STEM
Writes OUTPUT_STEM.md, OUTPUT_STEM.json and OUTPUT_STEM.png (FVU against k, every line).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SOURCE_TOKENS = 600_000


def by_k(sae: dict[str, Any], metric: str) -> dict[int, float]:
    return {row["k"]: row[metric] for row in sae["results"] if row.get(metric) is not None}


def seed_lines(family: Path, runs: Path, metric: str) -> dict[str, dict[int, float]]:
    """``{line: {k: value}}`` of one seed: the family's source, TopK at k and scratch SAE, and every run."""
    saes = json.loads(family.read_text())["saes"]
    topk_at_k = {k: v for sae in saes.values() if sae["family"] == "topk_fixed" for k, v in by_k(sae, metric).items()}
    lines = {
        "source: TopK@64, truncated": by_k(saes["topk-k64"], metric),
        "TopK trained at k": {**topk_at_k, 64: by_k(saes["topk-k64"], metric).get(64)},
        "HierarchicalTopK from scratch, 600k": by_k(saes["htopk-k64"], metric),
    }
    for run in sorted((run for run in runs.iterdir() if not run.name.startswith(".")), key=_run_order):
        path = run / "comparison.json"
        if not path.exists():
            continue
        kind, tokens = run.name.rsplit("-", 1)
        label = {
            "finetune": f"fine-tune +{int(tokens) // 1000}k ({int(tokens) / SOURCE_TOKENS:.0%})",
            "scratch": f"from scratch, {int(tokens) // 1000}k (same extra tokens)",
            "scratch-total": f"from scratch, {int(tokens) // 1000}k (same total tokens)",
        }[kind]
        (sae,) = json.loads(path.read_text())["saes"].values()
        values = by_k(sae, metric)
        if values:
            lines[label] = values
    return {line: {k: v for k, v in values.items() if v is not None} for line, values in lines.items()}


def _run_order(run: Path) -> tuple[int, int]:
    kind, tokens = run.name.rsplit("-", 1)
    return ({"finetune": 0, "scratch": 1, "scratch-total": 2}.get(kind, 3), int(tokens))


def aggregate(per_seed: list[dict[str, dict[int, float]]]) -> dict[str, dict[int, list[float]]]:
    merged: dict[str, dict[int, list[float]]] = {}
    for lines in per_seed:
        for line, values in lines.items():
            for k, value in values.items():
                merged.setdefault(line, {}).setdefault(k, []).append(value)
    return merged


def cell(values: list[float] | None) -> str:
    if not values:
        return ""
    half = (max(values) - min(values)) / 2
    return f"{statistics.fmean(values):.4f}" + (f" ± {half:.4f}" if len(values) > 1 else "")


def table(merged: dict[str, dict[int, list[float]]], title: str) -> list[str]:
    ks = sorted({k for values in merged.values() for k in values})
    out = [f"**{title}**", "", "| line | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    out += [f"| {line} | " + " | ".join(cell(values.get(k)) for k in ks) + " |" for line, values in merged.items()]
    return out


def ratio_table(merged: dict[str, dict[int, list[float]]]) -> list[str]:
    """Each run's FVU over the source's at K = 64 and over the from-scratch SAE's at k <= 32 (ratio of means)."""
    source, scratch = merged["source: TopK@64, truncated"], merged["HierarchicalTopK from scratch, 600k"]
    ks = [k for k in sorted(scratch) if k <= 32]
    out = [
        "**Targets: FVU / the source's at K (<= 1.03), FVU / from scratch (600k) at k <= K/2 (<= 1.00)**",
        "",
        "| line | at K: / source | " + " | ".join(f"k = {k}: / scratch" for k in ks) + " |",
        "|---|---:|" + "---:|" * len(ks),
    ]
    for line, values in merged.items():
        if not line.startswith(("fine-tune", "from scratch")):
            continue
        at_k = f"{statistics.fmean(values[64]) / statistics.fmean(source[64]):.3f}" if 64 in values else ""
        small = [f"{statistics.fmean(values[k]) / statistics.fmean(scratch[k]):.3f}" if k in values else "" for k in ks]
        out.append(f"| {line} | {at_k} | " + " | ".join(small) + " |")
    return out


def plot(merged: dict[str, dict[int, list[float]]], path: Path, seeds: list[str]) -> None:
    figure, axis = plt.subplots(figsize=(8, 5))
    palette = plt.get_cmap("tab20").colors
    axis.set_prop_cycle(color=[*palette[::2], *palette[1::2]])  # 20 distinct colours: no two lines share one
    for line, values in merged.items():
        ks = sorted(values)
        style = "--" if line.startswith("from scratch,") else "-"
        width = 2.5 if line.startswith(("fine-tune", "source")) else 1.2
        axis.plot(ks, [statistics.fmean(values[k]) for k in ks], style, marker="o", linewidth=width, label=line)
    title = f"Hierarchical fine-tunes of the TopK@64 SAE ({', '.join(seeds)})"
    axis.set(xscale="log", yscale="log", xlabel="k", ylabel="FVU", title=title)
    axis.set_xticks([1, 2, 4, 8, 16, 32, 64], ["1", "2", "4", "8", "16", "32", "64"])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    family_dir, runs_dir, stem = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    seeds = [
        seed.name
        for seed in sorted(runs_dir.glob("seed*"))
        if (family_dir / seed.name / "comparison.json").exists() and any(seed.iterdir())
    ]
    fvu = aggregate([seed_lines(family_dir / s / "comparison.json", runs_dir / s, "fvu") for s in seeds])
    ce = aggregate([seed_lines(family_dir / s / "comparison.json", runs_dir / s, "ce_loss_score") for s in seeds])
    lines = [f"Seeds {seeds}: mean ± half the range over seeds.", ""]
    lines += [*table(fvu, "FVU by k"), "", *ratio_table(fvu), ""]
    lines += table({line: values for line, values in ce.items() if values}, "CE-loss score by k (where measured)")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "fvu": fvu, "ce_loss_score": ce}, indent=1) + "\n")
    plot(fvu, stem.with_suffix(".png"), seeds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
