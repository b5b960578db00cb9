"""The memory-flat fused hierarchical loss against the reference and the independent float64 per-level loop."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sae_lens_hierarchical import HierarchicalTopKTrainingSAEConfig
from sae_lens_hierarchical.losses import (
    HIERARCHICAL_LOSSES,
    _common,
    fused,
    hierarchical_mse_fused,
    hierarchical_mse_reference,
    uniform_level_weights,
)
from tests.test_architecture import make_training_sae, step_input
from tests.test_losses import naive_per_level_loss, random_problem

DIFFERENTIABLE = ("sae_in", "top_acts", "W_dec", "b_dec")

CASES = [
    # (leading shape, d_in, d_sae, K, levels or None for all, weights or None for uniform)
    ((17,), 8, 40, 1, None, None),
    ((23,), 7, 45, 5, None, None),
    ((19,), 9, 60, 13, None, None),
    ((3, 11), 6, 50, 13, [1, 4, 5, 13], [0.5, 0.0, 2.0, 0.25]),
    ((2, 5, 3), 5, 30, 13, [13], [1.0]),
    ((12,), 10, 200, 64, None, None),
    ((4, 6), 11, 150, 64, [16, 64], [1.0, 0.125]),  # Multi-TopK-style
]
CHUNKINGS = [
    # (chunk_size, token_block); None means the default
    (None, None),
    (1, None),
    (3, 7),
    ("K", 1),
    ("K+5", 5),
]


def resolve(levels: list[int] | None, weights: list[float] | None, k: int) -> tuple[list[int], list[float]]:
    levels = levels or list(range(1, k + 1))
    return levels, weights or uniform_level_weights(levels)


def tiling(chunking: tuple[int | str | None, int | None], k: int) -> dict[str, int | None]:
    chunk_size, token_block = chunking
    chunk_size = {"K": k, "K+5": k + 5}.get(chunk_size, chunk_size)  # type: ignore[arg-type]
    return {"chunk_size": chunk_size, "token_block": token_block}


def gradients(problem: dict[str, torch.Tensor], loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(loss, [grad of sae_in, top_acts, W_dec, b_dec])`` of ``loss_fn(problem)``."""
    problem = {name: t.detach().clone() for name, t in problem.items()}
    leaves = [problem[name].requires_grad_() for name in DIFFERENTIABLE]
    loss = loss_fn(problem)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize(("shape", "d_in", "d_sae", "k", "levels", "weights"), CASES)
