"""The width trend: HierarchicalTopK's price at K and its lead below K/2 against the dictionary width, over seeds.

For each width and seed, the FVU ratio of the HierarchicalTopK SAE to the TopK SAE trained at k on the same batches
(same seed), at every k both were evaluated at (k = K is the price at K; k <= K/2 the lead). Mean ± half the range
over seeds; a least-squares line through the price at K against log2(width) is extrapolated to where it would reach
1.03 (an extrapolation beyond the widths measured, labelled as one).

Usage: python docs/quality/width_table.py RESULTS_DIR OUTPUT_STEM
RESULTS_DIR holds d<W>/seed<S>/comparison.json (docs/quality/width.sh). Writes OUTPUT_STEM.md, .json and .png.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TARGET = 1.03


def load(results: Path) -> dict[int, dict[int, dict[int, float]]]:
    """``{width: {seed: {k: FVU(HierarchicalTopK) / FVU(TopK trained at k)}}}``."""
    ratios: dict[int, dict[int, dict[int, float]]] = {}
    for path in sorted(results.glob("d*/seed*/comparison.json")):
        width, seed = int(path.parent.parent.name[1:]), int(path.parent.name.removeprefix("seed"))
        saes = json.loads(path.read_text())["saes"].values()
        hierarchical = {
            row["k"]: row["fvu"] for sae in saes if sae["family"] == "hierarchical" for row in sae["results"]
        }
        fixed: dict[int, float] = {}
        for sae in saes:
            if sae["family"] == "topk_fixed":
                fixed.update({row["k"]: row["fvu"] for row in sae["results"]})
            elif sae["family"] == "topk_truncated":
                largest = max(sae["results"], key=lambda row: row["k"])
                fixed[largest["k"]] = largest["fvu"]
        ratios.setdefault(width, {})[seed] = {k: hierarchical[k] / fvu for k, fvu in fixed.items() if k in hierarchical}
    if not ratios:
        raise SystemExit(f"no d*/seed*/comparison.json under {results}")
    return ratios


def summarise(ratios: dict[int, dict[int, dict[int, float]]]) -> dict[str, Any]:
    ks = sorted({k for per_width in ratios.values() for per_seed in per_width.values() for k in per_seed})
    max_k = ks[-1]
    table: dict[int, dict[int, dict[str, float]]] = {}
    for width, per_width in sorted(ratios.items()):
        for k in ks:
            values = [per_seed[k] for per_seed in per_width.values() if k in per_seed]
            if values:
                table.setdefault(width, {})[k] = {
                    "mean": statistics.fmean(values),
                    "half_range": (max(values) - min(values)) / 2,
                    "seeds": len(values),
                }
    widths = sorted(table)
    points = [(math.log2(width), table[width][max_k]["mean"]) for width in widths if max_k in table[width]]
    fit: dict[str, Any] = {"target": TARGET}
    if len(points) >= 2:
        slope, intercept = _least_squares(points)
        fit |= {"slope_per_doubling": slope, "intercept": intercept}
        fit["width_at_target"] = 2 ** ((TARGET - intercept) / slope) if slope < 0 else None
    return {
        "K": max_k,
        "ks": ks,
        "table": {str(w): {str(k): v for k, v in row.items()} for w, row in table.items()},
        "fit": fit,
    }


def _least_squares(points: list[tuple[float, float]]) -> tuple[float, float]:
    xs, ys = zip(*points, strict=True)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def markdown(summary: dict[str, Any]) -> str:
    ks, max_k, fit = summary["ks"], summary["K"], summary["fit"]
    header = " | ".join(f"k = {k}" + (" (price at K)" if k == max_k else "") for k in ks)
    out = [
        "FVU of HierarchicalTopK / FVU of TopK trained at k (same seed and batches), mean ± half the range over seeds:",
        "",
        f"| d_sae | seeds | {header} |",
        "|---:|---:|" + "---:|" * len(ks),
    ]
    for width, row in summary["table"].items():
        seeds = max(cell["seeds"] for cell in row.values())
        cells = [f"{row[str(k)]['mean']:.3f} ± {row[str(k)]['half_range']:.3f}" if str(k) in row else "" for k in ks]
        out.append(f"| {int(width):,} | {seeds} | " + " | ".join(cells) + " |")
    if "slope_per_doubling" in fit:
        out += [
            "",
            f"Least-squares line through the price at K against log2(d_sae): {fit['slope_per_doubling']:+.4f} per "
            "doubling of the width.",
        ]
        if fit["width_at_target"] is None:
            out.append(f"The price at K does not fall with width here: no width reaches {TARGET} on this line.")
        else:
            out.append(
                f"**Extrapolation** (beyond the widths measured): the line reaches {TARGET} at d_sae ≈ "
                f"{fit['width_at_target']:,.0f}."
            )
    return "\n".join(out)


def plot(summary: dict[str, Any], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 4.3))
    widths = [int(width) for width in summary["table"]]
    for k in summary["ks"]:
        cells = [summary["table"][str(width)].get(str(k)) for width in widths]
        present = [(width, cell) for width, cell in zip(widths, cells, strict=True) if cell]
        axis.errorbar(
            [width for width, _ in present],
            [cell["mean"] for _, cell in present],
            yerr=[cell["half_range"] for _, cell in present],
            marker="o",
            capsize=3,
            linewidth=2.5 if k == summary["K"] else 1.2,
            label=f"k = {k}" + (" = K (price at K)" if k == summary["K"] else ""),
        )
    fit = summary["fit"]
    if "slope_per_doubling" in fit:
        span = [min(widths), max(widths) * 4]
        axis.plot(
            span,
            [fit["intercept"] + fit["slope_per_doubling"] * math.log2(width) for width in span],
            linestyle=":",
            color="black",
            label="fit at K, extrapolated",
        )
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.axhline(TARGET, color="grey", linewidth=0.8, linestyle="--")
    axis.set(xscale="log", xlabel="d_sae", ylabel="FVU ratio: HierarchicalTopK / TopK trained at k")
    axis.set_xticks(widths, [f"{width:,}" for width in widths])
    axis.minorticks_off()  # the log axis's own minor labels would overprint the widths
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    results, stem = Path(sys.argv[1]), Path(sys.argv[2])
    summary = summarise(load(results))
    stem.with_suffix(".md").write_text(markdown(summary) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(summary, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
