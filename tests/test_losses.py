"""The hierarchical loss against an independent float64 per-level loop, values and gradients."""

from __future__ import annotations

import pytest
import torch

from sae_lens_hierarchical.losses import HIERARCHICAL_LOSSES, hierarchical_mse_reference, uniform_level_weights


def naive_per_level_loss(
    sae_in: torch.Tensor,
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    levels: list[int],
    weights: list[float],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The definition, written as loops: for each level j, add the first j ranked rows one at a time."""
    d_in = sae_in.shape[-1]
    x = sae_in.reshape(-1, d_in)
    acts = top_acts.reshape(x.shape[0], -1)
    indices = top_indices.reshape(x.shape[0], -1)
    total = torch.zeros((), dtype=x.dtype)
    per_level = []
    for level, weight in zip(levels, weights, strict=True):
        reconstruction = b_dec.expand_as(x)
        for rank in range(level):
            reconstruction = reconstruction + acts[:, rank : rank + 1] * W_dec[indices[:, rank]]
        level_mse = ((x - reconstruction) ** 2).sum(dim=-1).mean()
        per_level.append(level_mse)
        total = total + weight * level_mse
    return total, per_level


def random_problem(
    leading_shape: tuple[int, ...], d_in: int, d_sae: int, k: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(*leading_shape, d_sae, generator=generator, dtype=torch.float64)
    top_acts, top_indices = scores.topk(k, dim=-1, sorted=True)
    return {
        "sae_in": torch.randn(*leading_shape, d_in, generator=generator, dtype=torch.float64).to(dtype),
        "top_acts": top_acts.relu().to(dtype),
        "top_indices": top_indices,
        "W_dec": torch.randn(d_sae, d_in, generator=generator, dtype=torch.float64).to(dtype),
        "b_dec": torch.randn(d_in, generator=generator, dtype=torch.float64).to(dtype),
    }


CASES = [
    # (leading shape, d_in, d_sae, K, levels or None for all, weights or None for uniform)
    ((17,), 8, 40, 1, None, None),
    ((33,), 12, 64, 8, None, None),
    ((33,), 12, 64, 8, [8], None),
    ((20,), 6, 50, 16, [2, 4, 16], [1.0, 0.5, 0.125]),
    ((4, 9), 10, 48, 12, None, None),
    ((3, 5), 7, 30, 6, [1, 3, 6], [0.0, 2.0, 1.0]),
    ((25,), 5, 30, 20, [5, 20], [1.0, 0.125]),  # Multi-TopK-style
]


@pytest.mark.parametrize(("shape", "d_in", "d_sae", "k", "levels", "weights"), CASES)
def test_reference_matches_naive_loop_float64(shape, d_in, d_sae, k, levels, weights) -> None:
    problem = random_problem(shape, d_in, d_sae, k, torch.float64, seed=k)
    levels = levels or list(range(1, k + 1))
    weights = weights or uniform_level_weights(levels)
    result = hierarchical_mse_reference(**problem, levels=levels, level_weights=weights)
    expected_loss, expected_levels = naive_per_level_loss(**problem, levels=levels, weights=weights)
    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.level_mse, torch.stack(expected_levels), rtol=1e-12, atol=1e-12)
    full = naive_per_level_loss(**problem, levels=[k], weights=[1.0])[1][0]
    sae_in = problem["sae_in"]
    torch.testing.assert_close(((result.reconstruction - sae_in) ** 2).sum(-1).mean(), full)
    assert result.reconstruction.shape == sae_in.shape


@pytest.mark.parametrize(("shape", "d_in", "d_sae", "k", "levels", "weights"), CASES)
def test_reference_float32_close_to_float64_loop(shape, d_in, d_sae, k, levels, weights) -> None:
    problem64 = random_problem(shape, d_in, d_sae, k, torch.float64, seed=k + 100)
    problem32 = {name: t.float() if t.is_floating_point() else t for name, t in problem64.items()}
    levels = levels or list(range(1, k + 1))
    weights = weights or uniform_level_weights(levels)
    result = hierarchical_mse_reference(**problem32, levels=levels, level_weights=weights)
    expected, _ = naive_per_level_loss(**problem64, levels=levels, weights=weights)
    torch.testing.assert_close(result.loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("shape", "d_in", "d_sae", "k", "levels", "weights"), CASES)
def test_reference_gradients_match_autograd_of_loop(shape, d_in, d_sae, k, levels, weights) -> None:
    levels = levels or list(range(1, k + 1))
    weights = weights or uniform_level_weights(levels)

    def gradients(loss_fn) -> list[torch.Tensor]:
        problem = random_problem(shape, d_in, d_sae, k, torch.float64, seed=k + 7)
        differentiable = [problem[name].requires_grad_() for name in ("sae_in", "top_acts", "W_dec", "b_dec")]
        loss_fn(problem).backward()
        return [t.grad for t in differentiable]

    ours = gradients(lambda p: hierarchical_mse_reference(**p, levels=levels, level_weights=weights).loss)
    loop = gradients(lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    for name, got, expected in zip(("sae_in", "top_acts", "W_dec", "b_dec"), ours, loop, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_reference_passes_gradcheck() -> None:
    problem = random_problem((6,), 4, 12, 5, torch.float64, seed=3)
    levels, weights = [2, 5], [0.7, 0.3]

    def loss(sae_in, top_acts, W_dec, b_dec):
        return hierarchical_mse_reference(sae_in, top_acts, problem["top_indices"], W_dec, b_dec, levels, weights).loss

    inputs = tuple(problem[n].requires_grad_() for n in ("sae_in", "top_acts", "W_dec", "b_dec"))
    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_uniform_weights_average_the_level_errors(implementation: str) -> None:
    """Default weights make the loss the mean of the per-level errors (not their sum), so it stays on the scale of a
    single-level MSE; with levels=[K] it is TopK's MSE. Expectations: the float64 loop, averaged here by hand."""
    loss_fn = HIERARCHICAL_LOSSES[implementation]
    problem = random_problem((10,), 4, 20, 6, torch.float64, seed=0)
    levels = list(range(1, 7))
    result = loss_fn(**problem, levels=levels, level_weights=uniform_level_weights(levels))
    _, per_level = naive_per_level_loss(**problem, levels=levels, weights=[1.0] * len(levels))
    per_level = torch.stack(per_level)
    assert per_level.max() > 1.2 * per_level.min(), "levels must differ for the mean to mean anything"
    torch.testing.assert_close(result.level_mse, per_level, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.loss, per_level.sum() / len(levels), rtol=1e-12, atol=1e-12)
    topk = loss_fn(**problem, levels=[6], level_weights=uniform_level_weights([6]))
    torch.testing.assert_close(topk.loss, per_level[-1], rtol=1e-12, atol=1e-12)
