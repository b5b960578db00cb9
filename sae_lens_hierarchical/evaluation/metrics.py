"""Reconstruction quality of an SAE at every budget from one encoding pass: FVU, L0 and its spread, alive latents,
first ranks. Budgets are k's (:func:`evaluate_over_k`), target mean L0s served by a calibrated threshold
(:func:`evaluate_over_mean_l0`), or any :class:`~sae_lens_hierarchical.budget.Budget` (:func:`evaluate_budgets`).

With a model and tokens, also the CE-loss and KL scores of :mod:`sae_lens_hierarchical.evaluation.downstream`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_lens_hierarchical.budget import Budget, validate_k
from sae_lens_hierarchical.evaluation.budgets import (
    budget_reconstructions,
    max_budget,
    resolve_budgets,
    with_global_threshold_lifted,
)
from sae_lens_hierarchical.evaluation.downstream import downstream_metrics
from sae_lens_hierarchical.evaluation.thresholds import largest_mean_l0, ranking_values, thresholds_for_mean_l0
from sae_lens_hierarchical.loading import load_sae


@dataclass(frozen=True)
class BudgetMetrics:
    """Quality at one budget: a budget k, or a threshold (``threshold``, ``mean_l0_target``; ``k`` None unless it
    also caps the count), or the SAE as it encodes by itself (both None: a JumpReLU SAE at its own thresholds).

    Reconstruction metrics are over the evaluated activations: ``mse`` follows SAELens (squared error summed
    over d_in, mean over tokens); ``fvu`` is the fraction of variance unexplained (total squared error / total
    squared deviation from the mean activation); ``explained_variance = 1 - fvu``; ``l0`` the mean number of
    non-zero activations per token, ``l0_p50``/``l0_p90``/``l0_max`` its median, 90th percentile and largest value;
    ``alive_fraction`` the share of latents active on at least one token at this budget (``dead_fraction = 1 -
    alive_fraction``); ``at_cap_fraction`` (thresholds only, SAEs with a K) the share of tokens that keep every rank
    they may (K, or k): there the cap, not the threshold, set the count. Downstream metrics (``None`` without a
    model) are over the evaluated token sequences, as in ``sae_lens.evals``.
    """

    k: int | None
    mse: float
    fvu: float
    explained_variance: float
    cossim: float
    l0: float
    alive_fraction: float
    dead_fraction: float
    ce_loss_score: float | None = None
    kl_div_score: float | None = None
    ce_loss_with_sae: float | None = None
    ce_loss_without_sae: float | None = None
    ce_loss_with_ablation: float | None = None
    kl_div_with_sae: float | None = None
    kl_div_with_ablation: float | None = None
    threshold: float | None = None
    mean_l0_target: float | None = None
    l0_p50: float | None = None
    l0_p90: float | None = None
    l0_max: float | None = None
    at_cap_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)  # eq would compare tensors, which have no single truth value
class FirstRanks:
    """The first (smallest) rank at which each latent fired on any evaluated token, up to ``max_rank``.

    Budgets are nested, so a latent is alive at budget k exactly when its first rank is <= k: this is the whole
    ``alive_fraction`` curve at every k, not only at the evaluated ones. Latents first firing at small ranks carry
    the coarse, frequent directions; latents whose first rank is large are used only by large budgets.
    """

    ranks: torch.Tensor
    """``[d_sae]`` long, on CPU: 1-based first rank, or 0 for a latent that never fired within the top ``max_rank``."""
    max_rank: int
    """The largest rank looked at: the largest evaluated budget."""

    @property
    def counts(self) -> list[int]:
        """``counts[r - 1]``: the number of latents whose first rank is r, for r = 1..max_rank."""
        return torch.bincount(self.ranks, minlength=self.max_rank + 1)[1:].tolist()

    @property
    def never_fired(self) -> int:
        """Latents that fired at no rank <= max_rank on any token."""
        return int((self.ranks == 0).sum())

    def alive_fraction(self, k: int) -> float:
        """The share of latents active on at least one token at budget ``k`` (first rank in 1..k)."""
        k = validate_k(k, self.max_rank)
        return float(((self.ranks >= 1) & (self.ranks <= k)).double().mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the histogram over ranks 1..max_rank and the never-fired count (not the ranks)."""
        return {
            "max_rank": self.max_rank,
            "d_sae": self.ranks.numel(),
            "counts": self.counts,
            "never_fired": self.never_fired,
        }


