"""Training a suite in lockstep: every SAE on identical activation batches, one step each per batch (SAELens's
MultiSAETrainer from cached activations, with checkpoints and resuming; its MultiSAETrainingRunner when streaming)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_hierarchical.distributed import SINGLE_PROCESS, DataParallel, data_parallel_trainers
from sae_lens_hierarchical.hierarchical_topk_sae import check_weights_finite
from sae_lens_hierarchical.jobs.checkpoints import (
    CHECKPOINT_MARKER,
    json_safe,
    latest_checkpoint,
    mark_complete,
    stop_at_step_boundaries,
    without_fields,
)
from sae_lens_hierarchical.jobs.common import EmbeddedActivations, into_estimated_units
from sae_lens_hierarchical.jobs.overrides import PER_RUN_FIELDS
from sae_lens_hierarchical.jobs.suite import SuiteMember, build_member
from sae_lens_hierarchical.jobs.train import streamed_dataset


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
    # Each rank's device differs under torchrun (cuda:<local rank>); nothing that changes what is trained may differ.
    per_run = [f"runner.{name}" for name in PER_RUN_FIELDS]
    settings = {"members": [asdict(m) for m in members], "seed": seed, "runner": json_safe(cfg.to_dict())}
    settings = without_fields(settings, per_run)  # what the marker records
    if parallel.active:
        settings["data_parallel_processes"] = parallel.world_size
    trainer_cfg = replace(
        rank_cfg.to_sae_trainer_config(),
        n_checkpoints=n_checkpoints,
        checkpoint_path=None if checkpoint_dir is None else str(checkpoint_dir),  # also where a preempted run stops
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    resume_from = latest_checkpoint(checkpoint_dir, settings, per_run) if checkpoint_dir else None
    # The scaling-factor or whitening estimate reads the first batches; a resumed run restores the statistics instead.
    needs_estimate = any(sae.cfg.normalize_activations in _ESTIMATED_NORMALIZATIONS for sae in saes.values())
    skipped = 0
    if resume_from is not None:
        state = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
        skipped = state["n_training_steps"] + (cfg.n_batches_for_norm_estimate if needs_estimate else 0)
    train = activations.train.token_activations(exclude_token_ids=activations.special_token_ids)
    batches = shuffled_batches(train, cfg.hook_name, rank_cfg.train_batch_size_tokens, seed, cfg.device, skip=skipped)
    if initial_sae is not None and resume_from is None:
        converted = [sae for member, sae in zip(members, saes.values(), strict=True) if member.family == "hierarchical"]
        scaled = [sae for sae in converted if sae.cfg.normalize_activations == "expected_average_only_in"]
        if scaled:  # the same first batches as the trainer's own estimate below
            first = shuffled_batches(train, cfg.hook_name, rank_cfg.train_batch_size_tokens, seed, cfg.device)
            into_estimated_units(
                scaled, (batch[cfg.hook_name] for batch in first), cfg.sae.d_in, cfg.n_batches_for_norm_estimate
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
