"""The coarse-to-fine view: at which ranks does each latent fire, and are the latents of the first ranks broader?

A HierarchicalTopK SAE orders each token's K latents, and budget k keeps the first k, so a latent that fires at rank
1 is kept even at k = 1 while one that only appears at rank 50 exists only at large budgets. If the objective
makes the first ranks coarse and the later ones fine, latents of low typical rank should have broader, more general
top contexts. This module measures that on the labelled English documents
(:mod:`~sae_lens_hierarchical.interpretability.documents`, topic task, train and test documents alike):

- **rank histogram**: for each latent, how many tokens it fires on at each rank 1..K (firing: a positive activation
  among the K kept; rank 1 = the largest);
- **typical rank**: the lower median of those ranks (the smallest r with at least half its firings at rank <= r);
  the mean rank is kept too;
- **top documents**: the ``n_top_documents`` documents where the latent's largest activation over the document's
  tokens (at budget K) is highest, ties to the lower document index; a latent firing in fewer documents is not
  scored;
- **topic entropy**: the Shannon entropy, in bits, of the topics of its top documents: 0 when all share one topic,
  log2(11) = 3.46 at most for eleven topics;
- **null**: the entropy of ``n_top_documents`` documents drawn at random without replacement from the same documents
  (Monte Carlo mean and standard deviation), what a latent blind to topic would get;
- **summary**: Spearman's correlation between typical rank and topic entropy over the scored latents (negative:
  low ranks are broader), and the entropy by typical-rank range 1, 2, 3-4, 5-8, ..., K.

It works for any TopK-family SAE: for a TopK SAE the ranks are the order of its K activations, the ranking that
truncating it to k keeps, which is the baseline for the HierarchicalTopK SAE's trained ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE
from scipy.stats import spearmanr

from sae_lens_hierarchical.budget import validate_k
from sae_lens_hierarchical.evaluation.budgets import (
    default_budgets,
    lower_median_rank,
    max_budget,
    rank_histogram,
    ranked_latents,
)
from sae_lens_hierarchical.interpretability.document_selection import TOPIC_TASK
from sae_lens_hierarchical.interpretability.documents import LabelledDocuments
from sae_lens_hierarchical.interpretability.spread import format_spread

DEFAULT_TOP_DOCUMENTS = 20


@dataclass(frozen=True)
class RankBin:
    """Topic entropy of the scored latents whose typical rank is in ``low..high`` (None where there are none)."""

    low: int
    high: int
    latents: int
    mean: float | None
    std: float | None
    q25: float | None
    median: float | None
    q75: float | None


@dataclass(frozen=True)
class CoarseToFine:
    """Per latent: where it ranks and how topic-specific its top documents are; and the summary over latents.

    JSON-serialisable through :meth:`to_dict` / :meth:`from_dict`. Per-latent lists are indexed by latent;
    None where a latent never fired (ranks) or fired in fewer than ``n_top_documents`` documents (entropy).

    Attributes:
        name: what the caller calls this SAE.
        max_rank: K, the ranks counted.
        n_top_documents: documents per latent whose topics are counted.
        n_documents, n_tokens: what the histograms and top documents are over.
        topics: the topic names.
        rank_counts: ``[d_sae][max_rank]`` tokens on which each latent fired at rank r (index r - 1).
        typical_rank: lower median rank.
        mean_rank: mean rank.
        topic_entropy: bits.
        null_entropy, null_entropy_std: the random-documents null.
        spearman: Spearman's rho of typical rank vs topic entropy over the scored latents (None below 3 latents).
        scored_latents: latents with a topic entropy.
        bins: entropy by typical-rank range.
    """

    name: str
    max_rank: int
    n_top_documents: int
    n_documents: int
    n_tokens: int
    topics: list[str]
    rank_counts: list[list[int]]
    typical_rank: list[int | None]
    mean_rank: list[float | None]
    topic_entropy: list[float | None]
    null_entropy: float
    null_entropy_std: float
    spearman: float | None
    scored_latents: int
    bins: list[RankBin]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> CoarseToFine:
        return cls(**{**payload, "bins": [RankBin(**b) for b in payload["bins"]]})


def topic_entropy(topics: np.ndarray | torch.Tensor, n_topics: int) -> torch.Tensor:
    """Shannon entropy in bits of the topic distribution along the last axis of ``topics`` ``[..., documents]``
    (topic indices in 0..n_topics-1): ``[...]`` float64."""
    topics = torch.as_tensor(np.asarray(topics), dtype=torch.int64)
    counts = torch.nn.functional.one_hot(topics, n_topics).sum(dim=-2).to(torch.float64)  # [..., n_topics]
    p = counts / counts.sum(dim=-1, keepdim=True)
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(dim=-1)


def top_document_entropy(max_activations: torch.Tensor, topics: np.ndarray, n_topics: int, n_top: int) -> torch.Tensor:
    """``[d_sae]`` float64 topic entropy (bits) of each latent's ``n_top`` documents of highest activation, from
    ``max_activations`` ``[documents, d_sae]`` and ``topics`` ``[documents]``; NaN for latents with a positive
    activation in fewer than ``n_top`` documents. Ties go to the lower document index."""
    n_documents = max_activations.shape[0]
    if not isinstance(n_top, int) or not 1 <= n_top <= n_documents:
        raise ValueError(f"n_top_documents must be an int in 1..{n_documents} (the documents); got {n_top!r}")
    # A stable descending sort over documents: equal activations keep document order.
    order = torch.sort(max_activations, dim=0, descending=True, stable=True).indices[:n_top]  # [n_top, d_sae]
    scored = max_activations.gather(0, order[-1:])[0] > 0
    topic_of = torch.as_tensor(np.asarray(topics), dtype=torch.int64)[order]  # [n_top, d_sae]
    entropy = topic_entropy(topic_of.T, n_topics)
    return torch.where(scored, entropy, torch.full_like(entropy, float("nan")))


def null_topic_entropy(
    topics: np.ndarray, n_topics: int, n_top: int, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of the topic entropy of ``n_top`` documents drawn uniformly without replacement
    from ``topics`` (Monte Carlo, ``draws`` draws)."""
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"null_draws must be an int >= 1; got {draws!r}")
    rng = np.random.default_rng(seed)
    topics = np.asarray(topics)
    samples = np.stack([rng.choice(topics, size=n_top, replace=False) for _ in range(draws)])
    entropy = topic_entropy(samples, n_topics).numpy()
    return float(entropy.mean()), float(entropy.std())


