"""The command line: train/evaluate/cache on the tiny preset; errors are one line; nothing half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file

from sae_lens_hierarchical import HierarchicalTopKSAE, load_sae, presets
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.jobs import prepare_embedded_activations

TINY_TRAIN = ["--preset", "tiny-random", "--training-tokens", "8000", "--eval-tokens", "2000", "--wandb", "disabled"]


def metrics_by_hand(sae_dir: Path, activations: torch.Tensor, ks: list[int]) -> dict[int, dict[str, float]]:
    """``{k: {"fvu", "mse", "l0", "alive_fraction"}}`` in float64 from the saved ``cfg.json`` and weights alone, not
    the package's SAE or evaluation: rank by ``(x - b_dec) @ W_enc + b_enc`` (times decoder norms when rescaling), keep
    the top k."""
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg.get("normalize_activations", "none") == "none", "activations must be in the SAE's units"
    weights = {name: t.double() for name, t in load_file(sae_dir / "sae_weights.safetensors").items()}
    W_enc, b_enc, W_dec, b_dec = (weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = activations.double()
    scores = (x - b_dec * cfg.get("apply_b_dec_to_input", True)) @ W_enc + b_enc
    norms = W_dec.norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm", False) else torch.ones(W_dec.shape[0])
    values, indices = (scores * norms).topk(max(ks), dim=-1, sorted=True)
    acts = values.relu()
    total_variance = (x - x.mean(dim=0)).pow(2).sum()
    metrics = {}
    for k in ks:
        coefficients = acts[:, :k] / norms[indices[:, :k]]
        reconstruction = b_dec + torch.einsum("tk,tkd->td", coefficients, W_dec[indices[:, :k]])
        squared_error = (x - reconstruction).pow(2).sum()
        metrics[k] = {
            "fvu": float(squared_error / total_variance),
            "mse": float(squared_error / x.shape[0]),
            "l0": float((acts[:, :k] > 0).sum(dim=-1).double().mean()),
            "alive_fraction": indices[:, :k][acts[:, :k] > 0].unique().numel() / W_dec.shape[0],
        }
    return metrics


def assert_rows_match(rows: list[dict], expected: dict[int, dict[str, float]]) -> None:
    """Recorded per-k rows (a report's JSON) against :func:`metrics_by_hand`; explained variance is 1 - FVU."""
    assert [row["k"] for row in rows] == sorted(expected)
    for row in rows:
        for name, value in expected[row["k"]].items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-7), f"{name} at k={row['k']}"
        assert row["explained_variance"] == pytest.approx(1 - row["fvu"], rel=1e-9, abs=1e-12)


def assert_png_shows_a_plot(path: Path) -> None:
    """The file decodes as an image of plausible size with more than a blank background drawn on it."""
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 100 and image.shape[1] >= 100, image.shape
    colours = torch.from_numpy(image[..., :3].reshape(-1, 3).copy()).unique(dim=0)
    assert len(colours) > 10, f"{path.name} looks blank ({len(colours)} colours)"


