"""Named HierarchicalTopK objectives: the level subsets and weightings of docs/quality.md, by name.

Each name resolves to the training SAE's config fields (``hierarchy_levels``, ``hierarchy_weights``,
``hierarchy_final_weights``, ``hierarchy_schedule_steps``), so that ``compare --objectives uniform,k-weight-0.5``
trains several objectives side by side on identical batches, and a saved SAE records the fields themselves (its
metadata needs nothing from this module to load).

- ``uniform``: every level 1..K, weight 1/K each (the paper's loss; the default).
- ``k-weight-W``: every level, weight W on K and (1 - W)/(K - 1) on each other level.
- ``geometric``: levels 1, 2, 4, ... below K, and K; equal weights.
- ``geometric-k-weight-W``: those levels, weight W on K, the rest shared equally.
- ``schedule-to-k-weight-W``: uniform at the start, moving linearly to ``k-weight-W`` over the whole run.
- ``sampled-N``: at each step N levels of 1..K-1 drawn at random and K, weighted equally (Matryoshka-style).
- ``train-at-2K``: the uniform objective at twice the largest budget to serve (``k = 2K``, ``served_k = K``).
"""

from __future__ import annotations

import re
from typing import Any

from sae_lens_hierarchical.evaluation.budgets import default_budgets
from sae_lens_hierarchical.losses import uniform_level_weights, validate_level_weights, validate_levels

OBJECTIVE_PATTERNS = (
    "uniform",
    "k-weight-W",
    "geometric",
    "geometric-k-weight-W",
    "schedule-to-k-weight-W",
    "sampled-N",
    "train-at-2K",
)
"""The accepted names; ``W`` is the weight on the K level, a number in (0, 1]; ``N`` levels drawn per step below K."""

_NAME = re.compile(
    r"(?P<kind>uniform|geometric|k-weight|geometric-k-weight|schedule-to-k-weight|sampled)(?:-(?P<w>[0-9.]+))?"
)


def objective_overrides(name: str, max_k: int, n_training_steps: int) -> dict[str, Any]:
    """The HierarchicalTopK config fields of objective ``name`` at largest budget ``max_k``.

    ``n_training_steps`` is the run's length: a schedule spans all of it. Every field is set, so an objective
    never inherits another's levels, weights or schedule.
    """
    if name == "train-at-2K":
        return {**_DEFAULT_FIELDS, "k": 2 * max_k, "served_k": max_k}
    match = _NAME.fullmatch(name)
    weighted = match is not None and match["kind"] not in ("uniform", "geometric")
    if match is None or weighted != (match["w"] is not None):
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(OBJECTIVE_PATTERNS)} (W in (0, 1])")
    if n_training_steps < 1:
        raise ValueError(f"n_training_steps must be >= 1; got {n_training_steps}")
    levels = default_budgets(max_k) if match["kind"].startswith("geometric") else list(range(1, max_k + 1))
    weights = None
    if match["kind"] == "sampled":
        return {**_DEFAULT_FIELDS, "hierarchy_sampled_levels": _sampled_levels(match["w"], name, max_k)}
    if weighted:
        weights = _weights_with_k_share(len(levels), _k_share(match["w"], name, len(levels)))
    fields: dict[str, Any] = {
        **_DEFAULT_FIELDS,
        "hierarchy_levels": None if levels == list(range(1, max_k + 1)) else levels,
        "hierarchy_weights": weights,
    }
    if match["kind"] == "schedule-to-k-weight":
        fields |= {"hierarchy_weights": None, "hierarchy_final_weights": weights}
        fields["hierarchy_schedule_steps"] = n_training_steps
    return fields


# Every field an objective sets, at the config's defaults: an objective never inherits another's settings.
_DEFAULT_FIELDS: dict[str, Any] = {
    "hierarchy_levels": None,
    "hierarchy_weights": None,
    "hierarchy_final_weights": None,
    "hierarchy_schedule_steps": 0,
    "hierarchy_sampled_levels": 0,
    "served_k": None,
}


def _sampled_levels(text: str, name: str, max_k: int) -> int:
    """N of a ``sampled-N`` name: an int in 1..K-2 (fewer than the K - 1 levels below K)."""
    if not text.isdigit() or not 1 <= int(text) <= max_k - 2:
        raise ValueError(f"objective {name!r}: N levels drawn below K={max_k} must be an int in 1..{max_k - 2}")
    return int(text)


def _k_share(text: str, name: str, n_levels: int) -> float:
    """W of a ``...-W`` name, in (0, 1]; exactly 1 when there is only the K level to weigh."""
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1 or (n_levels == 1 and share != 1):
        allowed = "1 (K is the only level)" if n_levels == 1 else "(0, 1]"
        raise ValueError(f"objective {name!r}: the weight on K must be in {allowed}; got {text}")
    return share


def _weights_with_k_share(n_levels: int, share: float) -> list[float]:
    """``share`` on the last level (K), the rest split equally among the others."""
    if n_levels == 1:
        return [share]
    return [(1 - share) / (n_levels - 1)] * (n_levels - 1) + [share]


def resolve_levels(k: int, hierarchy_levels: list[int] | None) -> list[int]:
    """The budgets J whose errors the loss sums; default every budget 1..K (the paper's choice)."""
    return list(range(1, k + 1)) if hierarchy_levels is None else validate_levels(k, hierarchy_levels)


def resolve_level_weights(levels: list[int], hierarchy_weights: list[float] | None) -> list[float]:
    """Per-level weights; default uniform 1/|J|. Given weights are used as is (not renormalised)."""
    if hierarchy_weights is None:
        return uniform_level_weights(levels)
    return validate_level_weights(levels, hierarchy_weights)
