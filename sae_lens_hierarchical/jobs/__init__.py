"""The jobs behind the CLI: train one SAE with SAELens's runner (:mod:`.train`), or compare HierarchicalTopK with its
baselines (:mod:`.compare`: the suite's members in :mod:`.suite`, trained in lockstep by :mod:`.lockstep`); shared
plumbing (cached activations, overrides, reports, results directories) in :mod:`.common`."""

from __future__ import annotations

from sae_lens_hierarchical.jobs.checkpoints import CHECKPOINT_MARKER, latest_checkpoint
from sae_lens_hierarchical.jobs.common import (
    EmbeddedActivations,
    prepare_embedded_activations,
    write_report,
)
from sae_lens_hierarchical.jobs.compare import ComparisonJobResult, run_comparison_job, write_comparison_report
from sae_lens_hierarchical.jobs.lockstep import shuffled_batches, train_suite
from sae_lens_hierarchical.jobs.overrides import apply_overrides
from sae_lens_hierarchical.jobs.suite import BASELINES, SuiteMember, baseline_suite
from sae_lens_hierarchical.jobs.train import SAE_DIRNAME, TrainingJobResult, run_training_job

__all__ = [
    "BASELINES",
    "CHECKPOINT_MARKER",
    "SAE_DIRNAME",
    "ComparisonJobResult",
    "EmbeddedActivations",
    "SuiteMember",
    "TrainingJobResult",
    "apply_overrides",
    "baseline_suite",
    "latest_checkpoint",
    "prepare_embedded_activations",
    "run_comparison_job",
    "run_training_job",
    "shuffled_batches",
    "train_suite",
    "write_comparison_report",
    "write_report",
]