def rank_bins(typical_rank: Sequence[int | None], entropy: Sequence[float | None], max_rank: int) -> list[RankBin]:
    """Entropy statistics of the scored latents by typical rank: 1, 2, 3-4, 5-8, ..., up to ``max_rank``."""
    bins = []
    previous = 0
    pairs = [(r, e) for r, e in zip(typical_rank, entropy, strict=True) if r is not None and e is not None]
    for edge in default_budgets(max_rank):
        values = np.array([e for r, e in pairs if previous < r <= edge], dtype=np.float64)
        stats: list[float | None] = [None] * 5
        if len(values):
            stats = [float(s) for s in (values.mean(), values.std(), *np.quantile(values, [0.25, 0.5, 0.75]))]
        bins.append(RankBin(previous + 1, edge, len(values), *stats))
        previous = edge
    return bins


@torch.no_grad()
def coarse_to_fine(
    sae: SAE[Any],
    documents: LabelledDocuments,
    task: str = TOPIC_TASK,
    n_top_documents: int = DEFAULT_TOP_DOCUMENTS,
    max_rank: int | None = None,
    null_draws: int = 2000,
    seed: int = 0,
    name: str = "",
    batch_tokens: int = 4096,
    progress: bool = True,
) -> CoarseToFine:
    """Rank histograms, typical ranks and top-document topic entropies of every latent of ``sae`` (module docstring).

    Args:
        sae: any TopK-family SAELens SAE reading ``documents.hook_name``.
        documents: labelled documents; the documents of ``task`` (train and test) are read.
        task: whose classes are the "topics" (default: Wikipedia topic).
        n_top_documents: top documents per latent (at most the task's documents).
        max_rank: ranks counted, default K (required for SAEs without a k).
        null_draws, seed: the random-documents null.
        name: recorded in the result.
    """
    documents.check_sae(sae)
    labelled = documents.task(task)
    members = labelled.documents()
    max_k = max_budget(sae)
    if max_rank is None and max_k is None:
        raise ValueError(f"{type(sae).__name__} has no k; pass max_rank, the ranks to count (1..d_sae)")
    max_rank = validate_k(max_k if max_rank is None else max_rank, sae.cfg.d_sae if max_k is None else max_k)
    if not isinstance(n_top_documents, int) or not 1 <= n_top_documents <= len(members):
        raise ValueError(
            f"n_top_documents must be an int in 1..{len(members)} (the {task} documents); got {n_top_documents!r}"
        )
    d_sae = sae.cfg.d_sae
    weight = sae.W_enc
    histogram = torch.zeros(d_sae, max_rank, dtype=torch.int64)
    maxima = torch.zeros(documents.n_documents * d_sae, dtype=torch.float32)  # flat [documents, d_sae]
    batches = documents.token_batches(members, batch_tokens=batch_tokens, progress=progress, desc="Ranks")
    for acts, document in batches:
        top_acts, top_indices, _ = ranked_latents(sae, acts.to(weight.device, weight.dtype), max_rank)
        top_acts, top_indices = top_acts.float().cpu(), top_indices.cpu()
        histogram += rank_histogram(top_acts, top_indices, d_sae)
        flat = (document[:, None] * d_sae + top_indices).reshape(-1)
        maxima.scatter_reduce_(0, flat, top_acts.reshape(-1), reduce="amax")
    topics = labelled.labels[members]
    entropy = top_document_entropy(
        maxima.view(documents.n_documents, d_sae)[torch.from_numpy(members)],
        topics,
        len(labelled.classes),
        n_top_documents,
    )
    null_mean, null_std = null_topic_entropy(topics, len(labelled.classes), n_top_documents, null_draws, seed)
    median = lower_median_rank(histogram)
    fired = histogram.sum(dim=1)
    mean = (histogram.to(torch.float64) * torch.arange(1, max_rank + 1)).sum(dim=1) / fired.clamp(min=1)
    typical = [int(r) if r > 0 else None for r in median.tolist()]
    entropies = [None if np.isnan(e) else float(e) for e in entropy.tolist()]
    scored = [(r, e) for r, e in zip(typical, entropies, strict=True) if r is not None and e is not None]
    rho = None
    if len(scored) >= 3 and len({r for r, _ in scored}) > 1 and len({e for _, e in scored}) > 1:
        rho = float(spearmanr([r for r, _ in scored], [e for _, e in scored]).statistic)
    return CoarseToFine(
        name=name,
        max_rank=max_rank,
        n_top_documents=n_top_documents,
        n_documents=len(members),
        n_tokens=int(documents.token_counts[torch.from_numpy(members)].sum()),
        topics=list(labelled.classes),
        rank_counts=histogram.tolist(),
        typical_rank=typical,
        mean_rank=[float(m) if f > 0 else None for m, f in zip(mean.tolist(), fired.tolist(), strict=True)],
        topic_entropy=entropies,
        null_entropy=null_mean,
        null_entropy_std=null_std,
        spearman=rho,
        scored_latents=len(scored),
        bins=rank_bins(typical, entropies, max_rank),
    )