class BudgetResults(list[BudgetMetrics]):
    """What :func:`evaluate_over_k` returns: the per-budget metrics (a plain list, as always) plus ``first_ranks``."""

    def __init__(self, metrics: list[BudgetMetrics], first_ranks: FirstRanks):
        super().__init__(metrics)
        self.first_ranks = first_ranks


def evaluate_over_k(
    sae: SAE[Any] | str | Path,
    activations: torch.Tensor,
    ks: list[int] | None = None,
    batch_size: int = 1024,
    progress: bool = True,
    *,
    model: HookedRootModule | None = None,
    tokens: torch.Tensor | None = None,
    exclude_token_ids: list[int] | None = None,
    hook_name: str | None = None,
    sequence_batch_size: int = 8,
) -> BudgetResults:
    """Metrics of ``sae`` at each budget in ``ks`` (default: powers of two up to K, and K), in one pass.

    Returns the metrics in the order of sorted ``ks`` (a list of :class:`BudgetMetrics`), whose ``first_ranks``
    attribute holds each latent's first rank up to the largest budget (:class:`FirstRanks`).

    Args:
        sae: a HierarchicalTopK SAE, or any SAELens SAE (evaluated truncated to its top-k activations); in
            memory, or a saved SAE's directory (loaded with :func:`sae_lens_hierarchical.load_sae`).
        activations: ``[tokens, d_in]`` activations at the SAE's hook, in the units the SAE was saved in.
        ks: budgets in 1..K (required for SAEs without a ``k``).
        model, tokens: with both, also CE-loss and KL scores per k with the SAE spliced into ``model`` at
            ``hook_name`` (default: the SAE's metadata) on ``tokens`` ``[sequences, context]``.
        exclude_token_ids: tokens (e.g. BOS) whose positions keep clean activations and are not scored.
    """
    sae = _loaded(sae, activations)
    ks = resolve_budgets(sae, ks)
    downstream = _downstream_arguments(model, tokens, exclude_token_ids, hook_name, sequence_batch_size)
    rows, first_ranks = _evaluate(sae, activations, [Budget(k) for k in ks], batch_size, progress, downstream)
    return BudgetResults(rows, first_ranks)


def evaluate_over_mean_l0(
    sae: SAE[Any] | str | Path,
    activations: torch.Tensor,
    mean_l0s: list[float],
    batch_size: int = 1024,
    progress: bool = True,
    *,
    calibration_activations: torch.Tensor | None = None,
    model: HookedRootModule | None = None,
    tokens: torch.Tensor | None = None,
    exclude_token_ids: list[int] | None = None,
    hook_name: str | None = None,
    sequence_batch_size: int = 8,
    unreachable: Literal["error", "skip"] = "error",
) -> list[BudgetMetrics]:
    """Metrics of ``sae`` served by one global threshold per target mean L0 in ``mean_l0s`` (sorted), in one pass.

    Each threshold is calibrated (:func:`~sae_lens_hierarchical.evaluation.thresholds.calibrate_thresholds`) on
    ``calibration_activations``, default ``activations`` themselves, so that the mean L0 there is the target: pass
    other activations to see how a calibration carries over to new text. Any SAELens SAE: a HierarchicalTopK SAE keeps
    each token's ranks >= θ (at most K); another SAE keeps, of what its own ``encode`` activates, the activations
    >= θ (TopK: at most its k; JumpReLU: above its own thresholds too), except that a JumpReLU SAE with one
    threshold for every latent (BatchTopK, Matryoshka) is re-thresholded: θ replaces its trained threshold
    (:func:`~sae_lens_hierarchical.evaluation.budgets.with_global_threshold_lifted`). A target above the mean L0
    the SAE keeps without a threshold is an error, or with ``unreachable="skip"`` left out with one warning (what a
    report wants after a long run: an SAE whose pre-activations are often negative keeps fewer than K). Other
    arguments as for :func:`evaluate_over_k`.
    """
    if unreachable not in ("error", "skip"):
        raise ValueError(f"unreachable must be 'error' or 'skip'; got {unreachable!r}")
    sae = with_global_threshold_lifted(_loaded(sae, activations))
    _check_activations(sae, activations)
    targets = sorted(mean_l0s)
    calibration = activations if calibration_activations is None else calibration_activations
    values = ranking_values(sae, calibration, batch_size)
    largest = largest_mean_l0(values, calibration.shape[0])
    if unreachable == "skip" and (skipped := [target for target in targets if target > largest]):
        warnings.warn(
            f"mean L0 targets {skipped} skipped: the SAE keeps a mean L0 of {largest:.4g} without a threshold on "
            "these activations",
            stacklevel=2,
        )
        targets = [target for target in targets if target <= largest]
        if not targets:
            return []
    thresholds = thresholds_for_mean_l0(values, calibration.shape[0], targets)
    downstream = _downstream_arguments(model, tokens, exclude_token_ids, hook_name, sequence_batch_size)
    budgets = [Budget(threshold=threshold) for threshold in thresholds]
    rows, _ = _evaluate(sae, activations, budgets, batch_size, progress, downstream)
    return [replace(row, mean_l0_target=float(target)) for row, target in zip(rows, targets, strict=True)]


