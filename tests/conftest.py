"""Shared fixtures: everything offline, on CPU, on a tiny random TransformerLens model."""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Triton reads this when its kernels are decorated, i.e. on import, and torch imports triton early: set it first so
# that tests/test_triton_kernels.py runs the kernels on CPU tensors. TRITON_INTERPRET=0 tests them compiled on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from sae_lens import LanguageModelSAETrainingRunner  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, presets, testing  # noqa: E402
from sae_lens_hierarchical.data import collect_activations  # noqa: E402

TRAINED_K = 16
TRAINED_LEVELS = [1, 2, 4, 8, 16]
TRAINED_WEIGHTS = [0.3, 0.2, 0.2, 0.2, 0.1]


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    return testing.tiny_random_model(seed=0)


@pytest.fixture(scope="session")
def held_out_activations(tiny_model: HookedTransformer) -> torch.Tensor:
    tokens = torch.tensor(testing.tiny_token_dataset(64, 32, seed=123)["input_ids"])
    return collect_activations(tiny_model, tokens, testing.TINY_HOOK_NAME)


@pytest.fixture(scope="session")
def trained_sae_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: HookedTransformer) -> Path:
    """An SAE trained end to end by SAELens's runner with custom levels and weights, saved in SAELens format."""
    output = tmp_path_factory.mktemp("trained") / "sae"
    torch.manual_seed(0)
    cfg = presets.tiny_runner_config(
        str(output),
        training_tokens=60_000,
        k=TRAINED_K,
        hierarchy_levels=TRAINED_LEVELS,
        hierarchy_weights=TRAINED_WEIGHTS,
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=testing.tiny_token_dataset(600, 32, seed=0)
    )
    sae = runner.run()
    assert isinstance(sae, HierarchicalTopKTrainingSAE)
    return output
