"""The hierarchical_topk architecture: validation, registration, variable k, TopK equivalence, folding."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_hierarchical import (
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
)
from tests.test_losses import naive_per_level_loss


def make_training_sae(seed: int = 0, **overrides) -> HierarchicalTopKTrainingSAE:
    torch.manual_seed(seed)
    settings = {"d_in": 12, "d_sae": 48, "k": 8, **overrides}
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(**settings))
    with torch.no_grad():  # non-trivial biases and decoder norms, so folding and b_dec matter
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1) * 3 + 0.2)
    return sae


def step_input(sae_in: torch.Tensor, dead: torch.Tensor | None = None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=sae_in, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )


# --- validation -------------------------------------------------------------------------------------

BAD_TRAINING_CONFIGS = [
    ({"k": 0}, r"k \(K, the largest budget\) must be an int in 1..d_sae=48; got k=0"),
    ({"k": 49}, r"1..d_sae=48; got k=49"),
    ({"k": 4.0}, r"got k=4.0"),
    ({"k": True}, r"got k=True"),
    ({"hierarchy_levels": [0, 8]}, r"entries must be ints in 1..K=8; got 0"),
    ({"hierarchy_levels": [2, 9]}, r"entries must be ints in 1..K=8; got 9"),
    ({"hierarchy_levels": [4, 2, 8]}, r"strictly increasing .* got \[4, 2, 8\]"),
    ({"hierarchy_levels": [2, 2, 8]}, r"strictly increasing .* got \[2, 2, 8\]"),
    ({"hierarchy_levels": [2, 4]}, r"must end at K=8"),
    ({"hierarchy_levels": []}, r"must be non-empty"),
    ({"hierarchy_levels": [1.5, 8]}, r"entries must be ints"),
    ({"hierarchy_levels": [2, 8], "hierarchy_weights": [1.0]}, r"one weight per level \(2 levels"),
    ({"hierarchy_weights": [1.0] * 7}, r"one weight per level \(8 levels"),
    ({"hierarchy_levels": [2, 8], "hierarchy_weights": [1.0, -0.5]}, r"finite numbers >= 0; got -0.5"),
    ({"hierarchy_levels": [2, 8], "hierarchy_weights": [1.0, float("nan")]}, r"finite numbers >= 0; got nan"),
    ({"hierarchy_levels": [2, 8], "hierarchy_weights": [0.0, 0.0]}, r"must not all be zero"),
    ({"normalize_activations": "layer_norm"}, r"normalize_activations='layer_norm' is not supported"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_TRAINING_CONFIGS)
def test_bad_training_config_raises_clear_error(overrides, message) -> None:
    settings = {"d_in": 12, "d_sae": 48, "k": 8, **overrides}
    with pytest.raises(ValueError, match=message):
        HierarchicalTopKTrainingSAEConfig(**settings)


@pytest.mark.parametrize("k", [0, 49, -1, 2.0])
def test_bad_inference_config_raises_clear_error(k) -> None:
    with pytest.raises(ValueError, match=rf"1..d_sae=48; got k={k!r}"):
        HierarchicalTopKSAEConfig(d_in=12, d_sae=48, k=k)


@pytest.mark.parametrize("bad_k", [0, 9, -3, 2.5, "4", True])
def test_bad_inference_budget_raises_and_keeps_k(bad_k) -> None:
    sae = make_inference_sae()
    x = torch.randn(3, 12)
    message = rf"k must be an int in 1..K=8 .*got k={bad_k!r}"
    with pytest.raises(ValueError, match=message):
        sae.set_k(bad_k)
    with pytest.raises(ValueError, match=message):
        sae.encode(x, k=bad_k)
    with pytest.raises(ValueError, match=message), sae.use_k(bad_k):
        pass
    assert sae.k == 8


def test_config_normalises_levels_and_weights_and_records_them() -> None:
    cfg = HierarchicalTopKTrainingSAEConfig(
        d_in=4, d_sae=16, k=8, hierarchy_levels=(2, 8), hierarchy_weights=[1, 0.125]
    )
    assert cfg.levels == [2, 8]
    assert cfg.level_weights == [1.0, 0.125]
    details = cfg.to_dict()["metadata"]["training_architecture_details"]
    assert details["hierarchy_levels"] == [2, 8]
    assert details["hierarchy_weights"] == [1.0, 0.125]
    default = HierarchicalTopKTrainingSAEConfig(d_in=4, d_sae=16, k=4)
    assert default.levels == [1, 2, 3, 4]
    assert default.level_weights == [0.25] * 4


# --- registration -----------------------------------------------------------------------------------


def test_registered_under_architecture_name() -> None:
    assert get_sae_class("hierarchical_topk") == (HierarchicalTopKSAE, HierarchicalTopKSAEConfig)
    assert get_sae_training_class("hierarchical_topk") == (
        HierarchicalTopKTrainingSAE,
        HierarchicalTopKTrainingSAEConfig,
    )
    sae = TrainingSAE.from_dict({"architecture": "hierarchical_topk", "d_in": 4, "d_sae": 16, "k": 4})
    assert isinstance(sae, HierarchicalTopKTrainingSAE)


def test_import_twice_and_reload_do_not_raise() -> None:
    script = textwrap.dedent(
        """
        import importlib
        import sae_lens_hierarchical
        import sae_lens_hierarchical as again
        importlib.reload(sae_lens_hierarchical)
        importlib.reload(sae_lens_hierarchical.hierarchical_topk_sae)
        importlib.reload(sae_lens_hierarchical)
        from sae_lens.registry import get_sae_class
        cls, _ = get_sae_class("hierarchical_topk")
        assert cls is sae_lens_hierarchical.HierarchicalTopKSAE, cls
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- the training loss inside the SAE ---------------------------------------------------------------


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize(("levels", "weights"), [(None, None), ([1, 3, 8], [0.5, 0.25, 0.25])])
def test_training_loss_equals_naive_loop_on_independently_sorted_latents(rescale, levels, weights) -> None:
    sae = make_training_sae(rescale_acts_by_decoder_norm=rescale, hierarchy_levels=levels, hierarchy_weights=weights)
    x = torch.randn(2, 10, 12) * 2
    output = sae.training_forward_pass(step_input(x))

    with torch.no_grad():
        W_dec = sae.W_dec.double()
        norms = W_dec.norm(dim=-1)
        hidden_pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
        scores = hidden_pre * norms if rescale else hidden_pre
        order = scores.argsort(dim=-1, descending=True)[..., :8]
        acts = scores.gather(-1, order).relu()
        coefficients = acts / norms[order] if rescale else acts
        expected, _ = naive_per_level_loss(
            x.double(), coefficients, order, W_dec, sae.b_dec.double(), sae.cfg.levels, sae.cfg.level_weights
        )
    torch.testing.assert_close(output.losses["mse_loss"].double(), expected, rtol=1e-5, atol=1e-6)
    assert output.feature_acts.shape == (2, 10, 48)
    assert ((output.feature_acts.to_dense() != 0).sum(-1) <= 8).all()
    logged = {name for name in output.metrics if name.startswith("mse_at_k_")}
    assert logged == (
        {"mse_at_k_1", "mse_at_k_2", "mse_at_k_4", "mse_at_k_8"}
        if levels is None
        else {"mse_at_k_1", "mse_at_k_3", "mse_at_k_8"}
    )


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("with_dead_latents", [False, True])
def test_single_level_k_equals_sae_lens_topk_loss(rescale, with_dead_latents) -> None:
    ours = make_training_sae(seed=1, rescale_acts_by_decoder_norm=rescale, hierarchy_levels=[8])
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=12, d_sae=48, k=8, rescale_acts_by_decoder_norm=rescale))
    topk.load_state_dict(ours.state_dict())
    x = torch.randn(64, 12) * 2
    dead = (torch.arange(48) % 3 == 0) if with_dead_latents else None
    ours_out = ours.training_forward_pass(step_input(x, dead))
    topk_out = topk.training_forward_pass(step_input(x, dead))
    assert set(ours_out.losses) == set(topk_out.losses)
    for name in topk_out.losses:
        torch.testing.assert_close(ours_out.losses[name], topk_out.losses[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_out.loss, topk_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_out.sae_out, topk_out.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_out.feature_acts.to_dense(), topk_out.feature_acts)
    ours_out.loss.backward()
    topk_out.loss.backward()
    for name, parameter in topk.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, parameter.grad, rtol=1e-4, atol=1e-6)


