"""The baseline suite: HierarchicalTopK against the SAE family researchers train (TopK and BatchTopK at each k, TopK
truncated, Matryoshka, Multi-TopK) in lockstep on identical activations, evaluated by k and by mean L0, side by side."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import scratch_beside
from sae_lens_hierarchical.baselines import baseline_config, initialise_b_dec_with_mean, matryoshka_widths
from sae_lens_hierarchical.conversion import SOURCE_FIELDS, SOURCE_METADATA_KEY, check_convertible, from_sae
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.distributed import SINGLE_PROCESS, DataParallel, data_parallel_trainers
from sae_lens_hierarchical.evaluation import (
    BudgetMetrics,
    default_budgets,
    format_comparison_table,
    plot_comparison,
    serving_mean_l0s,
)
from sae_lens_hierarchical.hierarchical_topk_sae import (
    ARCHITECTURE,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    check_weights_finite,
)
from sae_lens_hierarchical.jobs.checkpoints import (
    CHECKPOINT_MARKER,
    json_safe,
    latest_checkpoint,
    mark_complete,
    stop_at_step_boundaries,
    stop_between_evaluations,
)
from sae_lens_hierarchical.jobs.common import (
    EmbeddedActivations,
    check_output_dir,
    finish_job,
    prepare_embedded_activations,
)
from sae_lens_hierarchical.jobs.hierarchicalize import check_source_fits, fine_tune_overrides, load_source
from sae_lens_hierarchical.jobs.overrides import apply_overrides
from sae_lens_hierarchical.jobs.train import streamed_dataset
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.objectives import objective_overrides
from sae_lens_hierarchical.presets import Preset, replace_runner_config
from sae_lens_hierarchical.reporting import format_mean_l0_table, mean_l0_lines, plot_mean_l0

BASELINES = ("topk", "batchtopk", "matryoshka", "multi_topk")


@dataclass(frozen=True)
class SuiteMember:
    """One SAE of a comparison: its training settings and the budgets it is evaluated at.

    ``family`` groups members into one line of the comparison: ``"hierarchical"``, ``"topk_fixed"`` (one TopK
    SAE per budget, each evaluated at its own k), ``"topk_truncated"`` (TopK at K evaluated at every k),
    ``"batchtopk"`` (one BatchTopK SAE per budget), ``"matryoshka"`` and ``"multi_topk"``.
    """

    name: str
    family: str
    sae_overrides: dict[str, Any]
    eval_ks: list[int]
    objective: str | None = None
    """A named HierarchicalTopK objective (:mod:`sae_lens_hierarchical.objectives`); None: the config's own."""
    architecture: str = ARCHITECTURE
    """The SAELens training architecture: ``hierarchical_topk`` (also the TopK baselines, as one level), or one of
    SAELens's own (:data:`sae_lens_hierarchical.baselines.SAE_LENS_BASELINES`), built by ``baseline_config``."""
    mean_l0s: list[int] = field(default_factory=list)
    """Target mean L0s at which the SAE is served by one calibrated global threshold."""
    as_saved: bool = False
    """Also evaluate the SAE as it encodes by itself (a JumpReLU export at its own thresholds)."""

    @property
    def line(self) -> str:
        """The report line this member belongs to: its family, split by objective when several are compared."""
        return self.family if self.objective is None else f"{self.family}:{self.objective}"


