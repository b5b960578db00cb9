"""Latent dashboards: a static site, one index and one page per latent, of what each latent does at every budget k.

All statistics come from one pass over held-out tokens. Each token's latents are ranked once at the largest budget K;
budget k is the first k ranks of that ranking (a HierarchicalTopK SAE's nested budgets; any other TopK-family SAE
truncated to its k largest activations, as :func:`sae_lens_hierarchical.evaluation.ranked_latents` does), so firing
frequencies, ranks and top contexts at every k describe one encoding. The site opens from disk (inline CSS, SVG and a
few lines of JS; no server, no network); each page is rendered from the JSON written beside it, which notebooks and
tests read. It is built in a scratch directory and renamed into place: all of it appears, or none.
"""

from __future__ import annotations

import html
import json
import math
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
from sae_lens_hierarchical.evaluation import max_budget, ranked_latents, resolve_budgets
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
        cumulative = self.rank_counts.cumsum(dim=1)
        total = cumulative[:, -1:]
        return torch.where(total[:, 0] > 0, (cumulative < (total + 1) // 2).sum(dim=1) + 1, 0)


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
    rank_counts = torch.zeros(d_sae * n_ranks, dtype=torch.long)
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
        slots = (top_indices * n_ranks + torch.arange(n_ranks))[fired]
        rank_counts.index_add_(0, slots, torch.ones_like(slots))
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
        rank_counts.view(d_sae, n_ranks),
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
    site = _Site(model, sae, statistics, pages, logit_effects, excluded, title, progress)
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


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _token(text: str) -> str:
    return f'<span class="tok">{html.escape(visible_token(text))}</span>'


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:16px;margin-top:26px}.muted{color:#666}a{color:#0645ad}
table{border-collapse:collapse}th,td{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f3f3f3;position:sticky;top:0}th[data-key]{cursor:pointer}th[aria-sort=descending]::after{content:" ▼"}
th[aria-sort=ascending]::after{content:" ▲"}.text{text-align:left}.row{display:flex;gap:36px;flex-wrap:wrap}
.ctx{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;border-bottom:1px solid #eee}
.ctx .val{display:inline-block;width:6em;color:#666}.ctx .max{outline:1.5px solid #c05000}.special{color:#aaa}
.tok{font-family:ui-monospace,monospace;background:#f4f4f4;padding:0 3px;white-space:pre}
svg text{font:11px sans-serif}"""

# Click a header to sort by it (again to reverse); index.html#sort=<key>[:asc] opens sorted.
_SORT_SCRIPT = r"""const table=document.getElementById('latents'),head=table.tHead.rows[0],body=table.tBodies[0];
function sortBy(key,ascending){const i=[...head.cells].findIndex(c=>c.dataset.key===key);if(i<0)return;
const v=r=>parseFloat(r.cells[i].dataset.v);[...body.rows].sort((a,b)=>ascending?v(a)-v(b):v(b)-v(a))
.forEach(r=>body.appendChild(r));[...head.cells].forEach(c=>c.removeAttribute('aria-sort'));
head.cells[i].setAttribute('aria-sort',ascending?'ascending':'descending')}
[...head.cells].filter(c=>c.dataset.key).forEach(c=>c.addEventListener('click',()=>{
const ascending=c.getAttribute('aria-sort')==='descending';sortBy(c.dataset.key,ascending);
history.replaceState(null,'','#sort='+c.dataset.key+(ascending?':asc':''))}));
const wanted=location.hash.match(/^#sort=([\w-]+)(:asc)?$/);if(wanted)sortBy(wanted[1],!!wanted[2]);"""


def _html_page(title: str, body: str, script: str = "") -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{body}{f'<script>{script}</script>' if script else ''}</body></html>\n"
    )


def _svg_plot(marks: str, x_labels: list[tuple[float, str]], y_top: str, caption: str, label: str) -> str:
    """A 300 x 110 plot area at (40, 10) holding ``marks``, with axes; x labels at fractions of the axis."""
    ticks = "".join(f'<text x="{40 + 300 * x:.1f}" y="134" text-anchor="middle">{t}</text>' for x, t in x_labels)
    return (
        f'<svg width="350" height="160" role="img" aria-label="{label}"><path d="M40 10V120H340" fill="none" '
        f'stroke="#888"/>{ticks}<text x="36" y="18" text-anchor="end">{y_top}</text><text x="36" y="120" '
        f'text-anchor="end">0</text><text x="190" y="152" text-anchor="middle">{caption}</text>{marks}</svg>'
    )


def _frequency_svg(frequency_by_k: list[float], ks: list[int]) -> str:
    """Firing frequency against k = 1..K (log-scaled x), the page's budgets ``ks`` marked."""
    n_ranks, top = len(frequency_by_k), max(frequency_by_k) or 1.0
    span = math.log2(n_ranks) or 1.0
    x = [40 + 300 * math.log2(k) / span for k in range(1, n_ranks + 1)]
    y = [10 + 110 * (1 - f / top) for f in frequency_by_k]
    marks = f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y, strict=True))}" fill="none" '
    marks += 'stroke="#0a6" stroke-width="2"/>' + "".join(
        f'<circle cx="{x[k - 1]:.1f}" cy="{y[k - 1]:.1f}" r="3.5" fill="#c05000"><title>k={k}: '
        f"{_percent(frequency_by_k[k - 1])}</title></circle>"
        for k in ks
    )
    labels = sorted({2**i for i in range(n_ranks.bit_length())} | {n_ranks})
    return _svg_plot(marks, [(math.log2(k) / span, str(k)) for k in labels], _percent(top), "budget k", "frequency")


def _histogram_svg(counts: list[int], bin_width: float) -> str:
    top, width = max(counts), 300 / len(counts)
    bars = "".join(
        f'<rect x="{40 + i * width:.1f}" y="{10 + 110 * (1 - c / top):.1f}" width="{width * 0.9:.1f}" '
        f'height="{110 * c / top:.1f}" fill="#c05000"><title>{i * bin_width:.3g} to {(i + 1) * bin_width:.3g}: '
        f"{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return _svg_plot(bars, [(0, "0"), (1, f"{len(counts) * bin_width:.3g}")], str(top), "activation", "histogram")


class _Site:
    """The JSON of every page (:meth:`latent_data`), the pages rendered from it, and :meth:`write`."""

    def __init__(
        self,
        model: HookedTransformer,
        sae: SAE[Any],
        statistics: LatentStatistics,
        pages: list[int],
        logit_effects: list[tuple[torch.Tensor, torch.Tensor]] | None,
        excluded: list[int],
        title: str | None,
        progress: bool,
    ):
        self.statistics, self.pages, self.logits, self.progress = statistics, pages, logit_effects, progress
        self.excluded = set(excluded)
        self.n_ranks = statistics.rank_counts.shape[1]
        self.first, self.median = statistics.first_ranks(), statistics.median_ranks()
        self.frequency = [statistics.fire_counts(k).double() / statistics.n_tokens for k in statistics.ks]
        self.column = {int(latent): i for i, latent in enumerate(statistics.latents)}
        ids = set(statistics.window_tokens.unique().tolist()) - {-1}
        for _, side in logit_effects or []:
            ids |= set(side.unique().tolist())
        decoded = model.tokenizer.batch_decode([[t] for t in sorted(ids)], clean_up_tokenization_spaces=False)
        # A byte of a multi-byte character decodes alone to U+FFFD: show its piece (<0xC2>) instead.
        self.strings = {
            t: model.tokenizer.convert_ids_to_tokens(t) if "\ufffd" in text else text
            for t, text in zip(sorted(ids), decoded, strict=True)
        }
        metadata = sae.cfg.metadata
        self.sae = {
            "architecture": sae.cfg.architecture(),
            "model_name": metadata.model_name,
            "hook_name": metadata.hook_name,
            "d_sae": sae.cfg.d_sae,
            "K": self.n_ranks,
        }
        self.title = (
            title or f"{sae.cfg.architecture()} SAE on {metadata.model_name or 'a model'} ({metadata.hook_name})"
        )

    def latent_data(self, page: int) -> dict[str, Any]:
        """The numbers of one latent's page: what its JSON holds and its HTML shows."""
        s, latent = self.statistics, self.pages[page]
        column, before = self.column[latent], s.window[0]
        counts = s.rank_counts[latent].cumsum(0)
        per_k = []
        for j, k in enumerate(s.ks):
            contexts = []
            for n in (s.context_values[j, :, column] > 0).nonzero().squeeze(1).tolist():
                inside = s.window_tokens[j, n, column] >= 0
                ids, position = s.window_tokens[j, n, column][inside].tolist(), int(s.context_positions[j, n, column])
                contexts.append(
                    {
                        "sequence": int(s.context_sequences[j, n, column]),
                        "position": position,
                        "activation": float(s.context_values[j, n, column]),
                        "max_index": min(position, before),  # the largest activation's place among the tokens
                        "token_ids": ids,
                        "tokens": [self.strings[t] for t in ids],
                        "activations": s.window_activations[j, n, column][inside].tolist(),
                    }
                )
            per_k.append({"k": k, "frequency": float(self.frequency[j][latent]), "contexts": contexts})
        histogram = s.histogram_counts[column].tolist()
        while histogram and histogram[-1] == 0:
            histogram.pop()
        logits: list[Any] = [None, None]
        if self.logits is not None:
            logits = [
                [{"token_id": t, "token": self.strings[t], "logit": v} for v, t in zip(values, ids, strict=True)]
                for values, ids in ((values[page].tolist(), ids[page].tolist()) for values, ids in self.logits)
            ]
        return {
            "latent": latent,
            "n_tokens": s.n_tokens,
            "fires": int(counts[-1]),
            "first_rank": int(self.first[latent]),
            "median_rank": int(self.median[latent]),
            "max_activation": float(s.max_activations[column]),
            "frequency_by_k": (counts.double() / s.n_tokens).tolist(),
            "histogram": {"bin_width": float(s.histogram_width[column]), "counts": histogram},
            "per_k": per_k,
            "promoted": logits[0],
            "suppressed": logits[1],
        }

    def _context_html(self, context: dict[str, Any], max_activation: float) -> str:
        spans = []
        for i, (text, token_id, act) in enumerate(
            zip(context["tokens"], context["token_ids"], context["activations"], strict=True)
        ):
            classes = " ".join(["max"] * (i == context["max_index"]) + ["special"] * (token_id in self.excluded))
            attributes = f' class="{classes}"' if classes else ""
            if act > 0:
                attributes += f' style="background:rgba(255,128,0,{min(1.0, act / max_activation):.2f})"'
            spans.append(f'<span{attributes} title="{act:.4g}">{html.escape(visible_token(text))}</span>')
        return f'<div class="ctx"><span class="val">{context["activation"]:.4g}</span>{"".join(spans)}</div>'

    def latent_html(self, data: dict[str, Any], page: int) -> str:
        latent, n_tokens, fires = data["latent"], data["n_tokens"], data["fires"]
        links = ['<a href="../index.html">all latents</a>']
        if page > 0:
            links.append(f'<a href="{self.pages[page - 1]}.html">← latent {self.pages[page - 1]}</a>')
        if page + 1 < len(self.pages):
            links.append(f'<a href="{self.pages[page + 1]}.html">latent {self.pages[page + 1]} →</a>')
        overview = f"Never fires within the top K = {self.n_ranks} on the {n_tokens:,} held-out tokens."
        if fires:
            overview = (
                f"Fires on <b>{_percent(fires / n_tokens)}</b> of {n_tokens:,} held-out tokens at K = {self.n_ranks} "
                f"({fires:,} tokens); first rank <b>{data['first_rank']}</b>, median rank <b>{data['median_rank']}</b> "
                f"when it fires; largest activation <b>{data['max_activation']:.4g}</b>."
            )
        rows = "".join(f"<tr><td>{e['k']}</td><td>{_percent(e['frequency'])}</td></tr>" for e in data["per_k"])
        panels = (
            f"<div><h2>Firing frequency by budget k</h2>{_frequency_svg(data['frequency_by_k'], self.statistics.ks)}"
        )
        panels += f"<table><tr><th>k</th><th>frequency</th></tr>{rows}</table></div><div><h2>Activations at K</h2>"
        panels += _histogram_svg(data["histogram"]["counts"], data["histogram"]["bin_width"]) if fires else "none"
        if data["promoted"] is not None:
            rows = "".join(
                f'<tr><td class="text">{_token(p["token"])}</td><td>{p["logit"]:+.3f}</td>'
                f'<td class="text">{_token(n["token"])}</td><td>{n["logit"]:+.3f}</td></tr>'
                for p, n in zip(data["promoted"], data["suppressed"], strict=True)
            )
            panels += '</div><div><h2>Logit effects</h2><table><tr><th class="text">promotes</th><th>logit</th>'
            panels += f'<th class="text">suppresses</th><th>logit</th></tr>{rows}</table>'
        sections = ""
        for entry in reversed(data["per_k"]):
            contexts = "".join(self._context_html(context, data["max_activation"]) for context in entry["contexts"])
            sections += (
                f'<h2 id="k{entry["k"]}">Top contexts at k = {entry["k"]}</h2><p class="muted">Fires on '
                f"{_percent(entry['frequency'])} of tokens at this budget. The sequences with its largest activations, "
                "shaded by activation (hover for values), the largest outlined.</p>"
                + (contexts or f"<p>Not among the first {entry['k']} ranks of any held-out token.</p>")
            )
        body = f"<p>{' · '.join(links)}</p><h1>Latent {latent}</h1><p class='muted'>{html.escape(self.title)}</p>"
        return _html_page(f"Latent {latent}", f'{body}<p>{overview}</p><div class="row">{panels}</div></div>{sections}')

    def summary(self, latents: list[dict[str, Any]]) -> dict[str, Any]:
        """``dashboard.json``: the SAE, the budgets, one row per page, every latent's first and median rank."""
        s = self.statistics
        rows = [
            {
                "latent": data["latent"],
                "page": f"{LATENTS_DIRNAME}/{data['latent']}.html",
                "frequency": [entry["frequency"] for entry in data["per_k"]],
                **{key: data[key] for key in ("fires", "first_rank", "median_rank", "max_activation")},
                "promotes": None if data["promoted"] is None else [entry["token"] for entry in data["promoted"][:3]],
            }
            for data in latents
        ]
        return {
            "title": self.title,
            "sae": self.sae,
            "ks": s.ks,
            "n_tokens": s.n_tokens,
            "window": list(s.window),
            "latents": rows,
            "first_rank": self.first.tolist(),
            "median_rank": self.median.tolist(),
        }

    def index_html(self, summary: dict[str, Any]) -> str:
        ks, sae = summary["ks"], summary["sae"]
        ranges = "".join(
            f"<tr><td>{low if low == high else f'{low}-{high}'}</td>"
            f"<td>{int(((self.first >= low) & (self.first <= high)).sum()):,}</td></tr>"
            for low, high in rank_ranges(self.n_ranks)
        )
        ranges += f"<tr><td>never</td><td>{int((self.first == 0).sum()):,}</td></tr>"
        headers = '<th data-key="latent">latent</th>' + "".join(
            f'<th data-key="frequency-k{k}">frequency at k={k}</th>' for k in ks
        )
        headers += '<th data-key="first-rank">first rank</th><th data-key="median-rank">median rank</th>'
        headers += '<th data-key="max-activation">max activation</th><th class="text">promotes</th>'
        rows = ""
        for row in summary["latents"]:
            cells = [f'<td data-v="{row["latent"]}"><a href="{row["page"]}">{row["latent"]}</a></td>']
            cells += [f'<td data-v="{f}">{_percent(f)}</td>' for f in row["frequency"]]
            cells += [
                f'<td data-v="{row[key] or "Infinity"}">{row[key] or "never"}</td>'
                for key in ("first_rank", "median_rank")
            ]
            cells.append(f'<td data-v="{row["max_activation"]}">{row["max_activation"]:.4g}</td>')
            cells.append(f'<td class="text">{" ".join(map(_token, row["promotes"] or []))}</td>')
            rows += f"<tr>{''.join(cells)}</tr>"
        body = (
            f"<h1>{html.escape(self.title)}</h1><p class='muted'>{html.escape(sae['architecture'])} SAE, d_sae "
            f"{sae['d_sae']:,}, K = {sae['K']}; {summary['n_tokens']:,} held-out tokens (special tokens excluded); "
            f"budgets k = {', '.join(map(str, ks))}.</p><p>Frequency at k: the share of tokens on which the latent is "
            "among the first k ranks. First rank: the smallest rank at which it fired on any token; median rank: its "
            f"typical rank when it fires at K. Click a column to sort.</p><h2>All {sae['d_sae']:,} latents by first "
            f"rank</h2><table><tr><th>first rank</th><th>latents</th></tr>{ranges}</table><h2>"
            f'{len(summary["latents"]):,} latent pages</h2><table id="latents"><thead><tr>{headers}</tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )
        return _html_page(self.title, body, _SORT_SCRIPT)

    def write(self, directory: Path) -> None:
        """Every page and its JSON, the index and ``dashboard.json``, into ``directory``."""
        (directory / LATENTS_DIRNAME).mkdir()
        latents = []
        for page in tqdm(range(len(self.pages)), desc="Writing latent pages", disable=not self.progress):
            data = self.latent_data(page)
            (directory / LATENTS_DIRNAME / f"{data['latent']}.json").write_text(json.dumps(data))
            (directory / LATENTS_DIRNAME / f"{data['latent']}.html").write_text(self.latent_html(data, page))
            latents.append(data)
        summary = self.summary(latents)
        (directory / SUMMARY_FILENAME).write_text(json.dumps(summary))
        (directory / "index.html").write_text(self.index_html(summary))