# --- variable k at inference ------------------------------------------------------------------------


def make_inference_sae(seed: int = 0, rescale: bool = True) -> HierarchicalTopKSAE:
    training = make_training_sae(seed=seed, rescale_acts_by_decoder_norm=rescale)
    inference = HierarchicalTopKSAE(
        HierarchicalTopKSAEConfig(d_in=12, d_sae=48, k=8, rescale_acts_by_decoder_norm=rescale)
    )
    inference.load_state_dict(training.state_dict())
    return inference


def ranking_scores(sae: HierarchicalTopKSAE | HierarchicalTopKTrainingSAE, x: torch.Tensor) -> torch.Tensor:
    """``[..., d_sae]`` float64 scores by which the SAE should rank latents, from its weights alone (not its code).

    SAELens convention: ``(x - b_dec) @ W_enc + b_enc`` (``apply_b_dec_to_input``), times the decoder row norms when
    ``rescale_acts_by_decoder_norm``; ``encode`` returns the ReLU of the top-k scores.
    """
    with torch.no_grad():
        sae_in = x.double() - sae.b_dec.double() * sae.cfg.apply_b_dec_to_input
        scores = sae_in @ sae.W_enc.double() + sae.b_enc.double()
        if sae.cfg.rescale_acts_by_decoder_norm:
            scores = scores * sae.W_dec.double().norm(dim=-1)
    return scores


