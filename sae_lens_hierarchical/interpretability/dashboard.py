"""Latent dashboards: a static site, one index and one page per latent, of what each latent does at every budget k.

All statistics come from one pass over held-out tokens. Each token's latents are ranked once at the largest budget K;
budget k is the first k ranks of that ranking (a HierarchicalTopK SAE's nested budgets; any other TopK-family SAE
truncated to its k largest activations, as :func:`sae_lens_hierarchical.evaluation.ranked_latents` does), so firing
frequencies, ranks and top contexts at every k describe one encoding. The site opens from disk (inline CSS, SVG and a
few lines of JS; no server, no network); each page is rendered from the JSON written beside it, which notebooks and
tests read. It is built in a scratch directory and renamed into place: all of it appears, or none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sae_lens import SAE
from sae_lens.util import get_special_token_ids
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import check_new_directory, move_into_place, scratch_beside, write_new_directory
from sae_lens_hierarchical.data.activation_cache import hook_activations
from sae_lens_hierarchical.evaluation import (
    lower_median_rank,
    max_budget,
    rank_histogram,
    ranked_latents,
    resolve_budgets,
)
from sae_lens_hierarchical.loading import load_sae

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


@dataclass(frozen=True)
class LatentDashboard:
    """A written dashboard: ``index.html``, ``dashboard.json`` and ``latents/<id>.html`` / ``.json`` in a directory."""

    directory: Path

    @property
    def index(self) -> Path:
        return self.directory / "index.html"

    def summary(self) -> dict[str, Any]:
        """``dashboard.json``: the SAE, the budgets, one row per latent page, every latent's first and median rank."""
        return json.loads((self.directory / SUMMARY_FILENAME).read_text())

    def latent(self, latent: int) -> dict[str, Any]:
        """The numbers one latent's page shows: frequencies, ranks, histogram, logit effects, top contexts per k."""
        return json.loads((self.directory / LATENTS_DIRNAME / f"{latent}.json").read_text())

    def table(self) -> pd.DataFrame:
        """The index as a table, one row per latent page; frequencies in columns ``frequency_k<k>``."""
        summary = self.summary()
        frame = pd.DataFrame(summary["latents"])
        frequencies = pd.DataFrame(frame.pop("frequency").tolist(), columns=[f"frequency_k{k}" for k in summary["ks"]])
        return pd.concat([frame, frequencies], axis=1)


