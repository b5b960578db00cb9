"""Plumbing shared by the jobs: cached activations of an embedded preset, overrides, reports, results directories.

A job builds its results in a scratch directory beside the target (:func:`sae_lens_hierarchical._files.scratch_beside`)
and :func:`finish_job` renames it into place only when the job has succeeded, so a failed or interrupted job never
leaves a half-written results directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import wandb
from datasets import Dataset
from sae_lens import SAE
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import move_into_place
from sae_lens_hierarchical.budget import Budget
from sae_lens_hierarchical.data.activation_cache import (
    DEFAULT_CACHE_ROOT,
    ActivationCache,
    ActivationCacheKey,
    cache_activations,
)
from sae_lens_hierarchical.distributed import SINGLE_PROCESS, DataParallel
from sae_lens_hierarchical.evaluation import (
    BudgetMetrics,
    BudgetResults,
    evaluate_budgets,
    evaluate_over_k,
    evaluate_over_mean_l0,
    format_first_rank_table,
    format_markdown_table,
    plot_over_k,
)
from sae_lens_hierarchical.presets import Preset, get_preset
from sae_lens_hierarchical.reporting import format_mean_l0_rows, plot_mean_l0


@dataclass
class EmbeddedActivations:
    """Cached held-out (and, for training, training) activations of an embedded preset."""

    held_out: ActivationCache
    special_token_ids: list[int]
    train: ActivationCache | None = None
    train_sequences: Dataset | None = None
    _held_out_activations: torch.Tensor | None = field(default=None, init=False, repr=False)

    def held_out_activations(self) -> torch.Tensor:
        """``[tokens, d_in]`` held-out activations without BOS and other special-token positions (read once)."""
        if self._held_out_activations is None:
            self._held_out_activations = self.held_out.token_activations(exclude_token_ids=self.special_token_ids)
        return self._held_out_activations

    def held_out_tokens(self, n_tokens: int) -> torch.Tensor:
        """``[sequences, context]`` token ids of the first held-out sequences, at least ``n_tokens`` in all."""
        dataset = self.held_out.load()
        n_sequences = min(math.ceil(n_tokens / self.held_out.key.context_size), len(dataset))
        return dataset.select(range(n_sequences))[:]["token_ids"].long()

    def evaluate(
        self,
        sae: SAE[Any],
        model: HookedTransformer,
        downstream_tokens: int,
        ks: list[int] | None = None,
        progress: bool = True,
    ) -> list[BudgetMetrics]:
        """:func:`evaluate_over_k` on the held-out activations, with CE-loss/KL scores on the first
        ``downstream_tokens`` held-out tokens (none when 0); special-token positions are left alone."""
        return evaluate_over_k(
            sae, self.held_out_activations(), ks=ks, progress=progress, **self._scoring(model, downstream_tokens)
        )

    def evaluate_mean_l0(
        self,
        sae: SAE[Any],
        model: HookedTransformer,
        downstream_tokens: int,
        mean_l0s: list[int],
        as_saved: bool = False,
        progress: bool = True,
    ) -> list[BudgetMetrics]:
        """The SAE served by one threshold per target mean L0 (:func:`evaluate_over_mean_l0`, calibrated on these
        held-out activations, so the mean L0 is the target; targets above what the SAE keeps without a threshold are
        skipped with a warning), then, with ``as_saved``, as it encodes by itself (one
        more row, whose ``threshold`` and ``mean_l0_target`` are None). Scores as :meth:`evaluate`."""
        scoring = self._scoring(model, downstream_tokens)
        held_out = self.held_out_activations()
        rows = (
            evaluate_over_mean_l0(sae, held_out, mean_l0s, progress=progress, unreachable="skip", **scoring)
            if mean_l0s
            else []
        )
        if as_saved:
            rows += evaluate_budgets(sae, held_out, [Budget()], progress=progress, **scoring)
        return rows

    def _scoring(self, model: HookedTransformer, downstream_tokens: int) -> dict[str, Any]:
        """The CE-loss/KL arguments of the evaluations: the model and the first held-out tokens, or nothing."""
        if not downstream_tokens:
            return {}
        tokens = self.held_out_tokens(downstream_tokens)
        return {"model": model, "tokens": tokens, "exclude_token_ids": self.special_token_ids}


@dataclass(frozen=True)
class HeldOut:
    """An embedded preset's held-out text, ready to evaluate an SAE on (what ``evaluate`` and the jobs use)."""

    activations: torch.Tensor
    """``[tokens, d_in]`` activations at the hook, BOS, padding and every other special-token position removed."""
    tokens: torch.Tensor
    """``[sequences, context]`` token ids of the first held-out sequences (BOS first), for CE-loss / KL scores."""
    special_token_ids: list[int]
    """Token ids to pass as ``exclude_token_ids`` when splicing (their positions keep clean activations)."""
    model: HookedTransformer
    hook_name: str