def evaluate_budgets(
    sae: SAE[Any] | str | Path,
    activations: torch.Tensor,
    budgets: list[Budget],
    batch_size: int = 1024,
    progress: bool = True,
    *,
    model: HookedRootModule | None = None,
    tokens: torch.Tensor | None = None,
    exclude_token_ids: list[int] | None = None,
    hook_name: str | None = None,
    sequence_batch_size: int = 8,
) -> list[BudgetMetrics]:
    """Metrics of ``sae`` at each :class:`~sae_lens_hierarchical.budget.Budget` as given (``Budget()``: the SAE as it
    encodes by itself, e.g. a JumpReLU or BatchTopK SAE at its own thresholds). Arguments as for
    :func:`evaluate_over_k`."""
    sae = _loaded(sae, activations)
    max_k = max_budget(sae) or sae.cfg.d_sae
    budgets = [budget.validated(max_k) for budget in budgets]
    if not budgets:
        raise ValueError("budgets must name at least one budget")
    downstream = _downstream_arguments(model, tokens, exclude_token_ids, hook_name, sequence_batch_size)
    return _evaluate(sae, activations, budgets, batch_size, progress, downstream)[0]


def _loaded(sae: SAE[Any] | str | Path, activations: torch.Tensor) -> SAE[Any]:
    return load_sae(sae, device=str(activations.device)) if isinstance(sae, (str, Path)) else sae


def _downstream_arguments(
    model: HookedRootModule | None,
    tokens: torch.Tensor | None,
    exclude_token_ids: list[int] | None,
    hook_name: str | None,
    sequence_batch_size: int,
) -> dict[str, Any] | None:
    """The CE-loss/KL settings, or None without a model: both model and tokens, or neither."""
    if model is None and tokens is None:
        return None
    if model is None or tokens is None:
        raise ValueError("CE-loss and KL scores need both model and tokens; pass both or neither")
    return {
        "model": model,
        "tokens": tokens,
        "exclude_token_ids": exclude_token_ids,
        "hook_name": hook_name,
        "sequence_batch_size": sequence_batch_size,
    }


