"""Configuring a run as a researcher does: any hook and context, every runner field by --set (the job, runner_cfg.json
and the SAE's metadata agreeing, and the trained SAE behaving as they say), rerunning a saved config offline, and
every bad setting refused with one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_hierarchical import load_sae, presets
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.evaluation import evaluate_over_k

TINY = presets.get_preset(presets.TINY_MODEL_NAME)
QUICK = ["--preset", "tiny-random", "--eval-tokens", "1000", "--downstream-tokens", "0", "--wandb", "disabled"]
SMALL = ["--set", "sae.d_sae=64", "--set", "sae.k=8"]


def train(tmp_path: Path, name: str, *arguments: str) -> Path:
    output = tmp_path / name
    main(["train", *QUICK, *SMALL, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(output), *arguments])
    return output


def records(output: Path) -> tuple[dict, dict, dict]:
    """``(job.json, runner_cfg.json, cfg.json's metadata)`` of a train job's results."""
    job = json.loads((output / "job.json").read_text())
    runner = json.loads((output / "sae" / "runner_cfg.json").read_text())
    metadata = json.loads((output / "sae" / "cfg.json").read_text())["metadata"]
    return job, runner, metadata


HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]  # both 32 wide in the tiny model (4 heads of 8)


@pytest.mark.parametrize("hook", HOOKS)
def test_any_hook_of_the_model(tmp_path: Path, hook: str) -> None:
    """``--hook``: its own activation cache, d_in from the model's widths, recorded everywhere; the SAE learnt that
    hook's activations (it reconstructs them better than the other hook's, flattened per token)."""
    output = train(tmp_path, "run", "--hook", hook, "--training-tokens", "8192")
    _, runner, metadata = records(output)
    assert runner["hook_name"] == metadata["hook_name"] == hook
    sae = load_sae(output / "sae")
    assert sae.cfg.d_in == 32
    assert any(hook in path.name for path in (tmp_path / "cache").iterdir())
    model = TINY.load_model("cpu")
    tokens = presets.tiny_token_dataset(64, 32, seed=9)[:]["input_ids"]
    fvu = {}
    for other in HOOKS:
        acts = presets.collect_activations(model, torch.as_tensor(tokens), other).flatten(start_dim=1)
        fvu[other] = evaluate_over_k(sae, acts.reshape(-1, 32), [8], progress=False)[0].fvu
    assert fvu[hook] < min(value for name, value in fvu.items() if name != hook), fvu


def test_layer_is_a_shorthand_and_context_size_changes_the_sequences(tmp_path: Path) -> None:
    output = train(tmp_path, "run", "--layer", "0", "--set", "context_size=16", "--training-tokens", "2048")
    _, runner, metadata = records(output)
    assert runner["hook_name"] == metadata["hook_name"] == "blocks.0.hook_resid_pre"  # the preset's kind of hook
    assert runner["context_size"] == metadata["context_size"] == 16
    assert any("blocks.0.hook_resid_pre" in path.name for path in (tmp_path / "cache").iterdir())


def test_seed_and_token_count_set_by_set_reach_the_training(tmp_path: Path) -> None:
    """``--set seed=3`` is the seed (other weights than seed 0; the same as --seed 3) and ``--set
    training_tokens=3072`` the token count (12 steps of 256): job.json, runner_cfg.json and the metadata agree."""
    by_set = train(tmp_path, "by-set", "--set", "seed=3", "--set", "training_tokens=3072")
    by_flag = train(tmp_path, "by-flag", "--seed", "3", "--training-tokens", "3072")
    seed_0 = train(tmp_path, "seed-0", "--training-tokens", "3072")
    weights = {name: load_file(path / "sae" / "sae_weights.safetensors") for name, path in
               (("set", by_set), ("flag", by_flag), ("zero", seed_0))}  # fmt: skip
    for tensor in weights["set"]:
        torch.testing.assert_close(weights["set"][tensor], weights["flag"][tensor], rtol=0, atol=0)
    assert not torch.equal(weights["set"]["W_dec"], weights["zero"]["W_dec"])
    job, runner, _ = records(by_set)
    assert job["seed"] == runner["seed"] == 3
    assert job["training_tokens"] == runner["training_tokens"] == 3072
    assert runner["logger"]["log_to_wandb"] is False


def test_nested_fields_and_owned_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = train(tmp_path, "run", "--training-tokens", "2048", "--set", "logger.wandb_log_frequency=7")
    assert records(output)[1]["logger"]["wandb_log_frequency"] == 7
    for arguments, message in [
        (["--set", "model_name=gpt2"], "model_name cannot be set with --set: choose the model with --preset"),
        (["--set", "dataset_path=x"], "dataset_path cannot be set with --set: choose the corpus with --preset"),
        (["--set", "training_tokens=3000", "--training-tokens", "5000"], "training_tokens is set twice"),
        (["--set", "seed=1", "--seed", "2"], "seed is set twice"),
        (["--set", "logger=3"], "logger is a group of settings; set its fields"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            train(tmp_path, "bad", *arguments)
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--set", "lr=-1e-3"], "lr must be a finite number >= 0; got -0.001"),
        (["--set", "lr=abc"], "lr must be a number; got 'abc'"),
        (["--set", "train_batch_size_tokens=0"], "train_batch_size_tokens must be an int >= 1; got 0"),
        (["--device", "cuda"], "device 'cuda': this torch has no CUDA device available"),
        (["--device", "tpu9"], "device must be a torch device"),
        (["--set", "sae.hierarchy_levels=2,1"], "strictly increasing"),
        (["--set", "sae.hierarchy_levels=2,x"], "sae.hierarchy_levels[1] must be an int; got 'x'"),
        (["--hook", "blocks.5.hook_resid_post"], "layer 5 does not exist: the model has layers 0..1"),
        (["--hook", "blocks.0.hook_nothing"], "hook must be blocks.<0..1>."),
        (["--set", "context_size=1"], "context_size must be an int in 2..128"),
        (["--training-tokens", "100"], "less than one batch"),
    ],
)
def test_bad_settings_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path, "bad", *arguments)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bad").exists(), "refused before caching"


def test_hierarchy_levels_as_a_comma_list(tmp_path: Path) -> None:
    output = train(tmp_path, "run", "--training-tokens", "2048", "--set", "sae.hierarchy_levels=2,4,8")
    details = json.loads((output / "sae" / "cfg.json").read_text())["metadata"]["training_architecture_details"]
    assert details["hierarchy_levels"] == [2, 4, 8]


def test_a_saved_runner_config_reruns_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``train --config`` of the package's own runner_cfg.json: the embedded preset's loaders and cache, the same
    settings (hook, context, levels, lr, tokens, seed), the same SAE, and the per-k report; flags apply on top."""
    first = train(
        tmp_path, "first", "--layer", "0", "--seed", "2", "--training-tokens", "2048", "--set", "lr=0.002",
        "--set", "sae.hierarchy_levels=4,8",
    )  # fmt: skip
    capsys.readouterr()
    config = first / "sae" / "runner_cfg.json"
    rerun = tmp_path / "rerun"
    main(
        [
            "train",
            "--config",
            str(config),
            *QUICK[2:],
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output-dir",
            str(rerun),
        ]
    )
    assert "Held-out reconstruction at every budget k" in capsys.readouterr().out
    assert (rerun / "per_k.md").is_file()
    ours, theirs = (load_file(path / "sae" / "sae_weights.safetensors") for path in (rerun, first))
    for tensor in theirs:
        torch.testing.assert_close(ours[tensor], theirs[tensor], rtol=0, atol=0)
    _, runner, _ = records(rerun)
    assert (runner["hook_name"], runner["seed"], runner["lr"]) == ("blocks.0.hook_resid_pre", 2, 0.002)
    on_top = tmp_path / "on-top"
    main(
        ["train", "--config", str(config), *QUICK[2:], "--cache-dir", str(tmp_path / "cache"),
         "--output-dir", str(on_top), "--seed", "5", "--set", "lr=0.001"]
    )  # fmt: skip
    _, runner, _ = records(on_top)
    assert (runner["seed"], runner["lr"], runner["training_tokens"]) == (5, 0.001, 2048)