def held_out(
    preset: str | Preset = "gemma-3-270m",
    eval_tokens: int | None = None,
    downstream_tokens: int | None = None,
    *,
    hook: str | None = None,
    model: HookedTransformer | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    device: str = "cpu",
    progress: bool = True,
) -> HeldOut:
    """The held-out activations and tokens of an embedded preset (at ``hook``, default its own), cached on first use.

    Special tokens are removed from the activations: BOS rows have norms ~100x those of text and would dominate any
    FVU (``evaluate_over_k`` warns about such rows). Pass ``activations``, and ``model``/``tokens``/
    ``special_token_ids`` for the CE-loss and KL scores, to :func:`evaluate_over_k` or ``evaluate_over_mean_l0``.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if hook is not None:
        preset = preset.at_hook(hook)
    if not preset.embedded:
        raise ValueError(f"preset {preset.name!r} has no embedded held-out text; choose an embedded preset")
    model = model if model is not None else preset.load_model(device)
    cached = prepare_embedded_activations(
        preset, model, eval_tokens or preset.eval_tokens, cache_root=cache_root, progress=progress
    )
    tokens = cached.held_out_tokens(downstream_tokens or preset.downstream_eval_tokens)
    return HeldOut(cached.held_out_activations(), tokens, cached.special_token_ids, model, preset.hook_name)


def prepare_embedded_activations(
    preset: Preset,
    model: HookedTransformer,
    eval_tokens: int,
    training_tokens: int | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    progress: bool = True,
    parallel: DataParallel = SINGLE_PROCESS,
    reuse_larger_cache: bool = False,
) -> EmbeddedActivations:
    """Cache (or reuse) activations of the last held-out sequences and, if asked, the first training ones.

    The preset's sequences come in a fixed shuffled order; training uses a prefix of it and evaluation the
    tail, so the two never overlap and every SAE trained on the same preset sees identical activations.
    Under data parallelism each rank caches and trains on its own contiguous share of that prefix (its own
    cache, so the language model runs on every rank at once); the held-out cache is filled once and shared.
    Only rank 0 shows progress. ``reuse_larger_cache``: a larger cache of the training sequences serves for its first
    rows (for jobs that read the cache themselves, not SAELens's store, which reads a cache whole).
    """
    progress = progress and parallel.is_main
    if preset.load_token_sequences is None:
        raise ValueError(f"preset {preset.name!r} streams its corpus; only embedded presets cache activations")
    sequences = preset.load_token_sequences(model.tokenizer, preset.context_size)
    text_tokens_per_sequence = preset.context_size - 1  # BOS is excluded
    n_eval = math.ceil(eval_tokens / text_tokens_per_sequence)
    if not 1 <= n_eval < len(sequences):
        raise ValueError(
            f"eval_tokens must be in 1..{(len(sequences) - 1) * text_tokens_per_sequence} for preset "
            f"{preset.name!r} ({len(sequences)} sequences of {preset.context_size}); got {eval_tokens}"
        )

    def cached(split: str, subset: Dataset, covering: bool = False) -> ActivationCache:
        key = ActivationCacheKey(
            model_name=preset.model_name,
            hook_name=preset.hook_name,
            corpus=f"{preset.corpus}-{split}",
            context_size=preset.context_size,
            n_sequences=len(subset),
        )
        return cache_activations(model, subset, key, cache_root, progress=progress, covering=covering)

    activations = EmbeddedActivations(
        held_out=cached("heldout", sequences.select(range(len(sequences) - n_eval, len(sequences)))),
        special_token_ids=sorted(get_special_token_ids(model.tokenizer)),
    )
    if training_tokens is not None:
        # More tokens than the corpus holds are reached by SAELens reusing the cache over several epochs.
        n_train = min(math.ceil(training_tokens / text_tokens_per_sequence), len(sequences) - n_eval)
        if n_train < parallel.world_size:
            raise ValueError(
                f"{n_train} training sequences cannot be shared by {parallel.world_size} data-parallel processes; "
                "train on more tokens or start fewer processes"
            )
        train = parallel.shard(sequences.select(range(n_train)))
        # A share's rows depend on n_train and the number of ranks: both name its cache.
        split = f"train{n_train}-rank{parallel.rank}of{parallel.world_size}" if parallel.active else "train"
        activations.train = cached(split, train, covering=reuse_larger_cache and not parallel.active)
        activations.train_sequences = train
    return activations


def write_report(
    results: list[BudgetMetrics], directory: Path, title: str, mean_l0_results: list[BudgetMetrics] | None = None
) -> None:
    """``per_k.md`` (tables), ``per_k.json`` and ``per_k.png`` (plot) in ``directory``; with ``mean_l0_results`` (the
    SAE served by threshold, :meth:`EmbeddedActivations.evaluate_mean_l0`) also their table and ``mean_l0.png``
    (FVU and CE-loss score against mean L0, fixed k and threshold side by side).

    ``per_k.json`` is ``{"per_k": [one row per budget], "first_rank": ..., "per_mean_l0": [one row per target]}``.
    Results of :func:`evaluate_over_k` carry each latent's first rank: its histogram is ``first_rank`` (else null), a
    second table in ``per_k.md`` and a panel of ``per_k.png``.
    """
    table = format_markdown_table(results) if results else ""
    first_rank = None
    if isinstance(results, BudgetResults):
        table += "\n\nLatents by the first rank at which they fire:\n\n" + format_first_rank_table(results.first_ranks)
        first_rank = results.first_ranks.to_dict()
    if mean_l0_results:
        table += (
            "\n\nServed by one threshold per target mean L0 (each token keeps its activations >= θ, at most K; θ "
            "calibrated on these held-out tokens), against fixed k:\n\n" + format_mean_l0_rows(mean_l0_results, results)
        )
        lines = {("hierarchical", "k"): {float(r.k): r for r in results if r.k is not None}}
        lines[("hierarchical", "threshold")] = {r.l0: r for r in mean_l0_results}
        plot_mean_l0({key: line for key, line in lines.items() if line}, directory / "mean_l0.png", title)
    (directory / "per_k.md").write_text(table.strip() + "\n")
    report = {
        "per_k": [r.to_dict() for r in results],
        "first_rank": first_rank,
        "per_mean_l0": [r.to_dict() for r in mean_l0_results or []],
    }
    (directory / "per_k.json").write_text(json.dumps(report, indent=2))
    if results:
        plot_over_k(results, directory / "per_k.png", title=title)


def finish_job(scratch: Path, output_dir: Path, job: dict[str, Any], started: float) -> float:
    """Record the job's settings and duration in ``job.json``, then move the results into place."""
    seconds = time.perf_counter() - started
    (scratch / "job.json").write_text(json.dumps({**job, "seconds": round(seconds, 1)}, indent=2))
    move_into_place(scratch, output_dir)
    return seconds


def into_estimated_units(saes: list[Any], first_batches: Iterator[torch.Tensor], d_in: int, n_batches: int) -> float:
    """Put SAEs that take raw activations (a converted pretrained SAE) into the units of SAELens's
    ``expected_average_only_in`` factor, estimated by SAELens's own ``ActivationScaler`` from ``n_batches``
    ``[tokens, d_in]`` batches: the ones a suite's trainer reads first for its own estimate (the same factor), or
    those whose factor a runner is then handed. The trainer folds the factor back into the weights at the end.
    Returns the factor."""
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(d_in, first_batches, n_batches)
    assert scaler.scaling_factor is not None
    for sae in saes:
        sae.fold_activation_norm_scaling_factor(1 / scaler.scaling_factor)
        sae.cfg.normalize_activations = "expected_average_only_in"
    return scaler.scaling_factor


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite``, before any expensive work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output directory {output_dir} exists and is a file")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {output_dir} exists and is not empty; pass overwrite or choose another")


@contextmanager
def wandb_environment(mode: str, directory: Path) -> Iterator[None]:
    """wandb's mode and run directory for the duration of one job, restored afterwards.

    wandb reads its settings once per process: it is torn down after the job, so that a second job in the same
    process (a notebook, a test) writes its run into its own directory, not the first one's.
    """
    saved = {name: os.environ.get(name) for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    if mode != "disabled":
        # wandb's own closing lines name the scratch directory, which is renamed when the job succeeds: the job
        # prints where the run ended up instead.
        os.environ.update(WANDB_MODE=mode, WANDB_DIR=str(directory), WANDB_SILENT="true")
    try:
        yield
    finally:
        if mode != "disabled":
            wandb.teardown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
