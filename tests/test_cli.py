"""The command line: train/evaluate/cache on the tiny preset; errors are one line; nothing half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sae_lens_hierarchical import HierarchicalTopKSAE, load_sae, presets
from sae_lens_hierarchical.cli import main

TINY_TRAIN = ["--preset", "tiny-random", "--training-tokens", "8000", "--eval-tokens", "2000", "--wandb", "disabled"]


def test_train_writes_loadable_sae_report_and_reuses_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output, cache = tmp_path / "run", tmp_path / "cache"
    main(
        [
            "train",
            *TINY_TRAIN,
            "--output-dir",
            str(output),
            "--cache-dir",
            str(cache),
            "--set",
            "sae.k=8",
            "--set",
            "sae.d_sae=64",
            "--set",
            "lr=0.001",
        ]
    )
    printed = capsys.readouterr().out
    assert "| k | L0 | FVU |" in printed
    assert {p.name for p in output.iterdir()} == {"sae", "per_k.md", "per_k.json", "per_k.png", "job.json"}
    rows = json.loads((output / "per_k.json").read_text())
    assert [row["k"] for row in rows] == [1, 2, 4, 8]
    assert [row["l0"] for row in rows] == pytest.approx([1, 2, 4, 8])
    assert (output / "per_k.png").read_bytes().startswith(b"\x89PNG")
    sae = load_sae(output / "sae")
    assert isinstance(sae, HierarchicalTopKSAE)
    assert (sae.cfg.k, sae.cfg.d_sae) == (8, 64)
    runner_cfg = json.loads((output / "sae" / "runner_cfg.json").read_text())
    assert runner_cfg["lr"] == 0.001
    assert runner_cfg["use_cached_activations"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"], "no scratch directory may be left"

    main(
        [
            "evaluate",
            str(output / "sae"),
            "--ks",
            "2,8",
            "--eval-tokens",
            "2000",
            "--cache-dir",
            str(cache),
            "--output-dir",
            str(tmp_path / "eval"),
        ]
    )
    table = capsys.readouterr().out
    assert "| 2 | 2.00 |" in table and "| 8 | 8.00 |" in table
    evaluated = json.loads((tmp_path / "eval" / "per_k.json").read_text())
    assert evaluated[1] == pytest.approx(rows[-1]), "evaluate must reproduce the training job's numbers at k=8"


def test_errors_are_one_line_and_leave_nothing_behind(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["train", *TINY_TRAIN, "--output-dir", str(existing)])
    assert (existing / "keep.txt").read_text() == "precious"

    bad = [
        (["--set", "sae.k=100", "--set", "sae.d_sae=64"], r"1..d_sae=64; got k=100"),
        (["--set", "sae.hierarchy_levels=[2,1]"], r"strictly increasing"),
        (["--set", "sae.nonsense=1"], r"unknown SAE field 'sae.nonsense'"),
        (["--set", "learning_rate=1"], r"unknown runner field 'learning_rate'"),
        (["--preset", "gpt-9"], r"unknown preset 'gpt-9'; choose one of"),
    ]
    for extra, message in bad:
        with pytest.raises(SystemExit, match=message):
            main(["train", *TINY_TRAIN, "--output-dir", str(tmp_path / "bad"), *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    with pytest.raises(SystemExit, match="no SAE at"):
        main(["evaluate", str(tmp_path / "missing")])


def test_wandb_offline_run_lands_in_the_results_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_DIR", raising=False)
    output = tmp_path / "run"
    options = [option if option != "disabled" else "offline" for option in TINY_TRAIN]
    main(["train", *options, "--output-dir", str(output), "--cache-dir", str(tmp_path / "cache"), "--set", "sae.k=4"])
    assert list((output / "wandb").glob("offline-run-*")), "the offline wandb run belongs to the results"
    assert "WANDB_DIR" not in os.environ, "the job must not leave wandb settings behind"


def test_evaluate_accepts_a_sae_lens_topk_sae(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate` works on any TopK-family SAE (truncated to each k), matched to its preset by metadata."""
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=32, d_sae=64, k=8)
    cfg.metadata.model_name, cfg.metadata.hook_name = presets.TINY_MODEL_NAME, presets.TINY_HOOK_NAME
    TopKSAE(cfg).save_model(tmp_path / "topk")
    main(
        [
            "evaluate",
            str(tmp_path / "topk"),
            "--ks",
            "2,8",
            "--eval-tokens",
            "2000",
            "--downstream-tokens",
            "64",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output-dir",
            str(tmp_path / "eval"),
        ]
    )
    assert "| 2 | 2.00 |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "eval" / "per_k.json").read_text())
    assert [row["k"] for row in rows] == [2, 8]
    assert all(row["ce_loss_score"] is not None for row in rows)
