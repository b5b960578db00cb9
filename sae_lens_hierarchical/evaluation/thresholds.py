"""The threshold θ that gives a target *mean* L0: one global cut on the ranking values of given activations.

Serving by threshold keeps, per token, the ranked activations >= θ (at most K for TopK-family SAEs), so the mean L0
over tokens falls as θ rises, in steps: it is the number of ranking values >= θ divided by the number of tokens. The
calibrated θ is one of those values, the one whose count is nearest the target; ties (equal values) move together,
so the count can miss the target by the size of a tie, and the K cap limits the largest mean L0 to what the SAE
keeps without a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from sae_lens_hierarchical.evaluation.budgets import ranked_latents


@torch.no_grad()
def ranking_values(
    sae: SAE[Any], activations: torch.Tensor, batch_size: int = 1024, progress: bool = False
) -> torch.Tensor:
    """``[values]`` float64, descending: every positive ranked activation of ``activations`` ``[tokens, d_in]``
    (what serving by threshold compares with θ), in the units of ``sae.encode``'s output."""
    if activations.ndim != 2 or activations.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"activations must be [tokens, d_in={sae.cfg.d_in}]; got shape {tuple(activations.shape)}")
    values = []
    for start in tqdm(range(0, activations.shape[0], batch_size), desc="Ranking values", disable=not progress):
        x = activations[start : start + batch_size].to(sae.device, sae.dtype)
        top_acts = ranked_latents(sae, x)[0]
        values.append(top_acts[top_acts > 0].double().cpu())
    return torch.cat(values).sort(descending=True).values


def largest_mean_l0(values: torch.Tensor, n_tokens: int) -> float:
    """The largest mean L0 a threshold can give: every ranking value of ``n_tokens`` tokens kept (the SAE without a
    threshold, K cap included)."""
    return len(values) / n_tokens


def thresholds_for_mean_l0(values: torch.Tensor, n_tokens: int, mean_l0s: Sequence[float]) -> list[float]:
    """For each target mean L0, the θ among ``values`` (descending, from :func:`ranking_values` of ``n_tokens``
    tokens) whose count of values >= θ is nearest ``target * n_tokens``; one ``ValueError`` for a target outside
    ``(0, largest_mean_l0]``."""
    largest = largest_mean_l0(values, n_tokens)
    if not len(values):
        raise ValueError("the SAE activates no latent on these activations; no threshold gives a mean L0 above 0")
    # Counts reachable by a threshold: at the last position of each run of equal values.
    last_of_run = torch.ones(len(values), dtype=torch.bool)
    last_of_run[:-1] = values[:-1] != values[1:]
    counts = last_of_run.nonzero().reshape(-1) + 1  # ascending
    thresholds = []
    for target in mean_l0s:
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= largest:
            raise ValueError(
                f"mean_l0 must be a number in (0, {largest:.4g}] (the mean L0 of the SAE without a threshold on these "
                f"activations); got mean_l0={target!r}"
            )
        wanted = target * n_tokens
        position = int(torch.searchsorted(counts.double(), torch.tensor(wanted, dtype=torch.float64)))
        candidates = [c for c in (position - 1, position) if 0 <= c < len(counts)]
        best = min(candidates, key=lambda c: abs(int(counts[c]) - wanted))
        thresholds.append(float(values[int(counts[best]) - 1]))
    return thresholds


def calibrate_thresholds(
    sae: SAE[Any],
    activations: torch.Tensor,
    mean_l0s: Sequence[float],
    batch_size: int = 1024,
    progress: bool = False,
) -> list[float]:
    """The thresholds that give each mean L0 in ``mean_l0s`` on ``activations`` ``[tokens, d_in]`` (one pass).

    θ lives on the values ``sae.encode`` returns (decoder-norm-scaled pre-activations for an in-memory SAE with
    ``rescale_acts_by_decoder_norm``; plain activations for a saved one). Use held-out activations without BOS or
    padding rows, which would take latents of their own.
    """
    values = ranking_values(sae, activations, batch_size, progress)
    return thresholds_for_mean_l0(values, activations.shape[0], mean_l0s)


def calibrate_threshold(sae: SAE[Any], activations: torch.Tensor, mean_l0: float, batch_size: int = 1024) -> float:
    """The threshold θ that gives mean L0 ``mean_l0`` on ``activations`` ``[tokens, d_in]``: serve it with
    ``sae.encode(x, threshold=θ)``, ``sae.at_threshold(θ)`` or export it with ``to_jumprelu(sae, θ)``."""
    return calibrate_thresholds(sae, activations, [mean_l0], batch_size)[0]