@torch.no_grad()
def _evaluate(
    sae: SAE[Any],
    activations: torch.Tensor,
    budgets: list[Budget],
    batch_size: int,
    progress: bool,
    downstream: dict[str, Any] | None,
) -> tuple[list[BudgetMetrics], FirstRanks]:
    """The metrics at each budget, and the first ranks up to the largest rank the ranking reached."""
    _check_activations(sae, activations)
    _warn_about_outlier_rows(activations)
    n_tokens = activations.shape[0]
    squared_error = torch.zeros(len(budgets), dtype=torch.float64)
    cossim_sum = torch.zeros(len(budgets), dtype=torch.float64)
    counts: list[list[torch.Tensor]] = [[] for _ in budgets]  # active latents per token, per budget
    at_cap = torch.zeros(len(budgets), dtype=torch.float64)
    alive = torch.zeros(len(budgets), sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    max_rank = 0
    # The best (smallest) 0-based rank at which each latent fired in the ranking; ``never`` for none.
    never = torch.iinfo(torch.long).max
    best_rank = torch.full((sae.cfg.d_sae,), never, dtype=torch.long, device=sae.device)
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq_norm = torch.zeros((), dtype=torch.float64)
    for start in tqdm(range(0, n_tokens, batch_size), desc="Evaluating budgets", disable=not progress):
        x = activations[start : start + batch_size].to(sae.device, sae.dtype)
        reconstructions, kept_ranks, top_acts, top_indices = budget_reconstructions(sae, x, budgets)
        for position, (reconstruction, kept) in enumerate(zip(reconstructions, kept_ranks, strict=True)):
            squared_error[position] += (reconstruction - x).double().pow(2).sum().cpu()
            cossim_sum[position] += F.cosine_similarity(reconstruction, x, dim=-1).double().sum().cpu()
            per_token = kept.sum(dim=-1)
            counts[position].append(per_token.cpu())
            at_cap[position] += (per_token == kept.shape[-1]).sum().cpu()
            alive[position, top_indices[:, : kept.shape[-1]][kept]] = True
        ranks = torch.arange(top_acts.shape[-1], device=sae.device).expand_as(top_indices)
        ranks = torch.where(top_acts > 0, ranks, never)
        best_rank.scatter_reduce_(0, top_indices.reshape(-1), ranks.reshape(-1), reduce="amin")
        max_rank = max(max_rank, top_acts.shape[-1])
        sum_x += x.double().sum(dim=0).cpu()
        sum_sq_norm += x.double().pow(2).sum().cpu()
    total_variance = sum_sq_norm - sum_x.pow(2).sum() / n_tokens
    scores: list[dict[str, float]] = [{} for _ in budgets]
    if downstream is not None:
        scores = downstream_metrics(sae, budgets=budgets, progress=progress, **downstream)
    first_ranks = FirstRanks(torch.where(best_rank != never, best_rank + 1, 0).cpu(), max_rank)
    has_cap = max_budget(sae) is not None
    results = []
    for position, budget in enumerate(budgets):
        fvu = float(squared_error[position] / total_variance)
        alive_fraction = float(alive[position].double().mean())
        per_token = torch.cat(counts[position]).double()
        results.append(
            BudgetMetrics(
                k=budget.k,
                mse=float(squared_error[position] / n_tokens),
                fvu=fvu,
                explained_variance=1.0 - fvu,
                cossim=float(cossim_sum[position] / n_tokens),
                l0=float(per_token.mean()),
                alive_fraction=alive_fraction,
                dead_fraction=1.0 - alive_fraction,
                **scores[position],
                threshold=budget.threshold,
                l0_p50=float(per_token.quantile(0.5)),
                l0_p90=float(per_token.quantile(0.9)),
                l0_max=float(per_token.max()),
                at_cap_fraction=float(at_cap[position] / n_tokens) if has_cap and budget.threshold else None,
            )
        )
    return results, first_ranks


# A row whose norm is this many times the median row norm is taken for a BOS-like position.
OUTLIER_NORM_RATIO = 10.0


def _warn_about_outlier_rows(activations: torch.Tensor) -> None:
    """Warn when some rows' norms are far above the rest: BOS or padding positions, which the SAE never trained on
    and whose squared error would dominate FVU (remove special tokens, as ``held_out`` does)."""
    norms = activations.double().norm(dim=-1)
    outliers = int((norms > OUTLIER_NORM_RATIO * norms.median()).sum())
    if outliers:
        warnings.warn(
            f"{outliers} of {len(norms)} activation rows have norms over {OUTLIER_NORM_RATIO:g}x the median (BOS or "
            "padding positions?): they dominate FVU and MSE; remove special-token positions first "
            "(sae_lens_hierarchical.held_out does)",
            stacklevel=3,
        )


def _check_activations(sae: SAE[Any], activations: torch.Tensor) -> None:
    if activations.ndim != 2 or activations.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"activations must be [tokens, d_in={sae.cfg.d_in}]; got shape {tuple(activations.shape)}")
    if activations.shape[0] < 2:
        raise ValueError(f"need at least 2 activation rows to measure variance; got {activations.shape[0]}")
    if not activations.is_floating_point():
        raise ValueError(f"activations must be floating point; got dtype {activations.dtype}")
    if sae.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale"):
        raise ValueError(
            f"evaluate_over_k does not support normalize_activations={sae.cfg.normalize_activations!r} "
            "(allowed: 'none', or a scaling already folded into the weights, as in saved SAEs)"
        )
