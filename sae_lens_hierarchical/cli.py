"""Command-line interface: argument parsing on top of :mod:`sae_lens_hierarchical.jobs`.

sae-lens-hierarchical train                      # the embedded default: Gemma-3-270M on Wikipedia, offline
sae-lens-hierarchical train --preset tiny-random --set sae.k=8 --set lr=1e-3
sae-lens-hierarchical train --config runner_cfg.json   # any SAELens runner config (architecture in it)
sae-lens-hierarchical cache --preset gemma-3-270m      # only cache activations
sae-lens-hierarchical evaluate results/gemma-3-270m/sae --ks 1,4,16,64 --mean-l0 2,8
sae-lens-hierarchical compare                    # HTopK vs TopK at each k, truncated TopK, Multi-TopK
torchrun --nproc-per-node 2 -m sae_lens_hierarchical train --preset tiny-random   # data-parallel (also compare)
sae-lens-hierarchical export results/gemma-3-270m/sae --k 16 topk_k16  # a plain SAELens TopK SAE at k=16
sae-lens-hierarchical export results/gemma-3-270m/sae --mean-l0 16 jumprelu_l0_16  # JumpReLU, any mean L0
sae-lens-hierarchical upload results/gemma-3-270m/sae owner/name --topk-ks 8,32 --dry-run repo_preview
sae-lens-hierarchical inspect results/gemma-3-270m/sae --ks 4,16,64   # latent dashboards: a static site
sae-lens-hierarchical interpret results/seed0 results/seed1 --output-dir interp  # probing/absorption per k
sae-lens-hierarchical hierarchicalize results/x/saes/topk-k64 --training-tokens 60000   # TopK SAE -> every k
sae-lens-hierarchical doctor                     # versions, devices, what loss_implementation='auto' runs, self-check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

from sae_lens_hierarchical._files import check_new_directory
from sae_lens_hierarchical.data import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.distributed import joined_process_group
from sae_lens_hierarchical.evaluation import format_markdown_table, max_budget
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKSAE
from sae_lens_hierarchical.interpretability.probing import DEFAULT_NS
from sae_lens_hierarchical.jobs import (
    BASELINES,
    prepare_embedded_activations,
    run_comparison_job,
    run_training_job,
    write_report,
)
from sae_lens_hierarchical.jobs.common import EmbeddedActivations, check_output_dir
from sae_lens_hierarchical.jobs.compare import check_objectives
from sae_lens_hierarchical.jobs.doctor import format_doctor_report, run_doctor_job
from sae_lens_hierarchical.jobs.hierarchicalize import load_source, run_hierarchicalize_job
from sae_lens_hierarchical.jobs.inspect import default_dashboard_dir, run_inspect_job
from sae_lens_hierarchical.jobs.interpret import MEASURES, run_interpret_job
from sae_lens_hierarchical.jobs.overrides import (
    ResolvedJob,
    check_runner_config,
    job_from_runner_config,
    resolve_job,
)
from sae_lens_hierarchical.jobs.overrides import apply_overrides as apply_config_overrides
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.objectives import objective_overrides
from sae_lens_hierarchical.preemption import Preempted, stop_on_signals
from sae_lens_hierarchical.presets import PRESETS, Preset, get_preset, preset_for_sae
from sae_lens_hierarchical.reporting import format_mean_l0_rows
from sae_lens_hierarchical.sharing import (
    EXPORT_METADATA_KEY,
    save_as_jumprelu,
    save_as_topk,
    save_as_topk_variants,
    upload,
)

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


def _resolved(args: argparse.Namespace, preset: Preset | None = None) -> ResolvedJob:
    """The job's preset, overrides, tokens, seed and device from the flags and ``--set``, every value checked."""
    return resolve_job(
        preset or get_preset(args.preset),
        dict(args.overrides) if hasattr(args, "overrides") else {},
        training_tokens=args.training_tokens,
        seed=getattr(args, "seed", None),
        device=args.device,
        hook=args.hook,
        layer=args.layer,
    )


def _results_dir(args: argparse.Namespace, job: ResolvedJob, suffix: str = "") -> Path:
    """``--output-dir``, else ``results/<preset>[-<hook>]<suffix>`` (the hook named when it is not the preset's)."""
    if args.output_dir is not None:
        return args.output_dir
    default_hook = get_preset(job.preset.name).hook_name
    hook = "" if job.preset.hook_name == default_hook else f"-{job.preset.hook_name}"
    context = (
        "" if job.preset.context_size == get_preset(job.preset.name).context_size else f"-ctx{job.preset.context_size}"
    )
    return Path("results") / f"{job.preset.name}{hook}{context}{suffix}"


