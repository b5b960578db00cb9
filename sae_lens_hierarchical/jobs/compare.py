"""The comparison job: HierarchicalTopK against the SAE family researchers train (the suite, :mod:`.suite`), trained in
lockstep on identical activations (:mod:`.lockstep`), each evaluated by k and by mean L0, and reported side by side."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import scratch_beside
from sae_lens_hierarchical.conversion import check_convertible
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.distributed import SINGLE_PROCESS, DataParallel
from sae_lens_hierarchical.evaluation import BudgetMetrics, format_comparison_table, plot_comparison
from sae_lens_hierarchical.jobs.checkpoints import stop_between_evaluations
from sae_lens_hierarchical.jobs.common import (
    EmbeddedActivations,
    check_output_dir,
    finish_job,
    prepare_embedded_activations,
)
from sae_lens_hierarchical.jobs.hierarchicalize import check_source_fits, fine_tune_overrides, load_source
from sae_lens_hierarchical.jobs.lockstep import shuffled_batches as shuffled_batches  # its home before the split
from sae_lens_hierarchical.jobs.lockstep import train_suite
from sae_lens_hierarchical.jobs.overrides import apply_overrides
from sae_lens_hierarchical.jobs.suite import BASELINES, SuiteMember, baseline_suite
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.objectives import objective_overrides
from sae_lens_hierarchical.presets import Preset, replace_runner_config
from sae_lens_hierarchical.reporting import format_mean_l0_table, mean_l0_lines, plot_mean_l0


@dataclass
class ComparisonJobResult:
    output_dir: Path
    results: dict[str, list[BudgetMetrics]]
    """Per SAE, its rows at each k it is evaluated at (none for SAEs without a k)."""
    seconds: float
    mean_l0_results: dict[str, list[BudgetMetrics]] = field(default_factory=dict)
    """Per SAE, its rows served by threshold at each target mean L0, then as saved (JumpReLU SAEs)."""


def run_comparison_job(
    preset: Preset,
    output_dir: Path,
    budgets: list[int] | None = None,
    baselines: tuple[str, ...] = BASELINES,
    overrides: dict[str, Any] | None = None,
    training_tokens: int | None = None,
    eval_tokens: int | None = None,
    downstream_tokens: int | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    model: HookedTransformer | None = None,
    n_checkpoints: int = 0,
    objectives: list[str] | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
    init_from: str | Path | None = None,
) -> ComparisonJobResult:
    """Train HierarchicalTopK and its baselines in lockstep on the same activation batches, evaluate, report.

    Embedded presets read the cached training activations (one shuffled order, shared by all SAEs);
    streaming presets run SAELens's ``MultiSAETrainingRunner`` (one LM forward pass feeds every SAE).
    Every SAE gets the same initialisation seed, tokens, steps and learning-rate schedule. The report
    (``comparison.md``/``.json``/``_fvu.png``/``_ce.png``) and each SAE (``saes/<name>``) land in
    ``output_dir``, written atomically.

    Args:
        budgets: the k's that get their own TopK SAE (default K/8, K/4, K/2, K).
        downstream_tokens: held-out tokens for CE-loss/KL scores (default the preset's; 0 skips them).
        n_checkpoints: checkpoints during training, kept beside ``output_dir`` until the job succeeds; rerunning
            the same job after a crash resumes from the newest complete one (embedded presets).
        objectives: named HierarchicalTopK objectives (:mod:`sae_lens_hierarchical.objectives`) to train side by
            side, one SAE each; None trains one with the config's own objective (``overrides`` may set it).
        parallel: this process's place in a torchrun job: every SAE of the suite is trained data-parallel (each rank
            on its share of the corpus and of every batch); rank 0 alone writes, evaluates and reports.
        init_from: a pretrained SAE (SAELens or sparsify directory) every HierarchicalTopK SAE starts from: a
            hierarchical fine-tune on the suite's batches, at the fine-tune learning rate unless ``lr`` is set (one
            trainer: the whole suite); its width and K set the suite's (one process).
    """
    check_output_dir(output_dir, overwrite)
    if n_checkpoints < 0:
        raise ValueError(f"n_checkpoints must be >= 0; got {n_checkpoints}")
    started = time.perf_counter()
    training_tokens = training_tokens or preset.training_tokens
    eval_tokens = eval_tokens or preset.eval_tokens
    downstream_tokens = preset.downstream_eval_tokens if downstream_tokens is None else downstream_tokens
    check_objectives(objectives, overrides or {})
    overrides = overrides or {}
    if init_from is not None:
        overrides = fine_tune_overrides(preset, overrides)
    cfg = apply_overrides(preset.runner_config(None, training_tokens=training_tokens, seed=seed), overrides)
    device = parallel.device(device)
    cfg = replace_runner_config(cfg, device=device)
    initial_sae = source_record = None
    if init_from is not None:
        if parallel.active:
            raise ValueError("compare --init-from runs in one process (not under a multi-process torchrun)")
        source, source_record = load_source(init_from, device=device)
        source_record["fine_tuning_lr"] = cfg.lr
        check_source_fits(source, preset, overrides)
        source_k = check_convertible(source, None) or cfg.sae.k
        cfg = replace_runner_config(cfg, sae=replace(cfg.sae, k=source_k, d_sae=source.cfg.d_sae))
        initial_sae = (source, source_record)
    max_k = cfg.sae.k
    budgets = budgets or sorted({max(1, max_k // 8), max(1, max_k // 4), max(1, max_k // 2), max_k})
    members = baseline_suite(max_k, budgets, baselines, _resolve_objectives(objectives, cfg))
    model = model if model is not None else preset.load_model(device)
    activations = None
    if preset.embedded:
        activations = prepare_embedded_activations(
            preset,
            model,
            eval_tokens,
            training_tokens,
            cache_root=cache_root,
            progress=progress,
            parallel=parallel,
            reuse_larger_cache=True,  # train_suite reads exactly the first rows
        )
    checkpoint_dir = output_dir.parent / f".{output_dir.name}.checkpoints"
    checkpoints = {"checkpoint_dir": checkpoint_dir, "n_checkpoints": n_checkpoints}
    if not parallel.is_main:  # the other ranks train their share; rank 0 writes, evaluates and reports
        train_suite(cfg, members, model, activations, None, seed=seed, parallel=parallel, **checkpoints)
        return ComparisonJobResult(output_dir, {}, time.perf_counter() - started)
    with scratch_beside(output_dir) as scratch:
        sae_dirs = train_suite(
            cfg,
            members,
            model,
            activations,
            scratch / "saes",
            seed=seed,
            parallel=parallel,
            initial_sae=initial_sae,
            **checkpoints,
        )
        results: dict[str, list[BudgetMetrics]] = {}
        mean_l0_results: dict[str, list[BudgetMetrics]] = {}
        if activations is not None:
            for member in members:
                stop_between_evaluations("its last checkpoint" if n_checkpoints else "the start (no --checkpoints)")
                saved = load_sae(sae_dirs[member.name], device=device)
                results[member.name], mean_l0_results[member.name] = evaluate_member(
                    member, saved, activations, model, downstream_tokens, progress
                )
            title = f"{preset.model_name} {preset.hook_name}: {training_tokens:,} tokens, d_sae {cfg.sae.d_sae}"
            write_comparison_report(results, members, scratch, title, mean_l0_results)
        job = {
            "preset": preset.name,
            "overrides": overrides,
            "training_tokens": training_tokens,
            "eval_tokens": eval_tokens,
            "downstream_tokens": downstream_tokens,
            "seed": seed,
            "budgets": budgets,
            "baselines": list(baselines),
            "objectives": objectives,
        }
        if source_record is not None:
            job["init_from"] = source_record
        if parallel.active:
            job["data_parallel_processes"] = parallel.world_size
        seconds = finish_job(scratch, output_dir, job, started)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return ComparisonJobResult(output_dir, results, seconds, mean_l0_results)


def evaluate_member(
    member: SuiteMember,
    sae: Any,
    activations: EmbeddedActivations,
    model: HookedTransformer,
    downstream_tokens: int,
    progress: bool = True,
) -> tuple[list[BudgetMetrics], list[BudgetMetrics]]:
    """``(rows at each of the member's k's, rows at each of its mean L0s by threshold and as saved)``."""
    by_k = (
        activations.evaluate(sae, model, downstream_tokens, ks=member.eval_ks, progress=progress)
        if member.eval_ks
        else []
    )
    by_mean_l0 = activations.evaluate_mean_l0(
        sae, model, downstream_tokens, member.mean_l0s, as_saved=member.as_saved, progress=progress
    )
    return list(by_k), by_mean_l0


def check_objectives(objectives: list[str] | None, overrides: dict[str, Any]) -> None:
    """Refuse duplicate objectives and ``--set`` overrides of the level fields, which would silently lose to the
    names; before anything else looks at the overrides."""
    if objectives is None:
        return
    duplicates = sorted({name for name in objectives if objectives.count(name) > 1})
    if duplicates:
        raise ValueError(f"objectives must be distinct; got {duplicates} more than once")
    clashing = sorted(name for name in overrides if name.removeprefix("sae.").startswith("hierarchy_"))
    if clashing:
        raise ValueError(f"objectives set the level fields themselves; drop the overrides {clashing} or the objectives")


def _resolve_objectives(
    objectives: list[str] | None, cfg: LanguageModelSAERunnerConfig[Any]
) -> dict[str, dict[str, Any]] | None:
    """Each named objective's config fields for this run (a schedule spans all its steps)."""
    if objectives is None:
        return None
    n_steps = cfg.training_tokens // cfg.train_batch_size_tokens
    resolved = {name: objective_overrides(name, cfg.sae.k, n_steps) for name in objectives}
    seen: dict[str, str] = {}
    for name, fields in resolved.items():  # k-weight-0.5 and k-weight-.50 would train the same SAE twice
        first = seen.setdefault(json.dumps(fields, sort_keys=True), name)
        if first != name:
            raise ValueError(f"objectives {first!r} and {name!r} are the same objective; keep one")
    return resolved


