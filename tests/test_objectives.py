"""Named objectives: their fields against hand-written values, and ``compare --objectives`` side by side equal to each
objective trained alone on the same batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_hierarchical import HierarchicalTopKTrainingSAEConfig, presets
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.jobs import run_comparison_job
from sae_lens_hierarchical.objectives import objective_overrides

TINY = presets.get_preset(presets.TINY_MODEL_NAME)
SMALL_SAE = {"sae.d_sae": 64, "sae.k": 8}
SIXTH = 1 / 6


@pytest.mark.parametrize(
    ("name", "max_k", "expected"),
    [
        ("uniform", 4, {}),
        ("k-weight-0.5", 4, {"hierarchy_weights": [SIXTH, SIXTH, SIXTH, 0.5]}),
        ("k-weight-1", 3, {"hierarchy_weights": [0.0, 0.0, 1.0]}),
        ("geometric", 32, {"hierarchy_levels": [1, 2, 4, 8, 16, 32]}),
        ("geometric", 12, {"hierarchy_levels": [1, 2, 4, 8, 12]}),
        ("geometric-k-weight-0.5", 8, {"hierarchy_levels": [1, 2, 4, 8], "hierarchy_weights": [SIXTH] * 3 + [0.5]}),
        (
            "schedule-to-k-weight-0.75",
            4,
            {"hierarchy_final_weights": [1 / 12] * 3 + [0.75], "hierarchy_schedule_steps": 10},
        ),
        ("k-weight-1", 1, {"hierarchy_weights": [1.0]}),
        ("sampled-3", 32, {"hierarchy_sampled_levels": 3}),
    ],
)
def test_named_objectives_are_the_documented_fields(name: str, max_k: int, expected: dict[str, Any]) -> None:
    defaults = {
        "hierarchy_levels": None,
        "hierarchy_weights": None,
        "hierarchy_final_weights": None,
        "hierarchy_schedule_steps": 0,
        "hierarchy_sampled_levels": 0,
        "served_k": None,
    }
    fields = objective_overrides(name, max_k, n_training_steps=10)
    assert fields.keys() == defaults.keys()
    for key, value in (defaults | expected).items():
        assert fields[key] == (pytest.approx(value) if isinstance(value, list) else value), key
    # every objective is a valid training config, and its weights sum to 1
    cfg = HierarchicalTopKTrainingSAEConfig(d_in=4, d_sae=64, k=max_k, **fields)
    assert sum(cfg.level_weights_at(1.0)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("k-weight", "unknown objective 'k-weight'"),
        ("uniform-0.5", "unknown objective 'uniform-0.5'"),
        ("topk", "allowed: uniform, k-weight-W, geometric"),
        ("k-weight-1.5", r"weight on K must be in \(0, 1\]; got 1.5"),
        ("geometric-k-weight-0", r"weight on K must be in \(0, 1\]; got 0"),
        ("k-weight-1.2.3", r"must be in \(0, 1\]; got 1.2.3"),
        ("sampled-7", r"N levels drawn below K=8 must be an int in 1\.\.6"),
        ("sampled-0.5", r"must be an int in 1\.\.6"),
        ("sampled", "unknown objective 'sampled'"),
    ],
)
def test_bad_objective_names_name_the_value(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        objective_overrides(name, 8, n_training_steps=10)
    with pytest.raises(ValueError, match=r"weight on K must be in 1 \(K is the only level\); got 0.5"):
        objective_overrides("k-weight-0.5", 1, n_training_steps=10)


def run(tmp_path: Path, name: str, **kwargs: Any) -> Path:
    output = tmp_path / name
    run_comparison_job(
        TINY,
        output,
        budgets=[2],
        baselines=("topk",),
        training_tokens=6400,
        eval_tokens=2000,
        downstream_tokens=0,
        cache_root=tmp_path / "cache",
        progress=False,
        **kwargs,
    )
    return output


def test_objectives_side_by_side_train_as_each_would_alone(tmp_path: Path) -> None:
    """Lockstep on identical batches from identical initial weights: each objective's SAE in the side-by-side suite
    has the weights of the same objective trained alone (its fields set by hand through overrides)."""
    names = ["uniform", "k-weight-0.5", "schedule-to-k-weight-0.75"]
    together = run(tmp_path, "together", overrides=SMALL_SAE, objectives=names)
    n_steps = 6400 // TINY.runner_config(None).train_batch_size_tokens
    by_hand = {
        "uniform": {},
        "k-weight-0.5": {"sae.hierarchy_weights": [0.5 / 7] * 7 + [0.5]},
        "schedule-to-k-weight-0.75": {
            "sae.hierarchy_final_weights": [0.25 / 7] * 7 + [0.75],
            "sae.hierarchy_schedule_steps": n_steps,
        },
    }
    report = json.loads((together / "comparison.json").read_text())
    assert list(report["saes"]) == [*(f"htopk-k8-{name}" for name in names), "topk-k2", "topk-k8"]
    trained = {}
    for name in names:
        alone = run(tmp_path, f"alone-{name}", overrides=SMALL_SAE | by_hand[name])
        mine = load_file(together / "saes" / f"htopk-k8-{name}" / "sae_weights.safetensors")
        theirs = load_file(alone / "saes" / "htopk-k8" / "sae_weights.safetensors")
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
        alone_report = json.loads((alone / "comparison.json").read_text())["saes"]["htopk-k8"]["results"]
        fvus = [row["fvu"] for row in report["saes"][f"htopk-k8-{name}"]["results"]]
        assert fvus == pytest.approx([row["fvu"] for row in alone_report], rel=1e-5)
        details = json.loads((together / "saes" / f"htopk-k8-{name}" / "cfg.json").read_text())["metadata"]
        recorded = details["training_architecture_details"]
        fields = {key.removeprefix("sae."): value for key, value in by_hand[name].items()}
        for key, value in fields.items():
            assert recorded[key] == pytest.approx(value), (name, key)
        trained[name] = mine["W_dec"]
    assert not torch.equal(trained["uniform"], trained["k-weight-0.5"]), "the objectives must differ"
    assert report["saes"]["htopk-k8-k-weight-0.5"]["objective"] == "k-weight-0.5"
    table = (together / "comparison.md").read_text()
    for name in names:
        assert f"HierarchicalTopK, {name}" in table
    assert "HierarchicalTopK, k-weight-0.5 FVU vs TopK trained at k" in table


def test_compare_cli_objectives_refuse_clashes_before_writing(tmp_path: Path) -> None:
    output = tmp_path / "out"
    common = ["compare", "--preset", "tiny-random", "--output-dir", str(output), "--cache-dir", str(tmp_path / "c")]
    with pytest.raises(SystemExit, match="unknown objective 'k-weight-2x'"):
        main([*common, "--objectives", "uniform,k-weight-2x"])
    with pytest.raises(SystemExit, match=r"objectives must be distinct; got \['uniform'\]"):
        main([*common, "--objectives", "uniform,uniform"])
    with pytest.raises(SystemExit, match=r"objectives 'k-weight-0\.5' and 'k-weight-\.50' are the same objective"):
        main([*common, "--objectives", "k-weight-0.5,k-weight-.50", "--training-tokens", "6400"])
    with pytest.raises(SystemExit, match=r"drop the overrides \['sae.hierarchy_weights'\]"):
        main([*common, "--objectives", "uniform", "--set", "sae.hierarchy_weights=[0.5,0.5]"])
    assert not output.exists()


def test_train_at_2k_trains_at_twice_k_and_records_the_served_budget(tmp_path: Path) -> None:
    """The recipe as a named objective: ``k = 2K``, ``served_k = K``, side by side with the uniform SAE at K in one
    suite (evaluated at its own budgets), and recorded in the saved SAE's metadata."""
    assert objective_overrides("train-at-2K", 32, 10) == {
        "hierarchy_levels": None,
        "hierarchy_weights": None,
        "hierarchy_final_weights": None,
        "hierarchy_schedule_steps": 0,
        "hierarchy_sampled_levels": 0,
        "served_k": 32,
        "k": 64,
    }
    output = run(tmp_path, "recipes", overrides=SMALL_SAE, objectives=["uniform", "train-at-2K"])
    report = json.loads((output / "comparison.json").read_text())["saes"]
    assert set(report) >= {"htopk-k8-uniform", "htopk-k16-train-at-2K"}
    assert [row["k"] for row in report["htopk-k16-train-at-2K"]["results"]][-1] == 16
    saved = json.loads((output / "saes" / "htopk-k16-train-at-2K" / "cfg.json").read_text())
    assert saved["k"] == 16 and saved["metadata"]["training_architecture_details"]["served_k"] == 8
    with pytest.raises(ValueError, match=r"served_k must be None or an int in 1\.\.K=8; got 9"):
        HierarchicalTopKTrainingSAEConfig(d_in=4, d_sae=64, k=8, served_k=9)