def held_out(eval_tokens: int, cache: Path) -> torch.Tensor:
    """The held-out activations the jobs evaluate on (read back from the jobs' cache)."""
    tiny = presets.get_preset(presets.TINY_MODEL_NAME)
    activations = prepare_embedded_activations(
        tiny, tiny.load_model("cpu"), eval_tokens, cache_root=cache, progress=False
    )
    return activations.held_out_activations()


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
    assert {p.name for p in output.iterdir()} == {
        "sae",
        "per_k.md",
        "per_k.json",
        "per_k.png",
        "mean_l0.png",
        "job.json",
    }
    report = json.loads((output / "per_k.json").read_text())
    rows = report["per_k"]
    by_threshold = report["per_mean_l0"]
    assert [row["mean_l0_target"] for row in by_threshold] == [1, 2, 4]  # served by threshold below K
    for row in by_threshold:  # calibrated on the evaluated text: the target, up to a tie or one token
        assert row["l0"] == pytest.approx(row["mean_l0_target"], abs=0.01) and row["l0_max"] > row["mean_l0_target"]
    assert "Served by one threshold per target mean L0" in (output / "per_k.md").read_text()
    assert_png_shows_a_plot(output / "mean_l0.png")
    activations = held_out(2000, cache)
    by_hand = metrics_by_hand(output / "sae", activations, [1, 2, 4, 8])
    assert_rows_match(rows, by_hand)
    assert [row["l0"] for row in rows] == pytest.approx([1, 2, 4, 8], abs=0.05), "a trained SAE fills its budget"
    # the markdown table's FVU column (4 decimals) is the same numbers
    first_table = (output / "per_k.md").read_text().split("\n\n")[0]
    table_rows = [line.split("|")[1:-1] for line in first_table.splitlines()]
    fvu_column = {
        int(cells[0]): float(cells[2]) for cells in table_rows if len(cells) > 2 and cells[0].strip().isdigit()
    }
    assert fvu_column == pytest.approx({k: round(metrics["fvu"], 4) for k, metrics in by_hand.items()}, abs=1.01e-4)
    assert_png_shows_a_plot(output / "per_k.png")
    sae = load_sae(output / "sae")
    assert isinstance(sae, HierarchicalTopKSAE)
    assert (sae.cfg.k, sae.cfg.d_sae) == (8, 64)
    runner_cfg = json.loads((output / "sae" / "runner_cfg.json").read_text())
    assert runner_cfg["lr"] == 0.001
    assert "use_cached_activations" not in runner_cfg and "output_path" not in runner_cfg  # where, not what
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
    evaluated = json.loads((tmp_path / "eval" / "per_k.json").read_text())["per_k"]
    assert_rows_match(evaluated, {k: by_hand[k] for k in (2, 8)})
    assert evaluated[1] == pytest.approx(rows[-1]), "evaluate must reproduce the training job's numbers at k=8"

    # JumpReLU exports at two mean L0s, calibrated on the preset's held-out text; evaluated as saved they have it
    exports, common = tmp_path / "jumprelu", ["--eval-tokens", "2000", "--cache-dir", str(cache)]
    main(["export", str(output / "sae"), str(exports), "--mean-l0", "2,3.5", *common])
    assert "JumpReLU SAE at mean L0 3.5" in capsys.readouterr().out
    for mean_l0 in (2, 3.5):
        cfg = json.loads((exports / f"mean_l0_{mean_l0:g}" / "cfg.json").read_text())
        calibration = cfg["metadata"]["hierarchical_topk_export"]["calibration"]
        assert cfg["architecture"] == "jumprelu" and calibration["mean_l0"] == pytest.approx(mean_l0, abs=0.01)
    main(
        [
            "evaluate",
            str(exports / "mean_l0_2"),
            *common,
            "--downstream-tokens",
            "0",
            "--output-dir",
            str(tmp_path / "e"),
        ]
    )
    as_saved = json.loads((tmp_path / "e" / "per_k.json").read_text())["per_mean_l0"]
    assert [row["threshold"] for row in as_saved] == [None] and as_saved[0]["l0"] == pytest.approx(2, abs=0.01)
    assert "as saved" in capsys.readouterr().out
    main(
        [
            "upload",
            str(output / "sae"),
            "owner/name",
            "--jumprelu-mean-l0",
            "2",
            *common,
            "--dry-run",
            str(tmp_path / "repo"),
        ]
    )
    uploaded = sorted(p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("cfg.json"))
    assert uploaded == [f"{presets.TINY_HOOK_NAME}/cfg.json", f"{presets.TINY_HOOK_NAME}/jumprelu_mean_l0_2/cfg.json"]
    assert f"`{presets.TINY_HOOK_NAME}/jumprelu_mean_l0_2`" in (tmp_path / "repo" / "README.md").read_text()


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
        (["--set", "sae.nonsense=1"], r"unknown field 'sae.nonsense'"),
        (["--set", "learning_rate=1"], r"unknown field 'learning_rate'"),
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
    rows = json.loads((tmp_path / "eval" / "per_k.json").read_text())["per_k"]
    assert_rows_match(rows, metrics_by_hand(tmp_path / "topk", held_out(2000, tmp_path / "cache"), [2, 8]))
    assert f"| 2 | {rows[0]['l0']:.2f} |" in capsys.readouterr().out
    assert all(row["ce_loss_score"] is not None for row in rows)


def test_checkpoint_path_gets_one_run_id(tmp_path: Path) -> None:
    """``--set checkpoint_path=ckpt`` writes ``ckpt/<run id>/<tokens>`` (SAELens appends one id), not an id per
    internal copy of the config."""
    ckpt = tmp_path / "ckpt"
    main(
        [
            "train",
            *TINY_TRAIN,
            "--output-dir",
            str(tmp_path / "run"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--set",
            f"checkpoint_path={ckpt}",
            "--set",
            "n_checkpoints=1",
        ]
    )
    runs = list(ckpt.iterdir())
    assert len(runs) == 1 and len(runs[0].name) == 8, runs  # the run id
    checkpoints = sorted(p.name for p in runs[0].iterdir())
    assert checkpoints and all(name.isdigit() or name.startswith("final_") for name in checkpoints), checkpoints
    recorded = json.loads((tmp_path / "run" / "sae" / "runner_cfg.json").read_text())["checkpoint_path"]
    assert recorded == str(runs[0])


def test_float16_training_is_refused_before_any_work(tmp_path: Path) -> None:
    """Adam's eps (1e-8) is 0 in float16: SAELens's step would write NaN weights and exit 0. One line, nothing
    written."""
    with pytest.raises(SystemExit, match=r"dtype='float16'.*bfloat16"):
        main(
            [
                "train",
                *TINY_TRAIN,
                "--set",
                "sae.dtype=float16",
                "--output-dir",
                str(tmp_path / "run"),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
    assert list(tmp_path.iterdir()) == []
