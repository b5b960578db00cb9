"""End-to-end jobs behind the CLI: cache activations, train with SAELens's runner, evaluate every budget k.

Results directories are written to a scratch directory beside the target and renamed into place only when
the job has succeeded, so a failed or interrupted job never leaves a half-written results directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

from sae_lens_hierarchical.activation_cache import (
    DEFAULT_CACHE_ROOT,
    ActivationCache,
    ActivationCacheKey,
    cache_activations,
)
from sae_lens_hierarchical.evaluation import BudgetMetrics, evaluate_over_k, format_markdown_table, plot_over_k
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKSAE
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.presets import Preset

SAE_DIRNAME = "sae"


@dataclass
class EmbeddedActivations:
    """Cached held-out (and, for training, training) activations of an embedded preset."""

    held_out: ActivationCache
    special_token_ids: list[int]
    train: ActivationCache | None = None
    train_sequences: Dataset | None = None

    def held_out_activations(self) -> torch.Tensor:
        """``[tokens, d_in]`` held-out activations without BOS and other special-token positions."""
        return self.held_out.token_activations(exclude_token_ids=self.special_token_ids)


def prepare_embedded_activations(
    preset: Preset,
    model: HookedTransformer,
    eval_tokens: int,
    training_tokens: int | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    progress: bool = True,
) -> EmbeddedActivations:
    """Cache (or reuse) activations of the last held-out sequences and, if asked, the first training ones.

    The preset's sequences come in a fixed shuffled order; training uses a prefix of it and evaluation the
    tail, so the two never overlap and every SAE trained on the same preset sees identical activations.
    """
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

    def cached(split: str, rows: range) -> ActivationCache:
        key = ActivationCacheKey(
            model_name=preset.model_name,
            hook_name=preset.hook_name,
            corpus=f"{preset.corpus}-{split}",
            context_size=preset.context_size,
            n_sequences=len(rows),
        )
        return cache_activations(model, sequences.select(rows), key, cache_root, progress=progress)

    activations = EmbeddedActivations(
        held_out=cached("heldout", range(len(sequences) - n_eval, len(sequences))),
        special_token_ids=sorted(get_special_token_ids(model.tokenizer)),
    )
    if training_tokens is not None:
        # More tokens than the corpus holds are reached by SAELens reusing the cache over several epochs.
        n_train = min(math.ceil(training_tokens / text_tokens_per_sequence), len(sequences) - n_eval)
        activations.train = cached("train", range(n_train))
        activations.train_sequences = sequences.select(range(n_train))
    return activations


@dataclass
class TrainingJobResult:
    output_dir: Path
    sae_dir: Path
    results: list[BudgetMetrics]
    seconds: float


def apply_overrides(
    cfg: LanguageModelSAERunnerConfig[Any], overrides: dict[str, Any]
) -> LanguageModelSAERunnerConfig[Any]:
    """Set runner fields (``lr``) and SAE fields (``sae.k``) by name; unknown names raise a clear error."""
    runner_names = {f.name for f in fields(cfg)}
    sae_names = {f.name for f in fields(cfg.sae)}
    runner_changes: dict[str, Any] = {}
    sae_changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if name.startswith("sae."):
            if name[4:] not in sae_names:
                raise ValueError(f"unknown SAE field {name!r}; SAE fields are sae.<{'|'.join(sorted(sae_names))}>")
            sae_changes[name[4:]] = value
        elif name in runner_names and name != "sae":
            runner_changes[name] = value
        else:
            raise ValueError(f"unknown runner field {name!r}; see LanguageModelSAERunnerConfig, or use sae.<field>")
    if sae_changes:
        runner_changes["sae"] = replace(cfg.sae, **sae_changes)
    return replace(cfg, **runner_changes) if runner_changes else cfg


def run_training_job(
    preset: Preset,
    output_dir: Path,
    overrides: dict[str, Any] | None = None,
    training_tokens: int | None = None,
    eval_tokens: int | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    device: str = "cpu",
    wandb: str = "offline",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    model: HookedTransformer | None = None,
) -> TrainingJobResult:
    """Train a HierarchicalTopK SAE on ``preset`` and evaluate it at every budget k on held-out text.

    Args:
        overrides: runner fields by name and SAE fields as ``sae.<name>`` (e.g. ``{"sae.k": 32}``).
        wandb: ``"offline"`` (default: logs under the results directory), ``"online"`` or ``"disabled"``.
        model: an already loaded model for ``preset`` (loading Gemma takes ~35 s).
    """
    if wandb not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb must be 'offline', 'online' or 'disabled'; got {wandb!r}")
    _check_output_dir(output_dir, overwrite)
    started = time.perf_counter()
    training_tokens = training_tokens or preset.training_tokens
    eval_tokens = eval_tokens or preset.eval_tokens
    # Validate the configuration before any expensive work.
    cfg = apply_overrides(preset.runner_config(None, training_tokens=training_tokens, seed=seed), overrides or {})
    model = model if model is not None else preset.load_model(device)
    activations = None
    if preset.embedded:
        activations = prepare_embedded_activations(
            preset, model, eval_tokens, training_tokens, cache_root=cache_root, progress=progress
        )
    with _scratch_beside(output_dir) as scratch, _wandb_environment(wandb, scratch):
        run_changes: dict[str, Any] = {"output_path": str(scratch / SAE_DIRNAME), "device": device}
        if activations is not None and activations.train is not None:
            cached_path = str(activations.train.activations_path)
            run_changes |= {"use_cached_activations": True, "cached_activations_path": cached_path}
        if wandb != "disabled":
            run_changes["logger"] = LoggingConfig(
                log_to_wandb=True, wandb_project="sae-lens-hierarchical", run_name=f"htopk-{preset.name}"
            )
            # In-loop evaluations run the whole LM with logits: keep them small on a CPU.
            run_changes |= {"n_eval_batches": 1, "eval_batch_size_prompts": 4}
        cfg = replace(cfg, **run_changes)
        torch.manual_seed(seed)  # SAELens does not seed torch from cfg.seed; this fixes the SAE's initialisation
        runner = LanguageModelSAETrainingRunner(
            cfg,
            override_model=model,
            override_dataset=activations.train_sequences if activations is not None else None,
        )
        runner.run()
        sae_dir = scratch / SAE_DIRNAME
        results: list[BudgetMetrics] = []
        if activations is not None:
            sae = load_sae(sae_dir)
            assert isinstance(sae, HierarchicalTopKSAE)
            results = evaluate_over_k(sae, activations.held_out_activations(), progress=progress)
            write_report(results, scratch, title=f"HierarchicalTopK on {preset.model_name} ({preset.hook_name})")
        seconds = time.perf_counter() - started
        job = {
            "preset": preset.name,
            "overrides": overrides or {},
            "training_tokens": training_tokens,
            "eval_tokens": eval_tokens,
            "seed": seed,
            "seconds": round(seconds, 1),
        }
        (scratch / "job.json").write_text(json.dumps(job, indent=2))
        _move_into_place(scratch, output_dir)
    return TrainingJobResult(output_dir, output_dir / SAE_DIRNAME, results, seconds)


def write_report(results: list[BudgetMetrics], directory: Path, title: str) -> None:
    """``per_k.md`` (table), ``per_k.json`` and ``per_k.png`` (plot) in ``directory``."""
    (directory / "per_k.md").write_text(format_markdown_table(results) + "\n")
    (directory / "per_k.json").write_text(json.dumps([r.to_dict() for r in results], indent=2))
    plot_over_k(results, directory / "per_k.png", title=title)


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output directory {output_dir} exists and is a file")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {output_dir} exists and is not empty; pass overwrite or choose another")


@contextmanager
def _wandb_environment(mode: str, directory: Path) -> Iterator[None]:
    """wandb's mode and run directory for the duration of one job, restored afterwards."""
    saved = {name: os.environ.get(name) for name in ("WANDB_MODE", "WANDB_DIR")}
    if mode != "disabled":
        os.environ.update(WANDB_MODE=mode, WANDB_DIR=str(directory))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _scratch_beside(target: Path) -> Iterator[Path]:
    """A scratch directory on the same file system as ``target`` (so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp's 0700 would otherwise become the results directory's mode
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _move_into_place(scratch: Path, target: Path) -> None:
    """Rename ``scratch`` to ``target``; an old ``target`` is moved aside first and removed only after."""
    if not target.exists():
        os.replace(scratch, target)
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, aside)
    os.replace(scratch, target)
    shutil.rmtree(aside)
