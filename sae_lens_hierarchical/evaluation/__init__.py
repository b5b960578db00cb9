"""Evaluation at every budget (k, or a threshold for a target mean L0): budgets and rankings, threshold calibration,
reconstruction metrics, CE/KL scores.

``evaluate_over_k`` and ``evaluate_over_mean_l0`` are the entry points. Tables and plots live in
:mod:`sae_lens_hierarchical.reporting` (re-exported
here, so ``from sae_lens_hierarchical.evaluation import evaluate_over_k, format_markdown_table`` keeps working).
"""

from typing import Any

from sae_lens_hierarchical.evaluation.budgets import (
    budget_reconstructions,
    default_budgets,
    flat_inputs,
    latent_activations,
    lower_median_rank,
    max_budget,
    prefix_reconstructions,
    rank_histogram,
    ranked_latents,
    resolve_budgets,
    serving_mean_l0s,
)
from sae_lens_hierarchical.evaluation.downstream import downstream_metrics, downstream_metrics_over_k
from sae_lens_hierarchical.evaluation.metrics import (
    BudgetMetrics,
    BudgetResults,
    FirstRanks,
    evaluate_budgets,
    evaluate_over_k,
    evaluate_over_mean_l0,
)
from sae_lens_hierarchical.evaluation.thresholds import (
    calibrate_threshold,
    calibrate_thresholds,
    ranking_values,
    thresholds_for_mean_l0,
)

# Tables and plots moved to sae_lens_hierarchical.reporting; served from here on first use (not imported eagerly, so
# that reporting, which builds on this package, and this package do not import each other).
_REPORTING_NAMES = (
    "FAMILY_LABELS",
    "by_family",
    "draw_first_ranks",
    "figure_over_k",
    "format_comparison_table",
    "format_first_rank_table",
    "format_markdown_table",
    "plot_comparison",
    "plot_first_ranks",
    "plot_over_k",
)


def __getattr__(name: str) -> Any:
    if name in _REPORTING_NAMES:
        from sae_lens_hierarchical import reporting

        return getattr(reporting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAMILY_LABELS",
    "BudgetMetrics",
    "BudgetResults",
    "FirstRanks",
    "budget_reconstructions",
    "by_family",
    "calibrate_threshold",
    "calibrate_thresholds",
    "default_budgets",
    "downstream_metrics",
    "downstream_metrics_over_k",
    "draw_first_ranks",
    "evaluate_budgets",
    "evaluate_over_k",
    "evaluate_over_mean_l0",
    "figure_over_k",
    "flat_inputs",
    "format_comparison_table",
    "format_first_rank_table",
    "format_markdown_table",
    "latent_activations",
    "lower_median_rank",
    "max_budget",
    "plot_comparison",
    "plot_first_ranks",
    "plot_over_k",
    "prefix_reconstructions",
    "rank_histogram",
    "ranked_latents",
    "ranking_values",
    "resolve_budgets",
    "serving_mean_l0s",
    "thresholds_for_mean_l0",
]
