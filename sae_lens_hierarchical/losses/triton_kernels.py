"""Triton kernels for the HierarchicalTopK loss: the memory-flat forward and backward of ``losses.fused`` on GPU.

Kept apart from :mod:`sae_lens_hierarchical.losses` (as openai/sparse_autoencoder keeps its ``kernels.py``) so that
the package imports and trains without triton: ``losses/__init__.py`` imports this module only when the Triton path
is chosen.

Both kernels run on a grid of (token blocks) x (``d_in`` blocks). Tokens are independent and the loss is a sum over
``d_in`` columns, so every program walks all K ranks on its own ``[BLOCK_TOKENS, BLOCK_D]`` tile, gathering the
selected decoder rows as it goes, and never holds more than a few tiles:

- forward: ``r_0 = b_dec - x``, then ``r_i = r_{i-1} + a_i W_dec[idx_i]`` for i = 1..K; at each rank that is a level,
  the tile's ``sum ||r_i||^2`` goes to a per-program partial sum (summed over programs in torch afterwards, so the
  loss is deterministic). It stores the final residual ``r_K`` (saved for backward) and the reconstruction.
- backward: walks i = K..1 carrying the suffix ``S_i = S_{i+1} + w_i (2 g / N) r_i`` (g the incoming gradient,
  w_i = 0 for ranks that are not levels) and recovering ``r_{i-1} = r_i - a_i W_dec[idx_i]``; it adds the tile's
  part of ``<W_dec[idx_i], S_i>`` to ``grad_top_acts[t, i]`` and ``a_i S_i`` to ``grad_W_dec[idx_i]`` with float32
  atomic adds (several ``d_in`` blocks share a ``grad_top_acts`` entry; tokens share decoder rows), and stores
  ``S_1``, from which ``grad_sae_in = -S_1`` and ``grad_b_dec = sum_tokens S_1``.

Accumulation is float32 whatever the input dtype; any K, token count and ``d_in`` work (tails are masked).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import triton
import triton.language as tl

from sae_lens_hierarchical.losses._common import TRITON_DTYPES, HierarchicalMSE, check_levels, input_gradients

# A [32, 128] float32 tile is 32 registers a thread at 4 warps; backward keeps about four such tiles live.
_BLOCK_TOKENS = 32
_MAX_BLOCK_D = 128
_NUM_WARPS = 4


@triton.jit
def _hierarchical_mse_forward_kernel(
    sae_in_ptr,  # [N, d_in]
    top_acts_ptr,  # [N, K]
    top_indices_ptr,  # [N, K]
    W_dec_ptr,  # [d_sae, d_in]
    b_dec_ptr,  # [d_in]
    rank_level_slot_ptr,  # [K] int32: position in ``levels`` of rank i + 1, or -1 where it is not a level
    residual_ptr,  # [N, d_in] float32 out: r_K = x_hat_K - x
    reconstruction_ptr,  # [N, d_in] out: x_hat_K
    squared_error_ptr,  # [n_programs, n_levels] float32 out: each program's sum of ||r_j||^2 over its tile
    n_tokens,
    d_in,
    n_kept,
    n_levels,
    stride_sae_in,
    stride_top,
    stride_W_dec,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < n_tokens
    tile_mask = token_mask[:, None] & (columns < d_in)[None, :]
    tokens = tokens.to(tl.int64)  # N * d_in may exceed 2**31
    tile_offsets = tokens[:, None] * stride_sae_in + columns[None, :]

    x = tl.load(sae_in_ptr + tile_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    b_dec = tl.load(b_dec_ptr + columns, mask=columns < d_in, other=0.0).to(tl.float32)
    residual = tl.where(tile_mask, b_dec[None, :] - x, 0.0)  # zero outside the tile, so tails add nothing
    partial_row = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * n_levels
    for rank in range(n_kept):
        acts = tl.load(top_acts_ptr + tokens * stride_top + rank, mask=token_mask, other=0.0).to(tl.float32)
        latents = tl.load(top_indices_ptr + tokens * stride_top + rank, mask=token_mask, other=0).to(tl.int64)
        rows = tl.load(W_dec_ptr + latents[:, None] * stride_W_dec + columns[None, :], mask=tile_mask, other=0.0)
        residual += acts[:, None] * rows.to(tl.float32)
        slot = tl.load(rank_level_slot_ptr + rank)
        if slot >= 0:
            tl.store(squared_error_ptr + partial_row + slot, tl.sum(tl.sum(residual * residual, axis=1), axis=0))
    tl.store(residual_ptr + tokens[:, None] * d_in + columns[None, :], residual, mask=tile_mask)
    reconstruction = (x + residual).to(reconstruction_ptr.dtype.element_ty)
    tl.store(reconstruction_ptr + tokens[:, None] * d_in + columns[None, :], reconstruction, mask=tile_mask)


@triton.jit
def _hierarchical_mse_backward_kernel(
    top_acts_ptr,  # [N, K]
    top_indices_ptr,  # [N, K]
    W_dec_ptr,  # [d_sae, d_in]
    residual_ptr,  # [N, d_in] float32: r_K from forward
    rank_weight_ptr,  # [K] float32: w_j of rank i + 1 if it is level j, else 0
    grad_scale_ptr,  # [1] float32: 2 g / N
    first_suffix_ptr,  # [N, d_in] float32 out: S_1
    grad_top_acts_ptr,  # [N, K] float32, zero-initialised, accumulated atomically
    grad_W_dec_ptr,  # [d_sae, d_in] float32, zero-initialised, accumulated atomically
    n_tokens,
    d_in,
    n_kept,
    stride_top,
    stride_W_dec,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NEED_GRAD_TOP_ACTS: tl.constexpr,
    NEED_GRAD_W_DEC: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < n_tokens
    tile_mask = token_mask[:, None] & (columns < d_in)[None, :]
    tokens = tokens.to(tl.int64)
    tile_offsets = tokens[:, None] * d_in + columns[None, :]

    residual = tl.load(residual_ptr + tile_offsets, mask=tile_mask, other=0.0)
    grad_scale = tl.load(grad_scale_ptr)
    suffix = tl.zeros([BLOCK_TOKENS, BLOCK_D], dtype=tl.float32)
    for step in range(n_kept):
        rank = n_kept - 1 - step
        suffix += (tl.load(rank_weight_ptr + rank) * grad_scale) * residual
        acts = tl.load(top_acts_ptr + tokens * stride_top + rank, mask=token_mask, other=0.0).to(tl.float32)
        latents = tl.load(top_indices_ptr + tokens * stride_top + rank, mask=token_mask, other=0).to(tl.int64)
        row_offsets = latents[:, None] * stride_W_dec + columns[None, :]
        rows = tl.load(W_dec_ptr + row_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        if NEED_GRAD_TOP_ACTS:
            partial_dot = tl.sum(rows * suffix, axis=1)
            tl.atomic_add(grad_top_acts_ptr + tokens * n_kept + rank, partial_dot, mask=token_mask, sem="relaxed")
        if NEED_GRAD_W_DEC:
            tl.atomic_add(grad_W_dec_ptr + row_offsets, acts[:, None] * suffix, mask=tile_mask, sem="relaxed")
        residual -= acts[:, None] * rows
    tl.store(first_suffix_ptr + tile_offsets, suffix, mask=tile_mask)


# ``TRITON_INTERPRET=1`` at import makes ``@triton.jit`` return interpreted kernels, which run on CPU tensors (tests).
INTERPRETED = not isinstance(_hierarchical_mse_forward_kernel, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=64)
def _rank_tables(
    levels: tuple[int, ...], level_weights: tuple[float, ...], n_kept: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([K] int32 level slot per rank or -1, [K] float32 level weight per rank or 0, [n_levels] float32 weights)``.

    Cached per (levels, weights, K, device): every training step uses the same ones, and building them is a
    host-to-device copy. Built outside inference mode: the weights are saved for backward, which autograd refuses
    for tensors made under ``torch.inference_mode()`` (say by an evaluation that ran first).
    """
    slots = [-1] * n_kept
    weights = [0.0] * n_kept
    for slot, (level, weight) in enumerate(zip(levels, level_weights, strict=True)):
        slots[level - 1] = slot
        weights[level - 1] = weight
    with torch.inference_mode(False):
        return (
            torch.tensor(slots, dtype=torch.int32, device=device),
            torch.tensor(weights, dtype=torch.float32, device=device),
            torch.tensor(level_weights, dtype=torch.float32, device=device),
        )


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Launch on the tensors' GPU, which need not be the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _TritonHierarchicalMSEFunction(torch.autograd.Function):
    """The hierarchical loss on flattened inputs; forward and backward are one kernel launch each.

    Saves only the inputs and the float32 final residual ``[tokens, d_in]``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sae_in: torch.Tensor,
        top_acts: torch.Tensor,
        top_indices: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        levels: tuple[int, ...],
        level_weights: tuple[float, ...],
        block_tokens: int,
        block_d: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_tokens, d_in = sae_in.shape
        n_kept = top_acts.shape[1]
        device = sae_in.device
        output_dtype = torch.promote_types(sae_in.dtype, W_dec.dtype)
        rank_level_slot, rank_weight, weights = _rank_tables(levels, level_weights, n_kept, device)
        grid = (triton.cdiv(n_tokens, block_tokens), triton.cdiv(d_in, block_d))
        residual = torch.empty(n_tokens, d_in, dtype=torch.float32, device=device)
        reconstruction = torch.empty(n_tokens, d_in, dtype=output_dtype, device=device)
        squared_errors = torch.zeros(grid[0] * grid[1], len(levels), dtype=torch.float32, device=device)
        if n_tokens and d_in:
            with _on_device(device):
                _hierarchical_mse_forward_kernel[grid](
                    sae_in,
                    top_acts,
                    top_indices,
                    W_dec,
                    b_dec,
                    rank_level_slot,
                    residual,
                    reconstruction,
                    squared_errors,
                    n_tokens,
                    d_in,
                    n_kept,
                    len(levels),
                    sae_in.stride(0),
                    top_acts.stride(0),
                    W_dec.stride(0),
                    BLOCK_TOKENS=block_tokens,
                    BLOCK_D=block_d,
                    num_warps=_NUM_WARPS,
                )
        level_mse = squared_errors.sum(dim=0) / n_tokens
        loss = (level_mse * weights).sum()
        ctx.save_for_backward(top_acts, top_indices, W_dec, residual, rank_weight)
        ctx.blocks = (block_tokens, block_d)
        ctx.input_dtypes = (sae_in.dtype, b_dec.dtype)
        ctx.mark_non_differentiable(level_mse, reconstruction)
        return loss.to(output_dtype), level_mse.to(output_dtype), reconstruction

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor, _grad_level_mse: torch.Tensor, _grad_reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        top_acts, top_indices, W_dec, residual, rank_weight = ctx.saved_tensors
        n_tokens, d_in = residual.shape
        n_kept = top_acts.shape[1]
        block_tokens, block_d = ctx.blocks
        _, need_top_acts, _, need_W_dec, _ = ctx.needs_input_grad[:5]
        device = residual.device
        grad_scale = (grad_loss.detach().to(torch.float32) * (2.0 / max(n_tokens, 1))).reshape(1)
        first_suffix = torch.empty(n_tokens, d_in, dtype=torch.float32, device=device)
        grad_top_acts = torch.zeros(n_tokens, n_kept, dtype=torch.float32, device=device) if need_top_acts else None
        grad_W_dec = torch.zeros(W_dec.shape, dtype=torch.float32, device=device) if need_W_dec else None
        grid = (triton.cdiv(n_tokens, block_tokens), triton.cdiv(d_in, block_d))
        if n_tokens and d_in:
            with _on_device(device):
                _hierarchical_mse_backward_kernel[grid](
                    top_acts,
                    top_indices,
                    W_dec,
                    residual,
                    rank_weight,
                    grad_scale,
                    first_suffix,
                    first_suffix if grad_top_acts is None else grad_top_acts,  # unused when not needed
                    first_suffix if grad_W_dec is None else grad_W_dec,
                    n_tokens,
                    d_in,
                    n_kept,
                    top_acts.stride(0),
                    W_dec.stride(0),
                    BLOCK_TOKENS=block_tokens,
                    BLOCK_D=block_d,
                    NEED_GRAD_TOP_ACTS=grad_top_acts is not None,
                    NEED_GRAD_W_DEC=grad_W_dec is not None,
                    num_warps=_NUM_WARPS,
                )
        return input_gradients(ctx, first_suffix, grad_top_acts, grad_W_dec, top_acts, W_dec)


def default_blocks(d_in: int) -> tuple[int, int]:
    """``(block_tokens, block_d)``: the tile one program walks over all K ranks (Triton needs powers of two)."""
    return _BLOCK_TOKENS, min(_MAX_BLOCK_D, triton.next_power_of_2(d_in))


def hierarchical_mse_triton(
    sae_in: torch.Tensor,
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    levels: list[int],
    level_weights: list[float],
    *,
    block_tokens: int | None = None,
    block_d: int | None = None,
) -> HierarchicalMSE:
    """Triton implementation: same arguments and result as :func:`~sae_lens_hierarchical.losses.hierarchical_mse_fused`.

    Memory ``O(tokens * d_in)`` whatever K is, like the torch fused path, with one kernel launch per pass. Needs CUDA
    tensors (or ``TRITON_INTERPRET=1`` set before this module is imported, which runs the kernels on CPU tensors).
    Inputs are float32, bfloat16 or float16, accumulated in float32; gradients come back in each input's dtype.
    Float atomics make ``grad_top_acts`` and ``grad_W_dec`` bitwise non-deterministic (not the loss).

    Args:
        sae_in, top_acts, top_indices, W_dec, b_dec, levels, level_weights: as in
            :func:`~sae_lens_hierarchical.losses.hierarchical_mse_reference`; ``sae_in`` may be ``[..., d_in]``.
        block_tokens, block_d: the tile of one program, powers of two; ``None``: :func:`default_blocks`.
    """
    d_in = sae_in.shape[-1]
    n_kept = top_acts.shape[-1]
    check_levels(levels, level_weights, n_kept)
    if not sae_in.is_cuda and not INTERPRETED:
        raise ValueError(
            f"the Triton loss runs on CUDA tensors (or with TRITON_INTERPRET=1 set before import); got {sae_in.device}"
        )
    dtypes = {sae_in.dtype, top_acts.dtype, W_dec.dtype, b_dec.dtype}
    if not dtypes <= set(TRITON_DTYPES):
        raise ValueError(
            f"the Triton loss takes float32, bfloat16 or float16 inputs and accumulates in float32; got "
            f"{sorted(str(dtype) for dtype in dtypes)} (use loss_implementation='fused' for float64)"
        )
    default_tokens, default_d = default_blocks(d_in)
    block_tokens = default_tokens if block_tokens is None else block_tokens
    block_d = default_d if block_d is None else block_d
    for name, block in (("block_tokens", block_tokens), ("block_d", block_d)):
        if block < 1 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two; got {block}")
    loss, level_mse, reconstruction = _TritonHierarchicalMSEFunction.apply(
        sae_in.reshape(-1, d_in).contiguous(),
        top_acts.reshape(-1, n_kept).contiguous(),
        top_indices.reshape(-1, n_kept).contiguous(),
        W_dec.contiguous(),
        b_dec.contiguous(),
        tuple(levels),
        tuple(float(weight) for weight in level_weights),
        block_tokens,
        block_d,
    )
    return HierarchicalMSE(loss, level_mse, reconstruction.reshape(sae_in.shape))