def write_comparison_report(
    results: dict[str, list[BudgetMetrics]],
    members: list[SuiteMember],
    directory: Path,
    title: str,
    mean_l0_results: dict[str, list[BudgetMetrics]] | None = None,
) -> None:
    """``comparison.md`` (tables by k, then by mean L0), ``comparison.json``, ``comparison_fvu.png`` /
    ``comparison_ce.png`` (by k) and ``comparison_mean_l0.png`` (every SAE against mean L0)."""
    mean_l0_results = mean_l0_results or {}
    families = {member.name: member.line for member in members}
    by_k = {name: rows for name, rows in results.items() if rows}
    report = format_comparison_table(by_k, families)
    lines = mean_l0_lines(by_k, mean_l0_results, families)
    if mean_l0_results:
        report += "\n\n## Every SAE by mean L0\n\n" + format_mean_l0_table(lines)
    (directory / "comparison.md").write_text(report + "\n")
    payload = {
        "title": title,
        "saes": {
            member.name: {
                "family": member.family,
                "objective": member.objective,
                "architecture": member.architecture,
                "settings": member.sae_overrides,
                "results": [r.to_dict() for r in results.get(member.name, [])],
                "mean_l0_results": [r.to_dict() for r in mean_l0_results.get(member.name, [])],
            }
            for member in members
        },
    }
    (directory / "comparison.json").write_text(json.dumps(payload, indent=2))
    plot_comparison(by_k, families, directory / "comparison_fvu.png", "fvu", title)
    if all(r.ce_loss_score is not None for rows in by_k.values() for r in rows):
        plot_comparison(by_k, families, directory / "comparison_ce.png", "ce_loss_score", title)
    if mean_l0_results:
        plot_mean_l0(lines, directory / "comparison_mean_l0.png", title)
