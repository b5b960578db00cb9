"""The readable definition of the hierarchical loss: plain autograd over every prefix reconstruction."""

from __future__ import annotations

import torch

from sae_lens_hierarchical.losses._common import (
    HierarchicalMSE,
    as_weights,
    check_levels,
    level_positions,
    weight_vector,
)


def hierarchical_mse_reference(
    sae_in: torch.Tensor,
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    levels: list[int],
    level_weights: list[float],
) -> HierarchicalMSE:
    """Plain autograd implementation: materialises every prefix reconstruction.

    Simple and obviously right, but autograd keeps several ``[tokens, K, d_in]`` tensors alive, so memory
    grows linearly with K.

    Args:
        sae_in: ``[..., d_in]`` target activations.
        top_acts: ``[..., K]`` decoder coefficients of the kept latents, sorted descending by the
            selection score (so column ``i`` is rank ``i + 1``).
        top_indices: ``[..., K]`` latent index of each kept activation.
        W_dec: ``[d_sae, d_in]`` decoder; rows are latent directions.
        b_dec: ``[d_in]`` decoder bias.
        levels: strictly increasing budgets in ``1..K`` whose reconstruction errors are summed.
        level_weights: one non-negative weight per level.
    """
    d_in = sae_in.shape[-1]
    n_kept = top_acts.shape[-1]
    check_levels(levels, level_weights, n_kept)
    target = sae_in.reshape(-1, d_in)
    acts = top_acts.reshape(-1, n_kept)
    indices = top_indices.reshape(-1, n_kept)

    # [tokens, K, d_in]: contribution of each ranked latent, then running sums over rank.
    contributions = acts.unsqueeze(-1) * W_dec[indices]
    prefix_recons = b_dec + contributions.cumsum(dim=1)
    level_recons = prefix_recons.index_select(1, level_positions(tuple(levels), sae_in.device))
    level_mse = (level_recons - target.unsqueeze(1)).pow(2).sum(dim=-1).mean(dim=0)
    loss = (level_mse * weight_vector(as_weights(level_weights), level_mse.device, level_mse.dtype)).sum()
    reconstruction = prefix_recons[:, -1, :].reshape(sae_in.shape)
    return HierarchicalMSE(loss, level_mse.detach(), reconstruction.detach())