def prefix_reconstruction_by_hand(
    sae: HierarchicalTopKSAE | HierarchicalTopKTrainingSAE, x: torch.Tensor, k: int
) -> torch.Tensor:
    """``[..., d_in]`` float64 ``b_dec + sum of the k top-ranked rows``, each row scaled by ReLU(score) / its norm."""
    scores = ranking_scores(sae, x)
    values, indices = scores.topk(k, dim=-1, sorted=True)
    with torch.no_grad():
        W_dec = sae.W_dec.double()
        norms = W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else torch.ones(W_dec.shape[0])
        coefficients = values.relu() / norms[indices]
        return sae.b_dec.double() + (coefficients.unsqueeze(-1) * W_dec[indices]).sum(dim=-2)


def assert_clear_ranking(scores: torch.Tensor, k: int) -> None:
    """The float64 top-(k+1) are well separated, so float32 rounding cannot reorder them (the tests then compare
    latent sets exactly)."""
    values = scores.topk(k + 1, dim=-1, sorted=True).values
    assert (values[..., :-1] - values[..., 1:]).min() > 1e-6, "pick another seed: near-tied scores"


@pytest.mark.parametrize("rescale", [True, False])
def test_budget_k_keeps_the_k_highest_scores_and_budgets_nest(rescale: bool) -> None:
    """At every budget, the active latents and their values are the top-k of scores computed from the weights."""
    sae = make_inference_sae(rescale=rescale)
    x = torch.randn(5, 7, 12)
    scores = ranking_scores(sae, x)
    assert_clear_ranking(scores, 8)
    values, indices = scores.topk(8, dim=-1, sorted=True)
    assert (values > 0).all(), "every ranked latent fires here, so active sets have exactly k members"
    previous = torch.zeros_like(scores, dtype=torch.bool)
    for k in range(1, 9):
        acts = sae.encode(x, k=k)
        expected = torch.zeros_like(scores).scatter(-1, indices[..., :k], values[..., :k])
        active = acts != 0
        assert torch.equal(active, expected != 0), f"budget {k} must keep the {k} highest scores"
        torch.testing.assert_close(acts.double(), expected, rtol=1e-5, atol=1e-7)
        assert (previous <= active).all(), f"top-{k - 1} set not inside top-{k} set"
        assert (active & ~previous).sum(-1).eq(1).all(), "each budget adds exactly the next-ranked latent"
        previous = active


@pytest.mark.parametrize("rescale", [True, False])
def test_decode_at_k_is_the_level_k_prefix_reconstruction(rescale: bool) -> None:
    sae = make_inference_sae(rescale=rescale)
    x = torch.randn(40, 12)
    assert_clear_ranking(ranking_scores(sae, x), 8)
    for k in (1, 3, 8):
        with sae.use_k(k):
            torch.testing.assert_close(sae(x).double(), prefix_reconstruction_by_hand(sae, x, k), rtol=1e-5, atol=1e-5)


def test_set_k_and_use_k_restore_previous_budget_even_on_error() -> None:
    sae = make_inference_sae()
    assert sae.k == 8
    sae.set_k(3)
    assert sae.k == 3
    with sae.use_k(5):
        assert sae.k == 5
        assert ((sae.encode(torch.randn(4, 12)) != 0).sum(-1) == 5).all()
    assert sae.k == 3
    with pytest.raises(RuntimeError, match="boom"), sae.use_k(1):
        raise RuntimeError("boom")
    assert sae.k == 3
    sae.k = 8
    assert sae.k == 8


