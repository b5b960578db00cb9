"""The command line's arguments: every subcommand, its options and their types, each checked as it is parsed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sae_lens_hierarchical.data import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.interpretability.probing import DEFAULT_NS
from sae_lens_hierarchical.jobs import (
    BASELINES,
)
from sae_lens_hierarchical.jobs.interpret import MEASURES
from sae_lens_hierarchical.presets import PRESETS

DEFAULT_PRESET = "gemma-3-270m"
DOWNSTREAM_HELP = "held-out tokens for CE-loss/KL scores (0 skips them; default: the preset's)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {value}")
    return value


def _budgets(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part]


def _mean_l0s(text: str) -> list[float]:
    """``2,8.5``: target mean L0s, each a number > 0."""
    values = []
    for part in filter(None, text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"mean L0s must be numbers > 0, comma-separated; got {part!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"a mean L0 must be a finite number > 0; got {part!r}")
        values.append(int(value) if value.is_integer() else value)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one mean L0")
    return values


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0; got {value}")
    return value


def _latents(text: str) -> list[int]:
    """``0-99,512``: latent ids and inclusive ranges, comma-separated."""
    latents = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected ids and ranges such as 0-99,512; got {part!r}") from None
        if not 0 <= low <= high:
            raise argparse.ArgumentTypeError(f"a range must be low-high with 0 <= low <= high; got {part!r}")
        latents += range(low, high + 1)
    return latents


def _measures(text: str) -> tuple[str, ...]:
    names = tuple(part for part in text.split(",") if part)
    unknown = sorted(set(names) - set(MEASURES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown measures {unknown}; allowed: {list(MEASURES)}")
    return names


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(part for part in text.split(",") if part)
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baselines {unknown}; allowed: {','.join(BASELINES)}")
    return names


def _add_override_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a runner field (lr=1e-3) or an SAE field (sae.k=32); repeatable",
    )


def _override(text: str) -> tuple[str, Any]:
    """``name=value``; the value is read as JSON when it parses (numbers, lists, true/false), else as text."""
    name, separator, raw = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected name=value (e.g. sae.k=32 or lr=1e-3); got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def _add_hook_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hook",
        help="the hook to train at, e.g. blocks.3.hook_resid_post, blocks.3.hook_mlp_out, blocks.3.attn.hook_z",
    )
    parser.add_argument("--layer", type=int, help="the preset's kind of hook at this layer (blocks.<layer>.<hook>)")


def _add_held_out_options(parser: argparse.ArgumentParser, purpose: str) -> None:
    """Where held-out activations for ``purpose`` come from: an embedded preset's held-out text."""
    parser.add_argument(
        "--preset", help=f"embedded preset whose held-out text is used for {purpose} (default: the SAE's)"
    )
    parser.add_argument("--eval-tokens", type=_positive_int, help="held-out tokens (default: the preset's)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT)
    parser.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-hierarchical", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    preset_help = f"one of {sorted(PRESETS)} (default {DEFAULT_PRESET})"

    train = commands.add_parser("train", help="cache activations, train, evaluate every budget k")
    train.add_argument("--preset", default=DEFAULT_PRESET, help=preset_help)
    train.add_argument("--config", type=Path, help="a SAELens runner config JSON (instead of a preset)")
    train.add_argument("--output-dir", type=Path, help="results directory (default results/<preset>)")
    _add_override_option(train)
    train.add_argument("--training-tokens", type=_positive_int, help="default: the preset's")
    train.add_argument("--eval-tokens", type=_positive_int, help="held-out tokens (default: the preset's)")
    train.add_argument("--downstream-tokens", type=_non_negative_int, help=DOWNSTREAM_HELP)
    train.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT, help="activation caches")
    train.add_argument(
        "--objective",
        help="a named objective or recipe, e.g. train-at-2K (K' = 2K, serving budgets up to K), k-weight-0.25; names "
        "in sae_lens_hierarchical.objectives (default: the preset's, uniform over 1..K)",
    )
    _add_hook_options(train)
    train.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    train.add_argument("--seed", type=int, help="SAE initialisation and data order (default 0)")
    train.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default="offline",
        help="wandb logging (default offline, into the results directory)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing results directory")

    cache = commands.add_parser("cache", help="cache training and held-out activations of an embedded preset")
    cache.add_argument("--preset", default=DEFAULT_PRESET, help=preset_help)
    cache.add_argument("--training-tokens", type=_positive_int)
    cache.add_argument("--eval-tokens", type=_positive_int)
    cache.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT)
    _add_hook_options(cache)
    cache.add_argument("--device", help="cpu (default), cuda, ...")

    evaluate = commands.add_parser(
        "evaluate", help="per-k table of a saved SAE (any TopK-family SAE: truncated) on its preset's held-out text"
    )
    evaluate.add_argument("sae", help="SAE directory, or a Hugging Face repo id with --sae-id")
    evaluate.add_argument("--sae-id", help="the SAE's folder inside a repo")
    evaluate.add_argument("--preset", help="default: the preset matching the SAE's model and hook")
    evaluate.add_argument("--ks", type=_budgets, help="comma-separated budgets (default powers of two and K)")
    evaluate.add_argument(
        "--mean-l0",
        type=_mean_l0s,
        help="also serve the SAE by one calibrated threshold at each of these mean L0s (e.g. 2,8,16)",
    )
    evaluate.add_argument("--eval-tokens", type=_positive_int)
    evaluate.add_argument("--downstream-tokens", type=_non_negative_int, help=DOWNSTREAM_HELP)
    evaluate.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT)
    evaluate.add_argument("--output-dir", type=Path, help="also write per_k.md/.json/.png here")
    evaluate.add_argument("--device", default="cpu")

    compare = commands.add_parser(
        "compare", help="train HTopK and fixed-k baselines on identical activations; tables and plots per k"
    )
    compare.add_argument("--preset", default=DEFAULT_PRESET, help=preset_help)
    compare.add_argument("--output-dir", type=Path, help="results directory (default results/<preset>-comparison)")
    compare.add_argument("--budgets", type=_budgets, help="k's that get their own TopK SAE (default K/8,K/4,K/2,K)")
    compare.add_argument(
        "--baselines", type=_baselines, default=BASELINES, help=f"comma-separated, from {','.join(BASELINES)}"
    )
    compare.add_argument(
        "--objectives",
        type=lambda text: [part for part in text.split(",") if part],
        help="HierarchicalTopK objectives side by side, one SAE each (e.g. uniform,k-weight-0.5); names in "
        "sae_lens_hierarchical.objectives (default: one SAE with the config's objective)",
    )
    _add_override_option(compare)
    compare.add_argument("--training-tokens", type=_positive_int, help="per SAE (default: the preset's)")
    compare.add_argument("--eval-tokens", type=_positive_int, help="held-out tokens (default: the preset's)")
    compare.add_argument("--downstream-tokens", type=_non_negative_int, help=DOWNSTREAM_HELP)
    compare.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT)
    _add_hook_options(compare)
    compare.add_argument("--device", help="cpu (default), cuda, ...")
    compare.add_argument("--seed", type=int, help="initialisation and data order of every SAE (default 0)")
    compare.add_argument(
        "--checkpoints",
        type=_non_negative_int,
        default=0,
        help="checkpoints during training; rerunning the same command after a crash resumes from the newest",
    )
    compare.add_argument(
        "--init-from",
        help="a pretrained SAE (SAELens or sparsify directory) the HierarchicalTopK SAE starts from: a hierarchical "
        "fine-tune on the suite's batches (its width and K set the suite's)",
    )
    compare.add_argument("--overwrite", action="store_true", help="replace an existing results directory")

    export = commands.add_parser(
        "export",
        help="write the SAE at budget k as a plain SAELens TopK SAE, or served by a threshold as a JumpReLU SAE "
        "(both load without this package)",
    )
    export.add_argument("sae", help="SAE directory, or a Hugging Face repo id with --sae-id")
    export.add_argument(
        "output_dir", type=Path, help="new directory (several budgets: one k_<k> or mean_l0_<m> folder each)"
    )
    budget = export.add_mutually_exclusive_group(required=True)
    budget.add_argument("--k", type=_budgets, help="TopK at this budget, or comma-separated budgets, in 1..K")
    budget.add_argument(
        "--mean-l0",
        type=_mean_l0s,
        help="JumpReLU at the threshold giving this mean L0 (or comma-separated ones) on the preset's held-out text",
    )
    budget.add_argument("--threshold", type=float, help="JumpReLU at this threshold (activations >= it are kept)")
    export.add_argument("--sae-id", help="the SAE's folder inside a repo")
    _add_held_out_options(export, "calibrating --mean-l0")

    convert = commands.add_parser(
        "hierarchicalize",
        help="convert a pretrained TopK (or BatchTopK) SAE to HierarchicalTopK and fine-tune it hierarchically",
    )
    convert.add_argument("source", help="SAELens or sparsify SAE directory, Hugging Face repo id, or SAELens release")
    convert.add_argument("sae_id", nargs="?", help="the SAE inside a repo or release (or a sub-directory)")
    convert.add_argument("--preset", help=f"one of {sorted(PRESETS)} (default: the one matching the source's hook)")
    convert.add_argument(
        "--output-dir", type=Path, help="results directory (default results/<preset>-hierarchicalized)"
    )
    convert.add_argument("--training-tokens", type=_positive_int, required=True, help="fine-tuning tokens")
    convert.add_argument(
        "--k", type=_positive_int, help="K for a JumpReLU/BatchTopK source (TopK sources bring theirs)"
    )
    convert.add_argument(
        "--l0-percentile",
        type=float,
        default=99.0,
        help="without --k, a JumpReLU source's K is this percentile of its L0 on training activations (default 99)",
    )
    _add_override_option(convert)
    convert.add_argument("--eval-tokens", type=_positive_int, help="held-out tokens (default: the preset's)")
    convert.add_argument("--downstream-tokens", type=_non_negative_int, help=DOWNSTREAM_HELP)
    convert.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT)
    convert.add_argument("--device", default="cpu")
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--overwrite", action="store_true", help="replace an existing results directory")

    publish = commands.add_parser(
        "upload", help="publish the SAE (and TopK exports) on the Hugging Face Hub with SAELens's uploader"
    )
    publish.add_argument(
        "sae", type=Path, help="SAE directory (a per_k.md next to it or one level up goes in the card)"
    )
    publish.add_argument("repo_id", help="owner/name")
    publish.add_argument("--sae-id", help="the SAE's folder in the repo (default: its hook name)")
    publish.add_argument("--topk-ks", type=_budgets, default=[], help="also upload TopK exports at these budgets")
    publish.add_argument(
        "--jumprelu-mean-l0",
        type=_mean_l0s,
        default=[],
        help="also upload JumpReLU exports at these mean L0s (thresholds calibrated on the preset's held-out text)",
    )
    _add_held_out_options(publish, "calibrating --jumprelu-mean-l0")
    publish.add_argument("--revision", default="main")
    publish.add_argument("--dry-run", type=Path, metavar="DIR", help="write the files to DIR instead of uploading")

    inspect = commands.add_parser(
        "inspect", help="latent dashboards: a static HTML site of top contexts, frequencies and ranks at every k"
    )
    inspect.add_argument("sae", help="SAE directory, or a Hugging Face repo id with --sae-id")
    inspect.add_argument("--sae-id", help="the SAE's folder inside a repo")
    inspect.add_argument("--preset", help="default: the preset matching the SAE's model and hook")
    inspect.add_argument(
        "--latents", type=_latents, help="ids and ranges, e.g. 0-99,512 (default: up to 20 per first-rank range)"
    )
    inspect.add_argument("--ks", type=_budgets, help="budgets whose top contexts pages show (default K/16,K/4,K)")
    inspect.add_argument("--contexts", type=_positive_int, default=10, help="top contexts per budget (default 10)")
    inspect.add_argument("--eval-tokens", type=_positive_int, help="held-out tokens (default: the preset's)")
    inspect.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT)
    inspect.add_argument("--output-dir", type=Path, help="new directory (default <SAE_DIR>-dashboard beside the SAE)")
    inspect.add_argument("--device", default="cpu")
    inspect.add_argument("--overwrite", action="store_true", help="replace an existing dashboard directory")

    interpret = commands.add_parser(
        "interpret", help="sparse probing, feature absorption and coarse-to-fine at every k for compare runs (seeds)"
    )
    interpret.add_argument("comparisons", nargs="+", type=Path, help="compare output directories, one per seed")
    interpret.add_argument("--output-dir", type=Path, required=True, help="new directory for interpret.md/.json/PNGs")
    interpret.add_argument(
        "--measures", type=_measures, default=MEASURES, help=f"comma-separated, from {','.join(MEASURES)}"
    )
    interpret.add_argument("--ns", type=_budgets, default=list(DEFAULT_NS), help="latents per sparse probe")
    interpret.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_ROOT)
    interpret.add_argument("--device", default="cpu")
    interpret.add_argument("--overwrite", action="store_true", help="replace an existing results directory")

    doctor = commands.add_parser(
        "doctor", help="versions, devices, which loss implementation 'auto' picks and why, Triton self-check per GPU"
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument(
        "--interpret",
        action="store_true",
        help="also run the self-check's Triton kernels on CPU in Triton's interpreter (TRITON_INTERPRET=1, slow)",
    )
    return parser
