"""Where activations come from: language models (:mod:`.models`), corpora packed into token sequences
(:mod:`.corpora`) and the resumable on-disk activation cache (:mod:`.activation_cache`)."""

from __future__ import annotations

from sae_lens_hierarchical.data.activation_cache import (
    DEFAULT_CACHE_ROOT,
    ActivationCache,
    ActivationCacheKey,
    cache_activations,
    collect_activations,
    hook_activations,
    hook_layer,
    open_cache,
)
from sae_lens_hierarchical.data.corpora import (
    WIKIPEDIA_LANGUAGES,
    pack_token_sequences,
    wikipedia_dataset,
    wikipedia_token_sequences,
)
from sae_lens_hierarchical.data.models import GEMMA_3_270M, UNPROCESSED, load_gemma_2_2b, load_gemma_3_270m

__all__ = [
    "DEFAULT_CACHE_ROOT",
    "GEMMA_3_270M",
    "UNPROCESSED",
    "WIKIPEDIA_LANGUAGES",
    "ActivationCache",
    "ActivationCacheKey",
    "cache_activations",
    "collect_activations",
    "hook_activations",
    "hook_layer",
    "load_gemma_2_2b",
    "load_gemma_3_270m",
    "open_cache",
    "pack_token_sequences",
    "wikipedia_dataset",
    "wikipedia_token_sequences",
]
