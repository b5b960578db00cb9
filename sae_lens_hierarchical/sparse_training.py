"""The training step's sparse pieces, so that a step does one dense ``[tokens, d_sae]`` matmul (the encoder's forward)
and nothing else that size with gradients.

- :class:`PreActivationsAt` takes the pre-activations the losses use (the K selected entries of each token, and the
  dead latents' columns for AuxK) out of an encoder output computed without autograd, with a backward that touches only
  those entries: ``grad_W_enc`` from the K selected latents per token (a scatter of outer products), ``grad_b_enc`` and
  ``grad_b_dec`` from one column sum. SAELens's dense backward instead multiplies a ``[tokens, d_sae]`` gradient, almost
  all zeros, by the batch twice.
- :func:`auxk_loss_on_dead_columns` is SAELens's TopK AuxK loss computed on the dead latents' columns only: with
  ``n_dead`` dead latents its matmuls are ``[tokens, n_dead]`` instead of ``[tokens, d_sae]``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sae_lens_hierarchical.accelerators import triton_available


def scatter_outer_products(
    indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int, allow_triton: bool = True
) -> torch.Tensor:
    """``out[j] = sum of weights[t, i] * rows[t] over (t, i) with indices[t, i] == j``, ``[n_out, d]`` in float32+.

    The transpose of a sparse ``[N, n_out]`` matrix (m entries a row) times ``rows`` ``[N, d]``, without building the
    dense matrix: ``N * m * d`` multiply-adds instead of ``N * n_out * d``. On CUDA with triton installed it runs
    :func:`sae_lens_hierarchical.triton_sparse.scatter_outer_products_triton` (atomic adds); elsewhere a CSR matrix
    (entries sorted by output row) times ``rows``, which on CPU was 5x faster than ``index_add`` of the ``[N * m, d]``
    outer products and never holds them. ``allow_triton=False``, or ``torch.use_deterministic_algorithms(True)`` (the
    atomic adds' order varies), keeps CUDA tensors on the CSR product.
    """
    dtype = torch.promote_types(torch.promote_types(weights.dtype, rows.dtype), torch.float32)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if allow_triton and rows.is_cuda and dtype == torch.float32 and not deterministic and triton_available():
        from sae_lens_hierarchical.triton_sparse import scatter_outer_products_triton

        return scatter_outer_products_triton(indices.contiguous(), weights, rows.contiguous(), n_out)
    n_tokens, n_kept = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_out)
    row_starts = torch.zeros(n_out + 1, dtype=torch.long, device=indices.device)
    torch.cumsum(counts, 0, out=row_starts[1:])
    tokens = torch.div(order, n_kept, rounding_mode="floor")
    with warnings.catch_warnings():  # torch's one-time "CSR support is in beta" notice is not the user's concern
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        sparse = torch.sparse_csr_tensor(
            row_starts, tokens, weights.reshape(-1)[order].to(dtype), size=(n_out, n_tokens), check_invariants=False
        )
    return sparse @ rows.to(dtype)


class PreActivationsAt(torch.autograd.Function):
    """Entries of ``hidden_pre = centered @ W_enc + b_enc``, read from that product already computed without autograd,
    with a backward over those entries only.

    ``forward(centered, W_enc, b_enc, b_dec, hidden_pre, token_indices, columns, allow_triton)`` returns
    ``(hidden_pre.gather(-1, token_indices) [N, m], hidden_pre[:, columns] [N, n_cols])``, the same values bit for
    bit. ``centered`` is the encoder's input ``x - b_dec`` without autograd history; ``b_dec`` (or None when
    ``apply_b_dec_to_input`` is off) receives the gradient that history would have given it,
    ``-W_enc @ grad_b_enc``: the per-token input gradient, the one that would need a second ``[N, d_sae]``-sized
    product, is never needed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        centered: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor | None,
        hidden_pre: torch.Tensor,
        token_indices: torch.Tensor,
        columns: torch.Tensor,
        allow_triton: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(centered, W_enc, token_indices, columns)
        ctx.allow_triton = allow_triton
        return hidden_pre.gather(-1, token_indices), hidden_pre.index_select(-1, columns)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_at_indices: torch.Tensor, grad_at_columns: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        centered, W_enc, token_indices, columns = ctx.saved_tensors
        # Under autocast the products would run in half precision (and CPU sparse products refuse bfloat16); the
        # gradients of float32 weights are accumulated in float32.
        with torch.autocast(device_type=W_enc.device.type, enabled=False):
            return _pre_activation_gradients(
                ctx, centered, W_enc, token_indices, columns, grad_at_indices, grad_at_columns
            )


