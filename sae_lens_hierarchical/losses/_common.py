"""What every implementation of the hierarchical loss shares: its result type, the level checks, the per-step
constant tables, the accumulation dtype and the mapping of the backward's sums to autograd's outputs."""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

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


def validate_levels(k: int, levels: list[int] | tuple[int, ...]) -> list[int]:
    """``levels`` as a list if they are budgets the loss can train: strictly increasing ints in 1..K, ending at K.

    The one check of levels, for configs and for every loss implementation.
    """
    levels = list(levels)
    if not levels:
        raise ValueError(f"hierarchy_levels must be non-empty, a strictly increasing list in 1..K={k} ending at K")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= k:
            raise ValueError(f"hierarchy_levels entries must be ints in 1..K={k}; got {level!r} in {levels}")
    if any(b <= a for a, b in itertools.pairwise(levels)):
        raise ValueError(f"hierarchy_levels must be strictly increasing (sorted, no duplicates); got {levels}")
    if levels[-1] != k:
        # Latents ranked past the last level would be selected at inference but never trained.
        raise ValueError(
            f"hierarchy_levels must end at K={k} (the largest budget trained); got {levels}. "
            f"Lower k to {levels[-1]} or append {k}."
        )
    return levels


def validate_level_weights(levels: list[int], weights: list[float] | tuple[float, ...]) -> list[float]:
    """``weights`` as floats if there is one finite weight >= 0 per level, not all zero (used as given)."""
    weights = list(weights)
    if len(weights) != len(levels):
        raise ValueError(
            f"hierarchy_weights must have one weight per level ({len(levels)} levels: {levels}); "
            f"got {len(weights)} weights {weights}"
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < float("inf"):
            raise ValueError(f"hierarchy_weights must be finite numbers >= 0; got {weight!r} in {weights}")
    if sum(weights) <= 0:
        raise ValueError(f"hierarchy_weights must not all be zero; got {weights}")
    return [float(weight) for weight in weights]


def check_levels(levels: list[int], level_weights: list[float], n_kept: int) -> None:
    """What every loss implementation checks on entry: :func:`validate_levels` and :func:`validate_level_weights`."""
    validate_level_weights(validate_levels(n_kept, levels), level_weights)


# --- per-step constants, built once ---------------------------------------------------------------------
# Every training step uses the same levels and weights. Building their tensors from Python lists is a blocking
# host-to-device copy on CUDA (one per tensor, per step), so they are cached per (arguments, device, dtype), as the
# Triton path caches its rank tables. Cached tensors are shared by every call: nothing may modify them in place.
# They are built outside inference mode, so that a first call under ``torch.inference_mode()`` cannot cache tensors
# that autograd later refuses to save for backward.

CACHE_SIZE = 64


def as_weights(level_weights: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Hashable cache key for the weights (ints and floats that compare equal give one entry)."""
    return tuple(float(weight) for weight in level_weights)


@functools.lru_cache(maxsize=CACHE_SIZE)
def level_positions(levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[n_levels]`` 0-based rank column of each level's prefix, for ``index_select``."""
    with torch.inference_mode(False):
        return torch.tensor([level - 1 for level in levels], dtype=torch.long, device=device)


@functools.lru_cache(maxsize=CACHE_SIZE)
def weight_vector(level_weights: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n_levels]`` level weights, multiplied into the per-level MSEs."""
    with torch.inference_mode(False):
        return torch.tensor(level_weights, dtype=dtype, device=device)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (sums over K ranks and d_in need it), else the promoted input dtype."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def input_gradients(
    ctx: Any,
    first_suffix: torch.Tensor,
    grad_top_acts: torch.Tensor | None,
    grad_W_dec: torch.Tensor | None,
    top_acts: torch.Tensor,
    W_dec: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """``backward``'s outputs for the fused and Triton functions, each in its input's dtype.

    From ``S_1`` ``[tokens, d_in]``: ``dL/dx = -S_1`` and ``dL/db_dec = sum_tokens S_1``; ``top_indices`` and the
    four non-tensor arguments get None. ``ctx.input_dtypes`` holds the dtypes of ``sae_in`` and ``b_dec``.
    """
    need_sae_in, _, _, _, need_b_dec = ctx.needs_input_grad[:5]
    sae_in_dtype, b_dec_dtype = ctx.input_dtypes
    return (
        (-first_suffix).to(sae_in_dtype) if need_sae_in else None,
        grad_top_acts.to(top_acts.dtype) if grad_top_acts is not None else None,
        None,
        grad_W_dec.to(W_dec.dtype) if grad_W_dec is not None else None,
        first_suffix.sum(dim=0).to(b_dec_dtype) if need_b_dec else None,
        None,
        None,
        None,
        None,
    )


# Input dtypes the Triton kernels take (they accumulate in float32, so float64 stays on the torch path).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
