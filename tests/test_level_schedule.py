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
