"""The hierarchicalize job: a pretrained SAE converted to HierarchicalTopK, fine-tuned hierarchically by SAELens's
runner on a preset's activations, then evaluated at every budget like a freshly trained one.

The source is a SAELens directory, a directory in EleutherAI sparsify's format, or a Hugging Face repo / SAELens
release (``SAE.from_pretrained``). Everything about the source is checked before the model is loaded: that it
converts, that its width fits the preset's hook, that no override changes what the source fixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_lens import SAE

from sae_lens_hierarchical.conversion import (
    SOURCE_FIELDS,
    SOURCE_METADATA_KEY,
    check_convertible,
    file_hashes,
    from_sae,
    is_sparsify_directory,
    load_sparsify_directory,
)
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig
from sae_lens_hierarchical.jobs.common import check_output_dir, into_estimated_units, prepare_embedded_activations
from sae_lens_hierarchical.jobs.overrides import apply_overrides
from sae_lens_hierarchical.jobs.train import TrainingJobResult, run_training_job
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.presets import Preset

# Tokens of the training activations that choose K for a JumpReLU source (its L0 percentile there).
CALIBRATION_TOKENS = 20_000
# A fine-tune's learning rate is the preset's from-scratch one divided by this. A fresh Adam moves every parameter by
# about the learning rate each step, coherently: at the embedded preset's 2e-3, 58 steps took a trained TopK SAE's FVU
# at K from 0.033 to 2.3 (worse than predicting the mean). docs/quality.md, section 8, has the rates tried.
FINE_TUNE_LR_DIVISOR = 40


def fine_tune_overrides(preset: Preset, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with the fine-tune learning rate (the preset's over :data:`FINE_TUNE_LR_DIVISOR`) unless they
    set ``lr`` themselves."""
    return {"lr": preset.lr / FINE_TUNE_LR_DIVISOR, **overrides}


def load_source(source: str | Path, sae_id: str | None = None, device: str = "cpu") -> tuple[SAE[Any], dict[str, Any]]:
    """The source SAE and what identifies it: a local directory by its name and its files' sha256 (never this
    machine's path), a repo or release by its name and ``sae_id``."""
    path = Path(source).expanduser()
    if path.is_dir() and sae_id is not None:
        path = path / sae_id
    if path.is_dir():
        record = {"source": path.name, "files": file_hashes(path)}
        if is_sparsify_directory(path):
            return load_sparsify_directory(path, device), {**record, "format": "sparsify"}
        return load_sae(path, device=device), {**record, "format": "saelens"}
    if Path(source).expanduser().exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no SAE at {source}: not a directory")
    if sae_id is None:
        raise ValueError(f"sae_id (the SAE inside {source!r}) is required for a Hub repo or SAELens release")
    return load_sae(str(source), sae_id, device=device), {"source": str(source), "sae_id": sae_id, "format": "hub"}


def check_source_fits(sae: SAE[Any], preset: Preset, overrides: dict[str, Any]) -> None:
    """One clear error before any work: a width that does not match the preset's hook, an override of what the
    source fixes, or a source trained at another hook of the same model."""
    if sae.cfg.d_in != preset.d_in:
        raise ValueError(
            f"the source SAE's d_in={sae.cfg.d_in} does not match preset {preset.name!r} ({preset.hook_name}, "
            f"d_in={preset.d_in}); pass the preset of the source's model and hook"
        )
    fixed = sorted(name for name in overrides if name.removeprefix("sae.") in SOURCE_FIELDS and name.startswith("sae."))
    if fixed:
        raise ValueError(f"the source SAE fixes {fixed}; drop those overrides (K comes from the source, or --k)")
    hook = sae.cfg.metadata.hook_name
    if hook and sae.cfg.metadata.model_name == preset.model_name and hook != preset.hook_name:
        raise ValueError(f"the source SAE was trained at {hook!r}; preset {preset.name!r} reads {preset.hook_name!r}")