def format_coarse_to_fine_table(results: Mapping[str, CoarseToFine | Sequence[CoarseToFine]]) -> str:
    """Markdown: per name, the mean topic entropy of its top documents by typical-rank range (latents scored in
    parentheses), the random-documents null and Spearman's rho. Several results under one name (seeds) show the
    mean ± half the range."""
    groups = {name: [value] if isinstance(value, CoarseToFine) else list(value) for name, value in results.items()}
    first = next(iter(groups.values()))[0]
    spans = [str(b.low) if b.low == b.high else f"{b.low}-{b.high}" for b in first.bins]
    lines = [
        "| SAE | " + " | ".join(f"rank {s}" for s in spans) + " | null | Spearman rho | scored |",
        "|---|" + "---:|" * (len(spans) + 3),
    ]
    for name, group in groups.items():
        cells = []
        for index in range(len(spans)):
            means = [r.bins[index].mean for r in group if r.bins[index].mean is not None]
            latents = sum(r.bins[index].latents for r in group) / len(group)
            cells.append(f"{format_spread(means, 2)} ({latents:.0f})" if means else "")
        rhos = [r.spearman for r in group if r.spearman is not None]
        null = format_spread([r.null_entropy for r in group], 2)
        scored = sum(r.scored_latents for r in group) / len(group)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {null} | {format_spread(rhos, 3)} | {scored:.0f} |")
    return "\n".join(lines)