def test_fused_matches_naive_loop_and_reference_float64(shape, d_in, d_sae, k, levels, weights, chunking) -> None:
    levels, weights = resolve(levels, weights, k)
    problem = random_problem(shape, d_in, d_sae, k, torch.float64, seed=k)
    fused = hierarchical_mse_fused(**problem, levels=levels, level_weights=weights, **tiling(chunking, k))
    reference = hierarchical_mse_reference(**problem, levels=levels, level_weights=weights)
    expected_loss, expected_levels = naive_per_level_loss(**problem, levels=levels, weights=weights)
    torch.testing.assert_close(fused.loss, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.level_mse, torch.stack(expected_levels), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.reconstruction, reference.reconstruction, rtol=1e-12, atol=1e-12)
    assert fused.reconstruction.shape == problem["sae_in"].shape
    assert not fused.level_mse.requires_grad and not fused.reconstruction.requires_grad


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize(("shape", "d_in", "d_sae", "k", "levels", "weights"), CASES)
def test_fused_float32_matches_reference_and_float64_loop(shape, d_in, d_sae, k, levels, weights, chunking) -> None:
    levels, weights = resolve(levels, weights, k)
    problem64 = random_problem(shape, d_in, d_sae, k, torch.float64, seed=k + 100)
    problem32 = {name: t.float() if t.is_floating_point() else t for name, t in problem64.items()}
    fused = hierarchical_mse_fused(**problem32, levels=levels, level_weights=weights, **tiling(chunking, k))
    reference = hierarchical_mse_reference(**problem32, levels=levels, level_weights=weights)
    expected, expected_levels = naive_per_level_loss(**problem64, levels=levels, weights=weights)
    assert fused.loss.dtype == fused.level_mse.dtype == fused.reconstruction.dtype == torch.float32
    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.level_mse, reference.level_mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.reconstruction, reference.reconstruction, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.level_mse.double(), torch.stack(expected_levels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize(("shape", "d_in", "d_sae", "k", "levels", "weights"), CASES)
def test_fused_gradients_match_autograd_of_loop(shape, d_in, d_sae, k, levels, weights, chunking) -> None:
    levels, weights = resolve(levels, weights, k)
    problem = random_problem(shape, d_in, d_sae, k, torch.float64, seed=k + 7)
    options = tiling(chunking, k)
    _, ours = gradients(
        problem, lambda p: hierarchical_mse_fused(**p, levels=levels, level_weights=weights, **options).loss
    )
    _, loop = gradients(problem, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    for name, got, expected in zip(DIFFERENTIABLE, ours, loop, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize(("levels", "weights", "chunk_size"), [([2, 5], [0.7, 0.3], 2), ([1, 2, 3, 4, 5], None, 3)])
def test_fused_passes_gradcheck(levels, weights, chunk_size) -> None:
    problem = random_problem((6,), 4, 12, 5, torch.float64, seed=3)
    weights = weights or uniform_level_weights(levels)

    def loss(sae_in, top_acts, W_dec, b_dec):
        return hierarchical_mse_fused(
            sae_in,
            top_acts,
            problem["top_indices"],
            W_dec,
            b_dec,
            levels,
            weights,
            chunk_size=chunk_size,
            token_block=4,
        ).loss

    inputs = tuple(problem[name].requires_grad_() for name in DIFFERENTIABLE)
    assert torch.autograd.gradcheck(loss, inputs)


def test_repeated_latents_accumulate_into_decoder_gradient() -> None:
    """Few latents shared by every token, at different ranks, and twice within some tokens."""
    generator = torch.Generator().manual_seed(5)
    problem = random_problem((40,), 6, 3, 3, torch.float64, seed=5)  # d_sae = K = 3: every token uses every latent
    problem["top_indices"] = torch.stack([torch.randperm(3, generator=generator) for _ in range(40)])
    problem["top_indices"][::4, 2] = problem["top_indices"][::4, 0]  # repeated within a token
    levels, weights = [1, 2, 3], [0.5, 0.3, 0.2]
    for chunk_size in (1, 2, 3):
        _, ours = gradients(
            problem,
            lambda p, c=chunk_size: (
                hierarchical_mse_fused(**p, levels=levels, level_weights=weights, chunk_size=c).loss
            ),
        )
        _, loop = gradients(problem, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
        for name, got, expected in zip(DIFFERENTIABLE, ours, loop, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_float32_rounding_stays_small_at_large_k_with_one_rank_chunks() -> None:
    """Backward recovers earlier residuals by subtracting chunk contributions; with chunk_size=1 that is K
    subtractions, the worst case. Gradients must stay within a few times the reference's float32 error."""
    k, levels = 128, list(range(1, 129))
    weights = uniform_level_weights(levels)
    problem64 = random_problem((64,), 32, 512, k, torch.float64, seed=11)
    # A target the top-K latents nearly reconstruct, so the residual shrinks with k and late levels are small.
    problem64["top_acts"] = problem64["top_acts"] / 4
    contributions = problem64["top_acts"].unsqueeze(-1) * problem64["W_dec"][problem64["top_indices"]]
    problem64["sae_in"] = problem64["b_dec"] + contributions.sum(dim=1) + 0.1 * problem64["sae_in"]
    problem32 = {name: t.float() if t.is_floating_point() else t for name, t in problem64.items()}
    _, exact = gradients(problem64, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    _, fused = gradients(
        problem32, lambda p: hierarchical_mse_fused(**p, levels=levels, level_weights=weights, chunk_size=1).loss
    )
    _, reference = gradients(
        problem32, lambda p: hierarchical_mse_reference(**p, levels=levels, level_weights=weights).loss
    )
    for name, ours, ref, expected in zip(DIFFERENTIABLE, fused, reference, exact, strict=True):
        ours_error = ((ours.double() - expected).norm() / expected.norm()).item()
        reference_error = ((ref.double() - expected).norm() / expected.norm()).item()
        assert ours_error < 1e-5, f"gradient of {name}: relative error {ours_error:.2e}"
        assert ours_error < max(5 * reference_error, 1e-6), (
            f"{name}: {ours_error:.2e} vs reference {reference_error:.2e}"
        )


# bf16 inputs are accumulated in float32; the only difference from the float64 loop on the same (bf16-rounded)
# values is the final rounding of the results to bf16, about 2**-8 relative.
BF16_RTOL = 1e-2


def test_bfloat16_inputs_accumulate_in_float32_and_return_bfloat16() -> None:
    k = 16
    levels, weights = resolve(None, None, k)
    problem16 = random_problem((4, 16), 24, 96, k, torch.bfloat16, seed=2)
    problem64 = {name: t.double() if t.is_floating_point() else t for name, t in problem16.items()}
    result = hierarchical_mse_fused(**problem16, levels=levels, level_weights=weights, chunk_size=3)
    assert result.loss.dtype == result.level_mse.dtype == result.reconstruction.dtype == torch.bfloat16
    expected, expected_levels = naive_per_level_loss(**problem64, levels=levels, weights=weights)
    torch.testing.assert_close(result.loss.double(), expected, rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(result.level_mse.double(), torch.stack(expected_levels), rtol=BF16_RTOL, atol=0)
    _, ours = gradients(
        problem16, lambda p: hierarchical_mse_fused(**p, levels=levels, level_weights=weights, chunk_size=3).loss
    )
    _, loop = gradients(problem64, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    for name, got, exact in zip(DIFFERENTIABLE, ours, loop, strict=True):
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(
            got.double(), exact, rtol=BF16_RTOL, atol=BF16_RTOL * exact.abs().max().item(), msg=f"gradient of {name}"
        )


def test_only_requested_gradients_are_computed_and_no_grad_works() -> None:
    problem = random_problem((9,), 5, 20, 4, torch.float64, seed=4)
    levels, weights = [2, 4], [0.5, 0.5]
    W_dec = problem["W_dec"].clone().requires_grad_()
    result = hierarchical_mse_fused(**{**problem, "W_dec": W_dec}, levels=levels, level_weights=weights)
    result.loss.backward()
    _, loop = gradients(problem, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    torch.testing.assert_close(W_dec.grad, loop[2], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        result = hierarchical_mse_fused(**problem, levels=levels, level_weights=weights)
    assert not result.loss.requires_grad


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"levels": [0, 4]}, r"entries must be ints in 1..K=4; got 0"),
        ({"levels": [2, 5]}, r"entries must be ints in 1..K=4; got 5"),
        ({"levels": [4, 2]}, r"strictly increasing .* got \[4, 2\]"),
        ({"levels": [2, 3]}, r"must end at K=4"),
        ({"level_weights": [1.0]}, r"one weight per level \(2 levels"),
        ({"chunk_size": 0}, r"chunk_size and token_block must be >= 1"),
        ({"token_block": 0}, r"chunk_size and token_block must be >= 1"),
    ],
)
def test_fused_rejects_bad_arguments(overrides, message) -> None:
    problem = random_problem((3,), 4, 10, 4, torch.float64, seed=0)
    arguments = {**problem, "levels": [2, 4], "level_weights": [0.5, 0.5], **overrides}
    with pytest.raises(ValueError, match=message):
        hierarchical_mse_fused(**arguments)


# --- per-step constants are built once --------------------------------------------------------------

# What a host-to-device copy or a host sync looks like to the dispatcher: torch.tensor / as_tensor / new_tensor /
# LongTensor(list) all lower to ``lift_fresh``; ``.item()`` / ``bool(t)`` to ``_local_scalar_dense``; ``nonzero``
# syncs to size its output.
HOST_OPS = ("aten.lift_fresh", "aten.arange", "aten._local_scalar_dense", "aten.nonzero")


class _RecordOps(TorchDispatchMode):
    """Every aten op run while active (autograd's backward included), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_host_tensors(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[collections.Counter, _RecordOps]]:
    """``(python calls of torch.tensor/as_tensor/arange, every aten op)`` inside the block."""
    calls: collections.Counter[str] = collections.Counter()

    def counted(name: str, original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in ("tensor", "as_tensor", "arange"):
            patch.setattr(torch, name, counted(name, getattr(torch, name)))
        with _RecordOps() as recorder:
            yield calls, recorder


def clear_constant_caches() -> None:
    """Start from empty caches, so the first call in a test builds the tables (whatever ran before)."""
    for cached in (fused._plan_chunks, _common.weight_vector, _common.level_positions):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_second_step_builds_no_tensor_from_host_data(monkeypatch, implementation) -> None:
    """The chunk tables, level weights and level positions are built on the first call only: on CUDA each one is a
    blocking host-to-device copy, K / chunk_size x 5 of them per step before they were cached."""
    loss_fn = HIERARCHICAL_LOSSES[implementation]
    options = {"chunk_size": 3} if implementation == "fused" else {}
    levels, weights = [1, 4, 5, 13], [0.5, 0.0, 2.0, 0.25]
    problem = random_problem((6, 5), 7, 30, 13, torch.float32, seed=21)
    clear_constant_caches()

    def step() -> tuple[collections.Counter, collections.Counter, list[torch.Tensor]]:
        leaves = {name: problem[name].clone().requires_grad_() for name in DIFFERENTIABLE}  # outside the window
        with recording_host_tensors(monkeypatch) as (calls, recorder):
            loss_fn(**{**problem, **leaves}, levels=levels, level_weights=weights, **options).loss.backward()
        host_ops = collections.Counter({op: n for op, n in recorder.ops.items() if op.startswith(HOST_OPS)})
        assert recorder.ops["aten.index_add_.default"] or recorder.ops["aten.index_add.default"], "backward unseen"
        return calls, host_ops, [leaves[name].grad for name in DIFFERENTIABLE]

    first_calls, first_ops, first_grads = step()
    assert sum(first_calls.values()) > 0 and sum(first_ops.values()) > 0, "the counters must see the first build"
    second_calls, second_ops, second_grads = step()
    assert not second_calls, f"python calls building tensors from host data on the second step: {second_calls}"
    assert not second_ops, f"host copies or syncs on the second step: {second_ops}"
    for name, got, expected in zip(DIFFERENTIABLE, second_grads, first_grads, strict=True):
        assert torch.equal(got, expected), f"gradient of {name} changed once the tables were cached"


def test_backward_leaves_the_cached_chunk_tables_unchanged() -> None:
    """Every later step reuses the cached tables, so backward must scale them out of place."""
    levels, weights = (2, 3, 7, 8), (0.25, 1.0, 0.5, 0.125)
    problem = random_problem((9,), 6, 25, 8, torch.float64, seed=8)
    clear_constant_caches()
    for _ in range(2):  # a gradient != 1 reaches backward, so an in-place scaling would show
        gradients(
            problem,
            lambda p: (
                3.0 * hierarchical_mse_fused(**p, levels=list(levels), level_weights=list(weights), chunk_size=3).loss
            ),
        )
    cached = fused._plan_chunks(levels, weights, 8, 3, torch.device("cpu"), torch.float64)
    fresh = fused._plan_chunks.__wrapped__(levels, weights, 8, 3, torch.device("cpu"), torch.float64)
    assert fused._plan_chunks.cache_info().hits >= 2
    for got, expected in zip(cached, fresh, strict=True):
        for field, value in got._asdict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(expected, field)), f"chunk {got.start}: {field} was modified"
            else:
                assert value == getattr(expected, field), field
    _, second = gradients(
        problem,
        lambda p: hierarchical_mse_fused(**p, levels=list(levels), level_weights=list(weights), chunk_size=3).loss,
    )
    _, loop = gradients(problem, lambda p: naive_per_level_loss(**p, levels=list(levels), weights=list(weights))[0])
    for name, got, expected in zip(DIFFERENTIABLE, second, loop, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_tables_first_built_under_inference_mode_still_train(implementation) -> None:
    """An evaluation under ``torch.inference_mode()`` may be the first call; the tables it caches are then used by
    training steps, where autograd refuses to save inference tensors for backward."""
    loss_fn = HIERARCHICAL_LOSSES[implementation]
    levels, weights = [2, 5, 6], [0.5, 0.25, 0.25]
    problem = random_problem((8,), 5, 20, 6, torch.float64, seed=12)
    clear_constant_caches()
    with torch.inference_mode():
        evaluated = loss_fn(**problem, levels=levels, level_weights=weights)
    _, ours = gradients(problem, lambda p: loss_fn(**p, levels=levels, level_weights=weights).loss)
    expected, loop = gradients(problem, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    torch.testing.assert_close(evaluated.loss, expected, rtol=1e-12, atol=1e-12)
    for name, got, exact in zip(DIFFERENTIABLE, ours, loop, strict=True):
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


# --- inside the training SAE ------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize(("levels", "weights"), [(None, None), ([1, 3, 8], [0.5, 0.25, 0.25])])
def test_training_sae_fused_and_reference_give_same_loss_and_gradients(rescale, levels, weights) -> None:
    settings = {"rescale_acts_by_decoder_norm": rescale, "hierarchy_levels": levels, "hierarchy_weights": weights}
    fused = make_training_sae(seed=3, **settings)
    reference = make_training_sae(seed=3, loss_implementation="reference", **settings)
    assert fused.cfg.loss_implementation == "auto"  # the default: the torch fused path on CPU
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(3, 10, 12) * 2
    dead = torch.arange(48) % 4 == 0  # exercises the AuxK loss, which uses the returned reconstruction
    fused_out = fused.training_forward_pass(step_input(x, dead))
    reference_out = reference.training_forward_pass(step_input(x, dead))
    for name in reference_out.losses:
        torch.testing.assert_close(fused_out.losses[name], reference_out.losses[name], rtol=1e-5, atol=1e-6)
    for name in reference_out.metrics:
        torch.testing.assert_close(fused_out.metrics[name], reference_out.metrics[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_out.sae_out, reference_out.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_out.feature_acts, reference_out.feature_acts)
    fused_out.loss.backward()
    reference_out.loss.backward()
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in fused.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, reference_parameters[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bad", ["cuda", "", "Fused", None])
def test_bad_loss_implementation_raises(bad) -> None:
    expected = r"\['auto', 'fused', 'reference', 'triton'\]"
    with pytest.raises(ValueError, match=rf"loss_implementation must be one of {expected}; got {bad!r}"):
        HierarchicalTopKTrainingSAEConfig(d_in=4, d_sae=16, k=4, loss_implementation=bad)


def test_loss_implementation_is_recorded_and_every_registered_one_agrees() -> None:
    cfg = HierarchicalTopKTrainingSAEConfig(d_in=4, d_sae=16, k=4, loss_implementation="reference")
    assert cfg.to_dict()["metadata"]["training_architecture_details"]["loss_implementation"] == "reference"
    assert HierarchicalTopKTrainingSAEConfig.from_dict(cfg.to_dict()).loss_implementation == "reference"
    problem = random_problem((7,), 5, 20, 6, torch.float64, seed=9)
    assert set(HIERARCHICAL_LOSSES) == {"auto", "fused", "reference", "triton"}
    # The Triton kernels need CUDA (tests/test_triton_kernels.py runs them interpreted); float64 on CPU is torch.
    expected, _ = naive_per_level_loss(**problem, levels=[3, 6], weights=[1.0, 0.5])
    for name, loss_fn in HIERARCHICAL_LOSSES.items():
        if name != "triton":
            loss = loss_fn(**problem, levels=[3, 6], level_weights=[1.0, 0.5]).loss
            torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12, msg=name)
