"""Sparse probing reported: results (seeds, or a family of SAEs) averaged per (task, k, n), a markdown table and a
figure against k with the residual stream's probes as reference lines.

Reads :class:`~sae_lens_hierarchical.interpretability.probing_results.SparseProbingResults` only (measured by
:func:`~sae_lens_hierarchical.interpretability.probing.sparse_probing`, or read back from JSON).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae_lens_hierarchical.interpretability.probing_results import ScoreSummary, SparseProbingResults
from sae_lens_hierarchical.interpretability.spread import spread


def summarize_probing(
    results: Sequence[SparseProbingResults],
) -> dict[tuple[str, int | None, int | None], ScoreSummary]:
    """``{(task, k, n): mean and half range}`` over ``results`` (seeds of one SAE, or the SAEs of one family trained
    at one k each); k = None holds the residual ceiling."""
    values: dict[tuple[str, int | None, int | None], list[float]] = {}
    for result in results:
        for score in [*result.ceiling, *result.scores]:
            values.setdefault((score.task, score.k, score.n), []).append(score.accuracy)
    return {key: spread(v) for key, v in sorted(values.items(), key=_key_order)}


def format_probing_table(
    results: Mapping[str, SparseProbingResults | Sequence[SparseProbingResults]], task: str
) -> str:
    """Markdown: one row per (SAE, k), one column per n, held-out accuracy of ``task``; first the residual stream
    (top-n dimensions, and all of them). Several results under one name show mean ± half the range."""
    groups = {name: _as_list(value) for name, value in results.items()}
    summaries = {name: summarize_probing(group) for name, group in groups.items()}
    ns = sorted({n for group in groups.values() for r in group for n in r.ns})
    lines = [
        "| SAE | k | " + " | ".join(f"n = {n}" for n in ns) + " | all |",
        "|---|---:|" + "---:|" * (len(ns) + 1),
    ]
    ceiling = next(iter(summaries.values()), {})
    if any(key[0] == task for key in ceiling):
        cells = [_cell(ceiling.get((task, None, n))) for n in [*ns, None]]
        lines.append("| residual stream | | " + " | ".join(cells) + " |")
    for name, summary in summaries.items():
        for k in sorted({key[1] for key in summary if key[0] == task and key[1] is not None}):
            cells = [_cell(summary.get((task, k, n))) for n in ns]
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def figure_sparse_probing(
    results: Mapping[str, SparseProbingResults | Sequence[SparseProbingResults]], title: str = "Sparse probing"
) -> Any:
    """A matplotlib figure: one panel per (task, n), held-out accuracy against k (log-x), one line per name (error
    bars: half the range over its results), the residual stream's top-n (dotted) and all-dimensions (dashed) probes.
    """
    from matplotlib.figure import Figure

    groups = {name: _as_list(value) for name, value in results.items()}
    summaries = {name: summarize_probing(group) for name, group in groups.items()}
    tasks = list(dict.fromkeys(task for group in groups.values() for r in group for task in r.tasks))
    ns = sorted({n for group in groups.values() for r in group for n in r.ns})
    figure = Figure(figsize=(3.6 * len(ns), 3.2 * len(tasks)))
    axes = np.atleast_2d(figure.subplots(len(tasks), len(ns), squeeze=False))
    ceiling = next(iter(summaries.values()), {})
    all_ks = sorted({key[1] for s in summaries.values() for key in s if key[1] is not None})
    for row, task in enumerate(tasks):
        for column, n in enumerate(ns):
            axis = axes[row, column]
            for name, summary in summaries.items():
                points = sorted((key[1], s) for key, s in summary.items() if key[0] == task and key[2] == n and key[1])
                if points:
                    axis.errorbar(
                        [k for k, _ in points],
                        [s.mean for _, s in points],
                        yerr=[s.half_range for _, s in points],
                        marker="o",
                        capsize=2,
                        label=name,
                    )
            for key, style, label in (
                ((task, None, n), ":", "residual, top n"),
                ((task, None, None), "--", "residual, all"),
            ):
                if key in ceiling:
                    axis.axhline(ceiling[key].mean, color="black", linestyle=style, linewidth=1, label=label)
            axis.set(xscale="log", title=f"{task}, n = {n}", xlabel="budget k", ylabel="held-out accuracy")
            if all_ks:
                axis.set_xticks(all_ks, [str(k) for k in all_ks])
            axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.08 if len(tasks) > 1 else 0.14, 1, 1))
    return figure


def plot_sparse_probing(
    results: Mapping[str, SparseProbingResults | Sequence[SparseProbingResults]],
    path: str | Path,
    title: str = "Sparse probing",
) -> Path:
    """Save :func:`figure_sparse_probing` as a 120-dpi PNG at ``path``."""
    path = Path(path)
    figure_sparse_probing(results, title).savefig(path, dpi=120)
    return path


def _as_list(value: SparseProbingResults | Sequence[SparseProbingResults]) -> list[SparseProbingResults]:
    return [value] if isinstance(value, SparseProbingResults) else list(value)


def _key_order(item: tuple[tuple[str, int | None, int | None], Any]) -> tuple[str, int, int]:
    """Tasks, then k (the ceiling first), then n (all dimensions last)."""
    task, k, n = item[0]
    return task, -1 if k is None else k, 1 << 62 if n is None else n


def _cell(summary: ScoreSummary | None) -> str:
    return "" if summary is None else summary.cell()