def run_hierarchicalize_job(
    source: str | Path,
    preset: Preset,
    output_dir: Path,
    sae_id: str | None = None,
    k: int | None = None,
    l0_percentile: float = 99.0,
    overrides: dict[str, Any] | None = None,
    training_tokens: int | None = None,
    eval_tokens: int | None = None,
    downstream_tokens: int | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    device: str = "cpu",
    seed: int = 0,
    wandb: str = "disabled",
    overwrite: bool = False,
    progress: bool = True,
) -> TrainingJobResult:
    """Convert ``source`` (:func:`~sae_lens_hierarchical.conversion.from_sae`) and fine-tune it hierarchically on
    ``training_tokens`` of ``preset``'s activations with SAELens's runner; write the SAE and its per-k report.

    The fine-tune uses the preset's training settings and SAE options (levels, AuxK, normalisation) with ``overrides``
    on top, at a learning rate :data:`FINE_TUNE_LR_DIVISOR` times lower than the preset's unless ``overrides`` set
    ``lr``; the source fixes the width, K and conventions. With the preset's ``expected_average_only_in``, the
    converted weights are put in the units of a scaling factor estimated as SAELens does on the training activations,
    the trainer uses that factor, and folds it back at the end. The saved SAE's metadata records the source (name,
    ``sae_id``, file hashes, how K was chosen) and the fine-tuning tokens.
    """
    check_output_dir(output_dir, overwrite)
    overrides = overrides or {}
    sae, record = load_source(source, sae_id, device)
    check_source_fits(sae, preset, overrides)
    overrides = fine_tune_overrides(preset, overrides)
    training_tokens = training_tokens or preset.training_tokens
    cfg = apply_overrides(preset.runner_config(None, training_tokens=training_tokens, seed=seed), overrides)
    settings = {
        name: value
        for name, value in cfg.sae.to_dict().items()
        if name in _TRAINING_FIELDS and name not in SOURCE_FIELDS
    }
    check_convertible(sae, k)
    model = preset.load_model(device)
    activations = prepare_embedded_activations(
        preset, model, eval_tokens or preset.eval_tokens, training_tokens, cache_root=cache_root, progress=progress
    )
    assert activations.train is not None
    train = activations.train.token_activations(exclude_token_ids=activations.special_token_ids)
    converted = from_sae(
        HierarchicalTopKTrainingSAE,
        sae,
        k,
        calibration_activations=train[:CALIBRATION_TOKENS],
        l0_percentile=l0_percentile,
        source=record,
        **{**settings, "normalize_activations": "none", "device": device},
    )
    getattr(converted.cfg.metadata, SOURCE_METADATA_KEY)["fine_tuning_tokens"] = training_tokens
    getattr(converted.cfg.metadata, SOURCE_METADATA_KEY)["fine_tuning_lr"] = cfg.lr
    scaling_factor = None
    if settings.get("normalize_activations") == "expected_average_only_in":
        batch_size, n_batches = cfg.train_batch_size_tokens, cfg.n_batches_for_norm_estimate
        # The runner is handed this factor (it estimates none itself): the mean norm over the first n_batches batches,
        # or over all the training tokens when they are fewer.
        first = train[: batch_size * n_batches].split(batch_size)
        scaling_factor = into_estimated_units([converted], iter(first), cfg.sae.d_in, len(first))
    return run_training_job(
        preset,
        output_dir,
        overrides=overrides,
        training_tokens=training_tokens,
        eval_tokens=eval_tokens,
        downstream_tokens=downstream_tokens,
        cache_root=cache_root,
        device=device,
        wandb=wandb,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
        model=model,
        initial_sae=converted,
        scaling_factor=scaling_factor,
    )


_TRAINING_FIELDS = {field for field in HierarchicalTopKTrainingSAEConfig.__dataclass_fields__ if field != "metadata"}
