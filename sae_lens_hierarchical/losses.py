"""The HierarchicalTopK reconstruction loss.

For each token, the K kept activations are sorted in descending order, a_(1) >= ... >= a_(K), and the
prefix reconstruction at budget j is ``x_hat_j = b_dec + sum_{i <= j} a_(i) * W_dec[(i)]``. The loss is

    L = sum_{j in levels} w_j * mean_tokens( ||x - x_hat_j||^2 )

Scale convention: squared error summed over ``d_in`` and averaged over tokens, exactly SAELens's TopK
``mse_loss``. With the default uniform weights ``w_j = 1 / |levels|`` the loss is an average over levels,
so it stays on the scale of a single-level MSE: SAELens's AuxK coefficient and its hard-coded
gradient clipping (norm 1.0) behave as they do for TopK, and ``levels == [K]`` *is* TopK's loss.

Every implementation here shares one signature and returns a :class:`HierarchicalMSE`; tests compare
them against an independent float64 loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class HierarchicalMSE(NamedTuple):
    """Result of a hierarchical loss evaluation.

    Attributes:
        loss: scalar, differentiable; the weighted sum of per-level MSEs.
        level_mse: ``[n_levels]``, detached; per-level MSE (summed over d_in, mean over tokens), for logging.
        reconstruction: ``[..., d_in]``, detached; the full top-K reconstruction ``x_hat_K`` (SAELens's
            ``sae_out``), which the AuxK loss and training statistics need.
    """

    loss: torch.Tensor
    level_mse: torch.Tensor
    reconstruction: torch.Tensor


def uniform_level_weights(levels: list[int]) -> list[float]:
    """The paper's weighting: every budget counts equally, and the weights sum to one."""
    return [1.0 / len(levels)] * len(levels)


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
    target = sae_in.reshape(-1, d_in)
    acts = top_acts.reshape(-1, n_kept)
    indices = top_indices.reshape(-1, n_kept)

    # [tokens, K, d_in]: contribution of each ranked latent, then running sums over rank.
    contributions = acts.unsqueeze(-1) * W_dec[indices]
    prefix_recons = b_dec + contributions.cumsum(dim=1)
    level_positions = torch.tensor([j - 1 for j in levels], device=sae_in.device)
    level_recons = prefix_recons.index_select(1, level_positions)
    level_mse = (level_recons - target.unsqueeze(1)).pow(2).sum(dim=-1).mean(dim=0)
    weights = torch.tensor(level_weights, dtype=level_mse.dtype, device=level_mse.device)
    loss = (level_mse * weights).sum()
    reconstruction = prefix_recons[:, -1, :].reshape(sae_in.shape)
    return HierarchicalMSE(loss, level_mse.detach(), reconstruction.detach())