@torch.no_grad()
def latent_dashboard(
    model: HookedTransformer,
    sae: SAE[Any] | str | Path,
    tokens: torch.Tensor,
    output_dir: str | Path,
    *,
    activations: torch.Tensor | None = None,
    latents: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    n_contexts: int = 10,
    window: tuple[int, int] = (12, 4),
    n_logit_tokens: int = 10,
    exclude_token_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    title: str | None = None,
) -> LatentDashboard:
    """Write a latent dashboard of ``sae`` on ``tokens`` to ``output_dir``: all of it, or nothing on failure.

    Args:
        model: its tokenizer decodes tokens, its unembedding gives logit effects and, without ``activations``, it
            computes the activations at the SAE's hook (``sae.cfg.metadata.hook_name``).
        sae: any TopK-family SAELens SAE, in memory or a directory; budgets below its k truncate it.
        tokens: ``[sequences, context]`` held-out token ids.
        activations: ``[sequences, context, d_in]`` activations of ``tokens`` at the SAE's hook, if already computed.
        latents: the latents that get a page (default :func:`default_dashboard_latents`).
        ks: budgets whose frequencies and top contexts pages show (default :func:`dashboard_budgets`).
        n_contexts, window: top contexts per budget; tokens shown before and after each one's largest activation.
        n_logit_tokens: promoted and suppressed tokens listed per latent.
        exclude_token_ids: tokens neither ranked nor counted (default the tokenizer's special tokens, e.g. BOS).
        overwrite: replace an existing ``output_dir`` (else it must be new or empty).
    """
    sae = load_sae(sae) if isinstance(sae, (str, Path)) else sae
    output_dir = Path(output_dir)
    if not overwrite:
        check_new_directory(output_dir)
    elif output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is a file; choose a directory")
    max_k = max_budget(sae)
    ks = resolve_budgets(sae, list(ks) if ks else (dashboard_budgets(max_k) if max_k else None))
    pages = None if latents is None else _check_latents(latents, sae.cfg.d_sae)
    for name, value in (("n_contexts", n_contexts), ("n_logit_tokens", n_logit_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    if len(window) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in window):
        raise ValueError(f"window must be two ints >= 0 (tokens before and after the largest); got {window!r}")
    if tokens.ndim != 2 or tokens.is_floating_point():
        raise ValueError(f"tokens must be integer ids [sequences, context]; got {tokens.dtype} {list(tokens.shape)}")
    if activations is None:
        activations = hook_activations(model, tokens, _hook_name(model, sae))
    if activations.shape[:2] != tokens.shape or activations[0, 0].numel() != sae.cfg.d_in:
        raise ValueError(
            f"activations must be [sequences, context, d_in] = {[*tokens.shape, sae.cfg.d_in]} for these tokens and "
            f"this SAE; got {list(activations.shape)}"
        )
    excluded = sorted(get_special_token_ids(model.tokenizer) if exclude_token_ids is None else exclude_token_ids)
    tracked = None if pages is None else torch.tensor(pages)
    statistics = collect_latent_statistics(
        sae, tokens, activations, ks, tracked, excluded, n_contexts, window, batch_size, progress
    )
    pages = default_dashboard_latents(statistics) if pages is None else pages
    logit_effects = _logit_effects(model, sae, pages, n_logit_tokens, progress)
    from sae_lens_hierarchical.interpretability.dashboard_site import DashboardSite  # it builds on this module

    site = DashboardSite(model, sae, statistics, pages, logit_effects, excluded, title, progress)
    if not overwrite:
        write_new_directory(output_dir, site.write)
        return LatentDashboard(output_dir)
    with scratch_beside(output_dir) as scratch:
        site.write(scratch)
        move_into_place(scratch, output_dir)
    return LatentDashboard(output_dir)


def _check_latents(latents: Sequence[int], d_sae: int) -> list[int]:
    allowed = f"ints in 0..{d_sae - 1} (d_sae={d_sae})"
    if isinstance(latents, (str, bytes)) or not list(latents):
        raise ValueError(f"latents must be a non-empty list of {allowed}; got {latents!r}")
    for latent in latents:
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < d_sae:
            raise ValueError(f"latents must be {allowed}; got latent {latent!r}")
    return sorted(set(latents))


def _hook_name(model: HookedTransformer, sae: SAE[Any]) -> str:
    hook_name = sae.cfg.metadata.hook_name
    if not hook_name or hook_name not in model.hook_dict:
        raise ValueError(f"sae.cfg.metadata.hook_name {hook_name!r} is not a hook of the model; pass activations=")
    return hook_name


def _logit_effects(
    model: HookedTransformer, sae: SAE[Any], latents: list[int], n: int, progress: bool
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each latent's direct effect on the logits per unit of activation: its decoder direction (over the row norm
    when the SAE rescales by it), centred for LayerNorm, times the final norm's weights, through ``W_U``. Later layers
    and the per-token norm scale are left out, as sae_dashboard does with folded layer norms.

    ``[(values, token ids) of the promoted, (values, token ids) of the suppressed]``, ``[latents, n]`` each; None when
    the SAE's input is not d_model wide (no direct path to the unembedding).
    """
    if sae.cfg.d_in != model.cfg.d_model:
        return None
    W_U = model.W_U.detach()[:, : len(model.tokenizer)]  # [d_model, d_vocab]
    directions = sae.W_dec.detach()[latents].to(W_U.device, W_U.dtype)  # [latents, d_model]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        directions = directions / directions.norm(dim=-1, keepdim=True)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        directions = directions - directions.mean(dim=-1, keepdim=True)
    norm_weight = getattr(getattr(model, "ln_final", None), "w", None)
    directions = directions if norm_weight is None else directions * norm_weight.detach()
    chunk = max(1, 2**24 // W_U.shape[1])  # latents per [chunk, d_vocab] product (64 MB)
    tops: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    for start in tqdm(range(0, len(latents), chunk), desc="Logit effects", disable=not progress):
        logits = directions[start : start + chunk] @ W_U
        for side, largest in enumerate((True, False)):
            values, ids = logits.topk(min(n, logits.shape[1]), dim=-1, largest=largest)
            tops[side].append((values.float().cpu(), ids.cpu()))
    return [(torch.cat([v for v, _ in side]), torch.cat([i for _, i in side])) for side in tops]


def visible_token(text: str) -> str:
    """A token as pages print it: newline as ↵, tab as ⇥, other control characters as their Unicode pictures."""
    return "".join({"\n": "↵", "\t": "⇥"}.get(c, chr(0x2400 + ord(c)) if ord(c) < 32 else c) for c in text)
