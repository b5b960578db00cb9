"""Feature absorption reported: several runs (seeds) averaged per budget, a markdown table and a plot against k.

Reads :class:`~sae_lens_hierarchical.interpretability.absorption_results.AbsorptionResults` only (measured by
:func:`~sae_lens_hierarchical.interpretability.absorption.absorption_over_k`, or read back from JSON), so reporting
needs neither an SAE nor the probe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sae_lens_hierarchical.interpretability.absorption_results import AbsorptionResults
from sae_lens_hierarchical.interpretability.spread import format_mean_spread, spread

# (field of AbsorptionAtK, table label, plot axis label)
_METRICS = (
    ("full_absorption_rate", "full absorption", "full absorption rate (lower is better)"),
    ("absorption_fraction", "absorption fraction", "mean absorption fraction (lower is better)"),
    ("mean_main_f1", "main-latent F1", "main latents' k-sparse probe F1"),
)


def aggregate_absorption(runs: Sequence[AbsorptionResults]) -> list[dict[str, float]]:
    """Per budget evaluated in every run (e.g. seeds): each metric's mean and half its range, and the letter count.

    Rows: ``{"k", "<metric>", "<metric>_half_range", ..., "n_letters_scored" (mean), "n_runs"}`` for the metrics
    ``full_absorption_rate``, ``absorption_fraction`` and ``mean_main_f1``.
    """
    if not runs:
        raise ValueError("runs must hold at least one AbsorptionResults; got none")
    common = sorted(set.intersection(*({row.k for row in run.per_k} for run in runs)))
    rows = []
    for k in common:
        at_k = [run.at(k) for run in runs]
        row: dict[str, float] = {"k": k, "n_runs": len(runs)}
        for metric, _, _ in _METRICS:
            summary = spread([getattr(result, metric) for result in at_k])
            row[metric], row[f"{metric}_half_range"] = summary.mean, summary.half_range
        row["n_letters_scored"] = float(np.mean([result.n_letters_scored for result in at_k]))
        rows.append(row)
    return rows


def _as_runs(
    results: Mapping[str, AbsorptionResults | Sequence[AbsorptionResults]],
) -> dict[str, list[dict[str, float]]]:
    return {
        name: aggregate_absorption([value] if isinstance(value, AbsorptionResults) else list(value))
        for name, value in results.items()
    }


def format_absorption_table(results: Mapping[str, AbsorptionResults | Sequence[AbsorptionResults]]) -> str:
    """Markdown, one row per budget and three columns per SAE (full absorption rate, absorption fraction, and the
    main latents' k-sparse probe F1, which says whether any latent tracks letters at that budget).

    ``results`` maps a name to one run or to several (seeds), shown as mean +- half the range. The letter counts
    scored are given per SAE in the last column.
    """
    aggregated = _as_runs(results)
    names = list(aggregated)
    ks = sorted({row["k"] for rows in aggregated.values() for row in rows})
    header = ["k"] + [f"{label}: {name}" for _, label, _ in _METRICS for name in names]
    lines = ["| " + " | ".join(header) + " | letters scored |", "|" + "---:|" * (len(header) + 1)]
    for k in ks:
        by_name = {name: next((row for row in rows if row["k"] == k), None) for name, rows in aggregated.items()}
        cells = [str(int(k))]
        for metric, _, _ in _METRICS:
            for name in names:
                row = by_name[name]
                cells.append(
                    "" if row is None else format_mean_spread(row[metric], row[f"{metric}_half_range"], row["n_runs"])
                )
        counts = ", ".join("" if row is None else f"{row['n_letters_scored']:.0f}" for row in by_name.values())
        lines.append("| " + " | ".join(cells) + f" | {counts} |")
    return "\n".join(lines)


def plot_absorption(
    results: Mapping[str, AbsorptionResults | Sequence[AbsorptionResults]],
    path: str | Path,
    title: str = "Feature absorption (first-letter task)",
) -> Path:
    """A PNG at ``path``: full absorption rate, absorption fraction and main-latent F1 against k (log-x), one line per
    SAE, error bars of half the range over runs. Built without pyplot (no global state, any backend)."""
    from matplotlib.figure import Figure

    aggregated = _as_runs(results)
    figure = Figure(figsize=(14, 3.8))
    axes = figure.subplots(1, len(_METRICS))
    for axis, (metric, _, label) in zip(axes, _METRICS, strict=True):
        for name, rows in aggregated.items():
            ks = [row["k"] for row in rows]
            axis.errorbar(
                ks, [row[metric] for row in rows], yerr=[row[f"{metric}_half_range"] for row in rows],
                marker="o", capsize=3, label=name,
            )  # fmt: skip
        all_ks = sorted({row["k"] for rows in aggregated.values() for row in rows})
        axis.set(xscale="log", xlabel="budget k", ylabel=label, ylim=(0, None))
        axis.set_xticks(all_ks, [str(int(k)) for k in all_ks])
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
