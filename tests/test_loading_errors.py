"""Broken or foreign SAE directories fail with one message that names the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig, load_sae


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    directory = tmp_path / "sae"
    sae.save_inference_model(directory)
    return directory


def edit_cfg(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (directory / "cfg.json").write_text(json.dumps(cfg))


def test_intact_directory_loads(saved: Path) -> None:
    assert load_sae(saved, k=2).k == 2


def test_missing_weights(saved: Path) -> None:
    (saved / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete SAE at .*sae_weights.safetensors does not exist"):
        load_sae(saved)


@pytest.mark.parametrize("keep_bytes", [0, 7, 200])
def test_truncated_weights(saved: Path, keep_bytes: int) -> None:
    weights = saved / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    with pytest.raises(ValueError, match=r"could not load .*sae_weights.safetensors"):
        load_sae(saved)


def test_weights_that_contradict_the_config(saved: Path, tmp_path: Path) -> None:
    other = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=64, k=4))
    other.save_inference_model(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "sae_weights.safetensors", saved / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"(?s)could not load .*sae_weights.safetensors: .*size mismatch"):
        load_sae(saved)


def test_corrupt_config(saved: Path) -> None:
    (saved / "cfg.json").write_text('{"architecture": "hierarchical_topk", ')
    with pytest.raises(ValueError, match=r"cfg.json is not valid JSON"):
        load_sae(saved)


def test_unknown_architecture(saved: Path) -> None:
    edit_cfg(saved, architecture="hierarchical_topk_v9")
    with pytest.raises(ValueError, match=r"architecture 'hierarchical_topk_v9', which SAELens does not know"):
        load_sae(saved)


def test_config_without_k(saved: Path) -> None:
    edit_cfg(saved, k=None)
    with pytest.raises(ValueError, match=r"cfg.json has no 'k' \(K, the largest budget"):
        load_sae(saved)
    # SAELens's own loaders must not fall back to TopK's default k=100 either.
    for loader in (SAE.load_from_disk, TrainingSAE.load_from_disk):
        with pytest.raises(ValueError, match=r"k \(K, the largest budget the SAE was trained for\) must be given"):
            loader(saved)


def test_config_with_k_larger_than_d_sae(saved: Path) -> None:
    edit_cfg(saved, k=33)
    with pytest.raises(ValueError, match=r"1..d_sae=32; got k=33"):
        load_sae(saved)
