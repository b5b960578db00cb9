"""The training-length trend (issue 14, docs/quality.md section 3): the uniform HierarchicalTopK SAE's FVU ratios per
training length, mean ± half the range over seeds, as a markdown table and a plot.

Usage: python docs/quality/trend_table.py
Reads docs/quality/trend_d2048_k32_tokens<N>.json (summarize.py's output for docs/quality/runs/trend/tokens<N>) and,
for 600k tokens, docs/quality/search_d2048_k32.json (the search's baselines, same size and seeds). Writes
docs/quality/trend_d2048_k32.md and .png.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
DEFAULT = "uniform (default)"
COLUMNS = [("fvu_vs_topk_at_k", k, f"FVU / TopK@{k}") for k in (4, 8, 16)]
COLUMNS += [
    ("fvu_vs_topk_at_k", 32, "FVU / TopK@32 (k = K)"),
    ("fvu_vs_truncated", 1, "FVU / TopK@32 truncated, k = 1"),
]


def lengths() -> dict[int, dict]:
    """``{training tokens: the uniform objective's summary}``."""
    found = {}
    for path in HERE.glob("trend_d2048_k32_tokens*.json"):
        tokens = int(re.search(r"tokens(\d+)", path.name)[1])  # type: ignore[index]
        found[tokens] = json.loads(path.read_text())["objectives"][DEFAULT]
    found[600_000] = json.loads((HERE / "search_d2048_k32.json").read_text())["objectives"][DEFAULT]
    return dict(sorted(found.items()))


def cell(summary: dict, key: str, k: int) -> str:
    entry = summary[key].get(str(k))
    if entry is None:
        return ""
    if entry["n"] == 1:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {(entry['max'] - entry['min']) / 2:.3f}"


def main() -> None:
    rows = lengths()
    table = ["| training tokens | seeds | " + " | ".join(label for _, _, label in COLUMNS) + " |"]
    table.append("|---:|---|" + "---:|" * len(COLUMNS))
    for tokens, summary in rows.items():
        seeds = ", ".join(str(s) for s in summary["seeds"])
        cells = [cell(summary, key, k) for key, k, _ in COLUMNS]
        table.append(f"| {tokens:,} | {seeds} | " + " | ".join(cells) + " |")
    (HERE / "trend_d2048_k32.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for key, k, label in COLUMNS:
        points = [(t, s[key][str(k)]) for t, s in rows.items() if str(k) in s[key]]
        means = [p["mean"] for _, p in points]
        spreads = [(p["max"] - p["min"]) / 2 for _, p in points]
        axis.errorbar([t for t, _ in points], means, yerr=spreads, marker="o", capsize=3, label=label)
    axis.axhline(1.03, color="black", linestyle="--", linewidth=1, label="target at K (1.03)")
    axis.axhline(0.97, color="gray", linestyle=":", linewidth=1, label="target below K (0.97)")
    axis.set(xscale="log", xlabel="training tokens", ylabel="FVU ratio (< 1: HierarchicalTopK better)")
    axis.set_title("Uniform HierarchicalTopK, d_sae 2,048, K = 32: ratios as training grows", fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(HERE / "trend_d2048_k32.png", dpi=120)


if __name__ == "__main__":
    main()
