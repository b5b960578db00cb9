"""HierarchicalTopK sparse autoencoders for SAELens: train once at K, run at any budget k <= K.

Importing this package registers the architecture ``"hierarchical_topk"`` with SAELens (inference and
training), so SAELens's runner, ``SAE.load_from_disk`` and ``SAE.from_pretrained`` know it.
"""

from __future__ import annotations

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sae_lens_hierarchical.budget import Budget
from sae_lens_hierarchical.evaluation.thresholds import calibrate_threshold
from sae_lens_hierarchical.hierarchical_topk_sae import (
    ARCHITECTURE,
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
)
from sae_lens_hierarchical.inspection import active_latents
from sae_lens_hierarchical.jobs.common import HeldOut, held_out
from sae_lens_hierarchical.loading import load_sae

__all__ = [
    "ARCHITECTURE",
    "Budget",
    "HeldOut",
    "HierarchicalTopKSAE",
    "HierarchicalTopKSAEConfig",
    "HierarchicalTopKTrainingSAE",
    "HierarchicalTopKTrainingSAEConfig",
    "active_latents",
    "calibrate_threshold",
    "held_out",
    "load_sae",
]


def _register_with_sae_lens() -> None:
    """Register (or re-register, after a reload) our classes; refuse to shadow someone else's."""
    for registry in (SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY):
        registered = registry.get(ARCHITECTURE)
        if registered is not None:
            if not registered[0].__module__.startswith(__name__):
                raise ValueError(
                    f"SAELens architecture {ARCHITECTURE!r} is already registered by "
                    f"{registered[0].__module__}.{registered[0].__qualname__}; cannot register ours"
                )
            del registry[ARCHITECTURE]
    register_sae_class(ARCHITECTURE, HierarchicalTopKSAE, HierarchicalTopKSAEConfig)
    register_sae_training_class(ARCHITECTURE, HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig)


_register_with_sae_lens()
