"""The training job: one HierarchicalTopK SAE trained by SAELens's runner, then evaluated at every budget k."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, IterableDataset, load_dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.constants import RUNNER_CFG_FILENAME
from sae_lens.saes.sae import TrainingSAE
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import scratch_beside, write_json_atomically
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.distributed import SINGLE_PROCESS, DataParallel, data_parallel_trainers
from sae_lens_hierarchical.evaluation import BudgetMetrics, serving_mean_l0s
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKSAE
from sae_lens_hierarchical.jobs.checkpoints import (
    json_safe,
    latest_checkpoint,
    mark_complete,
    stop_at_step_boundaries,
    without_fields,
)
from sae_lens_hierarchical.jobs.common import (
    EmbeddedActivations,
    check_output_dir,
    finish_job,
    prepare_embedded_activations,
    wandb_environment,
    write_report,
)
from sae_lens_hierarchical.jobs.overrides import PER_RUN_FIELDS, apply_overrides
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.presets import Preset, replace_runner_config

SAE_DIRNAME = "sae"


@dataclass
class TrainingJobResult:
    output_dir: Path
    sae_dir: Path
    results: list[BudgetMetrics]
    seconds: float


def run_training_job(
    preset: Preset,
    output_dir: Path,
    overrides: dict[str, Any] | None = None,
    training_tokens: int | None = None,
    eval_tokens: int | None = None,
    downstream_tokens: int | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    device: str = "cpu",
    wandb: str = "offline",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    model: HookedTransformer | None = None,
    dataset: Dataset | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
    initial_sae: TrainingSAE[Any] | None = None,
    scaling_factor: float | None = None,
) -> TrainingJobResult:
    """Train a HierarchicalTopK SAE on ``preset`` and evaluate it at every budget k on held-out text.

    Args:
        overrides: runner fields by name and SAE fields as ``sae.<name>`` (e.g. ``{"sae.k": 32}``).
        wandb: ``"offline"`` (default: logs under the results directory), ``"online"`` or ``"disabled"``.
        downstream_tokens: held-out tokens for CE-loss/KL scores (default the preset's; 0 skips them).
        model: an already loaded model for ``preset`` (loading Gemma takes ~35 s).
        dataset: for a streamed preset, the token sequences its activations come from (default: the config's
            ``dataset_path`` on the Hugging Face Hub); embedded presets bring their own.
        parallel: this process's place in a torchrun job (:func:`~sae_lens_hierarchical.distributed.
            joined_process_group`): each rank trains on its share of the corpus and of every batch, rank 0 alone
            writes, evaluates and reports.
        initial_sae: an SAE to fine-tune instead of a fresh one (its config replaces the preset's SAE config).
        scaling_factor: with ``initial_sae``, the activation scaling it was put in the units of: the trainer uses it
            instead of estimating one, and folds it back into the weights at the end.
    """
    if wandb not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb must be 'offline', 'online' or 'disabled'; got {wandb!r}")
    if dataset is not None and preset.embedded:
        raise ValueError(f"preset {preset.name!r} brings its own corpus; dataset is for streamed presets")
    check_output_dir(output_dir, overwrite)
    started = time.perf_counter()
    training_tokens = training_tokens or preset.training_tokens
    eval_tokens = eval_tokens or preset.eval_tokens
    downstream_tokens = preset.downstream_eval_tokens if downstream_tokens is None else downstream_tokens
    # Validate the configuration before any expensive work.
    cfg = apply_overrides(preset.runner_config(None, training_tokens=training_tokens, seed=seed), overrides or {})
    if initial_sae is not None:
        cfg = replace_runner_config(cfg, sae=initial_sae.cfg)
    if dataset is not None:  # the SAE's metadata and runner_cfg.json name what it was trained on, not the preset's
        cfg = replace_runner_config(cfg, dataset_path=f"a {type(dataset).__name__} passed to run_training_job")
    rank_cfg = parallel.runner_config(cfg)
    device = parallel.device(device)
    model = model if model is not None else preset.load_model(device)
    activations = None
    if preset.embedded:
        activations = prepare_embedded_activations(
            preset, model, eval_tokens, training_tokens, cache_root=cache_root, progress=progress, parallel=parallel
        )
    elif parallel.active:
        dataset = parallel.shard(dataset if dataset is not None else streamed_dataset(cfg))
    job = {"preset": preset.name, "overrides": overrides or {}, "training_tokens": training_tokens}
    job |= {"eval_tokens": eval_tokens, "downstream_tokens": downstream_tokens, "seed": seed}
    # A preempted run leaves a checkpoint here; the same job run again resumes from it (SAELens's resume).
    checkpoint_dir = output_dir.parent / f".{output_dir.name}.checkpoints"
    settings = without_fields(json_safe(cfg.to_dict()), PER_RUN_FIELDS)  # what the marker records
    start = {"initial_sae": initial_sae, "scaling_factor": scaling_factor, "checkpoint_dir": checkpoint_dir}
    resume_from = latest_checkpoint(checkpoint_dir, settings, PER_RUN_FIELDS) if not parallel.active else None
    if resume_from is not None:
        rank_cfg = replace_runner_config(rank_cfg, resume_from_checkpoint=str(resume_from))
        if progress:
            print(f"Resuming from {resume_from}")
    start["settings"] = settings
    if not parallel.is_main:  # the other ranks train their share; rank 0 writes, evaluates and reports
        _run_sae_lens_runner(
            rank_cfg, model, activations, dataset, device, None, "disabled", preset.name, seed, **start
        )
        return TrainingJobResult(output_dir, output_dir / SAE_DIRNAME, [], time.perf_counter() - started)
    with scratch_beside(output_dir) as scratch, wandb_environment(wandb, scratch):
        sae_dir = scratch / SAE_DIRNAME
        _run_sae_lens_runner(rank_cfg, model, activations, dataset, device, sae_dir, wandb, preset.name, seed, **start)
        portable_runner_config(sae_dir / RUNNER_CFG_FILENAME)
        results: list[BudgetMetrics] = []
        if activations is not None:
            sae = load_sae(sae_dir)
            assert isinstance(sae, HierarchicalTopKSAE)
            results = activations.evaluate(sae, model, downstream_tokens, progress=progress)
            mean_l0_results = activations.evaluate_mean_l0(
                sae, model, downstream_tokens, serving_mean_l0s(sae.cfg.k), progress=progress
            )
            title = f"HierarchicalTopK on {preset.model_name} ({preset.hook_name})"
            write_report(results, scratch, title=title, mean_l0_results=mean_l0_results)
        if parallel.active:
            job["data_parallel_processes"] = parallel.world_size
        seconds = finish_job(scratch, output_dir, job, started)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainingJobResult(output_dir, output_dir / SAE_DIRNAME, results, seconds)


def _run_sae_lens_runner(
    cfg: LanguageModelSAERunnerConfig[Any],
    model: HookedTransformer,
    activations: EmbeddedActivations | None,
    dataset: Dataset | None,
    device: str,
    output_path: Path | None,
    wandb: str,
    run_name: str,
    seed: int,
    initial_sae: TrainingSAE[Any] | None = None,
    scaling_factor: float | None = None,
    checkpoint_dir: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> None:
    """SAELens's runner on this rank's activations (the cache, else ``dataset``, else the config's corpus); the SAE
    (``initial_sae``, else a fresh one) is saved to ``output_path`` unless it is None. Under torchrun it builds the
    data-parallel trainer. On SIGTERM/SIGINT it checkpoints into ``checkpoint_dir`` (marked with ``settings``) after
    the step it is in, and stops."""
    run_changes: dict[str, Any] = {"output_path": None if output_path is None else str(output_path), "device": device}
    if activations is not None and activations.train is not None:
        cached_path = str(activations.train.activations_path)
        run_changes |= {"use_cached_activations": True, "cached_activations_path": cached_path}
    if wandb != "disabled":
        run_changes["logger"] = LoggingConfig(
            log_to_wandb=True, wandb_project="sae-lens-hierarchical", run_name=f"htopk-{run_name}"
        )
        # In-loop evaluations run the whole LM with logits: keep them small on a CPU.
        run_changes |= {"n_eval_batches": 1, "eval_batch_size_prompts": 4}
    cfg = replace_runner_config(cfg, **run_changes)
    torch.manual_seed(seed)  # SAELens does not seed torch from cfg.seed; this fixes the SAE's initialisation
    runner = FixedScalingRunner(
        cfg,
        override_model=model,
        override_dataset=activations.train_sequences if activations is not None else dataset,
        override_sae=initial_sae,
    )
    runner.scaling_factor = scaling_factor
    runner.stop_checkpoints = None if checkpoint_dir is None else (checkpoint_dir, settings or {})
    with data_parallel_trainers():
        runner.run()


# runner_cfg.json fields that name where this run's files were on this machine: a record must not carry them (a rerun
# with ``train --config`` sets its own).
_RUN_LOCATIONS = ("output_path", "cached_activations_path", "use_cached_activations", "resume_from_checkpoint")


def portable_runner_config(path: Path) -> None:
    """Rewrite SAELens's ``runner_cfg.json`` without this run's locations (scratch directory, activation cache, resume
    checkpoint), so the record says what was trained and nothing about where."""
    if path.is_file():
        config = json.loads(path.read_text())
        write_json_atomically(path, {name: value for name, value in config.items() if name not in _RUN_LOCATIONS})


class FixedScalingRunner(LanguageModelSAETrainingRunner):  # type: ignore[type-arg]
    """SAELens's runner, with the activation scaling factor given instead of estimated when ``scaling_factor`` is set:
    an SAE converted from a pretrained one was put in the units of that factor before training."""

    scaling_factor: float | None = None
    stop_checkpoints: tuple[Path, dict[str, Any]] | None = None
    """Where a preempted run checkpoints, and the settings its marker records."""

    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        """``trainer.fit()``; SAELens's own handlers (which stop mid-step) give way to a checkpoint at the next step
        boundary (:func:`~sae_lens_hierarchical.jobs.checkpoints.stop_at_step_boundaries`)."""
        if self.scaling_factor is not None:
            trainer.activation_scaler.scaling_factor = self.scaling_factor
        if self.stop_checkpoints is not None:
            checkpoint_dir, settings = self.stop_checkpoints

            def marked(path: Path) -> None:
                mark_complete(path, trainer.n_training_steps + 1, settings)

            stop_at_step_boundaries(trainer, checkpoint_dir, on_saved=marked)
        return trainer.fit()


def streamed_dataset(cfg: LanguageModelSAERunnerConfig[Any]) -> IterableDataset | Dataset:
    """The corpus SAELens's activation store would load from ``cfg.dataset_path``, loaded here so that each
    data-parallel rank can take its own share of it."""
    return load_dataset(cfg.dataset_path, split="train", streaming=cfg.streaming)
