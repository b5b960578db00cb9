"""The command line under generated input: every invocation either stops with exit code 2 and one line (a bad
setting, a missing file), gets as far as loading a model, or (an export) succeeds: never a traceback.

Hypothesis draws invocations from the CLI's own grammar (each subcommand's options, with values that are valid, out of
range, of the wrong type, or not there at all). Loading a model is where real work starts, so the presets' model
loaders are replaced by one that stops the invocation there: what this test checks is everything before it.
"""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_lens_hierarchical import HierarchicalTopKSAE, HierarchicalTopKSAEConfig, presets
from sae_lens_hierarchical.cli import main


class WouldWork(Exception):
    """Raised where the invocation would load a model: it passed every check before the work."""


def _stop_at_the_model(device: str) -> None:
    raise WouldWork(device)


NUMBERS = st.sampled_from(
    ["0", "1", "-1", "3", "64", "4096", "1e-3", "-2.5", "abc", "", "nan", "inf", "1,2", "9999999"]
)
WORDS = st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "x", "", "tiny-random", "gemma-3-270m", "none"])
HOOKS = st.sampled_from(
    ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.9.hook_resid_post", "blocks.0.hook_nope", "resid"]
)
SET_VALUES = st.tuples(
    st.sampled_from(
        [
            "lr",
            "seed",
            "training_tokens",
            "train_batch_size_tokens",
            "context_size",
            "sae.k",
            "sae.d_sae",
            "sae.hierarchy_levels",
            "sae.dtype",
            "sae.normalize_activations",
            "logger.log_to_wandb",
            "logger",
            "model_name",
            "nonsense",
            "sae.nonsense",
            "n_batches_in_buffer",
            "adam_beta1",
            "hook_name",
            "device",
        ]
    ),
    st.sampled_from(["1", "0", "-1", "abc", "2,4,8", "[2,4]", "true", "float16", "none", "1e-3", "", "{}", "8,x"]),
).map(lambda pair: f"{pair[0]}={pair[1]}")


def options(sae_dir: str) -> dict[str, st.SearchStrategy[list[str]]]:
    """Each subcommand's grammar: its positional arguments, then any of its options with a drawn value."""
    paths = st.sampled_from([sae_dir, "missing/dir", "", "owner/name"])
    flags = {
        "--preset": WORDS,
        "--training-tokens": NUMBERS,
        "--eval-tokens": NUMBERS,
        "--downstream-tokens": NUMBERS,
        "--device": WORDS,
        "--seed": NUMBERS,
        "--set": SET_VALUES,
        "--hook": HOOKS,
        "--layer": NUMBERS,
        "--budgets": NUMBERS,
        "--baselines": st.sampled_from(["topk", "batchtopk,matryoshka", "bogus", ""]),
        "--objectives": st.sampled_from(["uniform", "train-at-2K", "sampled-3", "nope", "uniform,uniform"]),
        "--ks": NUMBERS,
        "--mean-l0": NUMBERS,
        "--k": NUMBERS,
        "--threshold": NUMBERS,
        "--checkpoints": NUMBERS,
        "--l0-percentile": NUMBERS,
        "--config": paths,
        "--init-from": paths,
        "--objective": st.sampled_from(["uniform", "train-at-2K", "zzz"]),
    }

    def command(name: str, positional: st.SearchStrategy[list[str]], allowed: list[str]) -> st.SearchStrategy:
        drawn = st.lists(st.sampled_from(allowed), max_size=4).flatmap(
            lambda chosen: st.tuples(*[flags[flag].map(lambda value, flag=flag: [flag, value]) for flag in chosen])
        )
        return st.tuples(positional, drawn).map(
            lambda parts: [name, *parts[0], *(x for pair in parts[1] for x in pair)]
        )

    no_positional = st.just([])
    common = ["--preset", "--training-tokens", "--eval-tokens", "--device", "--seed", "--set", "--hook", "--layer"]
    return {
        "train": command("train", no_positional, [*common, "--downstream-tokens", "--config", "--objective"]),
        "compare": command(
            "compare",
            no_positional,
            [*common, "--budgets", "--baselines", "--objectives", "--checkpoints", "--init-from"],
        ),
        "cache": command(
            "cache", no_positional, ["--preset", "--training-tokens", "--eval-tokens", "--hook", "--layer"]
        ),
        "evaluate": command("evaluate", paths.map(lambda p: [p]), ["--preset", "--ks", "--mean-l0", "--eval-tokens"]),
        "export": command(
            "export", st.tuples(paths, st.just("OUT")).map(list), ["--k", "--mean-l0", "--threshold", "--preset"]
        ),
        "hierarchicalize": command(
            "hierarchicalize",
            paths.map(lambda p: [p]),
            ["--preset", "--training-tokens", "--k", "--l0-percentile", "--set"],
        ),
    }


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("fuzz") / "sae"
    cfg = HierarchicalTopKSAEConfig(d_in=32, d_sae=64, k=8)
    cfg.metadata.model_name, cfg.metadata.hook_name = presets.TINY_MODEL_NAME, presets.TINY_HOOK_NAME
    HierarchicalTopKSAE(cfg).save_model(directory)
    return str(directory)


def test_500_generated_invocations_never_end_in_a_traceback(
    sae_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, preset in list(presets.PRESETS.items()):
        monkeypatch.setitem(presets.PRESETS, name, dataclasses.replace(preset, load_model=_stop_at_the_model))
    monkeypatch.chdir(tmp_path)  # default output directories land here
    outcomes = {"refused": 0, "would work": 0, "done": 0}
    grammar = options(sae_dir)

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(sorted(grammar)).flatmap(lambda name: grammar[name]))
    def invoke(argv: list[str]) -> None:
        err = io.StringIO()
        run = sum(outcomes.values())
        argv = [str(tmp_path / f"out{run}") if part == "OUT" else part for part in argv]  # a fresh export directory
        try:
            with redirect_stderr(err), redirect_stdout(io.StringIO()):
                main([*argv, "--cache-dir", str(tmp_path / "cache")] if argv[0] != "export" else argv)
        except WouldWork:
            outcomes["would work"] += 1
            return
        except SystemExit as stopped:
            text = err.getvalue()
            assert stopped.code == 2, (argv, stopped.code, text[-500:])
            assert "Traceback" not in text, (argv, text)
            assert text.strip().splitlines()[-1].startswith(("error:", "usage:")) or ": error: " in text, (argv, text)
            outcomes["refused"] += 1
            return
        outcomes["done"] += 1  # a valid invocation that needs no model (an export at a threshold or k)

    invoke()
    assert sum(outcomes.values()) >= 500 and outcomes["refused"] > 100 and outcomes["would work"] > 20, outcomes