def test_records_carry_no_scratch_or_machine_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Everything a train job writes (SAE config, runner config, job record, report, wandb's offline run metadata) and
    an export of it, scanned for this run's directories: none appears; the wandb line names where the run is."""
    output = tmp_path / "run"
    main(
        ["train", *QUICK[:-2], *SMALL, "--training-tokens", "2048", "--wandb", "offline",
         "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(output)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert f"wandb sync {output}" in printed and ".partial-" not in printed
    main(["export", str(output / "sae"), str(tmp_path / "topk"), "--k", "4"])
    scanned = [*output.rglob("*.json"), *output.rglob("*.md"), *(tmp_path / "topk").rglob("*.json")]
    assert any(path.name == "runner_cfg.json" for path in scanned)
    for path in scanned:
        text = path.read_text()
        for location in (str(tmp_path), ".partial-", str(Path.home() / ".cache")):
            assert location not in text, f"{path.relative_to(tmp_path)} names {location}"


def test_the_readme_evaluation_snippet_runs_as_written(tmp_path: Path) -> None:
    """The README's code block, with only its first line (which preset, which SAE) pointed at the tiny model."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- snippet: evaluate[^\n]*\n```python\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    code = block.group(1)
    assert 'PRESET, SAE_DIR = "gemma-3-270m", "results/gemma-3-270m/sae"' in code
    output = train(tmp_path, "run", "--training-tokens", "2048", "--set", "sae.k=64", "--set", "sae.d_sae=128")
    code = code.replace('"gemma-3-270m", "results/gemma-3-270m/sae"', f'"tiny-random", "{output / "sae"}"')
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    results = namespace["results"]
    assert [row.k for row in results] == [1, 4, 16, 64] and all(row.ce_loss_score is not None for row in results)
    assert [row.mean_l0_target for row in namespace["by_mean_l0"]] == [2, 8]