def _job_settings(args: argparse.Namespace, job: ResolvedJob) -> dict[str, Any]:
    """The options ``train`` and ``compare`` share, as keyword arguments of their jobs."""
    return {
        "training_tokens": job.training_tokens,
        "eval_tokens": args.eval_tokens,
        "downstream_tokens": args.downstream_tokens,
        "cache_root": args.cache_dir,
        "device": job.device,
        "seed": job.seed,
        "overwrite": args.overwrite,
    }


def _train(args: argparse.Namespace) -> None:
    if args.config is not None:
        job = _job_from_config(args)
        if job is None:
            return
    else:
        job = _resolved(args)
    if args.objective is not None:
        job = _with_objective(job, args.objective)
    output_dir = _results_dir(args, job)
    check_output_dir(output_dir, args.overwrite)
    with joined_process_group(job.device) as parallel:
        result = run_training_job(
            job.preset,
            output_dir,
            overrides=job.overrides,
            wandb=args.wandb,
            parallel=parallel,
            **_job_settings(args, job),
        )
    if not parallel.is_main:
        return
    if result.results:
        print(f"\nHeld-out reconstruction at every budget k ({job.preset.name}, special tokens excluded):\n")
        print(format_markdown_table(result.results))
    for run in sorted((result.output_dir / "wandb").glob("offline-run-*")):
        print(f"wandb: the offline run is {run}; upload it with `wandb sync {run}`")
    print(f"\nSAE saved to {result.sae_dir}; report in {result.output_dir}. Took {result.seconds / 60:.1f} min.")