def _pre_activation_gradients(
    ctx: Any,
    centered: torch.Tensor,
    W_enc: torch.Tensor,
    token_indices: torch.Tensor,
    columns: torch.Tensor,
    grad_at_indices: torch.Tensor,
    grad_at_columns: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """:meth:`PreActivationsAt.backward`'s outputs, in the weights' dtypes; any leading shape is flattened to tokens."""
    d_in, d_sae = W_enc.shape
    dtype = torch.promote_types(W_enc.dtype, torch.float32)
    centered, token_indices = centered.reshape(-1, d_in), token_indices.reshape(-1, token_indices.shape[-1])
    grad_at_indices = grad_at_indices.to(dtype).reshape(token_indices.shape)
    grad_at_columns = grad_at_columns.to(dtype).reshape(len(token_indices), len(columns))
    column_sums = torch.zeros(d_sae, dtype=dtype, device=W_enc.device)
    column_sums.index_add_(0, token_indices.reshape(-1), grad_at_indices.reshape(-1))
    grad_W_enc = None
    if ctx.needs_input_grad[1]:
        grad_W_enc_t = scatter_outer_products(token_indices, grad_at_indices, centered, d_sae, ctx.allow_triton)
        if len(columns):
            grad_W_enc_t.index_add_(0, columns, grad_at_columns.T @ centered.to(dtype))
        grad_W_enc = grad_W_enc_t.T.to(W_enc.dtype)
    if len(columns):
        column_sums.index_add_(0, columns, grad_at_columns.sum(0))
    grad_b_dec = -(W_enc.to(dtype) @ column_sums) if ctx.needs_input_grad[3] else None
    return (
        None,
        grad_W_enc,
        column_sums.to(W_enc.dtype) if ctx.needs_input_grad[2] else None,
        grad_b_dec.to(W_enc.dtype) if grad_b_dec is not None else None,
        None,
        None,
        None,
        None,
    )


def auxk_loss_on_dead_columns(
    pre_at_dead: torch.Tensor,
    dead_columns: torch.Tensor,
    W_dec: torch.Tensor,
    residual: torch.Tensor,
    decoder_norms: torch.Tensor | None,
) -> tuple[torch.Tensor, float]:
    """SAELens's TopK AuxK loss, unscaled, from the dead latents' pre-activations ``[N, n_dead]``; and its scale.

    As ``TopKTrainingSAE.calculate_topk_aux_loss``: the ``k_aux = min(d_in // 2, n_dead)`` largest dead
    pre-activations of each token (no ReLU), decoded without ``b_dec`` (over the decoder norms when rescaling), against
    the detached residual ``x - x_hat_K``; the scale is ``min(n_dead / (d_in // 2), 1)``. Returns
    ``(mean_tokens ||recons - residual||^2, scale)``; the caller multiplies by the coefficient and the scale.
    """
    n_dead = len(dead_columns)
    half_width = residual.shape[-1] // 2
    k_aux = min(half_width, n_dead)
    positions = pre_at_dead.detach().topk(k_aux, dim=-1, sorted=False).indices
    acts = torch.zeros_like(pre_at_dead).scatter(-1, positions, pre_at_dead.gather(-1, positions))
    if decoder_norms is not None:
        acts = acts * (1 / decoder_norms[dead_columns])
    recons = acts @ W_dec.index_select(0, dead_columns)
    return (recons - residual).pow(2).sum(dim=-1).mean(), min(n_dead / half_width, 1.0)


def sparse_activations(top_acts: torch.Tensor, top_indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense ``[..., d_sae]`` activations with ``top_acts`` at ``top_indices``, as a coalesced sparse COO tensor.

    ``N * K`` entries instead of ``N * d_sae``; each token's latents are sorted so that the entries are in coalesced
    order already (SAELens's firing statistics sum them without sorting again).
    """
    leading = top_indices.shape[:-1]
    columns, order = top_indices.sort(dim=-1)
    values = top_acts.gather(-1, order).reshape(-1)
    tokens = torch.arange(columns[..., 0].numel(), device=columns.device).repeat_interleave(columns.shape[-1])
    positions = torch.unravel_index(tokens, leading) if len(leading) else ()
    indices = torch.stack([*positions, columns.reshape(-1)])
    return torch.sparse_coo_tensor(indices, values, (*leading, d_sae), is_coalesced=True, check_invariants=False)


def encoder_product(centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """``centered @ W_enc + b_enc``, with the bias riding on the product (``addmm``) instead of a second pass over
    ``[tokens, d_sae]``; under autocast as SAELens computes it, since ``addmm`` would round the bias to half too."""
    if torch.is_autocast_enabled(centered.device.type):
        return centered @ W_enc + b_enc
    flat = torch.addmm(b_enc, centered.reshape(-1, centered.shape[-1]), W_enc)
    return flat.reshape(*centered.shape[:-1], -1)


def dead_latent_indices(dead_neuron_mask: torch.Tensor | None, d_sae: int, device: torch.device) -> torch.Tensor:
    """Indices of the dead latents (empty when there is no mask); one host sync, as SAELens's own count."""
    if dead_neuron_mask is None:
        return torch.empty(0, dtype=torch.long, device=device)
    if dead_neuron_mask.dtype != torch.bool or tuple(dead_neuron_mask.shape) != (d_sae,):
        raise ValueError(
            f"dead_neuron_mask must be a bool tensor of shape ({d_sae},) (one flag per latent); got "
            f"{dead_neuron_mask.dtype} of shape {tuple(dead_neuron_mask.shape)}"
        )
    return dead_neuron_mask.nonzero().reshape(-1).to(device)
