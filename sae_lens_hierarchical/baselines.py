"""SAELens's own SAE families as comparison baselines: a config built from the HierarchicalTopK run's, and nothing else.

A baseline is a config, not a class: BatchTopK (``batchtopk``, SAELens's ``BatchTopKTrainingSAE``, one global
threshold learnt in training and saved as a JumpReLU SAE) and Matryoshka BatchTopK (``matryoshka_batchtopk``,
nested dictionary prefixes, saved as JumpReLU too) are built from the run's SAE config, so they share its width,
normalisation, decoder-norm rescaling, AuxK coefficient, decoder init and dtype; only the objective differs.

``b_dec_init="mean"`` is this package's option (SAELens starts b_dec at zero); :func:`initialise_b_dec_with_mean`
gives SAELens's SAEs the same start, so that every member of a comparison begins from identical weights.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput

from sae_lens_hierarchical.hierarchical_topk_sae import trained_b_dec_loaded

# The SAELens training architectures a comparison can build, with the config fields a member must set.
SAE_LENS_BASELINES = {"batchtopk": ("k",), "matryoshka_batchtopk": ("k", "matryoshka_widths")}


# Settings of how this package's SAE runs, not of what it learns: SAELens's classes keep their own.
_NOT_SHARED = ("use_sparse_activations",)


def matryoshka_widths(d_sae: int) -> list[int]:
    """Nested dictionary prefixes doubling from d_sae/16 up to d_sae (5 levels; the outermost is the whole SAE).

    The Matryoshka papers use a handful of geometrically growing widths; d_sae/16 keeps the innermost level a few
    hundred latents at the preset's size (256 of 4,096), wide enough for the coarse features it must hold.
    """
    widths = sorted({max(1, d_sae // 2**power) for power in range(4, -1, -1)})
    return widths


def baseline_config(source: TrainingSAEConfig, architecture: str, **settings: Any) -> TrainingSAEConfig:
    """SAELens's training config of ``architecture`` with every field it shares with ``source`` copied over (width,
    normalisation, rescaling, AuxK, init, dtype, device, metadata), then ``settings`` (e.g. ``k``).

    Fields that only ``source``'s class has (the hierarchy's levels, ``b_dec_init``) stay behind; unknown
    ``settings`` for that architecture are refused.
    """
    if architecture not in SAE_LENS_BASELINES:
        raise ValueError(f"unknown baseline architecture {architecture!r}; allowed: {sorted(SAE_LENS_BASELINES)}")
    cfg_class = get_sae_training_class(architecture)[1]
    names = {field.name for field in fields(cfg_class)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"{architecture} configs have no fields {unknown}")
    missing = [name for name in SAE_LENS_BASELINES[architecture] if name not in settings]
    if missing:
        raise ValueError(f"a {architecture} baseline needs {missing}")
    shared = {
        field.name: getattr(source, field.name)
        for field in fields(source)
        if field.name in names and field.name not in _NOT_SHARED
    }
    return cfg_class(**{**shared, **settings})


def initialise_b_dec_with_mean(sae: TrainingSAE[Any]) -> None:
    """Set ``sae.b_dec`` to the mean of its first training batch (after SAELens's activation scaling), as this
    package's ``b_dec_init="mean"`` does, for one of SAELens's own training SAEs.

    Follows the same protocol: ``b_dec_pending_mean_init`` is set until the first step, which the data-parallel
    trainer reads to take the mean over every rank's batch instead; loading weights into the SAE (resuming) clears it.
    """
    sae.b_dec_pending_mean_init = True  # type: ignore[attr-defined]
    own_step = type(sae).training_forward_pass

    def training_forward_pass(step_input: TrainStepInput) -> TrainStepOutput:
        if sae.b_dec_pending_mean_init:  # type: ignore[attr-defined]
            with torch.no_grad():
                sae.b_dec.copy_(step_input.sae_in.reshape(-1, sae.cfg.d_in).mean(dim=0))
            sae.b_dec_pending_mean_init = False  # type: ignore[attr-defined]
        return own_step(sae, step_input)

    sae.training_forward_pass = training_forward_pass  # type: ignore[method-assign]
    sae.register_load_state_dict_post_hook(trained_b_dec_loaded)
