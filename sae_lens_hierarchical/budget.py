"""What "an SAE at a budget" means, in one place: a budget k, a threshold θ, or both, validated once.

A HierarchicalTopK SAE ranks each token's K largest activations, so any budget is a per-token *prefix* of that
ranking:

- **k** keeps the first k ranks of every token (fixed L0 = k);
- **threshold θ** keeps the ranks whose activation is ≥ θ: one global cut gives each token as many latents as it
  has above θ (never more than K), so the *mean* L0 over tokens is tuned by θ and tokens spend it unevenly;
- **both** keep at most k ranks, and only those ≥ θ.

θ is in the units of ``encode``'s output (the values the ranking sorts): pre-activations times decoder row norms when
``rescale_acts_by_decoder_norm`` is set, which are the plain activations of every saved SAE (its norms are folded).
The SAE's ``encode``/``forward``/views and the evaluation of any SAELens SAE all select through :meth:`Budget.keep`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def is_int(value: object, allow_numpy: bool = False) -> bool:
    """A Python int that is not a bool (``True`` is an int to Python, never a budget); with ``allow_numpy`` a numpy
    integer too (a count or a seed read from numpy data), where the value is only compared, never stored."""
    integer_types = (int, np.integer) if allow_numpy else int
    return isinstance(value, integer_types) and not isinstance(value, bool)


def validate_k(k: object, max_k: int) -> int:
    """Return ``k`` if it is a valid inference budget for an SAE trained with ``K = max_k``."""
    if not is_int(k) or not 1 <= k <= max_k:  # type: ignore[operator]
        raise ValueError(f"k must be an int in 1..K={max_k} (the largest budget this SAE was trained for); got k={k!r}")
    return k  # type: ignore[return-value]


def validate_threshold(threshold: object) -> float:
    """Return ``threshold`` as a float if it is a valid serving threshold: a finite number > 0.

    A threshold of 0 or below would keep nothing more than the plain top-K (activations are ReLU'd), so it is refused
    rather than silently meaning "no threshold".
    """
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = float(threshold)
    if is_int(threshold) or isinstance(threshold, float):
        value = float(threshold)  # type: ignore[arg-type]
        if math.isfinite(value) and value > 0:
            return value
    raise ValueError(
        f"threshold must be a finite number > 0 (in the units of encode's activations); got threshold={threshold!r}"
    )


@dataclass(frozen=True)
class Budget:
    """A serving budget: at most ``k`` ranks per token (None: all the SAE keeps), of which only those with an
    activation ≥ ``threshold`` (None: no cut)."""

    k: int | None = None
    threshold: float | None = None

    def validated(self, max_k: int) -> Budget:
        """This budget with ``k`` checked against K and ``threshold`` normalised to a float (one error each)."""
        k = None if self.k is None else validate_k(self.k, max_k)
        threshold = None if self.threshold is None else validate_threshold(self.threshold)
        return Budget(k, threshold)

    def ranks(self, n_ranks: int) -> int:
        """How many of ``n_ranks`` ranked columns this budget can use."""
        return n_ranks if self.k is None else min(self.k, n_ranks)

    def keep(self, top_acts: torch.Tensor) -> torch.Tensor:
        """``[..., n_ranks]`` bool: which entries of a ranking (activations sorted descending) this budget keeps.

        Entries with activation 0 are never kept (a ReLU'd zero is not an active latent).
        """
        kept = top_acts > 0
        if self.k is not None and self.k < top_acts.shape[-1]:
            kept = kept & (torch.arange(top_acts.shape[-1], device=top_acts.device) < self.k)
        if self.threshold is not None:
            kept = kept & (top_acts >= self.threshold)
        return kept

    @property
    def label(self) -> str:
        """``k=8``, ``θ=0.31``, ``k=8, θ=0.31`` or ``own`` (the SAE as it encodes by itself)."""
        parts = ([] if self.k is None else [f"k={self.k}"]) + (
            [] if self.threshold is None else [f"θ={self.threshold:.4g}"]
        )
        return ", ".join(parts) or "own"
