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
and the torch fused path elsewhere, once the kernels passed their self-check on that device (``self_check``). What
they share (result type, level checks, constant tables) is in ``_common``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from sae_lens_hierarchical.accelerators import triton_available
from sae_lens_hierarchical.losses._common import (
    TRITON_DTYPES,
    HierarchicalMSE,
    check_levels,
    uniform_level_weights,
    validate_level_weights,
    validate_levels,
)
from sae_lens_hierarchical.losses.fused import default_tiling, hierarchical_mse_fused
from sae_lens_hierarchical.losses.reference import hierarchical_mse_reference
from sae_lens_hierarchical.losses.triton_loader import hierarchical_mse_triton

HierarchicalLossFn = Callable[..., HierarchicalMSE]

# --- Triton kernels and the automatic choice ------------------------------------------------------------


# Device types the Triton kernels are compiled for (the self-check's tests simulate a GPU by adding "cpu").
TRITON_DEVICE_TYPES = ("cuda",)


class AutoChoice(NamedTuple):
    """What ``loss_implementation="auto"`` runs for some tensors (``"triton"`` or ``"fused"``), and why."""

    implementation: str
    reason: str


def auto_loss_choice(device: torch.device | str, dtype: torch.dtype) -> AutoChoice:
    """``"triton"`` for float32/bfloat16/float16 tensors on CUDA when triton is installed, unless the kernels failed
    their self-check on that device; else ``"fused"``. Runs nothing: a device not checked yet reads as ``"triton"``.

    The torch fused path stays the choice on CPU (Triton kernels run on GPU only) and for float64.
    """
    device = torch.device(device)
    if device.type not in TRITON_DEVICE_TYPES:
        return AutoChoice("fused", f"the Triton kernels run on CUDA only; {device.type} uses the fused torch loss")
    if dtype not in TRITON_DTYPES:
        name = str(dtype).removeprefix("torch.")
        return AutoChoice("fused", f"the Triton kernels take float32, bfloat16 or float16; {name} uses the fused loss")
    if not triton_available():
        return AutoChoice("fused", "triton is not installed (pip install 'sae-lens-hierarchical[gpu]')")
    from sae_lens_hierarchical.losses.self_check import known_verdict

    verdict = known_verdict(device)
    if verdict is None:
        return AutoChoice(
            "triton", "triton is installed; the self-check runs at the first 'auto' loss (if it fails: fused)"
        )
    if not verdict.ok:
        return AutoChoice("fused", f"the Triton self-check failed on {verdict.device}: {verdict.cause}")
    return AutoChoice("triton", f"triton is installed and the self-check passed on {verdict.device}")


def auto_loss_implementation(device: torch.device | str, dtype: torch.dtype) -> str:
    """The implementation of :func:`auto_loss_choice`, without its reason."""
    return auto_loss_choice(device, dtype).implementation


def auto_uses_triton(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether "auto" runs the Triton kernels for tensors on ``device`` of ``dtype``: :func:`auto_loss_implementation`
    says so and the kernels pass their self-check there, which runs (once per device) the first time it is asked.

    A failed check warns once and makes this False on that device for the rest of the process.
    """
    if auto_loss_implementation(device, dtype) != "triton":
        return False
    from sae_lens_hierarchical.losses.self_check import triton_self_check

    return triton_self_check(device).ok


def hierarchical_mse_auto(
    sae_in: torch.Tensor,
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    levels: list[int],
    level_weights: list[float],
) -> HierarchicalMSE:
    """The memory-flat loss: the Triton kernels where :func:`auto_uses_triton`, else the fused torch loss."""
    dtype = functools.reduce(torch.promote_types, (sae_in.dtype, top_acts.dtype, W_dec.dtype, b_dec.dtype))
    loss_fn = HIERARCHICAL_LOSSES["triton" if auto_uses_triton(sae_in.device, dtype) else "fused"]
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
    "TRITON_DEVICE_TYPES",
    "TRITON_DTYPES",
    "AutoChoice",
    "HierarchicalLossFn",
    "HierarchicalMSE",
    "auto_loss_choice",
    "auto_loss_implementation",
    "auto_uses_triton",
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