def _with_objective(job: ResolvedJob, name: str) -> ResolvedJob:
    """The job with a named objective's SAE fields (refused beside --set of the same fields)."""
    clashing = sorted(field for field in job.overrides if field.startswith(("sae.hierarchy_", "sae.served_k")))
    if clashing:
        raise ValueError(f"--objective {name} sets the level fields itself; drop the overrides {clashing}")
    cfg = apply_config_overrides(job.preset.runner_config(None, **_tokens(job)), job.overrides)
    fields = objective_overrides(name, cfg.sae.k, max(1, cfg.training_tokens // cfg.train_batch_size_tokens))
    overrides = {**job.overrides, **{f"sae.{field}": value for field, value in fields.items()}}
    return resolve_job(job.preset, overrides, training_tokens=job.training_tokens, seed=job.seed, device=job.device)


def _tokens(job: ResolvedJob) -> dict[str, int]:
    return {} if job.training_tokens is None else {"training_tokens": job.training_tokens}


def _job_from_config(args: argparse.Namespace) -> ResolvedJob | None:
    """``train --config FILE``: an embedded preset's config (this package's runner_cfg.json too) as a preset job with
    the file's settings, flags on top; any other SAELens config runs SAELens's runner as it is (None: done)."""
    config = json.loads(args.config.read_text())
    found = job_from_runner_config(config, PRESETS)
    if found is not None:
        preset, overrides, tokens, seed = found
        overrides |= dict(args.overrides)  # --set on top of the file
        return resolve_job(
            preset,
            overrides,
            training_tokens=args.training_tokens or tokens,
            seed=seed if args.seed is None else args.seed,
            device=args.device,
            hook=args.hook,
            layer=args.layer,
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "data-parallel training (torchrun with several processes) runs presets (--preset), which shard the "
            "corpus across ranks; this --config names no embedded preset, so SAELens's runner runs it in one process"
        )
    given = [flag for flag, value in (("--hook", args.hook), ("--layer", args.layer)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: with a --config of no embedded preset, set hook_name in the file")
    cfg = LanguageModelSAERunnerConfig.from_dict(config)
    flags = {"training_tokens": args.training_tokens, "seed": args.seed, "device": args.device}
    overrides = {name: value for name, value in flags.items() if value is not None} | dict(args.overrides)
    if args.output_dir is not None:
        overrides["output_path"] = str(args.output_dir)
    cfg = check_runner_config(apply_config_overrides(cfg, overrides))
    LanguageModelSAETrainingRunner(cfg).run()
    print(
        f"SAE saved to {cfg.output_path}. No per-k report: that needs an embedded preset's held-out text "
        f"(presets {sorted(name for name, preset in PRESETS.items() if preset.embedded)})"
    )
    return None


def _cache(args: argparse.Namespace) -> None:
    job = _resolved(args)
    model = job.preset.load_model(job.device)
    activations = prepare_embedded_activations(
        job.preset,
        model,
        eval_tokens=args.eval_tokens or job.preset.eval_tokens,
        training_tokens=job.training_tokens or job.preset.training_tokens,
        cache_root=args.cache_dir,
    )
    for name, cache in (("training", activations.train), ("held-out", activations.held_out)):
        assert cache is not None
        print(f"{name}: {cache.key.n_tokens} tokens at {cache.activations_path}")


def _held_out(sae: SAE[Any], args: argparse.Namespace) -> tuple[Preset, Any, EmbeddedActivations]:
    """``(preset, model, held-out activations)`` of the SAE's preset (or ``--preset``), checked against the SAE."""
    preset = preset_for_sae(sae.cfg.metadata, args.preset)
    if not preset.embedded:
        raise ValueError(f"preset {preset.name!r} has no embedded held-out corpus to evaluate on")
    if sae.cfg.d_in != preset.d_in:
        raise ValueError(
            f"the SAE's d_in={sae.cfg.d_in} does not match preset {preset.name!r} (d_in={preset.d_in} at "
            f"{preset.hook_name}); pass the matching --preset"
        )
    model = preset.load_model(args.device)
    activations = prepare_embedded_activations(
        preset, model, eval_tokens=args.eval_tokens or preset.eval_tokens, cache_root=args.cache_dir
    )
    return preset, model, activations


def _evaluate(args: argparse.Namespace) -> None:
    sae = load_sae(args.sae, args.sae_id, device=args.device)
    preset, model, activations = _held_out(sae, args)
    downstream_tokens = preset.downstream_eval_tokens if args.downstream_tokens is None else args.downstream_tokens
    results = activations.evaluate(sae, model, downstream_tokens, ks=args.ks) if max_budget(sae) or args.ks else []
    by_threshold = activations.evaluate_mean_l0(sae, model, downstream_tokens, args.mean_l0 or [], as_saved=not results)
    if results:
        print(format_markdown_table(results))
    if by_threshold:
        print("\nServed by one threshold per mean L0 (JumpReLU SAEs: also as saved):\n")
        print(format_mean_l0_rows(by_threshold, results))
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        title = f"{sae.cfg.architecture()} SAE on {preset.model_name} ({preset.hook_name})"
        write_report(results, args.output_dir, title=title, mean_l0_results=by_threshold)


def _compare(args: argparse.Namespace) -> None:
    check_objectives(args.objectives, dict(args.overrides))  # names the clash before the values are checked
    job = _resolved(args)
    output_dir = _results_dir(args, job, "-comparison")
    with joined_process_group(job.device) as parallel:
        result = run_comparison_job(
            job.preset,
            output_dir,
            budgets=args.budgets,
            baselines=args.baselines,
            overrides=job.overrides,
            n_checkpoints=args.checkpoints,
            objectives=args.objectives,
            parallel=parallel,
            init_from=args.init_from,
            **_job_settings(args, job),
        )
    if not parallel.is_main:
        return
    if result.results:
        print((result.output_dir / "comparison.md").read_text())
    print(f"\nSAEs in {result.output_dir / 'saes'}; report in {result.output_dir}. Took {result.seconds / 60:.1f} min.")


def _hierarchicalize(args: argparse.Namespace) -> None:
    source_sae, _ = load_source(args.source, args.sae_id)  # the preset is chosen before any model is loaded
    preset = preset_for_sae(source_sae.cfg.metadata, args.preset)
    output_dir = args.output_dir or Path("results") / f"{preset.name}-hierarchicalized"
    result = run_hierarchicalize_job(
        args.source,
        preset,
        output_dir,
        sae_id=args.sae_id,
        k=args.k,
        l0_percentile=args.l0_percentile,
        overrides=dict(args.overrides),
        training_tokens=args.training_tokens,
        eval_tokens=args.eval_tokens,
        downstream_tokens=args.downstream_tokens,
        cache_root=args.cache_dir,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print((result.output_dir / "per_k.md").read_text())
    print(f"\nSAE saved to {result.sae_dir}; report in {result.output_dir}. Took {result.seconds / 60:.1f} min.")


def _interpret(args: argparse.Namespace) -> None:
    run_interpret_job(
        args.comparisons,
        args.output_dir,
        measures=args.measures,
        ns=args.ns,
        cache_root=args.cache_dir,
        device=args.device,
        overwrite=args.overwrite,
    )
    print((args.output_dir / "interpret.md").read_text())
    print(f"Report, plots and per-SAE JSON in {args.output_dir}.")


def portable_name(location: str | Path) -> str:
    """What a record may say of a path given on the command line: as given when relative, else only its last part
    (this machine's absolute paths mean nothing elsewhere); repo ids pass through."""
    path = Path(location)
    return path.name if path.is_absolute() or str(location).startswith("~") else str(location)


def _export(args: argparse.Namespace) -> None:
    sae = load_sae(args.sae, args.sae_id)
    source = portable_name(args.sae) if args.sae_id is None else f"{portable_name(args.sae)}/{args.sae_id}"
    if args.k is None:
        _export_jumprelu(sae, args, source)
        return
    if len(args.k) == 1:
        paths = {args.k[0]: save_as_topk(sae, args.output_dir, args.k[0], source=source)}
    else:
        paths = save_as_topk_variants(sae, args.output_dir, args.k, source=source)
    for k, path in paths.items():
        print(f"TopK SAE at k={k}: {path} (SAELens alone loads it: SAE.load_from_disk)")


def _export_jumprelu(sae: SAE[Any], args: argparse.Namespace, source: str) -> None:
    """``export --threshold`` / ``--mean-l0``: one JumpReLU SAE, or one ``mean_l0_<m>`` folder per mean L0."""
    if not isinstance(sae, HierarchicalTopKSAE):
        raise ValueError(
            f"{args.sae} holds a {sae.cfg.architecture()!r} SAE; JumpReLU exports take a hierarchical_topk SAE"
        )
    if args.threshold is not None:
        path = save_as_jumprelu(sae, args.output_dir, threshold=args.threshold, source=source)
        print(f"JumpReLU SAE at threshold {args.threshold:g}: {path} (SAELens alone loads it: SAE.load_from_disk)")
        return
    check_new_directory(args.output_dir)  # before loading the model
    _, _, activations = _held_out(sae, args)
    held_out = activations.held_out_activations()
    several = len(args.mean_l0) > 1
    for mean_l0 in args.mean_l0:
        path = args.output_dir / f"mean_l0_{mean_l0:g}" if several else args.output_dir
        save_as_jumprelu(sae, path, mean_l0=mean_l0, activations=held_out, source=source)
        record = json.loads((path / "cfg.json").read_text())["metadata"][EXPORT_METADATA_KEY]
        calibration = record["calibration"]
        print(
            f"JumpReLU SAE at mean L0 {mean_l0:g} (threshold {record['threshold']:.6g}, mean L0 "
            f"{calibration['mean_l0']:.2f} on {calibration['tokens']} held-out tokens, "
            f"{100 * calibration['share_of_tokens_over_K']:.2f}% of them over K): {path}"
        )


def _upload(args: argparse.Namespace) -> None:
    calibration = None
    if args.jumprelu_mean_l0:
        calibration = _held_out(load_sae(args.sae), args)[2].held_out_activations()
    uploaded = upload(
        args.sae,
        args.repo_id,
        sae_id=args.sae_id,
        topk_ks=args.topk_ks,
        jumprelu_mean_l0s=args.jumprelu_mean_l0,
        calibration_activations=calibration,
        dry_run=args.dry_run,
    )
    where = f"written to {args.dry_run} (dry run, nothing uploaded)" if args.dry_run else f"uploaded to {args.repo_id}"
    print(f"README.md and {len(uploaded)} SAE(s) {where}:")
    for sae_id, description in uploaded.items():
        print(f"  {sae_id}: {description}")


def _inspect(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    sae = load_sae(args.sae, args.sae_id, device=args.device)
    preset = preset_for_sae(sae.cfg.metadata, args.preset)
    dashboard = run_inspect_job(
        sae,
        preset,
        args.output_dir or default_dashboard_dir(args.sae, args.sae_id),
        latents=args.latents,
        ks=args.ks,
        n_contexts=args.contexts,
        eval_tokens=args.eval_tokens,
        cache_root=args.cache_dir,
        device=args.device,
        overwrite=args.overwrite,
    )
    pages = len(dashboard.summary()["latents"])
    minutes = (time.perf_counter() - started) / 60
    print(f"Dashboard of {pages} latents: open {dashboard.index} in a browser. Took {minutes:.1f} min.")


def _doctor(args: argparse.Namespace) -> None:
    report = run_doctor_job(interpret=args.interpret)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_doctor_report(report))
    if not report.ok:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handlers = {
        "train": _train,
        "cache": _cache,
        "evaluate": _evaluate,
        "compare": _compare,
        "interpret": _interpret,
        "hierarchicalize": _hierarchicalize,
        "export": _export,
        "upload": _upload,
        "inspect": _inspect,
        "doctor": _doctor,
    }
    try:
        with stop_on_signals():  # SIGTERM/SIGINT: checkpoint at the next step boundary, say how to resume
            handlers[args.command](args)
    except Preempted as stopped:
        raise SystemExit(f"stopped: {stopped}") from stopped
    except (ValueError, OSError) as error:  # bad settings, missing files, no Hub: one clear line, no traceback
        raise UsageError(f"error: {error}") from error


class UsageError(SystemExit):
    """A bad setting or a missing file: its one line goes to stderr and the exit code is 2, as for argparse's."""

    def __init__(self, message: str):
        super().__init__(message)
        print(message, file=sys.stderr)
        self.code = 2
