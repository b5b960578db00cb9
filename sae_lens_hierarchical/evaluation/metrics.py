"""Reconstruction quality of an SAE at every budget k from one encoding pass: FVU, L0, alive latents, first ranks.

With a model and tokens, also the CE-loss and KL scores of :mod:`sae_lens_hierarchical.evaluation.downstream`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_lens_hierarchical.evaluation.budgets import prefix_reconstructions, resolve_budgets
from sae_lens_hierarchical.evaluation.downstream import downstream_metrics_over_k
from sae_lens_hierarchical.hierarchical_topk_sae import validate_k
from sae_lens_hierarchical.loading import load_sae


@dataclass(frozen=True)
class BudgetMetrics:
    """Quality at one budget k.

    Reconstruction metrics are over the evaluated activations: ``mse`` follows SAELens (squared error summed
    over d_in, mean over tokens); ``fvu`` is the fraction of variance unexplained (total squared error / total
    squared deviation from the mean activation); ``explained_variance = 1 - fvu``; ``l0`` the mean number of
    non-zero activations per token; ``alive_fraction`` the share of latents active on at least one token at
    this budget (``dead_fraction = 1 - alive_fraction``). Downstream metrics (``None`` without a model) are
    over the evaluated token sequences, as in ``sae_lens.evals``.
    """

    k: int
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


@torch.no_grad()
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
    if isinstance(sae, (str, Path)):
        sae = load_sae(sae, device=str(activations.device))
    ks = resolve_budgets(sae, ks)
    _check_activations(sae, activations)
    n_tokens = activations.shape[0]
    squared_error = torch.zeros(len(ks), dtype=torch.float64)
    cossim_sum = torch.zeros(len(ks), dtype=torch.float64)
    l0_sum = torch.zeros(len(ks), dtype=torch.float64)
    # The best (smallest) rank at which each latent fired: it is alive at budget k iff that rank is < k.
    best_rank = torch.full((sae.cfg.d_sae,), ks[-1], dtype=torch.long, device=sae.device)
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq_norm = torch.zeros((), dtype=torch.float64)
    for start in tqdm(range(0, n_tokens, batch_size), desc="Evaluating budgets", disable=not progress):
        x = activations[start : start + batch_size].to(sae.device, sae.dtype)
        reconstructions, top_acts, top_indices = prefix_reconstructions(sae, x, ks)
        for position, (k, reconstruction) in enumerate(zip(ks, reconstructions, strict=True)):
            squared_error[position] += (reconstruction - x).double().pow(2).sum().cpu()
            cossim_sum[position] += F.cosine_similarity(reconstruction, x, dim=-1).double().sum().cpu()
            l0_sum[position] += (top_acts[:, :k] > 0).sum().cpu()
        ranks = torch.arange(ks[-1], device=sae.device).expand_as(top_indices)
        ranks = torch.where(top_acts > 0, ranks, ks[-1])
        best_rank.scatter_reduce_(0, top_indices.reshape(-1), ranks.reshape(-1), reduce="amin")
        sum_x += x.double().sum(dim=0).cpu()
        sum_sq_norm += x.double().pow(2).sum().cpu()
    total_variance = sum_sq_norm - sum_x.pow(2).sum() / n_tokens
    downstream: list[dict[str, float]] = [{} for _ in ks]
    if model is not None or tokens is not None:
        if model is None or tokens is None:
            raise ValueError("CE-loss and KL scores need both model and tokens; pass both or neither")
        downstream = downstream_metrics_over_k(
            sae, model, tokens, ks, exclude_token_ids, hook_name, sequence_batch_size, progress
        )
    first_ranks = FirstRanks(torch.where(best_rank < ks[-1], best_rank + 1, 0).cpu(), ks[-1])
    results = []
    for position, k in enumerate(ks):
        fvu = float(squared_error[position] / total_variance)
        alive = first_ranks.alive_fraction(k)
        results.append(
            BudgetMetrics(
                k=k,
                mse=float(squared_error[position] / n_tokens),
                fvu=fvu,
                explained_variance=1.0 - fvu,
                cossim=float(cossim_sum[position] / n_tokens),
                l0=float(l0_sum[position] / n_tokens),
                alive_fraction=alive,
                dead_fraction=1.0 - alive,
                **downstream[position],
            )
        )
    return BudgetResults(results, first_ranks)


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
