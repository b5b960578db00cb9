"""Budgets and rankings: what "an SAE at a budget" means for any SAELens SAE, and its reconstructions there.

The ranking of a token's active latents is computed once; a budget (:class:`~sae_lens_hierarchical.budget.Budget`)
keeps a prefix of it: the first k ranks, the ranks whose activation is >= a threshold, or both. For a
HierarchicalTopK SAE that is exactly what ``encode(x, k=, threshold=)`` gives; any other SAELens SAE (TopK, JumpReLU,
BatchTopK, ...) is ranked by its own activations, so budget k is that SAE truncated to its k largest (the natural
baseline for "train at K, run at k") and a threshold keeps, of what it activates, those >= the threshold.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE

from sae_lens_hierarchical.budget import Budget, validate_k
from sae_lens_hierarchical.serving import VariableKMixin, decode_rows


def max_budget(sae: SAE[Any]) -> int | None:
    """The largest budget ``sae`` can be evaluated at: K for TopK-family SAEs, None when it has no k."""
    k = getattr(sae.cfg, "k", None)
    return int(k) if isinstance(k, int) and not isinstance(k, bool) else None


def default_budgets(max_k: int) -> list[int]:
    """Powers of two below K, and K itself."""
    budgets = [2**i for i in range(max_k.bit_length()) if 2**i < max_k]
    return [*budgets, max_k]


def serving_mean_l0s(max_k: int) -> list[int]:
    """The mean L0s at which reports serve an SAE by threshold: the powers of two below K (at K a threshold has
    nothing left to cut)."""
    return [budget for budget in default_budgets(max_k) if budget < max_k]


def resolve_budgets(sae: SAE[Any], ks: list[int] | None) -> list[int]:
    """The budgets to evaluate, sorted and distinct: ``ks`` checked against K (d_sae for SAEs without k), else the
    default powers of two and K."""
    max_k = max_budget(sae)
    if max_k is None:
        if not ks:
            raise ValueError(f"{type(sae).__name__} has no k; pass the budgets to evaluate (ks=[...])")
        max_k = sae.cfg.d_sae
    return sorted({validate_k(k, max_k) for k in (ks or default_budgets(max_k))})


@contextmanager
def flat_inputs(sae: SAE[Any]) -> Iterator[None]:
    """Let a hook_z inference SAE take flat ``[tokens, d_in]`` rows (it expects ``[..., n_heads, d_head]``).

    Evaluation works on flattened activations, as SAELens's activation store and trainer do.
    """
    if not getattr(sae, "hook_z_reshaping_mode", False):
        yield
        return
    sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        sae.turn_on_forward_pass_hook_z_reshaping()


def with_global_threshold_lifted(sae: SAE[Any]) -> SAE[Any]:
    """For serving at a new global threshold: a JumpReLU SAE whose thresholds are all one value (BatchTopK and
    Matryoshka SAEs as SAELens saves them) becomes a copy with that threshold at 0 (plain ReLU), so a new threshold
    *replaces* the trained one and the mean L0 can go up as well as down; any other SAE is returned as it is (a
    threshold then applies on top of what it activates)."""
    if not isinstance(sae, JumpReLUSAE) or not bool((sae.threshold == sae.threshold.flatten()[0]).all()):
        return sae
    lifted = copy.deepcopy(sae)
    with torch.no_grad():
        lifted.threshold.zero_()
    return lifted


def ranked_latents(
    sae: SAE[Any], x: torch.Tensor, n_ranks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(activations, latent indices, decoder coefficients)``, each ``[tokens, n_ranks]``, largest first.

    HierarchicalTopK SAEs use their own nested ranking; other SAEs are encoded and their active latents
    ranked by activation, which is what truncating them to k keeps. ``n_ranks=None`` ranks everything the SAE keeps:
    K for TopK-family SAEs, else as many as the most active token of ``x`` has (at least 1).
    """
    with flat_inputs(sae):
        if isinstance(sae, VariableKMixin):
            top_acts, top_indices = sae.encode_top_k(x, k=n_ranks)
            return top_acts, top_indices, sae.decoder_coefficients(top_acts, top_indices)
        acts = sae.encode(x)
    if n_ranks is None:
        n_ranks = max_budget(sae) or max(1, int((acts > 0).sum(dim=-1).max()))
    top_acts, top_indices = acts.topk(n_ranks, dim=-1, sorted=True)
    coefficients = top_acts
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        coefficients = top_acts / sae.W_dec.norm(dim=-1)[top_indices]
    return top_acts, top_indices, coefficients


