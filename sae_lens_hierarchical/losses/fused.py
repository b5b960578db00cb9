"""The memory-flat hierarchical loss: a custom autograd function walking tiles of tokens x ranks in torch."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from sae_lens_hierarchical.losses._common import (
    CACHE_SIZE,
    HierarchicalMSE,
    accumulation_dtype,
    check_levels,
    input_gradients,
    weight_vector,
)

# --- memory-flat fused implementation ---------------------------------------------------------------

# Default tiling: one tile is ``token_block`` tokens x ``chunk_size`` ranks, and its ``[token_block, chunk_size, d_in]``
# temporaries hold about this many elements. On CPU, tiles of about a megabyte stay in cache and are recycled by the
# allocator: at d_in 640, K 64-128, 1.3 MB tiles ran the loss 15-20% faster on one thread than 4 MB ones, and as fast
# on two (tiles of tens of MB are page-faulted in afresh every time and ran ~2x slower); much smaller tiles mean
# thousands of small kernels per step, each a thread-pool barrier, which stalls badly when the cores are shared. On GPU,
# fewer and larger tiles keep kernel launches few while staying far below the step's ``[tokens, d_sae]`` tensors.
_TILE_ELEMENTS = {"cpu": 5 << 16, "cuda": 1 << 26}
_DEFAULT_TILE_ELEMENTS = 1 << 22
_MAX_CHUNK_RANKS = 8


def default_tiling(n_tokens: int, d_in: int, n_kept: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """``(chunk_size, token_block)``: ranks and tokens walked at once by :func:`hierarchical_mse_fused`."""
    chunk_size = max(1, min(n_kept, _MAX_CHUNK_RANKS))
    budget = _TILE_ELEMENTS.get(torch.device(device).type, _DEFAULT_TILE_ELEMENTS)
    token_block = max(1, min(n_tokens, budget // (chunk_size * d_in)))
    return chunk_size, token_block


class _Chunk(NamedTuple):
    """Ranks ``start..stop-1`` (0-based columns of top_acts) and the q levels whose prefix ends inside them.

    With ``beta_m = sum of the weights of the chunk's levels at or after chunk rank m`` (``[c]``), the suffix sum
    at chunk rank m is ``S_m = S_after + beta_m r_start + sum_m' beta_max(m, m') a_m' W_dec[idx_m']``, where
    ``S_after`` covers the later chunks and ``r_start`` is the residual before the chunk; ``mixing`` holds
    ``beta_max(m, m')``. Both still lack the ``2 / N`` and incoming-gradient factor.
    """

    start: int
    stop: int
    level_slots: torch.Tensor  # [q] positions in ``levels`` of those levels
    included: torch.Tensor  # [q, c] 1.0 where chunk rank m is part of the level's prefix (m <= level end)
    ends_at_stop: bool  # the chunk's last rank is a level, so its residual is the chunk's last level residual
    beta: torch.Tensor  # [c]
    mixing: torch.Tensor  # [c, c]


@functools.lru_cache(maxsize=CACHE_SIZE)
def _plan_chunks(
    levels: tuple[int, ...],
    level_weights: tuple[float, ...],
    n_kept: int,
    chunk_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[_Chunk, ...]:
    """The chunks of ranks ``0..K-1`` and their tables, on ``device`` in ``dtype``; cached (see above)."""
    chunks = []
    with torch.inference_mode(False):
        for start in range(0, n_kept, chunk_size):
            stop = min(start + chunk_size, n_kept)
            slots = [slot for slot, level in enumerate(levels) if start < level <= stop]
            ends = torch.tensor([levels[slot] - 1 - start for slot in slots], device=device, dtype=torch.long)
            ranks = torch.arange(stop - start, device=device)
            included = (ranks <= ends.unsqueeze(1)).to(dtype)
            weights = torch.tensor([level_weights[slot] for slot in slots], dtype=dtype, device=device)
            beta = weights @ included
            later_rank = torch.maximum(ranks.unsqueeze(1), ranks.unsqueeze(0))
            chunks.append(
                _Chunk(
                    start=start,
                    stop=stop,
                    level_slots=torch.tensor(slots, dtype=torch.long, device=device),
                    included=included,
                    ends_at_stop=bool(slots) and levels[slots[-1]] == stop,
                    beta=beta,
                    mixing=beta[later_rank],
                )
            )
    return tuple(chunks)


def _gather_tile(
    top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor, chunk: _Chunk, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([n, c] coefficients, [n, c] latent indices, [n, c, d_in] decoder rows)`` of one chunk for n tokens."""
    indices = top_indices[:, chunk.start : chunk.stop]
    # index_select copies whole rows; on CPU it is several times faster than advanced indexing W_dec[indices].
    rows = W_dec.index_select(0, indices.reshape(-1)).view(*indices.shape, W_dec.shape[1])
    return top_acts[:, chunk.start : chunk.stop].to(dtype), indices, rows.to(dtype)


def _chunk_sum(acts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[n, d_in]``: what the chunk's ranks add to the reconstruction."""
    return torch.bmm(acts.unsqueeze(1), rows).squeeze(1)


class _FusedHierarchicalMSEFunction(torch.autograd.Function):
    """The hierarchical loss on flattened inputs, never holding a ``[tokens, K, d_in]`` tensor.

    Tokens are independent, so both passes walk blocks of n tokens; inside a block, forward walks the ranks in
    chunks of c, carrying the running residual ``r = x_hat - x`` ``[n, d_in]``. Only the inputs and the final
    residual ``[tokens, d_in]`` are saved. Backward walks the chunks from the last rank to the first, recovering each
    chunk's starting residual by subtracting the chunk's contribution (one subtraction per chunk, so rounding grows
    with K / c, not K), and carries the suffix sum ``S_i = sum_{j in levels, j >= i} w_j 2 r_j / N``, from which
    ``dL/da_i = <W_dec[idx_i], S_i>``, ``dL/dW_dec[idx_i] += a_i S_i``, ``dL/db_dec = sum_tokens S_1`` and
    ``dL/dx = -S_1``. Every per-chunk step is a handful of whole-tile kernels (gather, batched matmul, dot products,
    index_add), not a loop over ranks.
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
        chunk_size: int,
        token_block: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = accumulation_dtype(sae_in, top_acts, W_dec, b_dec)
        output_dtype = torch.promote_types(sae_in.dtype, W_dec.dtype)
        n_tokens, d_in = sae_in.shape
        chunks = _plan_chunks(levels, level_weights, top_acts.shape[1], chunk_size, sae_in.device, dtype)
        # Autocast would run the batched products in half precision; the loss accumulates over K ranks in `dtype`.
        with torch.autocast(device_type=sae_in.device.type, enabled=False):
            final_residual = torch.empty(n_tokens, d_in, dtype=dtype, device=sae_in.device)
            squared_errors = torch.zeros(len(levels), dtype=dtype, device=sae_in.device)
            for first in range(0, n_tokens, token_block):
                tokens = slice(first, first + token_block)
                residual = b_dec.to(dtype) - sae_in[tokens].to(dtype)  # [n, d_in], r_0 = b_dec - x
                for chunk in chunks:
                    acts, _, rows = _gather_tile(top_acts[tokens], top_indices[tokens], W_dec, chunk, dtype)
                    if not len(chunk.level_slots):
                        residual = residual + _chunk_sum(acts, rows)
                        continue
                    # [n, q, d_in] residuals at the chunk's levels: r_start + (its prefix of the chunk's ranks).
                    start = residual.unsqueeze(1).expand(-1, len(chunk.level_slots), -1)
                    level_residuals = torch.baddbmm(start, acts.unsqueeze(1) * chunk.included, rows)
                    per_level = torch.linalg.vector_norm(level_residuals, dim=-1).square().sum(dim=0)  # [q]
                    squared_errors.index_add_(0, chunk.level_slots, per_level)
                    last = level_residuals[:, -1] if chunk.ends_at_stop else None
                    residual = residual + _chunk_sum(acts, rows) if last is None else last
                final_residual[tokens] = residual
            level_mse = squared_errors / n_tokens
            loss = (level_mse * weight_vector(level_weights, level_mse.device, dtype)).sum()
            reconstruction = (sae_in.to(dtype) + final_residual).to(output_dtype)
        ctx.save_for_backward(top_acts, top_indices, W_dec, final_residual)
        ctx.chunks = chunks
        ctx.token_block = token_block
        ctx.input_dtypes = (sae_in.dtype, b_dec.dtype)
        ctx.mark_non_differentiable(level_mse, reconstruction)
        return loss.to(output_dtype), level_mse.to(output_dtype), reconstruction

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor, _grad_level_mse: torch.Tensor, _grad_reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        top_acts, top_indices, W_dec, final_residual = ctx.saved_tensors
        chunks: tuple[_Chunk, ...] = ctx.chunks
        dtype = final_residual.dtype
        n_tokens, d_in = final_residual.shape
        _, need_acts, _, need_W_dec, _ = ctx.needs_input_grad[:5]
        # d(level MSE)/d(r_j) = 2 r_j / N, times the incoming gradient; the level weights are in beta and mixing.
        # Out of place: beta and mixing are the cached tables of every later call.
        scale = grad_loss.to(dtype) * 2.0 / n_tokens
        betas = [chunk.beta * scale for chunk in chunks]
        mixings = [chunk.mixing * scale for chunk in chunks]
        grad_acts = torch.zeros(top_acts.shape, dtype=dtype, device=W_dec.device) if need_acts else None
        grad_W_dec = torch.zeros(W_dec.shape, dtype=dtype, device=W_dec.device) if need_W_dec else None
        first_suffix = torch.empty(n_tokens, d_in, dtype=dtype, device=W_dec.device)  # S_1 per token
        for first in range(0, n_tokens, ctx.token_block):
            tokens = slice(first, first + ctx.token_block)
            residual = final_residual[tokens]
            suffix = torch.zeros_like(residual)  # S after the current chunk: levels past it only
            for index in reversed(range(len(chunks))):
                chunk = chunks[index]
                acts, indices, rows = _gather_tile(top_acts[tokens], top_indices[tokens], W_dec, chunk, dtype)
                residual = residual - _chunk_sum(acts, rows)  # residual before the chunk's first rank
                if len(chunk.level_slots):
                    # [n, c, d_in]: S_m = S_after + beta_m r_start + sum_m' beta_max(m, m') a_m' W_dec[idx_m']
                    suffixes = torch.addcmul(suffix.unsqueeze(1), betas[index].unsqueeze(1), residual.unsqueeze(1))
                    suffixes.baddbmm_(mixings[index] * acts.unsqueeze(1), rows)
                else:
                    suffixes = suffix.unsqueeze(1).expand_as(rows)
                if grad_acts is not None:
                    grad_acts[tokens, chunk.start : chunk.stop] = torch.linalg.vecdot(rows, suffixes)
                suffix = suffixes[:, 0].clone()
                if grad_W_dec is not None:
                    # a_m S_m per (token, rank); in place, except where suffixes is a broadcast view of S_after.
                    if len(chunk.level_slots):
                        weighted = suffixes.mul_(acts.unsqueeze(-1))
                    else:
                        weighted = suffixes * acts.unsqueeze(-1)
                    grad_W_dec.index_add_(0, indices.reshape(-1), weighted.reshape(-1, d_in))
            first_suffix[tokens] = suffix
        return input_gradients(ctx, first_suffix, grad_acts, grad_W_dec, top_acts, W_dec)


def hierarchical_mse_fused(
    sae_in: torch.Tensor,
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    levels: list[int],
    level_weights: list[float],
    *,
    chunk_size: int | None = None,
    token_block: int | None = None,
) -> HierarchicalMSE:
    """Memory-flat implementation: same arguments and result as :func:`hierarchical_mse_reference`.

    A custom autograd function walks tiles of ``token_block`` tokens x ``chunk_size`` ranks, so forward and backward
    hold ``O(tokens * d_in + tokens * K)`` plus one tile's ``[token_block, chunk_size, d_in]`` temporaries, whatever
    K is. Half-precision inputs are accumulated in float32; gradients come back in each input's dtype.

    Args:
        sae_in, top_acts, top_indices, W_dec, b_dec, levels, level_weights: as in
            :func:`hierarchical_mse_reference`; ``sae_in`` may have any leading shape ``[..., d_in]``.
        chunk_size: ranks walked at once (>= 1; above K means one chunk). ``None``: :func:`default_tiling`.
        token_block: tokens walked at once (>= 1). ``None``: :func:`default_tiling`.
    """
    d_in = sae_in.shape[-1]
    n_kept = top_acts.shape[-1]
    check_levels(levels, level_weights, n_kept)
    target = sae_in.reshape(-1, d_in)
    default_chunk, default_block = default_tiling(target.shape[0], d_in, n_kept, sae_in.device)
    chunk_size = default_chunk if chunk_size is None else chunk_size
    token_block = default_block if token_block is None else token_block
    if chunk_size < 1 or token_block < 1:
        raise ValueError(f"chunk_size and token_block must be >= 1 (or None); got {chunk_size}, {token_block}")
    loss, level_mse, reconstruction = _FusedHierarchicalMSEFunction.apply(
        target,
        top_acts.reshape(-1, n_kept),
        top_indices.reshape(-1, n_kept),
        W_dec,
        b_dec,
        tuple(levels),
        tuple(float(weight) for weight in level_weights),
        min(chunk_size, n_kept),
        token_block,
    )
    return HierarchicalMSE(loss, level_mse, reconstruction.reshape(sae_in.shape))
