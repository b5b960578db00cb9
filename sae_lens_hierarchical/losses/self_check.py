"""A self-check of the Triton kernels, run once per device before ``loss_implementation="auto"`` relies on them.

Why: the kernels are compiled on the user's GPU by the user's triton, a combination the test suite never sees. A
compile error would crash training at its first step, and a miscompiled kernel would train on wrong gradients without
a sign. So the first time "auto" would run the kernels on a device, :func:`triton_self_check` runs them once on a
small random problem against the torch path (:func:`check_triton`): the hierarchical loss (values, and gradients
w.r.t. every input that has one) against the fused torch loss, and the sparse encoder backward's scatter kernel
against its torch product. On a mismatch or an exception it warns once, naming the device and the cause, and the
verdict is kept for the rest of the process: "auto" then uses the fused torch loss on that device. An explicit
``loss_implementation="triton"`` is never checked (the user asked for the kernels).

The check calls the Triton implementations by name, never "auto", and records a provisional failed verdict while it
runs, so nothing it calls can start it again. Not thread-safe (two threads may both run the first check).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sae_lens_hierarchical.losses._common import HierarchicalMSE
from sae_lens_hierarchical.losses.fused import hierarchical_mse_fused
from sae_lens_hierarchical.losses.triton_loader import hierarchical_mse_triton
from sae_lens_hierarchical.sparse_training import scatter_outer_products
from sae_lens_hierarchical.triton_sparse import scatter_outer_products_triton

# The loss's problem: several levels with non-uniform weights; K = 13 is no multiple of the fused path's 8-rank
# chunks, 45 tokens no multiple of the kernels' 32-token blocks, d_in = 160 spans two 128-column blocks (which share
# grad top_acts entries through atomic adds) with a masked tail, and 45 * 13 selections of 96 latents share decoder
# rows (atomic adds into grad W_dec).
N_TOKENS, D_IN, D_SAE, K = 45, 160, 96, 13
LEVELS = [1, 3, 8, 13]
LEVEL_WEIGHTS = [0.4, 0.1, 0.3, 0.2]
GRAD_SCALE = 0.75  # incoming gradient of the loss, not 1, so that the kernels' use of it is checked too
DIFFERENTIABLE = ("sae_in", "top_acts", "W_dec", "b_dec")
# The scatter's problem: each of 6 tokens selects 13 of 20 latents, so the 78 sorted entries fill two 32-entry chunks
# and a tail, and a run of equal latents crosses a chunk boundary; 48 columns leave a masked tail of a 64-column
# block. Small, because in Triton's CPU interpreter (``doctor --interpret``, the tests) each program takes ~1 s.
SCATTER_TOKENS, SCATTER_COLUMNS, SCATTER_OUT = 6, 48, 20

# Tolerance. The kernels run in float32 and are compared with the torch path in float64 on the same (float32-exact)
# inputs, so the reference is exact to ~1e-15; on GPU float64 also keeps the fused loss's batched products off TF32,
# whose ~1e-3 rounding would hide a bug. What is left is the kernels' own float32 rounding over K ranks, d_in columns
# and 45 tokens: about 1e-6 of a tensor's largest magnitude (measured: at most 7e-7 under the interpreter). Errors are
# taken relative to that largest magnitude, not elementwise, because sums such as grad b_dec cancel to entries near
# zero whose relative error means nothing. 1e-4 is two orders of magnitude above float32 rounding, and a wrong kernel
# (a rank, level weight, decoder row, mask or atomic add lost or misplaced) moves some entry by a sizeable share of
# it: 1e-3 or more in tensors this small.
TOLERANCE = 1e-4


class TritonSelfCheckWarning(RuntimeWarning):
    """The Triton kernels failed their self-check on a device; "auto" uses the fused torch loss there instead."""


@dataclass(frozen=True)
class TritonCheck:
    """The verdict of :func:`check_triton` on one device.

    Attributes:
        device: where the kernels ran, e.g. ``"cuda:0"``.
        ok: every compared tensor within ``tolerance`` and nothing raised.
        cause: None when ok; else what failed: the exception text, or each tensor that mismatched and by how much.
        max_errors: compared tensor -> largest absolute difference from the torch path, as a fraction of the torch
            path's largest magnitude (``inf`` for a wrong shape; missing where an exception came first).
        tolerance: the largest such error that passes.
        seconds: wall time of the check, including compiling the kernels on first use.
    """

    device: str
    ok: bool
    cause: str | None = None
    max_errors: dict[str, float] = field(default_factory=dict)
    tolerance: float = TOLERANCE
    seconds: float = 0.0


def as_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` with an index for CUDA (the cache key: ``"cuda"`` and ``"cuda:0"`` agree)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch.device or a device name such as 'cuda:0' or 'cpu'; got {device!r}"
        ) from error
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return resolved


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |got - expected| / max |expected|`` (the plain difference where expected is all zeros); NaN stays NaN."""
    if got.shape != expected.shape:
        return float("inf")
    difference = (got.detach().double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    return difference / scale if scale > 0 else difference


def _problem(device: torch.device) -> dict[str, torch.Tensor]:
    """The float32 problems on ``device``, the same on every call (own generator; the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(0)
    # Distinct latents per token, in descending order of activation, as the SAE selects them.
    top_acts, top_indices = torch.rand(N_TOKENS, D_SAE, generator=generator).topk(K, dim=-1)
    sae_in = torch.randn(N_TOKENS, D_IN, generator=generator)
    problem = {
        "sae_in": sae_in,
        "top_acts": top_acts,
        "top_indices": top_indices,
        "W_dec": torch.randn(D_SAE, D_IN, generator=generator) / D_IN**0.5,
        "b_dec": torch.randn(D_IN, generator=generator) * 0.1,
        "scatter_indices": torch.rand(SCATTER_TOKENS, SCATTER_OUT, generator=generator).topk(K, dim=-1).indices,
        "scatter_weights": torch.randn(SCATTER_TOKENS, K, generator=generator),  # gradients at the selected latents
        "scatter_rows": sae_in[:SCATTER_TOKENS, :SCATTER_COLUMNS].contiguous(),
    }
    return {name: tensor.to(device) for name, tensor in problem.items()}


def _loss_outputs(
    loss_fn: Callable[..., HierarchicalMSE], problem: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Values and input gradients of one loss implementation on ``problem`` cast to ``dtype``."""
    leaves = {name: problem[name].to(dtype).requires_grad_() for name in DIFFERENTIABLE}
    result = loss_fn(
        leaves["sae_in"],
        leaves["top_acts"],
        problem["top_indices"],
        leaves["W_dec"],
        leaves["b_dec"],
        LEVELS,
        LEVEL_WEIGHTS,
    )
    grads = torch.autograd.grad(result.loss, list(leaves.values()), torch.full_like(result.loss, GRAD_SCALE))
    outputs = {"loss": result.loss, "level_mse": result.level_mse, "reconstruction": result.reconstruction}
    return outputs | {f"gradient of {name}": grad for name, grad in zip(DIFFERENTIABLE, grads, strict=True)}


def _compare_loss(problem: dict[str, torch.Tensor]) -> dict[str, float]:
    """The Triton loss (float32) against the fused torch loss (float64): errors of every value and gradient."""
    got = _loss_outputs(hierarchical_mse_triton, problem, torch.float32)
    expected = _loss_outputs(hierarchical_mse_fused, problem, torch.float64)
    return {name: relative_error(got[name], expected[name]) for name in expected}


def _compare_scatter(problem: dict[str, torch.Tensor]) -> dict[str, float]:
    """The sparse encoder backward's Triton scatter (float32) against its torch product (float64)."""
    indices, weights, rows = problem["scatter_indices"], problem["scatter_weights"], problem["scatter_rows"]
    got = scatter_outer_products_triton(indices, weights, rows, SCATTER_OUT)
    expected = scatter_outer_products(indices, weights.double(), rows.double(), SCATTER_OUT, allow_triton=False)
    return {"sparse encoder backward (scatter of outer products)": relative_error(got, expected)}


# (what is compared, how): each part is run even when another failed, so that the cause names every failure.
_PARTS = (("loss kernels", _compare_loss), ("sparse encoder kernel", _compare_scatter))


def _compare_parts(device: torch.device) -> tuple[dict[str, float], list[str]]:
    """``(errors of every compared tensor, what each part that raised said)`` on ``device``."""
    problem = _problem(device)
    errors: dict[str, float] = {}
    causes = []
    for part, compare in _PARTS:
        try:
            errors |= compare(problem)
        except Exception as error:  # a compile error or crash is a failed check, not a crash
            causes.append(f"the Triton {part} raised {type(error).__name__}: {error}")
    return errors, causes


def check_triton(device: torch.device | str) -> TritonCheck:
    """Run both Triton kernels once on ``device`` against the torch path; never raises for a failing kernel.

    Not cached and warns nothing: :func:`triton_self_check` is the cached, warning entry point "auto" uses; the
    ``doctor`` command reports this verdict. Raises ValueError only for a ``device`` that names no device.
    """
    device = as_device(device)
    started = time.perf_counter()
    try:
        # The first "auto" loss may come under inference mode, no_grad or autocast; the check needs none of them.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            errors, causes = _compare_parts(device)
    except Exception as error:  # no such device, a torch without CUDA, ...: the check could not run at all
        errors, causes = {}, [f"the check could not run on {device}: {type(error).__name__}: {error}"]
    causes += [
        f"{name} differs from the torch path by {error:.2e} of its largest magnitude (tolerance {TOLERANCE:.0e})"
        for name, error in errors.items()
        if not error <= TOLERANCE  # also catches NaN
    ]
    return TritonCheck(
        device=str(device),
        ok=not causes,
        cause="; ".join(causes) or None,
        max_errors=errors,
        seconds=time.perf_counter() - started,
    )


# device -> verdict, for the rest of the process.
_VERDICTS: dict[torch.device, TritonCheck] = {}


def known_verdict(device: torch.device | str) -> TritonCheck | None:
    """The verdict of ``device``'s self-check if it ran in this process (or is running), else None; runs nothing."""
    return _VERDICTS.get(as_device(device))


def triton_self_check(device: torch.device | str) -> TritonCheck:
    """The verdict for ``device``: :func:`check_triton`'s, run on the first call per device and then cached.

    A failed first check warns (:class:`TritonSelfCheckWarning`) naming the device and the cause; later calls return
    the cached verdict silently. While the check runs, its device reads as failed ("the self-check is still running"),
    so a call from inside the check gets the torch path instead of starting the check again.
    """
    key = as_device(device)
    if key in _VERDICTS:
        return _VERDICTS[key]
    _VERDICTS[key] = TritonCheck(device=str(key), ok=False, cause="the self-check is still running")
    try:
        verdict = check_triton(key)
    except BaseException:  # interrupted (KeyboardInterrupt): no verdict, so the next call checks again
        del _VERDICTS[key]
        raise
    _VERDICTS[key] = verdict
    if not verdict.ok:
        warnings.warn(
            f"The Triton kernels failed their self-check on {key}: {verdict.cause}. loss_implementation='auto' uses "
            f"the torch paths (fused loss, CSR encoder backward) instead of the Triton kernels on {key} for the rest "
            "of this process (loss_implementation='triton' runs the kernels anyway; 'fused' skips the check).",
            TritonSelfCheckWarning,
            stacklevel=3,
        )
    return verdict


__all__ = [
    "TOLERANCE",
    "TritonCheck",
    "TritonSelfCheckWarning",
    "as_device",
    "check_triton",
    "known_verdict",
    "relative_error",
    "triton_self_check",
]
