"""End-to-end jobs behind the CLI: cache activations, train with SAELens's runner, evaluate every budget k.

Results directories are written to a scratch directory beside the target and renamed into place only when
the job has succeeded, so a failed or interrupted job never leaves a half-written results directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.util import get_special_token_ids
from safetensors.torch import save_file
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import move_into_place, scratch_beside, write_json_atomically
from sae_lens_hierarchical.data.activation_cache import (
    DEFAULT_CACHE_ROOT,
    ActivationCache,
    ActivationCacheKey,
    cache_activations,
)
from sae_lens_hierarchical.evaluation import (
    BudgetMetrics,
    BudgetResults,
    default_budgets,
    evaluate_over_k,
    format_comparison_table,
    format_first_rank_table,
    format_markdown_table,
    plot_comparison,
    plot_over_k,
)
from sae_lens_hierarchical.hierarchical_topk_sae import (
    HierarchicalTopKSAE,
    HierarchicalTopKTrainingSAE,
)
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
        tokens = self.held_out_tokens(downstream_tokens) if downstream_tokens else None
        return evaluate_over_k(
            sae,
            self.held_out_activations(),
            ks=ks,
            progress=progress,
            model=model if tokens is not None else None,
            tokens=tokens,
            exclude_token_ids=self.special_token_ids,
        )


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
    downstream_tokens: int | None = None,
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
        downstream_tokens: held-out tokens for CE-loss/KL scores (default the preset's; 0 skips them).
        model: an already loaded model for ``preset`` (loading Gemma takes ~35 s).
    """
    if wandb not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb must be 'offline', 'online' or 'disabled'; got {wandb!r}")
    _check_output_dir(output_dir, overwrite)
    started = time.perf_counter()
    training_tokens = training_tokens or preset.training_tokens
    eval_tokens = eval_tokens or preset.eval_tokens
    downstream_tokens = preset.downstream_eval_tokens if downstream_tokens is None else downstream_tokens
    # Validate the configuration before any expensive work.
    cfg = apply_overrides(preset.runner_config(None, training_tokens=training_tokens, seed=seed), overrides or {})
    model = model if model is not None else preset.load_model(device)
    activations = None
    if preset.embedded:
        activations = prepare_embedded_activations(
            preset, model, eval_tokens, training_tokens, cache_root=cache_root, progress=progress
        )
    with scratch_beside(output_dir) as scratch, _wandb_environment(wandb, scratch):
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
            results = activations.evaluate(sae, model, downstream_tokens, progress=progress)
            write_report(results, scratch, title=f"HierarchicalTopK on {preset.model_name} ({preset.hook_name})")
        job = {"preset": preset.name, "overrides": overrides or {}, "training_tokens": training_tokens}
        job |= {"eval_tokens": eval_tokens, "downstream_tokens": downstream_tokens, "seed": seed}
        seconds = _finish_job(scratch, output_dir, job, started)
    return TrainingJobResult(output_dir, output_dir / SAE_DIRNAME, results, seconds)


def write_report(results: list[BudgetMetrics], directory: Path, title: str) -> None:
    """``per_k.md`` (table), ``per_k.json`` and ``per_k.png`` (plot) in ``directory``.

    ``per_k.json`` is ``{"per_k": [one row per budget], "first_rank": ...}``. Results of :func:`evaluate_over_k`
    carry each latent's first rank: its histogram is ``first_rank`` (else null), a second table in ``per_k.md`` and a
    panel of ``per_k.png``.
    """
    table = format_markdown_table(results)
    first_rank = None
    if isinstance(results, BudgetResults):
        table += "\n\nLatents by the first rank at which they fire:\n\n" + format_first_rank_table(results.first_ranks)
        first_rank = results.first_ranks.to_dict()
    (directory / "per_k.md").write_text(table + "\n")
    report = {"per_k": [r.to_dict() for r in results], "first_rank": first_rank}
    (directory / "per_k.json").write_text(json.dumps(report, indent=2))
    plot_over_k(results, directory / "per_k.png", title=title)


