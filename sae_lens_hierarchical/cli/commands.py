"""One handler per subcommand: resolve the job from the parsed arguments, run it, print where its results are."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

from sae_lens_hierarchical._files import check_new_directory
from sae_lens_hierarchical.distributed import joined_process_group
from sae_lens_hierarchical.evaluation import format_markdown_table, max_budget
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKSAE
from sae_lens_hierarchical.jobs import (
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
from sae_lens_hierarchical.jobs.interpret import run_interpret_job
from sae_lens_hierarchical.jobs.overrides import (
    ResolvedJob,
    check_runner_config,
    job_from_runner_config,
    resolve_job,
)
from sae_lens_hierarchical.jobs.overrides import apply_overrides as apply_config_overrides
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.objectives import objective_overrides
from sae_lens_hierarchical.presets import PRESETS, Preset, get_preset, preset_for_sae
from sae_lens_hierarchical.reporting import format_mean_l0_rows
from sae_lens_hierarchical.sharing import (
    EXPORT_METADATA_KEY,
    save_as_jumprelu,
    save_as_topk,
    save_as_topk_variants,
    upload,
)


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


def run_train(args: argparse.Namespace) -> None:
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


def run_cache(args: argparse.Namespace) -> None:
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


def run_evaluate(args: argparse.Namespace) -> None:
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


def run_compare(args: argparse.Namespace) -> None:
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


def run_hierarchicalize(args: argparse.Namespace) -> None:
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


def run_interpret(args: argparse.Namespace) -> None:
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


def run_export(args: argparse.Namespace) -> None:
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


def run_upload(args: argparse.Namespace) -> None:
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


def run_inspect(args: argparse.Namespace) -> None:
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


def run_doctor(args: argparse.Namespace) -> None:
    report = run_doctor_job(interpret=args.interpret)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_doctor_report(report))
    if not report.ok:
        raise SystemExit(1)