# --- saving -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [True, False])
def test_save_inference_keeps_every_prefix_reconstruction(tmp_path: Path, rescale: bool) -> None:
    training = make_training_sae(seed=2, rescale_acts_by_decoder_norm=rescale, hierarchy_levels=[2, 5, 8])
    x = torch.randn(50, 12) * 2
    training.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, HierarchicalTopKSAE)
    assert loaded.cfg.architecture() == "hierarchical_topk"
    assert loaded.cfg.k == 8
    if rescale:  # norms were folded on save
        torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(48), rtol=1e-5, atol=1e-5)
    for k in range(1, 9):
        with training.use_k(k), loaded.use_k(k):
            torch.testing.assert_close(loaded(x), training(x), rtol=1e-4, atol=1e-5)
            assert torch.equal(loaded.encode(x) != 0, training.encode(x) != 0)


def test_training_load_from_disk_keeps_training_only_fields(tmp_path: Path) -> None:
    training = make_training_sae(
        hierarchy_levels=[2, 4, 8], hierarchy_weights=[1.0, 0.5, 0.25], aux_loss_coefficient=0.5
    )
    training.save_inference_model(tmp_path / "inference")
    training.save_model(tmp_path / "checkpoint")
    for directory in ("inference", "checkpoint"):
        reloaded = TrainingSAE.load_from_disk(tmp_path / directory)
        assert isinstance(reloaded, HierarchicalTopKTrainingSAE)
        assert reloaded.cfg.hierarchy_levels == [2, 4, 8]
        assert reloaded.cfg.hierarchy_weights == [1.0, 0.5, 0.25]
        assert reloaded.cfg.aux_loss_coefficient == 0.5


def test_b_dec_mean_init_happens_at_step_zero_only() -> None:
    sae = make_training_sae(b_dec_init="mean")
    first, later = torch.randn(64, 12) + 5.0, torch.randn(64, 12) - 5.0
    sae.training_forward_pass(step_input(first))
    torch.testing.assert_close(sae.b_dec.detach(), first.mean(0))
    resumed = TrainStepInput(
        sae_in=later, coefficients={}, dead_neuron_mask=None, n_training_steps=7, is_logging_step=False
    )
    sae.training_forward_pass(resumed)
    torch.testing.assert_close(sae.b_dec.detach(), first.mean(0))
    untouched = make_training_sae()
    before = untouched.b_dec.detach().clone()
    untouched.training_forward_pass(step_input(first))
    assert torch.equal(untouched.b_dec.detach(), before)
    with pytest.raises(ValueError, match=r"b_dec_init must be one of \['zeros', 'mean'\]; got 'median'"):
        HierarchicalTopKTrainingSAEConfig(d_in=4, d_sae=16, k=4, b_dec_init="median")


@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_forward_equals_sae_lens_dense_path_and_yields_to_hooks(rescale: bool) -> None:
    sae = make_inference_sae(seed=3, rescale=rescale)
    x = torch.randn(3, 5, 12) * 2
    for k in range(1, 9):
        with sae.use_k(k):
            dense = sae.decode(sae.encode(x))  # SAELens's path: dense scatter, then the whole decoder
            torch.testing.assert_close(sae(x), dense, rtol=1e-5, atol=1e-5)
    latent = int(sae.encode(x)[0, 0].argmax())

    def ablate(acts: torch.Tensor, hook) -> torch.Tensor:
        acts[..., latent] = 0.0
        return acts

    sae.hook_sae_acts_post.add_hook(ablate)
    try:
        edited = sae(x)  # a hook on the activations must see, and be able to change, the dense activations
    finally:
        sae.reset_hooks()
    expected = sae.decode(ablate(sae.encode(x), None))
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, sae(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_stop_training_before_the_weights_change(bad: float) -> None:
    sae = make_training_sae()
    sae.cfg.metadata.hook_name = "blocks.6.hook_resid_post"
    x = torch.randn(16, 12)
    x[3, 5] = bad
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    with pytest.raises(
        ValueError, match=r"non-finite activations .* at training step 4, hook 'blocks.6.hook_resid_post'"
    ):
        sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=4, is_logging_step=False)
        )
    for name, parameter in sae.named_parameters():
        assert torch.equal(parameter, before[name])