def baseline_suite(
    max_k: int,
    budgets: list[int],
    baselines: tuple[str, ...] = BASELINES,
    objectives: dict[str, dict[str, Any]] | None = None,
) -> list[SuiteMember]:
    """HierarchicalTopK at K plus the baselines: TopK at each budget (the one at K doubles as truncated TopK),
    BatchTopK at each budget, Matryoshka BatchTopK at K, Multi-TopK.

    ``objectives`` (name -> HierarchicalTopK config fields, from :func:`~sae_lens_hierarchical.objectives.
    objective_overrides`) puts one HierarchicalTopK SAE per objective in the suite, ``htopk-k<K>-<name>``, side by
    side on the same batches; without it there is one, ``htopk-k<K>``, with the config's own objective.

    The TopK baselines are this package's training SAE with a single level (proven equal to SAELens's TopK training
    SAE in tests/test_architecture.py), so they ride the same sparse step; Multi-TopK is ``L(K/4) + L(K)/8`` (Gao et
    al., 2024). BatchTopK and Matryoshka are SAELens's own classes, configured from the same SAE config
    (:func:`~sae_lens_hierarchical.baselines.baseline_config`; Matryoshka's nested widths from
    :func:`~sae_lens_hierarchical.baselines.matryoshka_widths`), so initialisation, b_dec, AuxK and rescaling are
    the same for all of them and only the objective differs.

    Evaluation: every SAE that can serve budgets below its own is also served by threshold at mean L0 = 1, 2, 4, ...,
    K/2; BatchTopK SAEs at their own saved thresholds and re-thresholded to exactly their k; Matryoshka at its own
    thresholds and re-thresholded to each mean L0.
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; allowed: {list(BASELINES)}")
    budgets = sorted(set(budgets))
    if not budgets or budgets[0] < 1 or budgets[-1] > max_k:
        raise ValueError(f"comparison budgets must be in 1..K={max_k}; got {budgets}")
    eval_ks = sorted(set(default_budgets(max_k)) | set(budgets))
    mean_l0s = serving_mean_l0s(max_k)
    if objectives is not None and not objectives:
        raise ValueError("objectives must name at least one objective (or be None for the config's own)")
    if objectives is None:
        members = [SuiteMember(f"htopk-k{max_k}", "hierarchical", {}, eval_ks, mean_l0s=mean_l0s)]
    else:
        members = [
            SuiteMember(
                f"htopk-k{fields.get('k', max_k)}-{name}",
                "hierarchical",
                fields,
                sorted(set(default_budgets(fields.get("k", max_k))) | set(budgets)),
                objective=name,
                mean_l0s=serving_mean_l0s(fields.get("k", max_k)),
            )
            for name, fields in objectives.items()
        ]
    if "topk" in baselines:
        for k in budgets:
            if k < max_k:
                members.append(SuiteMember(f"topk-k{k}", "topk_fixed", _single_level(k), [k]))
        truncated = SuiteMember(f"topk-k{max_k}", "topk_truncated", _single_level(max_k), eval_ks, mean_l0s=mean_l0s)
        members.append(truncated)
    if "batchtopk" in baselines:
        for k in budgets:
            members.append(
                SuiteMember(f"batchtopk-k{k}", "batchtopk", {"k": k}, [], None, "batchtopk", [k], as_saved=True)
            )
    if "matryoshka" in baselines:
        members.append(
            SuiteMember(
                f"matryoshka-k{max_k}",
                "matryoshka",
                {"k": max_k},
                [],
                architecture="matryoshka_batchtopk",
                mean_l0s=mean_l0s,
                as_saved=True,
            )
        )
    if "multi_topk" in baselines and max_k >= 4:
        multi = {"k": max_k, "hierarchy_levels": [max_k // 4, max_k], "hierarchy_weights": [1.0, 0.125], **_NO_SCHEDULE}
        members.append(
            SuiteMember(f"multi-topk-k{max_k // 4}-k{max_k}", "multi_topk", multi, eval_ks, mean_l0s=mean_l0s)
        )
    return members


# A baseline keeps its own fixed objective whatever level-weight schedule the HierarchicalTopK SAE is given.
_NO_SCHEDULE = {
    "hierarchy_final_weights": None,
    "hierarchy_schedule_steps": 0,
    "hierarchy_sampled_levels": 0,
    "served_k": None,
}


def _single_level(k: int) -> dict[str, Any]:
    return {"k": k, "hierarchy_levels": [k], "hierarchy_weights": None, **_NO_SCHEDULE}


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
    overrides = fine_tune_overrides(preset, overrides or {}) if init_from is not None else overrides or {}
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
        job = {"preset": preset.name, "overrides": overrides, "training_tokens": training_tokens}
        job |= {"eval_tokens": eval_tokens, "downstream_tokens": downstream_tokens, "seed": seed}
        job |= {"budgets": budgets, "baselines": list(baselines), "objectives": objectives}
        job |= {} if source_record is None else {"init_from": source_record}
        job |= {"data_parallel_processes": parallel.world_size} if parallel.active else {}
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


def train_suite(
    cfg: LanguageModelSAERunnerConfig[Any],
    members: list[SuiteMember],
    model: HookedTransformer,
    activations: EmbeddedActivations | None,
    output_dir: Path | None,
    seed: int = 0,
    dataset: Dataset | None = None,
    checkpoint_dir: Path | None = None,
    n_checkpoints: int = 0,
    parallel: DataParallel = SINGLE_PROCESS,
    initial_sae: tuple[Any, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Train every member in lockstep and save each to ``output_dir/<name>`` (SAELens files; None saves nothing).

    ``initial_sae``: ``(a pretrained SAE, where it came from)``, which every HierarchicalTopK member starts from instead
    of a random initialisation
    (converted by :func:`~sae_lens_hierarchical.conversion.from_sae`, equal to it at k = K; with
    ``expected_average_only_in`` put in the units of the scaling factor the trainer will estimate from the same
    batches, and folded back at the end). From cached activations, in one process.

    All SAEs are initialised from the same seed, so same-shaped SAEs start from identical weights. Without
    cached ``activations`` the LM runs on ``dataset`` (default: the config's ``dataset_path``).

    From cached activations, ``n_checkpoints`` checkpoints go to ``checkpoint_dir``, and a later call with
    the same settings resumes from the newest complete one: the batch order is a pure function of the seed
    and the step, so the resumed run ends with the same weights as an uninterrupted one.

    Under torchrun (``parallel``) every SAE is trained data-parallel: each rank reads its own cached share (or its
    share of ``dataset``) in batches of B/N tokens, and rank 0 writes the checkpoints; resuming needs the same N.
    """
    saes = {member.name: build_member(cfg, member, seed, initial_sae) for member in members}
    sae_dirs = {} if output_dir is None else {name: output_dir / name for name in saes}
    rank_cfg = parallel.runner_config(cfg)
    if initial_sae is not None and (parallel.active or activations is None or activations.train is None):
        raise ValueError("starting from a pretrained SAE needs cached activations and one process")
    if activations is None or activations.train is None:
        if n_checkpoints:
            raise ValueError("checkpoints are supported when training from cached activations (embedded presets)")
        if parallel.active:
            dataset = parallel.shard(dataset if dataset is not None else streamed_dataset(cfg))
        multi_cfg = MultiSAETrainingRunnerConfig(
            saes={name: sae.cfg for name, sae in saes.items()},
            hook_names=cfg.hook_name,
            output_path=None if output_dir is None else str(output_dir),
            checkpoint_path=None,
            logger=LoggingConfig(log_to_wandb=False),
            **{name: getattr(rank_cfg, name) for name in _SHARED_RUNNER_FIELDS},
        )
        runner = MultiSAETrainingRunner(multi_cfg, override_dataset=dataset, override_model=model, override_saes=saes)
        with data_parallel_trainers():
            runner.run()
        return sae_dirs
    if n_checkpoints and checkpoint_dir is None:
        raise ValueError("n_checkpoints > 0 needs a checkpoint_dir")
    for sae in saes.values():
        for name in RUNNER_ONLY_METADATA:
            setattr(sae.cfg.metadata, name, getattr(cfg, name))
    # Each rank's device differs under torchrun (cuda:<local rank>); nothing else may differ between checkpoints.
    runner_settings = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "llm_device", "act_store_device")}
    settings = {"members": [asdict(m) for m in members], "seed": seed, "runner": json_safe(runner_settings)}
    if parallel.active:
        settings["data_parallel_processes"] = parallel.world_size
    trainer_cfg = replace(
        rank_cfg.to_sae_trainer_config(),
        n_checkpoints=n_checkpoints,
        checkpoint_path=None if checkpoint_dir is None else str(checkpoint_dir),  # also where a preempted run stops
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    resume_from = latest_checkpoint(checkpoint_dir, settings) if checkpoint_dir else None
    # The scaling-factor or whitening estimate reads the first batches; a resumed run restores the statistics instead.
    needs_estimate = any(sae.cfg.normalize_activations in _ESTIMATED_NORMALIZATIONS for sae in saes.values())
    skipped = 0
    if resume_from is not None:
        state = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
        skipped = state["n_training_steps"] + (cfg.n_batches_for_norm_estimate if needs_estimate else 0)
    train = activations.train.token_activations(exclude_token_ids=activations.special_token_ids)
    batches = shuffled_batches(train, cfg.hook_name, rank_cfg.train_batch_size_tokens, seed, cfg.device, skip=skipped)
    if initial_sae is not None and resume_from is None:
        _into_estimated_units(
            [sae for member, sae in zip(members, saes.values(), strict=True) if member.family == "hierarchical"],
            shuffled_batches(train, cfg.hook_name, rank_cfg.train_batch_size_tokens, seed, cfg.device),
            cfg,
        )

    def mark_checkpoint(checkpoint_path: Path | None) -> None:
        for name, sae in saes.items():  # a checkpoint of non-finite weights is never marked complete
            check_weights_finite(sae, f"({name}) at checkpoint {checkpoint_path}: not resumable")
        if checkpoint_path is not None and parallel.is_main:
            mark_complete(checkpoint_path, trainer.n_training_steps + 1, settings)

    with data_parallel_trainers():
        trainer = MultiSAETrainer(
            cfg=trainer_cfg,
            saes=saes,
            hook_names=dict.fromkeys(saes, cfg.hook_name),
            data_provider=batches,
            save_checkpoint_fn=mark_checkpoint,
        )
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        # MultiSAETrainer counts a step after checkpointing it; the marker recorded the steps done.
        trainer.n_training_steps = state["n_training_steps"]
        for single in trainer.trainers.values():
            single.n_training_steps = state["n_training_steps"]
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
        if parallel.is_main:
            total = trainer_cfg.total_training_steps
            tqdm.write(f"Resuming from {resume_from} (step {state['n_training_steps']} of {total})")
    if checkpoint_dir is not None:
        stop_at_step_boundaries(trainer, checkpoint_dir, parallel)
    trainer.fit()
    if output_dir is None:
        return sae_dirs
    for name, sae in saes.items():  # every member, SAELens's own classes too, before anything is written
        check_weights_finite(sae, f"({name}) after the last update: not saved")
    for name, sae in saes.items():
        sae_dirs[name].mkdir(parents=True)
        sae.save_inference_model(str(sae_dirs[name]))
        save_file({"sparsity": trainer.trainers[name].log_feature_sparsity}, sae_dirs[name] / SPARSITY_FILENAME)
    return sae_dirs


def build_member(
    cfg: LanguageModelSAERunnerConfig[Any],
    member: SuiteMember,
    seed: int,
    initial_sae: tuple[Any, dict[str, Any]] | None = None,
) -> TrainingSAE[Any]:
    """The member's training SAE, initialised from ``seed`` (same-shaped members start from identical weights), or a
    HierarchicalTopK member converted from ``initial_sae``.

    SAELens's ``from_sae_runner_config`` records the model, hook, context and BOS in the SAE's metadata; SAELens's own
    families get the run's SAE config translated (:func:`~sae_lens_hierarchical.baselines.baseline_config`) and
    the same ``b_dec_init``.
    """
    sae_cfg = HierarchicalTopKTrainingSAEConfig.from_sae_runner_config(cfg)
    if member.family == "hierarchical" and initial_sae is not None:
        member_cfg = replace(sae_cfg, **member.sae_overrides)
        settings = {
            name: getattr(member_cfg, name)
            for name in member_cfg.__dataclass_fields__
            if name not in (*SOURCE_FIELDS, "metadata")
        }
        source, record = initial_sae
        k = check_convertible(source, None) or member_cfg.k  # a JumpReLU source takes the run's K
        converted = from_sae(HierarchicalTopKTrainingSAE, source, k, source=record, **settings)
        record = converted.cfg.metadata.get(SOURCE_METADATA_KEY)  # the run's metadata, and where the SAE came from
        converted.cfg.metadata = type(sae_cfg.metadata).from_dict(
            {**sae_cfg.metadata.to_dict(), SOURCE_METADATA_KEY: record}
        )
        return converted
    if member.architecture == ARCHITECTURE:
        torch.manual_seed(seed)
        return HierarchicalTopKTrainingSAE(replace(sae_cfg, **member.sae_overrides))
    settings = dict(member.sae_overrides)
    if member.architecture == "matryoshka_batchtopk":
        settings.setdefault("matryoshka_widths", matryoshka_widths(sae_cfg.d_sae))
    baseline_cfg = baseline_config(sae_cfg, member.architecture, **settings)
    torch.manual_seed(seed)
    sae = get_sae_training_class(member.architecture)[0](baseline_cfg)
    if sae_cfg.b_dec_init == "mean":
        initialise_b_dec_with_mean(sae)
    return sae


def _into_estimated_units(saes: list[Any], batches: Iterator[dict[str, torch.Tensor]], cfg: Any) -> None:
    """Put converted SAEs (raw units) in the units of the scaling factor SAELens's trainer is about to estimate from
    the first batches of ``batches`` (the same batches, the same estimate), when they normalise that way."""
    scaled = [sae for sae in saes if sae.cfg.normalize_activations == "expected_average_only_in"]
    if not scaled:
        return
    scaler = ActivationScaler()
    first = iter([next(batches)[cfg.hook_name] for _ in range(cfg.n_batches_for_norm_estimate)])
    scaler.estimate_scaling_factor(cfg.sae.d_in, first, cfg.n_batches_for_norm_estimate)
    for sae in scaled:
        sae.fold_activation_norm_scaling_factor(1 / scaler.scaling_factor)
        sae.cfg.normalize_activations = "expected_average_only_in"


# Normalisations whose statistics SAELens's trainer estimates from the first n_batches_for_norm_estimate batches.
_ESTIMATED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")
# Runner fields that SAELens's runners copy into each SAE's metadata when they run (in their private
# ``_set_sae_metadata``) but its public ``from_sae_runner_config`` leaves out. From cached activations train_suite
# drives MultiSAETrainer itself (to own the batch order and resume from checkpoints), so no runner records them.
RUNNER_ONLY_METADATA = (
    "dataset_path",
    "model_class_name",
    "exclude_special_tokens",
    "sequence_separator_token",
    "disable_concat_sequences",
)


_SHARED_RUNNER_FIELDS = (
    "model_name",
    "model_class_name",
    "dataset_path",
    "streaming",
    "context_size",
    "n_batches_in_buffer",
    "training_tokens",
    "store_batch_size_prompts",
    "device",
    "seed",
    "dtype",
    "prepend_bos",
    "train_batch_size_tokens",
    "adam_beta1",
    "adam_beta2",
    "lr",
    "lr_scheduler_name",
    "lr_warm_up_steps",
    "lr_end",
    "lr_decay_steps",
    "dead_feature_window",
    "feature_sampling_window",
    "dead_feature_threshold",
    "exclude_special_tokens",
    "n_batches_for_norm_estimate",
    "model_from_pretrained_kwargs",
)


def shuffled_batches(
    activations: torch.Tensor, hook_name: str, batch_size: int, seed: int, device: str = "cpu", skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless ``{hook_name: [batch_size, d_in]}`` batches: a seeded permutation per epoch, no partial batches.

    Batch ``i`` depends only on ``seed`` and ``i``; ``skip`` starts at batch ``skip`` (for resuming).
    """
    if activations.shape[0] < batch_size:
        raise ValueError(f"train_batch_size_tokens={batch_size} exceeds the {activations.shape[0]} cached tokens")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = activations.shape[0] // batch_size
    index = 0
    while True:
        order = torch.randperm(activations.shape[0], generator=generator)
        if index + per_epoch <= skip:  # a whole epoch before the resume point: only advance the generator
            index += per_epoch
            continue
        for start in range(0, per_epoch * batch_size, batch_size):
            if index >= skip:
                yield {hook_name: activations[order[start : start + batch_size]].to(device)}
            index += 1


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