def latent_activations(sae: SAE[Any], x: torch.Tensor, k: int) -> torch.Tensor:
    """``[tokens, d_sae]`` latent activations of ``x`` ``[tokens, d_in]`` at budget ``k``, zero outside the top k.

    What interpretability measures read at a budget: a HierarchicalTopK SAE's ``encode(x, k=k)``, any other
    TopK-family SAE truncated to its k largest activations (the same ranking as :func:`ranked_latents`).
    """
    max_k = max_budget(sae)
    k = validate_k(k, sae.cfg.d_sae if max_k is None else max_k)
    top_acts, top_indices, _ = ranked_latents(sae, x, k)
    dense = torch.zeros(x.shape[0], sae.cfg.d_sae, dtype=top_acts.dtype, device=top_acts.device)
    return dense.scatter_(1, top_indices, top_acts)


def budget_reconstructions(
    sae: SAE[Any], x: torch.Tensor, budgets: list[Budget]
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Reconstructions of ``x`` ``[tokens, d_in]`` at each budget, from one ranking.

    Returns ``(reconstructions [tokens, d_in] per budget, which ranks each budget keeps [tokens, ranks it can use]
    per budget, ranked activations, ranked indices)``. Each budget decodes only the rows it keeps with
    ``embedding_bag``, so no ``[tokens, ranks, d_in]`` tensor of gathered rows is ever built (600 MB at d_in 2304,
    K 128 and 1024 tokens).
    """
    bounded = all(budget.k is not None for budget in budgets)
    top_acts, top_indices, coefficients = ranked_latents(sae, x, max(b.k for b in budgets) if bounded else None)
    reconstructions, kept_ranks = [], []
    for budget in budgets:
        n_ranks = budget.ranks(top_acts.shape[-1])
        kept = budget.keep(top_acts[:, :n_ranks])
        decoded = decode_rows(sae.W_dec, top_indices[:, :n_ranks], torch.where(kept, coefficients[:, :n_ranks], 0.0))
        reconstructions.append(sae.run_time_activation_norm_fn_out(decoded + sae.b_dec))
        kept_ranks.append(kept)
    return reconstructions, kept_ranks, top_acts, top_indices


def prefix_reconstructions(
    sae: SAE[Any], x: torch.Tensor, ks: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Reconstructions of ``x`` ``[tokens, d_in]`` at each budget k in sorted ``ks``, and the ranking used."""
    reconstructions, _, top_acts, top_indices = budget_reconstructions(sae, x, [Budget(k) for k in ks])
    return reconstructions, top_acts, top_indices


def rank_histogram(top_acts: torch.Tensor, top_indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """``[d_sae, ranks]`` int64: how often each latent has a positive activation at each rank, from a ranking
    ``top_acts``, ``top_indices`` ``[tokens, ranks]`` (largest first)."""
    n_ranks = top_indices.shape[1]
    slots = top_indices * n_ranks + torch.arange(n_ranks)  # [tokens, ranks]: (latent, rank) as one index
    fired = slots[top_acts > 0]
    return torch.bincount(fired, minlength=d_sae * n_ranks).view(d_sae, n_ranks)


def lower_median_rank(rank_counts: torch.Tensor) -> torch.Tensor:
    """``[d_sae]`` int64: the smallest rank r (1-based) with at least half of a latent's firings at ranks <= r; 0 for
    latents that never fired. ``rank_counts``: ``[d_sae, ranks]``."""
    total = rank_counts.sum(dim=1, keepdim=True)
    reached = 2 * rank_counts.cumsum(dim=1) >= total  # [d_sae, ranks]
    median = reached.to(torch.int64).argmax(dim=1) + 1
    return torch.where(total[:, 0] > 0, median, torch.zeros_like(median))
