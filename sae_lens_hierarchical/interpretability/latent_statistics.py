"""What a latent dashboard shows, computed in one pass over held-out tokens: each latent's firing frequency at every
budget k, its rank histogram and its top contexts, from one ranking of each token's latents at the largest budget K
(budget k is the first k ranks: a HierarchicalTopK SAE's nested budgets; any other TopK-family SAE truncated to its
k largest activations). :mod:`~sae_lens_hierarchical.interpretability.dashboard_site` renders them;
:mod:`~sae_lens_hierarchical.interpretability.dashboard` is the entry point that writes the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from sae_lens_hierarchical.evaluation import (
    lower_median_rank,
    max_budget,
    rank_histogram,
    ranked_latents,
)

SUMMARY_FILENAME = "dashboard.json"
LATENTS_DIRNAME = "latents"
DEFAULT_LATENTS_PER_RANGE = 20
HISTOGRAM_BINS = 40  # even: a histogram doubles its bin width by merging neighbouring pairs
DENSE_ELEMENTS = 2**25  # a batch's activations at k are made dense this many (float64) at a time: 256 MB


def dashboard_budgets(max_k: int) -> list[int]:
    """The default budgets whose top contexts a dashboard shows: K/16, K/4 and K (4, 16, 64 for K = 64)."""
    return sorted({max(1, max_k // 16), max(1, max_k // 4), max_k})


def rank_ranges(n_ranks: int) -> list[tuple[int, int]]:
    """First-rank ranges ``(low, high)``: 1, 2, 3-4, 5-8, ... up to ``n_ranks``, as in ``per_k.md``."""
    ranges, low = [], 1
    while low <= n_ranks:
        high = min(n_ranks, max(1, 2 * (low - 1)))
        ranges.append((low, high))
        low = high + 1
    return ranges


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class LatentStatistics:
    """What one pass over held-out tokens measured; ``L`` tracked latents, ``N`` contexts, ``W`` window tokens."""

    ks: list[int]
    """Budgets whose top contexts were kept, sorted."""
    n_tokens: int
    """Positions counted (excluded tokens such as BOS are not)."""
    rank_counts: torch.Tensor
    """``[d_sae, K]`` long: on how many tokens each latent fired at rank r + 1 (K = the ranking's length)."""
    latents: torch.Tensor
    """``[L]`` long: the latents whose contexts, histograms and largest activations were kept."""
    context_values: torch.Tensor
    """``[len(ks), N, L]``: the latent's largest activation in each top sequence at that k, largest first (0: none)."""
    context_sequences: torch.Tensor
    """``[len(ks), N, L]`` long: that sequence's row in the inspected tokens."""
    context_positions: torch.Tensor
    """``[len(ks), N, L]`` long: the position of that largest activation in its sequence."""
    window_tokens: torch.Tensor
    """``[len(ks), N, L, W]`` long: the token ids around it (-1 beyond the sequence's ends)."""
    window_activations: torch.Tensor
    """``[len(ks), N, L, W]``: the latent's activation at budget k on each of those tokens."""
    histogram_counts: torch.Tensor
    """``[L, HISTOGRAM_BINS]`` long: nonzero activations at K, bin i holding ``[i, i + 1) * histogram_width``."""
    histogram_width: torch.Tensor
    """``[L]`` float64: each latent's bin width, a power of two."""
    max_activations: torch.Tensor
    """``[L]``: each latent's largest activation at K (0 if it never fired)."""
    window: tuple[int, int]
    """Tokens kept before and after each context's largest activation."""

    def fire_counts(self, k: int) -> torch.Tensor:
        """``[d_sae]``: tokens on which each latent fires at budget ``k`` (its rank there is <= k)."""
        return self.rank_counts[:, :k].sum(dim=1)

    def first_ranks(self) -> torch.Tensor:
        """``[d_sae]``: the smallest rank at which each latent fired (0: never within K)."""
        fired = self.rank_counts > 0
        return torch.where(fired.any(dim=1), fired.int().argmax(dim=1) + 1, 0)

    def median_ranks(self) -> torch.Tensor:
        """``[d_sae]``: the median rank (the lower middle one of an even count) at which each fired; 0: never."""
        return lower_median_rank(self.rank_counts)


class _Histograms:
    """Exact histograms of streamed positive values, ``HISTOGRAM_BINS`` bins per row (latent), nothing else kept.

    A row's bin width is a power of two, doubled (neighbouring bins merged, exactly) when a larger value arrives, so
    at the end the row's largest value lies in the upper half of its bins.
    """

    def __init__(self, n_rows: int):
        self.counts = torch.zeros(n_rows, HISTOGRAM_BINS, dtype=torch.long)
        self.exponents = torch.full((n_rows,), -1074, dtype=torch.long)  # width 2**exponent: the smallest double

    def add(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Count ``values`` ``[n]`` (positive) into ``rows`` ``[n]``."""
        values = values.double()
        needed = torch.floor(torch.log2(values / HISTOGRAM_BINS)).long() + 1  # least e: value < bins * 2**e
        wanted = self.exponents.clone().scatter_reduce_(0, rows, needed, reduce="amax")
        empty = self.counts.sum(dim=1) == 0
        self.exponents[empty] = wanted[empty]  # nothing to merge yet
        while (grow := wanted > self.exponents).any():
            half = self.counts[grow].view(-1, HISTOGRAM_BINS // 2, 2).sum(dim=-1)
            self.counts[grow] = torch.cat([half, torch.zeros_like(half)], dim=1)
            self.exponents[grow] += 1
        bins = torch.floor(values / torch.ldexp(torch.ones_like(values), self.exponents[rows])).long()
        flat = rows * HISTOGRAM_BINS + bins.clamp(max=HISTOGRAM_BINS - 1)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))


class _TopContexts:
    """The ``n`` sequences with the largest activations of each latent at one budget, with a window around each.

    Ties go to the earlier sequence (stable sorts, earlier batches first), so the contexts are deterministic.
    """

    def __init__(self, n: int, n_latents: int, window: tuple[int, int]):
        self.offsets = torch.arange(-window[0], window[1] + 1)
        self.kept = (  # each updated in place, a slice of latents at a time
            torch.zeros(n, n_latents, dtype=torch.float64),  # values
            torch.zeros(n, n_latents, dtype=torch.long),  # sequences
            torch.zeros(n, n_latents, dtype=torch.long),  # positions
            torch.full((n, n_latents, len(self.offsets)), -1, dtype=torch.long),  # window tokens
            torch.zeros(n, n_latents, len(self.offsets), dtype=torch.float64),  # window activations
        )

    def update(self, dense: torch.Tensor, token_ids: torch.Tensor, first_sequence: int, latents: slice) -> None:
        """Merge a batch: ``dense`` ``[B, C, l]`` activations at this budget of the tracked ``latents`` (a slice of
        ``l`` columns) on ``token_ids`` ``[B, C]``."""
        _, context, n_latents = dense.shape
        best, best_position = dense.max(dim=1)  # [B, L]
        values, which = (part[: len(self.kept[0])] for part in best.sort(dim=0, descending=True, stable=True))
        positions = best_position.gather(0, which)
        window = positions[..., None] + self.offsets  # [n, L, W]
        inside = (window >= 0) & (window < context)
        window = window.clamp(0, context - 1)
        rows = which[..., None].expand_as(window)
        columns = torch.arange(n_latents)[None, :, None].expand_as(window)
        batch = (
            values,
            which + first_sequence,
            positions,
            torch.where(inside, token_ids[rows, window], -1),
            dense[rows, window, columns] * inside,
        )
        candidates = [torch.cat([kept[:, latents], new]) for kept, new in zip(self.kept, batch, strict=True)]
        keep = candidates[0].sort(dim=0, descending=True, stable=True).indices[: len(self.kept[0])]  # [n, l]
        for kept, c in zip(self.kept, candidates, strict=True):
            kept[:, latents] = c.gather(0, keep if c.ndim == 2 else keep[..., None].expand(-1, -1, c.shape[2]))


@torch.no_grad()
def collect_latent_statistics(
    sae: SAE[Any],
    token_ids: torch.Tensor,
    activations: torch.Tensor,
    ks: list[int],
    latents: torch.Tensor | None = None,
    exclude_token_ids: Sequence[int] = (),
    n_contexts: int = 10,
    window: tuple[int, int] = (12, 4),
    batch_size: int = 8,
    progress: bool = True,
) -> LatentStatistics:
    """One pass over ``activations`` ``[sequences, context, d_in]`` of ``token_ids`` ``[sequences, context]``.

    Positions holding an excluded token are neither ranked nor counted. The ranking has K ranks (the SAE's k, or
    ``max(ks)`` for an SAE without one). Contexts and histograms are kept for ``latents`` (default all): memory grows
    with ``len(ks) * n_contexts * latents * window``; a batch's activations at k are made dense for a slice of the
    latents at a time (at most ``DENSE_ELEMENTS``).
    """
    n_ranks = max_budget(sae) or max(ks)
    d_sae = sae.cfg.d_sae
    tracked = torch.arange(d_sae) if latents is None else latents
    column_of = torch.full((d_sae,), -1, dtype=torch.long)
    column_of[tracked] = torch.arange(len(tracked))
    rank_counts = torch.zeros(d_sae, n_ranks, dtype=torch.long)
    contexts = [_TopContexts(n_contexts, len(tracked), window) for _ in ks]
    histograms = _Histograms(len(tracked))
    max_activations = torch.zeros(len(tracked), dtype=torch.float64)
    excluded = torch.tensor(list(exclude_token_ids), dtype=torch.long)
    n_sequences, context = token_ids.shape
    n_tokens = 0
    for start in tqdm(range(0, n_sequences, batch_size), desc="Collecting latent statistics", disable=not progress):
        tokens = token_ids[start : start + batch_size].long()
        keep = ~torch.isin(tokens, excluded).reshape(-1)
        x = activations[start : start + batch_size].reshape(-1, sae.cfg.d_in)[keep]
        top_acts, top_indices, _ = ranked_latents(sae, x.to(sae.device, sae.dtype), n_ranks)  # [T, K] each
        top_acts, top_indices = top_acts.double().cpu(), top_indices.cpu()
        fired = top_acts > 0
        n_tokens += len(x)
        rank_counts += rank_histogram(top_acts, top_indices, d_sae)
        columns = column_of[top_indices]
        rows = keep.nonzero().squeeze(1)[:, None].expand_as(top_indices)  # each token's row in the [B * C] batch
        width = max(1, DENSE_ELEMENTS // len(keep))  # latents per dense slice
        for k, top in zip(ks, contexts, strict=True):
            for low in range(0, len(tracked), width):
                high = min(low + width, len(tracked))
                chosen = fired[:, :k] & (columns[:, :k] >= low) & (columns[:, :k] < high)
                dense = torch.zeros(len(keep), high - low, dtype=torch.float64)
                dense[rows[:, :k][chosen], columns[:, :k][chosen] - low] = top_acts[:, :k][chosen]
                top.update(dense.view(len(tokens), context, -1), tokens, start, slice(low, high))
        chosen = fired & (columns >= 0)
        histograms.add(columns[chosen], top_acts[chosen])
        max_activations.scatter_reduce_(0, columns[chosen], top_acts[chosen], reduce="amax")
    if n_tokens == 0:
        raise ValueError(f"no token to inspect: all {token_ids.numel()} positions hold excluded tokens")
    kept = [torch.stack(parts) for parts in zip(*(top.kept for top in contexts), strict=True)]
    return LatentStatistics(
        ks,
        n_tokens,
        rank_counts,
        tracked,
        *kept,
        histograms.counts,
        torch.ldexp(torch.ones(len(tracked), dtype=torch.float64), histograms.exponents),
        max_activations,
        window,
    )


def default_dashboard_latents(statistics: LatentStatistics, per_range: int = DEFAULT_LATENTS_PER_RANGE) -> list[int]:
    """Up to ``per_range`` latents from each first-rank range (1, 2, 3-4, ..., K), the SAE's coarse-to-fine spread;
    within a range, spaced evenly over its latents sorted by firing frequency at K (the most frequent first)."""
    n_ranks = statistics.rank_counts.shape[1]
    first, counts = statistics.first_ranks(), statistics.fire_counts(n_ranks)
    chosen: list[int] = []
    for low, high in rank_ranges(n_ranks):
        members = ((first >= low) & (first <= high)).nonzero().squeeze(1)
        members = members[counts[members].argsort(descending=True, stable=True)]
        chosen += members[torch.linspace(0, len(members) - 1, min(per_range, len(members))).round().long()].tolist()
    return sorted(set(chosen))


def visible_token(text: str) -> str:
    """A token as pages print it: newline as ↵, tab as ⇥, other control characters as their Unicode pictures."""
    return "".join({"\n": "↵", "\t": "⇥"}.get(c, chr(0x2400 + ord(c)) if ord(c) < 32 else c) for c in text)
