"""The baseline suite: fair training (same init, same batches), a report that matches re-evaluation, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_hierarchical import HierarchicalTopKSAE, load_sae, presets
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.jobs import (
    SuiteMember,
    baseline_suite,
    prepare_embedded_activations,
    run_comparison_job,
    train_suite,
)
from tests.test_cli import assert_png_shows_a_plot, assert_rows_match, held_out, metrics_by_hand

TINY = presets.get_preset(presets.TINY_MODEL_NAME)
SMALL_SAE = {"sae.d_sae": 64, "sae.k": 8}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "sae_weights.safetensors")


def test_default_suite_members() -> None:
    members = {m.name: m for m in baseline_suite(64, [8, 16, 32, 64])}
    assert list(members) == [
        "htopk-k64",
        "topk-k8",
        "topk-k16",
        "topk-k32",
        "topk-k64",
        "batchtopk-k8",
        "batchtopk-k16",
        "batchtopk-k32",
        "batchtopk-k64",
        "matryoshka-k64",
        "multi-topk-k16-k64",
    ]
    assert members["htopk-k64"].sae_overrides == {}
    assert members["htopk-k64"].eval_ks == [1, 2, 4, 8, 16, 32, 64]
    assert members["htopk-k64"].mean_l0s == [1, 2, 4, 8, 16, 32]  # served by threshold below K
    assert members["batchtopk-k16"].architecture == "batchtopk" and members["batchtopk-k16"].sae_overrides == {"k": 16}
    assert members["batchtopk-k16"].eval_ks == [] and members["batchtopk-k16"].mean_l0s == [16]
    assert members["batchtopk-k16"].as_saved and members["matryoshka-k64"].as_saved
    assert members["matryoshka-k64"].architecture == "matryoshka_batchtopk"
    assert members["matryoshka-k64"].mean_l0s == [1, 2, 4, 8, 16, 32]
    assert members["topk-k16"].mean_l0s == [] and not members["topk-k16"].as_saved
    assert members["topk-k16"].sae_overrides == {
        "k": 16,
        "hierarchy_levels": [16],
        "hierarchy_weights": None,
        "hierarchy_final_weights": None,
        "hierarchy_schedule_steps": 0,
        "hierarchy_sampled_levels": 0,
        "served_k": None,
    }
    assert members["topk-k16"].eval_ks == [16]
    assert members["topk-k64"].family == "topk_truncated"
    assert members["topk-k64"].eval_ks == [1, 2, 4, 8, 16, 32, 64]
    assert members["multi-topk-k16-k64"].sae_overrides["hierarchy_weights"] == [1.0, 0.125]
    assert [m.name for m in baseline_suite(64, [8], ("topk",))] == ["htopk-k64", "topk-k8", "topk-k64"]


@pytest.mark.parametrize(
    ("budgets", "baselines", "message"),
    [([0, 8], ("topk",), "1..K=64"), ([128], ("topk",), "1..K=64"), ([8], ("batch_topk",), "unknown baselines")],
)
def test_bad_suites_name_the_value(budgets: list[int], baselines: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        baseline_suite(64, budgets, baselines)


@pytest.mark.parametrize("source", ["cache", "language_model"])
def test_suite_members_start_identical_and_see_identical_batches(tmp_path: Path, source: str) -> None:
    """Two identically configured members end bit-identical; a TopK member at K equals HTopK with levels=[K]."""
    model = TINY.load_model("cpu")
    cfg = TINY.runner_config(None, training_tokens=12_800, sae_overrides={"d_sae": 64, "k": 8})
    members = [
        SuiteMember("topk-a", "topk_fixed", {"k": 4, "hierarchy_levels": [4]}, [4]),
        SuiteMember("topk-b", "topk_fixed", {"k": 4, "hierarchy_levels": [4]}, [4]),
        SuiteMember("htopk", "hierarchical", {}, [8]),
        SuiteMember("topk-at-K", "topk_truncated", {"hierarchy_levels": [8]}, [8]),
        SuiteMember("htopk-single-level", "hierarchical", {"hierarchy_levels": [8]}, [8]),
    ]
    if source == "cache":
        activations = prepare_embedded_activations(
            TINY, model, 1000, 12_800, cache_root=tmp_path / "cache", progress=False
        )
        sae_dirs = train_suite(cfg, members, model, activations, tmp_path / "saes", seed=3)
    else:
        dataset = presets.tiny_token_dataset(500, TINY.context_size, seed=0)
        sae_dirs = train_suite(cfg, members, model, None, tmp_path / "saes", seed=3, dataset=dataset)
    trained = {name: weights(directory) for name, directory in sae_dirs.items()}
    for name in trained["topk-a"]:
        torch.testing.assert_close(trained["topk-a"][name], trained["topk-b"][name], rtol=0, atol=0)
        torch.testing.assert_close(trained["topk-at-K"][name], trained["htopk-single-level"][name], rtol=0, atol=0)
    assert not torch.equal(trained["htopk"]["W_dec"], trained["topk-at-K"]["W_dec"]), "objectives must differ"
    for name, directory in sae_dirs.items():
        sae = load_sae(directory)
        assert isinstance(sae, HierarchicalTopKSAE)
        assert sae.cfg.metadata.hook_name == TINY.hook_name
        assert (directory / "sparsity.safetensors").is_file(), name


def test_comparison_job_report_matches_reevaluation(tmp_path: Path) -> None:
    output, cache = tmp_path / "comparison", tmp_path / "cache"
    result = run_comparison_job(
        TINY,
        output,
        budgets=[2, 8],
        overrides=SMALL_SAE,
        training_tokens=12_800,
        eval_tokens=3000,
        downstream_tokens=256,
        cache_root=cache,
        progress=False,
    )
    names = ["htopk-k8", "topk-k2", "topk-k8", "batchtopk-k2", "batchtopk-k8", "matryoshka-k8", "multi-topk-k2-k8"]
    assert sorted(p.name for p in (output / "saes").iterdir()) == sorted(names)
    plots = ["comparison_fvu.png", "comparison_ce.png", "comparison_mean_l0.png"]
    assert {"comparison.md", "comparison.json", "job.json", *plots} <= {p.name for p in output.iterdir()}
    for plot in plots:
        assert_png_shows_a_plot(output / plot)
    report = json.loads((output / "comparison.json").read_text())
    assert list(report["saes"]) == names
    activations = held_out(3000, cache)
    mean_l0 = {name: report["saes"][name]["mean_l0_results"] for name in names}
    assert [r["mean_l0_target"] for r in mean_l0["htopk-k8"]] == [1, 2, 4]
    assert [r["mean_l0_target"] for r in mean_l0["batchtopk-k2"]] == [2, None]  # re-thresholded to k, then as saved
    assert [r["threshold"] is None for r in mean_l0["matryoshka-k8"]] == [False] * 3 + [True]
    for name in ("htopk-k8", "batchtopk-k2", "matryoshka-k8"):
        for row in mean_l0[name]:
            if row["mean_l0_target"] is not None:  # calibrated on these held-out activations: the target, up to ties
                assert row["l0"] == pytest.approx(row["mean_l0_target"], rel=0.01), name
            assert row["ce_loss_score"] is not None
    for name in ["htopk-k8", "topk-k2", "topk-k8", "multi-topk-k2-k8"]:
        recorded = report["saes"][name]["results"]
        # the report's numbers, recomputed in float64 from each saved SAE's weights (not the package's evaluation)
        assert_rows_match(recorded, metrics_by_hand(output / "saes" / name, activations, [r["k"] for r in recorded]))
        assert all(r["ce_loss_score"] is not None for r in recorded)
    assert result.results["topk-k2"][0].k == 2
    assert [r["k"] for r in report["saes"]["topk-k8"]["results"]] == [1, 2, 4, 8]  # truncated to every k
    table = (output / "comparison.md").read_text()
    assert "| 2 |" in table and "CE-loss score" in table and "HierarchicalTopK against each baseline" in table
    assert "Every SAE by mean L0" in table and "At their own thresholds" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "comparison"], "no scratch directory may be left"


def test_compare_cli_refuses_bad_settings_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    common = ["compare", "--preset", "tiny-random", "--output-dir", str(output), "--cache-dir", str(tmp_path / "c")]
    with pytest.raises(SystemExit, match=r"comparison budgets must be in 1\.\.K=16"):
        main([*common, "--budgets", "4,32"])
    with pytest.raises(SystemExit):
        main([*common, "--baselines", "topk,batch_topk"])
    assert "unknown baselines ['batch_topk']" in capsys.readouterr().err
    assert not output.exists()
    main([*common, "--budgets", "4", "--baselines", "topk", "--training-tokens", "6400", "--downstream-tokens", "0"])
    printed = capsys.readouterr().out
    assert "FVU (lower is better)" in printed and "CE-loss score" not in printed
    assert sorted(p.name for p in (output / "saes").iterdir()) == ["htopk-k16", "topk-k16", "topk-k4"]
    with pytest.raises(SystemExit, match="not empty"):
        main([*common, "--budgets", "4"])


def test_small_comparison_is_bit_reproducible(tmp_path: Path) -> None:
    """Same seed, same batch order, same initial weights: at this size two runs give bit-identical reports."""
    reports = []
    for name in ("first", "second"):
        run_comparison_job(
            TINY,
            tmp_path / name,
            budgets=[4],
            baselines=("topk",),
            overrides=SMALL_SAE,
            training_tokens=6400,
            eval_tokens=2000,
            downstream_tokens=128,
            cache_root=tmp_path / "cache",
            progress=False,
        )
        reports.append(json.loads((tmp_path / name / "comparison.json").read_text()))
    assert reports[0] == reports[1]


def test_baselines_keep_their_fixed_objective_when_htopk_gets_a_schedule() -> None:
    """``compare --set sae.hierarchy_final_weights=[...]`` schedules the HierarchicalTopK SAE only; a single-level or
    Multi-TopK baseline must neither inherit the schedule nor fail on its per-level weights."""
    from dataclasses import replace

    from sae_lens_hierarchical import HierarchicalTopKTrainingSAEConfig

    scheduled = HierarchicalTopKTrainingSAEConfig(
        d_in=4, d_sae=64, k=8, hierarchy_final_weights=[0.0] * 7 + [1.0], hierarchy_schedule_steps=10
    )
    for member in baseline_suite(8, [2, 4, 8], ("topk", "multi_topk")):
        cfg = replace(scheduled, **member.sae_overrides)
        assert (cfg.hierarchy_final_weights is not None) == (member.family == "hierarchical"), member.name


@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in"])
def test_sae_lens_family_members_equal_their_own_class_trained_alone(tmp_path: Path, normalize: str) -> None:
    """BatchTopK and Matryoshka members, trained in lockstep with the rest, end with the weights (and the saved JumpReLU
    threshold) of SAELens's own class trained alone by SAELens's own single-SAE trainer on the same batches, with b_dec
    set by hand to the mean of the first training batch (the suite's ``b_dec_init="mean"``)."""
    from dataclasses import replace

    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_hierarchical.jobs.compare import shuffled_batches

    model = TINY.load_model("cpu")
    overrides = {"d_sae": 64, "k": 8, "b_dec_init": "mean", "normalize_activations": normalize}
    cfg = TINY.runner_config(None, training_tokens=12_800, sae_overrides=overrides, n_batches_for_norm_estimate=5)
    members = [
        SuiteMember("htopk", "hierarchical", {}, [8]),
        SuiteMember("batchtopk-k4", "batchtopk", {"k": 4}, [], architecture="batchtopk"),
        SuiteMember("matryoshka", "matryoshka", {"k": 8}, [], architecture="matryoshka_batchtopk"),
    ]
    activations = prepare_embedded_activations(TINY, model, 1000, 12_800, cache_root=tmp_path / "cache", progress=False)
    sae_dirs = train_suite(cfg, members, model, activations, tmp_path / "saes", seed=3)

    train = activations.train.token_activations(exclude_token_ids=activations.special_token_ids)
    trainer_cfg = replace(cfg.to_sae_trainer_config(), logger=replace(cfg.logger, log_to_wandb=False))
    shared = {"d_in": TINY.d_in, "d_sae": 64, "normalize_activations": normalize}
    references = {
        "batchtopk-k4": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=4, **shared)),
        "matryoshka": MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(k=8, matryoshka_widths=[4, 8, 16, 32, 64], **shared)
        ),
    }
    for name, reference in references.items():
        torch.manual_seed(3)
        reference.load_state_dict(type(reference)(reference.cfg).state_dict())  # the suite's seeded initialisation
        batches = (batch[TINY.hook_name] for batch in shuffled_batches(train, TINY.hook_name, 256, 3))
        trainer = SAETrainer(cfg=trainer_cfg, sae=reference, data_provider=batches)
        original_step = reference.training_forward_pass

        def first_step(step_input: Any, reference: Any = reference, original: Any = original_step) -> Any:
            with torch.no_grad():
                reference.b_dec.copy_(step_input.sae_in.mean(dim=0))  # the scaled first training batch
            reference.training_forward_pass = original
            return original(step_input=step_input)

        reference.training_forward_pass = first_step
        trainer.fit()
        reference.save_inference_model(tmp_path / f"reference-{name}")
        ours, theirs = weights(sae_dirs[name]), weights(tmp_path / f"reference-{name}")
        assert sorted(ours) == sorted(theirs) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        for tensor in ours:
            torch.testing.assert_close(ours[tensor], theirs[tensor], rtol=1e-6, atol=1e-7, msg=f"{name}: {tensor}")
        saved = json.loads((sae_dirs[name] / "cfg.json").read_text())
        assert saved["architecture"] == "jumprelu" and saved["metadata"]["hook_name"] == TINY.hook_name
        assert float(ours["threshold"].min()) == float(ours["threshold"].max()) > 0  # one global threshold