def _finish_job(scratch: Path, output_dir: Path, job: dict[str, Any], started: float) -> float:
    """Record the job's settings and duration in ``job.json``, then move the results into place."""
    seconds = time.perf_counter() - started
    (scratch / "job.json").write_text(json.dumps({**job, "seconds": round(seconds, 1)}, indent=2))
    move_into_place(scratch, output_dir)
    return seconds


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


# --- Baseline suite: HierarchicalTopK against fixed-k TopK SAEs trained on identical activations ---

BASELINES = ("topk", "multi_topk")


@dataclass(frozen=True)
class SuiteMember:
    """One SAE of a comparison: its training settings and the budgets it is evaluated at.

    ``family`` groups members into one line of the comparison: ``"hierarchical"``, ``"topk_fixed"`` (one TopK
    SAE per budget, each evaluated at its own k), ``"topk_truncated"`` (TopK at K evaluated at every k) and
    ``"multi_topk"``.
    """

    name: str
    family: str
    sae_overrides: dict[str, Any]
    eval_ks: list[int]


def baseline_suite(max_k: int, budgets: list[int], baselines: tuple[str, ...] = BASELINES) -> list[SuiteMember]:
    """HierarchicalTopK at K plus the baselines: TopK at each budget (the one at K doubles as truncated TopK).

    Every baseline is this package's training SAE with a single level (proven equal to SAELens's TopK
    training SAE in tests/test_architecture.py), so initialisation, b_dec, AuxK and rescaling are the same
    for all of them and only the objective differs. Multi-TopK is ``L(K/4) + L(K)/8`` (Gao et al., 2024).
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; allowed: {list(BASELINES)}")
    budgets = sorted(set(budgets))
    if not budgets or budgets[0] < 1 or budgets[-1] > max_k:
        raise ValueError(f"comparison budgets must be in 1..K={max_k}; got {budgets}")
    eval_ks = sorted(set(default_budgets(max_k)) | set(budgets))
    members = [SuiteMember(f"htopk-k{max_k}", "hierarchical", {}, eval_ks)]
    if "topk" in baselines:
        for k in budgets:
            if k < max_k:
                members.append(SuiteMember(f"topk-k{k}", "topk_fixed", _single_level(k), [k]))
        members.append(SuiteMember(f"topk-k{max_k}", "topk_truncated", _single_level(max_k), eval_ks))
    if "multi_topk" in baselines and max_k >= 4:
        multi = {"k": max_k, "hierarchy_levels": [max_k // 4, max_k], "hierarchy_weights": [1.0, 0.125]}
        members.append(SuiteMember(f"multi-topk-k{max_k // 4}-k{max_k}", "multi_topk", multi, eval_ks))
    return members


def _single_level(k: int) -> dict[str, Any]:
    return {"k": k, "hierarchy_levels": [k], "hierarchy_weights": None}


@dataclass
class ComparisonJobResult:
    output_dir: Path
    results: dict[str, list[BudgetMetrics]]
    seconds: float


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
    """
    _check_output_dir(output_dir, overwrite)
    if n_checkpoints < 0:
        raise ValueError(f"n_checkpoints must be >= 0; got {n_checkpoints}")
    started = time.perf_counter()
    training_tokens = training_tokens or preset.training_tokens
    eval_tokens = eval_tokens or preset.eval_tokens
    downstream_tokens = preset.downstream_eval_tokens if downstream_tokens is None else downstream_tokens
    cfg = apply_overrides(preset.runner_config(None, training_tokens=training_tokens, seed=seed), overrides or {})
    cfg = replace(cfg, device=device)
    max_k = cfg.sae.k
    budgets = budgets or sorted({max(1, max_k // 8), max(1, max_k // 4), max(1, max_k // 2), max_k})
    members = baseline_suite(max_k, budgets, baselines)
    model = model if model is not None else preset.load_model(device)
    activations = None
    if preset.embedded:
        activations = prepare_embedded_activations(
            preset, model, eval_tokens, training_tokens, cache_root=cache_root, progress=progress
        )
    with scratch_beside(output_dir) as scratch:
        checkpoint_dir = output_dir.parent / f".{output_dir.name}.checkpoints"
        sae_dirs = train_suite(
            cfg,
            members,
            model,
            activations,
            scratch / "saes",
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            n_checkpoints=n_checkpoints,
        )
        results: dict[str, list[BudgetMetrics]] = {}
        if activations is not None:
            for member in members:
                saved = load_sae(sae_dirs[member.name], device=device)
                results[member.name] = activations.evaluate(
                    saved, model, downstream_tokens, ks=member.eval_ks, progress=progress
                )
            title = f"{preset.model_name} {preset.hook_name}: {training_tokens:,} tokens, d_sae {cfg.sae.d_sae}"
            write_comparison_report(results, members, scratch, title)
        job = {"preset": preset.name, "overrides": overrides or {}, "training_tokens": training_tokens}
        job |= {"eval_tokens": eval_tokens, "downstream_tokens": downstream_tokens, "seed": seed}
        job |= {"budgets": budgets, "baselines": list(baselines)}
        seconds = _finish_job(scratch, output_dir, job, started)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return ComparisonJobResult(output_dir, results, seconds)


def train_suite(
    cfg: LanguageModelSAERunnerConfig[Any],
    members: list[SuiteMember],
    model: HookedTransformer,
    activations: EmbeddedActivations | None,
    output_dir: Path,
    seed: int = 0,
    dataset: Dataset | None = None,
    checkpoint_dir: Path | None = None,
    n_checkpoints: int = 0,
) -> dict[str, Path]:
    """Train every member in lockstep and save each to ``output_dir/<name>`` (SAELens files).

    All SAEs are initialised from the same seed, so same-shaped SAEs start from identical weights. Without
    cached ``activations`` the LM runs on ``dataset`` (default: the config's ``dataset_path``).

    From cached activations, ``n_checkpoints`` checkpoints go to ``checkpoint_dir``, and a later call with
    the same settings resumes from the newest complete one: the batch order is a pure function of the seed
    and the step, so the resumed run ends with the same weights as an uninterrupted one.
    """
    saes: dict[str, TrainingSAE[Any]] = {}
    for member in members:
        torch.manual_seed(seed)
        saes[member.name] = HierarchicalTopKTrainingSAE(replace(cfg.sae, **member.sae_overrides))
    sae_dirs = {name: output_dir / name for name in saes}
    if activations is None or activations.train is None:
        if n_checkpoints:
            raise ValueError("checkpoints are supported when training from cached activations (embedded presets)")
        multi_cfg = MultiSAETrainingRunnerConfig(
            saes={name: sae.cfg for name, sae in saes.items()},
            hook_names=cfg.hook_name,
            output_path=str(output_dir),
            checkpoint_path=None,
            logger=LoggingConfig(log_to_wandb=False),
            **{name: getattr(cfg, name) for name in _SHARED_RUNNER_FIELDS},
        )
        MultiSAETrainingRunner(multi_cfg, override_dataset=dataset, override_model=model, override_saes=saes).run()
        return sae_dirs
    if n_checkpoints and checkpoint_dir is None:
        raise ValueError("n_checkpoints > 0 needs a checkpoint_dir")
    for sae in saes.values():
        _set_metadata(sae, cfg)
    settings = {"members": [asdict(m) for m in members], "seed": seed, "runner": _json_safe(cfg.to_dict())}
    trainer_cfg = replace(
        cfg.to_sae_trainer_config(),
        n_checkpoints=n_checkpoints,
        checkpoint_path=str(checkpoint_dir) if n_checkpoints else None,
        logger=LoggingConfig(log_to_wandb=False),
    )
    resume_from = latest_checkpoint(checkpoint_dir, settings) if n_checkpoints and checkpoint_dir else None
    # The scaling-factor estimate reads the first batches; a resumed run restores the factor instead.
    needs_estimate = any(sae.cfg.normalize_activations == "expected_average_only_in" for sae in saes.values())
    skipped = 0
    if resume_from is not None:
        state = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
        skipped = state["n_training_steps"] + (cfg.n_batches_for_norm_estimate if needs_estimate else 0)
    train = activations.train.token_activations(exclude_token_ids=activations.special_token_ids)
    batches = shuffled_batches(train, cfg.hook_name, cfg.train_batch_size_tokens, seed, cfg.device, skip=skipped)

    def mark_complete(checkpoint_path: Path | None) -> None:
        if checkpoint_path is not None:
            state = {"n_training_steps": trainer.n_training_steps + 1, "settings": settings}
            write_json_atomically(checkpoint_path / CHECKPOINT_MARKER, state)

    trainer = MultiSAETrainer(
        cfg=trainer_cfg,
        saes=saes,
        hook_names=dict.fromkeys(saes, cfg.hook_name),
        data_provider=batches,
        save_checkpoint_fn=mark_complete,
    )
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        # MultiSAETrainer counts a step after checkpointing it; the marker recorded the steps done.
        trainer.n_training_steps = state["n_training_steps"]
        for single in trainer.trainers.values():
            single.n_training_steps = state["n_training_steps"]
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    trainer.fit()
    for name, sae in saes.items():
        sae_dirs[name].mkdir(parents=True)
        sae.save_inference_model(str(sae_dirs[name]))
        save_file({"sparsity": trainer.trainers[name].log_feature_sparsity}, sae_dirs[name] / SPARSITY_FILENAME)
    return sae_dirs


CHECKPOINT_MARKER = "checkpoint_complete.json"


def latest_checkpoint(checkpoint_dir: Path, settings: dict[str, Any]) -> Path | None:
    """The newest checkpoint under ``checkpoint_dir`` whose completion marker exists, or None.

    A checkpoint interrupted while being written has no marker and is ignored. A complete one written with
    different settings is refused, naming the directory, rather than silently mixed into this run.
    """
    if not checkpoint_dir.is_dir():
        return None
    complete = [path.parent for path in checkpoint_dir.glob(f"*/{CHECKPOINT_MARKER}")]
    if not complete:
        return None
    newest = max(complete, key=lambda path: json.loads((path / CHECKPOINT_MARKER).read_text())["n_training_steps"])
    if json.loads((newest / CHECKPOINT_MARKER).read_text())["settings"] != settings:
        raise ValueError(
            f"checkpoint {newest} was written with different settings; delete {checkpoint_dir} to start afresh"
        )
    return newest


def _json_safe(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so settings compare equal after a round trip."""
    return json.loads(json.dumps(value, default=str))


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


def _set_metadata(sae: TrainingSAE[Any], cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """The metadata SAELens's runner records, so the SAE loads and splices like a runner-trained one."""
    for name in (
        "dataset_path",
        "hook_name",
        "model_name",
        "model_class_name",
        "hook_head_index",
        "context_size",
        "seqpos_slice",
        "model_from_pretrained_kwargs",
        "prepend_bos",
        "exclude_special_tokens",
        "sequence_separator_token",
        "disable_concat_sequences",
    ):
        setattr(sae.cfg.metadata, name, getattr(cfg, name))


def write_comparison_report(
    results: dict[str, list[BudgetMetrics]], members: list[SuiteMember], directory: Path, title: str
) -> None:
    """``comparison.md`` (tables), ``comparison.json`` and ``comparison_fvu.png`` / ``comparison_ce.png``."""
    families = {member.name: member.family for member in members}
    (directory / "comparison.md").write_text(format_comparison_table(results, families) + "\n")
    payload = {
        "title": title,
        "saes": {
            member.name: {
                "family": member.family,
                "settings": member.sae_overrides,
                "results": [r.to_dict() for r in results[member.name]],
            }
            for member in members
        },
    }
    (directory / "comparison.json").write_text(json.dumps(payload, indent=2))
    plot_comparison(results, families, directory / "comparison_fvu.png", "fvu", title)
    if all(r.ce_loss_score is not None for rows in results.values() for r in rows):
        plot_comparison(results, families, directory / "comparison_ce.png", "ce_loss_score", title)