def figure_coarse_to_fine(result: CoarseToFine, title: str = "") -> Any:
    """A matplotlib figure: topic entropy of each scored latent's top documents against its typical rank (log-x,
    jittered within a rank), the mean and standard deviation per typical-rank range, and the random-documents null;
    beside it, how many latents have each typical rank."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    scatter_axis, count_axis = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    pairs = [(r, e) for r, e in zip(result.typical_rank, result.topic_entropy, strict=True) if r and e is not None]
    if pairs:
        ranks = np.array([r for r, _ in pairs], dtype=np.float64)
        jitter = np.exp2(np.random.default_rng(0).uniform(-0.25, 0.25, len(ranks)))
        scatter_axis.scatter(ranks * jitter, [e for _, e in pairs], s=4, alpha=0.25, color="tab:blue", label="latent")
    filled = [b for b in result.bins if b.mean is not None]
    centres = [np.sqrt(b.low * b.high) for b in filled]
    scatter_axis.errorbar(
        centres,
        [b.mean for b in filled],
        yerr=[b.std for b in filled],
        color="tab:red",
        marker="o",
        capsize=3,
        linewidth=2,
        label="mean ± std per rank range",
    )
    scatter_axis.axhline(result.null_entropy, color="black", linestyle="--", label="random documents (null)")
    scatter_axis.axhspan(
        result.null_entropy - result.null_entropy_std,
        result.null_entropy + result.null_entropy_std,
        color="gray",
        alpha=0.2,
    )
    scatter_axis.axhline(np.log2(len(result.topics)), color="gray", linestyle=":", label=f"log2({len(result.topics)})")
    rho = "n/a" if result.spearman is None else f"{result.spearman:.3f}"
    scatter_axis.set(
        xscale="log",
        xlabel="typical (median) rank at K",
        ylabel=f"topic entropy of top {result.n_top_documents} documents (bits)",
        title=f"{result.scored_latents} latents, Spearman rho = {rho}",
    )
    edges = default_budgets(result.max_rank)
    scatter_axis.set_xticks(edges, [str(e) for e in edges])
    scatter_axis.legend(fontsize=7, loc="lower right")
    scatter_axis.grid(alpha=0.3)
    spans = [str(b.low) if b.low == b.high else f"{b.low}-{b.high}" for b in result.bins]
    fired = [sum(1 for r in result.typical_rank if r is not None and b.low <= r <= b.high) for b in result.bins]
    positions = np.arange(len(spans))
    count_axis.bar(positions - 0.2, fired, width=0.4, label="fired", color="tab:gray")
    count_axis.bar(positions + 0.2, [b.latents for b in result.bins], width=0.4, label="scored", color="tab:blue")
    count_axis.set_xticks(positions, spans, rotation=45)
    count_axis.set(xlabel="typical rank", ylabel="latents", title="Latents by typical rank")
    count_axis.legend(fontsize=7)
    figure.suptitle(title or f"Coarse to fine: {result.name}")
    figure.tight_layout()
    return figure


def plot_coarse_to_fine(result: CoarseToFine, path: str | Path, title: str = "") -> Path:
    """Save :func:`figure_coarse_to_fine` as a 120-dpi PNG at ``path``."""
    path = Path(path)
    figure_coarse_to_fine(result, title).savefig(path, dpi=120)
    return path
