"""The level-weight schedule (``hierarchy_final_weights`` over ``hierarchy_schedule_steps``).

The loss is linear in the level weights, so at progress t it must equal ``(1 - t) * L(start) + t * L(final)``, each
computed by an SAE with those weights fixed (no schedule code involved); SAELens's own ``SAETrainer`` drives the
progress through its coefficient scheduler.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig

D_IN, D_SAE, K = 8, 32, 4
START, FINAL = [0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]


def make_sae(**cfg: Any) -> HierarchicalTopKTrainingSAE:
    torch.manual_seed(0)
    return HierarchicalTopKTrainingSAE(
        HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float64", **cfg)
    )


def mse_loss(sae: HierarchicalTopKTrainingSAE, sae_in: torch.Tensor, coefficients: dict[str, float]) -> float:
    output = sae.training_forward_pass(TrainStepInput(sae_in, coefficients, None, 1, False))
    return float(output.losses["mse_loss"].detach())


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 1.0])
def test_the_loss_moves_linearly_between_the_fixed_weight_losses(progress: float) -> None:
    scheduled = make_sae(hierarchy_weights=START, hierarchy_final_weights=FINAL, hierarchy_schedule_steps=10)
    sae_in = torch.randn(64, D_IN, dtype=torch.float64)
    at_start = mse_loss(make_sae(hierarchy_weights=START), sae_in, {})
    at_end = mse_loss(make_sae(hierarchy_weights=FINAL), sae_in, {})
    expected = (1 - progress) * at_start + progress * at_end
    assert mse_loss(scheduled, sae_in, {"hierarchy_schedule": progress}) == pytest.approx(expected, rel=1e-12)
    assert mse_loss(scheduled, sae_in, {}) == pytest.approx(at_end, rel=1e-12)  # no coefficient: the final weights


def test_saelens_trainer_ramps_the_schedule_over_its_steps() -> None:
    sae = make_sae(hierarchy_final_weights=FINAL, hierarchy_schedule_steps=4)
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=6 * 16, train_batch_size_samples=16, lr_end=3e-4),
        sae,
        data_provider=iter(()),
    )
    seen = []
    for _ in range(6):
        seen.append(trainer.get_coefficients()["hierarchy_schedule"])
        trainer.step(torch.randn(16, D_IN, dtype=torch.float64))
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_the_schedule_is_saved_with_the_sae_and_comes_back(tmp_path) -> None:
    sae = make_sae(hierarchy_final_weights=FINAL, hierarchy_schedule_steps=7)
    details = sae.cfg.metadata.training_architecture_details
    assert details["hierarchy_final_weights"] == FINAL and details["hierarchy_schedule_steps"] == 7
    sae.save_inference_model(tmp_path / "saved")
    loaded = HierarchicalTopKTrainingSAE.load_from_disk(tmp_path / "saved")
    assert loaded.cfg.hierarchy_final_weights == FINAL and loaded.cfg.hierarchy_schedule_steps == 7


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"hierarchy_final_weights": FINAL}, "hierarchy_final_weights needs hierarchy_schedule_steps >= 1"),
        ({"hierarchy_schedule_steps": 5}, "hierarchy_schedule_steps=5 needs hierarchy_final_weights"),
        ({"hierarchy_schedule_steps": -1}, "hierarchy_schedule_steps must be an int >= 0; got -1"),
        ({"hierarchy_final_weights": [1.0], "hierarchy_schedule_steps": 3}, "one weight per level"),
        ({"hierarchy_final_weights": [0.0] * K, "hierarchy_schedule_steps": 3}, "must not all be zero"),
    ],
)
def test_a_bad_schedule_is_refused_with_the_value_and_the_rule(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_sae(**cfg)


# --- levels drawn at random each step (``hierarchy_sampled_levels``) --------------------------------------------


def float64_loss_at_levels(sae: HierarchicalTopKTrainingSAE, sae_in: torch.Tensor, levels: list[int]) -> float:
    """Mean over ``levels`` of the squared error of each prefix reconstruction, by a loop over ranks in float64."""
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    norms = W_dec.norm(dim=-1)
    values, indices = (((sae_in - b_dec) @ W_enc + b_enc) * norms).topk(K, dim=-1)
    losses = []
    for level in levels:
        reconstruction = b_dec + sum(
            (values[:, i].relu() / norms[indices[:, i]])[:, None] * W_dec[indices[:, i]] for i in range(level)
        )
        losses.append(float((reconstruction - sae_in).pow(2).sum(dim=-1).mean()))
    return sum(losses) / len(levels)


def test_each_step_draws_its_levels_and_always_k() -> None:
    cfg = HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=64, k=16, hierarchy_sampled_levels=3)
    draws = [cfg.levels_at(1.0, step) for step in range(50)]
    for levels, weights in draws:
        assert len(levels) == 4 and levels[-1] == 16 and levels == sorted(set(levels)) and levels[0] >= 1
        assert weights == [0.25] * 4
    assert len({tuple(levels) for levels, _ in draws}) > 40  # different draws
    again = HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=64, k=16, hierarchy_sampled_levels=3)
    assert [again.levels_at(0.3, step) for step in range(50)] == draws  # a function of the step: resumes the same
    counts = torch.zeros(16)
    for step in range(3000):
        for level in cfg.levels_at(1.0, step)[0][:-1]:
            counts[level - 1] += 1
    expected = 3000 * 3 / 15  # uniform over the 15 levels below K
    assert counts[:15].min() > 0.8 * expected and counts[:15].max() < 1.2 * expected


def test_the_sampled_loss_is_the_mean_over_the_drawn_levels() -> None:
    sae = make_sae(hierarchy_sampled_levels=2)
    sae_in = torch.randn(32, D_IN, dtype=torch.float64)
    for step in (0, 1, 7):
        levels = sae.cfg.levels_at(1.0, step)[0]
        output = sae.training_forward_pass(TrainStepInput(sae_in, {}, None, step, False))
        assert float(output.losses["mse_loss"]) == pytest.approx(float64_loss_at_levels(sae, sae_in, levels), rel=1e-9)
        assert list(output.metrics) == [f"mse_at_k_{K}"]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"hierarchy_sampled_levels": 3}, r"hierarchy_sampled_levels must be an int in 0\.\.2 .*got 3"),
        ({"hierarchy_sampled_levels": -1}, r"in 0\.\.2 .*got -1"),
        ({"hierarchy_sampled_levels": 1, "hierarchy_weights": START}, "cannot be combined with hierarchy_weights"),
    ],
)
def test_a_bad_sampling_is_refused(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **cfg)
