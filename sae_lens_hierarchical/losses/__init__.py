"""The HierarchicalTopK reconstruction loss.

For each token, the K kept activations are sorted in descending order, a_(1) >= ... >= a_(K), and the
prefix reconstruction at budget j is ``x_hat_j = b_dec + sum_{i <= j} a_(i) * W_dec[(i)]``. The loss is

    L = sum_{j in levels} w_j * mean_tokens( ||x - x_hat_j||^2 )

Scale convention: squared error summed over ``d_in`` and averaged over tokens, exactly SAELens's TopK
``mse_loss``. With the default uniform weights ``w_j = 1 / |levels|`` the loss is an average over levels,
so it stays on the scale of a single-level MSE: SAELens's AuxK coefficient and its hard-coded
gradient clipping (norm 1.0) behave as they do for TopK, and ``levels == [K]`` *is* TopK's loss.

Every implementation here shares one signature and returns a :class:`HierarchicalMSE`; tests compare
them against an independent float64 loop. Implementations: ``reference`` (plain autograd), ``fused`` (torch,
memory-flat) and ``triton_kernels`` (GPU), imported only when used; :func:`hierarchical_mse_auto` picks Triton on CUDA
and the torch fused path elsewhere. What they share (result type, level checks, constant tables) is in ``_common``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from sae_lens_hierarchical.losses._common import (
    TRITON_DTYPES,
    HierarchicalMSE,
    check_levels,
    triton_available,
    uniform_level_weights,
    validate_level_weights,
    validate_levels,
)
from sae_lens_hierarchical.losses.fused import default_tiling, hierarchical_mse_fused
from sae_lens_hierarchical.losses.reference import hierarchical_mse_reference

HierarchicalLossFn = Callable[..., HierarchicalMSE]

# --- Triton kernels and the automatic choice ------------------------------------------------------------


def hierarchical_mse_triton(*args: Any, **kwargs: Any) -> HierarchicalMSE:
    """Memory-flat loss in Triton kernels, for CUDA tensors: see :mod:`sae_lens_hierarchical.losses.triton_kernels`.

    Same arguments and result as :func:`hierarchical_mse_fused`. Imported on first use, so that everything else
    works without triton installed.
    """
    if not triton_available():
        raise ImportError("the Triton loss needs triton: pip install 'sae-lens-hierarchical[gpu]'")
    from sae_lens_hierarchical.losses.triton_kernels import hierarchical_mse_triton as triton_loss

    return triton_loss(*args, **kwargs)


def auto_loss_implementation(device: torch.device | str, dtype: torch.dtype) -> str:
    """``"triton"`` for float32/bfloat16/float16 tensors on CUDA when triton is installed, else ``"fused"``.

    The torch fused path stays the choice on CPU (Triton kernels run on GPU only) and for float64.
    """
    use_triton = torch.device(device).type == "cuda" and dtype in TRITON_DTYPES and triton_available()
    return "triton" if use_triton else "fused"


def hierarchical_mse_auto(
    sae_in: torch.Tensor,
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    levels: list[int],
    level_weights: list[float],
) -> HierarchicalMSE:
    """The memory-flat loss, on the implementation :func:`auto_loss_implementation` picks for these tensors."""
    dtype = functools.reduce(torch.promote_types, (sae_in.dtype, top_acts.dtype, W_dec.dtype, b_dec.dtype))
    loss_fn = HIERARCHICAL_LOSSES[auto_loss_implementation(sae_in.device, dtype)]
    return loss_fn(sae_in, top_acts, top_indices, W_dec, b_dec, levels, level_weights)


# ``HierarchicalTopKTrainingSAEConfig.loss_implementation`` -> loss function (all share one signature).
HIERARCHICAL_LOSSES: dict[str, HierarchicalLossFn] = {
    "auto": hierarchical_mse_auto,
    "fused": hierarchical_mse_fused,
    "reference": hierarchical_mse_reference,
    "triton": hierarchical_mse_triton,
}


__all__ = [
    "HIERARCHICAL_LOSSES",
    "TRITON_DTYPES",
    "HierarchicalLossFn",
    "HierarchicalMSE",
    "auto_loss_implementation",
    "check_levels",
    "default_tiling",
    "hierarchical_mse_auto",
    "hierarchical_mse_fused",
    "hierarchical_mse_reference",
    "hierarchical_mse_triton",
    "triton_available",
    "uniform_level_weights",
    "validate_level_weights",
    "validate_levels",
]
