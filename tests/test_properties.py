"""Property tests (hypothesis): fused == reference; budgets are nested; save/load keeps every budget's output."""

from __future__ import annotations

import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_lens_hierarchical import (
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    load_sae,
)
from sae_lens_hierarchical.losses import hierarchical_mse_fused, hierarchical_mse_reference
from tests.test_architecture import ranking_scores


@st.composite
def loss_problems(draw: st.DrawFn) -> dict:
    k = draw(st.integers(1, 12))
    d_sae = draw(st.integers(k, 40))
    d_in = draw(st.integers(1, 9))
    n_tokens = draw(st.integers(1, 30))
    levels = sorted(draw(st.sets(st.integers(1, k), min_size=0, max_size=k)) | {k})
    weights = draw(st.lists(st.floats(0.0, 4.0, allow_nan=False), min_size=len(levels), max_size=len(levels)))
    if sum(weights) == 0:
        weights[-1] = 1.0
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_tokens, d_sae, generator=generator, dtype=torch.float64)
    top_acts, top_indices = scores.topk(k, dim=-1, sorted=True)
    return {
        "sae_in": torch.randn(n_tokens, d_in, generator=generator, dtype=torch.float64).to(dtype),
        "top_acts": top_acts.relu().to(dtype),
        "top_indices": top_indices,
        "W_dec": torch.randn(d_sae, d_in, generator=generator, dtype=torch.float64).to(dtype),
        "b_dec": torch.randn(d_in, generator=generator, dtype=torch.float64).to(dtype),
        "levels": levels,
        "level_weights": weights,
        "chunk_size": draw(st.integers(1, k + 2)),
    }


@settings(max_examples=60, deadline=None)
@given(loss_problems())
def test_fused_equals_reference_with_gradients(problem: dict) -> None:
    chunk_size = problem.pop("chunk_size")
    differentiable = ("sae_in", "top_acts", "W_dec", "b_dec")

    def run(fn, **extra):
        inputs = {name: (t.clone().requires_grad_() if name in differentiable else t) for name, t in problem.items()}
        result = fn(**inputs, **extra)
        result.loss.backward()
        return result, [inputs[name].grad for name in differentiable]

    fused, fused_grads = run(hierarchical_mse_fused, chunk_size=chunk_size)
    reference, reference_grads = run(hierarchical_mse_reference)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if problem["sae_in"].dtype == torch.float32 else {}
    torch.testing.assert_close(fused.loss, reference.loss, **tolerance)
    torch.testing.assert_close(fused.level_mse, reference.level_mse, **tolerance)
    torch.testing.assert_close(fused.reconstruction, reference.reconstruction, **tolerance)
    for got, expected in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, **tolerance)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 10),
    extra_latents=st.integers(0, 30),
    n_tokens=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
    rescale=st.booleans(),
)
def test_budgets_are_nested_top_k_sets_for_any_input(
    k: int, extra_latents: int, n_tokens: int, seed: int, ties: bool, rescale: bool
) -> None:
    """At every budget the active latents are a top-k set of scores computed from the weights in float64, their
    values are those scores, and each budget's set contains the previous one (ties included)."""
    torch.manual_seed(seed)
    sae = HierarchicalTopKSAE(
        HierarchicalTopKSAEConfig(d_in=6, d_sae=k + extra_latents, k=k, rescale_acts_by_decoder_norm=rescale)
    )
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        if ties:  # identical encoder columns and biases give exactly tied pre-activations
            sae.W_enc[:, 1:] = sae.W_enc[:, :1]
            sae.b_enc.zero_()
            sae.W_dec.copy_(sae.W_dec[:1].expand_as(sae.W_dec))  # and equal norms, so rescaled scores tie too
    x = torch.randn(n_tokens, 6)
    scores = ranking_scores(sae, x)
    tolerance = 1e-5 * (1 + scores.abs().max().item())
    previous = torch.zeros_like(scores, dtype=torch.bool)
    for budget in range(1, k + 1):
        acts = sae.encode(x, k=budget).double()
        active = acts != 0
        kth_score = scores.topk(budget, dim=-1).values[..., -1:]
        # each active latent carries its own (positive) score and is among the top `budget` scores ...
        torch.testing.assert_close(acts, torch.where(active, scores, 0.0), rtol=0, atol=tolerance)
        assert (scores[active] >= kth_score.expand_as(scores)[active] - tolerance).all()
        # ... and every latent clearly above the budget-th score, and positive, is active
        assert (active | (scores <= kth_score + tolerance) | (scores <= tolerance)).all()
        # sorted values: exactly the ReLU of the top `budget` scores (whatever latents won the ties)
        torch.testing.assert_close(
            acts.topk(budget, dim=-1).values, scores.topk(budget, dim=-1).values.relu(), rtol=0, atol=tolerance
        )
        assert (previous <= active).all(), f"top-{budget - 1} set not inside top-{budget} set"
        previous = active


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 8),
    extra_latents=st.integers(0, 20),
    d_in=st.integers(1, 10),
    rescale=st.booleans(),
    decoder_scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_save_load_round_trip_keeps_every_prefix_reconstruction(
    k: int, extra_latents: int, d_in: int, rescale: bool, decoder_scale: float, seed: int
) -> None:
    """Whatever the sizes and decoder norms, the saved SAE reconstructs exactly like the trained one at every k."""
    torch.manual_seed(seed)
    training = HierarchicalTopKTrainingSAE(
        HierarchicalTopKTrainingSAEConfig(d_in=d_in, d_sae=k + extra_latents, k=k, rescale_acts_by_decoder_norm=rescale)
    )
    with torch.no_grad():
        training.W_dec.mul_(decoder_scale * (torch.rand(k + extra_latents, 1) + 0.5))
        training.b_enc.normal_()
        training.b_dec.normal_()
    x = torch.randn(16, d_in) * 3
    with tempfile.TemporaryDirectory() as directory:
        training.save_inference_model(directory)
        loaded = load_sae(directory)
    for budget in range(1, k + 1):
        with training.use_k(budget), loaded.use_k(budget):
            torch.testing.assert_close(loaded(x), training(x), rtol=1e-4, atol=1e-4)
            assert torch.equal(loaded.encode(x) != 0, training.encode(x) != 0)
