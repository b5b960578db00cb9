"""A Triton kernel for the transpose of a sparse-times-dense product, without the dense ``[N, n_out]`` matrix.

``scatter_outer_products(indices, weights, rows, n_out)[j] = sum of weights[t, i] * rows[t] over indices[t, i] == j``.
In a TopK SAE's sparse backward it is the encoder weights' gradient from the gradients at each token's K selected
latents (``indices`` the latents, ``weights`` their gradients, ``rows`` the SAE inputs), and the decoder's gradient
from the activations and the reconstruction's gradient.

triton is imported on first call (so that importing this module, like the rest of the package, never needs it):
:func:`_load_kernel` imports it, binds ``tl`` and jits the kernel functions below, which are plain functions until
then. With ``TRITON_INTERPRET=1`` set before that first call the kernel runs in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

# Input dtypes of weights and rows; the kernel accumulates in float32 (float64 is refused, not rounded silently).
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# A [32, 128] float32 tile is 32 registers a thread at 4 warps; the kernel keeps about three such tiles live.
_BLOCK_ENTRIES = 32
_MAX_BLOCK_D = 128
_NUM_WARPS = 4

# Bound by _load_kernel on first use: triton.language, and the jitted combine function of the segmented scan.
tl: Any = None
_segment_sum: Any = None


def _segment_sum_combine(sum_a, start_a, sum_b, start_b):
    """Combine of a segmented inclusive sum: a run that starts at ``b`` drops what came before it."""
    return tl.where(start_b != 0, sum_b, sum_a + sum_b), start_a | start_b


def _scatter_outer_products_kernel(
    sorted_indices_ptr,  # [E] int64: the E = N * m indices, sorted
    order_ptr,  # [E] int64: flat position t * m + i of each sorted entry
    weights_ptr,  # [E]: weights, flattened
    rows_ptr,  # [N, d]
    out_ptr,  # [n_out, d] float32, zero-initialised, accumulated atomically
    n_entries,
    n_kept,
    d,
    stride_rows_token,
    stride_rows_d,
    BLOCK_ENTRIES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    positions = tl.arange(0, BLOCK_ENTRIES)
    entries = tl.program_id(0).to(tl.int64) * BLOCK_ENTRIES + positions
    entry_mask = entries < n_entries
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    column_mask = columns < d
    tile_mask = entry_mask[:, None] & column_mask[None, :]

    # A run of equal indices starts where the index differs from the previous entry's (or at the chunk's start) and
    # ends where it differs from the next entry's (or at the chunk's end); masked neighbours read as -1.
    indices = tl.load(sorted_indices_ptr + entries, mask=entry_mask, other=-1)
    previous = tl.load(sorted_indices_ptr + entries - 1, mask=entry_mask & (positions > 0), other=-1)
    following = tl.load(
        sorted_indices_ptr + entries + 1, mask=(entries + 1 < n_entries) & (positions < BLOCK_ENTRIES - 1), other=-1
    )
    order = tl.load(order_ptr + entries, mask=entry_mask, other=0)
    weights = tl.load(weights_ptr + order, mask=entry_mask, other=0.0).to(tl.float32)
    tokens = order // n_kept
    row_offsets = tokens[:, None] * stride_rows_token + columns[None, :] * stride_rows_d
    rows = tl.load(rows_ptr + row_offsets, mask=tile_mask, other=0.0).to(tl.float32)

    starts = tl.broadcast_to((indices != previous).to(tl.int32)[:, None], (BLOCK_ENTRIES, BLOCK_D))
    run_sums, _ = tl.associative_scan((weights[:, None] * rows, starts), 0, _segment_sum)
    run_ends = entry_mask & (indices != following)
    out_offsets = indices[:, None] * d + columns[None, :]
    tl.atomic_add(out_ptr + out_offsets, run_sums, mask=run_ends[:, None] & column_mask[None, :], sem="relaxed")


@functools.cache
def _load_kernel() -> tuple[Any, bool]:
    """``(jitted kernel, whether it runs in Triton's interpreter)``; imports triton, once."""
    global tl, _segment_sum
    try:
        import triton
        import triton.language
    except ImportError as error:
        raise ImportError(
            "scatter_outer_products_triton needs triton: pip install 'sae-lens-hierarchical[gpu]'"
        ) from error
    tl = triton.language
    _segment_sum = triton.jit(_segment_sum_combine)
    kernel = triton.jit(_scatter_outer_products_kernel)
    # ``TRITON_INTERPRET=1`` when jitting makes ``triton.jit`` return interpreted kernels, which take CPU tensors.
    return kernel, not isinstance(kernel, triton.runtime.JITFunction)


def triton_interpreted() -> bool:
    """Whether :func:`scatter_outer_products_triton` runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
    when it was first used) rather than compiled for CUDA. Raises ImportError without triton."""
    return _load_kernel()[1]


def _check_inputs(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int) -> None:
    """Shapes, dtypes and ``n_out``: one ValueError each, naming the value and what is allowed."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D [N, m]; got shape {tuple(indices.shape)}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights must have the shape of indices {tuple(indices.shape)}; got {tuple(weights.shape)}")
    if rows.dim() != 2 or rows.shape[0] != indices.shape[0]:
        raise ValueError(
            f"rows must be 2-D [N, d] with N = {indices.shape[0]} (indices' first dimension); "
            f"got shape {tuple(rows.shape)}"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64; got {indices.dtype}")
    for name, tensor in (("weights", weights), ("rows", rows)):
        if tensor.dtype not in INPUT_DTYPES:
            raise ValueError(
                f"{name} must be float32, bfloat16 or float16 (accumulated in float32); got {tensor.dtype}"
            )
    if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 0:
        raise ValueError(f"n_out must be an int >= 0 (the number of output rows); got {n_out!r}")


def _check_block(name: str, block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= 1; got {block!r}")


def scatter_outer_products_triton(
    indices: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    n_out: int,
    *,
    block_entries: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """``out [n_out, d]`` float32 with ``out[j] = sum of weights[t, i] * rows[t] over (t, i) with indices[t, i] == j``.

    That is ``A.T @ rows`` for the sparse ``A [N, n_out]`` holding ``weights[t, i]`` at ``(t, indices[t, i])``
    (repeated indices add up), in ``O(N m d)`` work and no ``[N, n_out]`` memory. Rows no index names are zero.

    Why sort first: adding each ``weights[t, i] * rows[t]`` straight into ``out`` would be ``N m d`` float atomic
    adds, and the latents that many tokens select (in every training batch of a TopK SAE) would serialise them on
    the same addresses. Here the ``N m`` indices are sorted once (``torch.sort``, cheap next to the ``N m d``
    products); each program takes a fixed chunk of the sorted entries and a block of columns, gathers its entries'
    rows, sums each run of equal indices in registers (a segmented scan) and makes one atomic add per run and
    column, so no address gets two adds from one program and only runs that cross a chunk boundary share one. Fixed
    chunks keep the load even however skewed the index counts are (a latent selected by every token is spread over
    many programs). The price is reading a token's row once per entry rather than once.

    Args:
        indices: ``[N, m]`` int64, each in ``0..n_out-1``.
        weights: ``[N, m]`` float32, bfloat16 or float16.
        rows: ``[N, d]`` float32, bfloat16 or float16 (any strides).
        n_out: rows of the output.
        block_entries, block_d: sorted entries and columns of one program, powers of two (tests use small ones);
            ``None``: 32 and ``min(128, next power of two >= d)``.

    All tensors are on one CUDA device (CPU under ``TRITON_INTERPRET=1``, see :func:`triton_interpreted`).
    Accumulates in float32; float atomics make the result bitwise non-deterministic where a run spans chunks.
    Checking that the indices lie in ``0..n_out-1`` reads the smallest and largest back: one device sync a call.
    """
    _check_inputs(indices, weights, rows, n_out)
    n_tokens, n_kept = indices.shape
    d = rows.shape[1]
    block_entries = _BLOCK_ENTRIES if block_entries is None else block_entries
    block_d = min(_MAX_BLOCK_D, 1 << max(d - 1, 0).bit_length()) if block_d is None else block_d
    _check_block("block_entries", block_entries)
    _check_block("block_d", block_d)
    kernel, interpreted = _load_kernel()
    devices = {indices.device, weights.device, rows.device}
    if len(devices) > 1:
        raise ValueError(f"indices, weights and rows must be on one device; got {sorted(map(str, devices))}")
    device = rows.device
    allowed = ("cpu", "cuda") if interpreted else ("cuda",)
    if device.type not in allowed:
        raise ValueError(
            f"scatter_outer_products_triton takes {' or '.join(allowed)} tensors "
            f"(CPU only with TRITON_INTERPRET=1 set before first use); got {device}"
        )

    out = torch.zeros(n_out, d, dtype=torch.float32, device=device)
    n_entries = n_tokens * n_kept
    if n_entries == 0:
        return out
    sorted_indices, order = torch.sort(indices.reshape(-1), stable=True)
    low, high = sorted_indices[[0, -1]].tolist()
    if low < 0 or high >= n_out:
        raise ValueError(f"indices must lie in 0..n_out-1 = 0..{n_out - 1}; got {low if low < 0 else high}")
    if d == 0:
        return out
    grid = ((n_entries + block_entries - 1) // block_entries, (d + block_d - 1) // block_d)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](
            sorted_indices,
            order,
            weights.reshape(-1),
            rows,
            out,
            n_entries,
            n_kept,
            d,
            rows.stride(0),
            rows.stride(1),
            BLOCK_ENTRIES=block_entries,
            BLOCK_D=block_d,
            num_warps=_NUM_WARPS,
        )
    return out
