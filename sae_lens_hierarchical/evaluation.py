"""Evaluation of a TopK-family SAE at every budget k from one encoding pass.

The ranking of a token's K latents is computed once; the reconstruction at budget k is the running sum
of the first k ranked decoder rows, so all budgets cost one top-K plus K row additions per token. For a
HierarchicalTopK SAE budget k is exactly what ``encode(x, k=k)`` gives; for any other SAELens SAE (TopK,
BatchTopK, ...) it is that SAE truncated to its k largest activations, the natural baseline for "train at
K, run at k".

Downstream metrics follow ``sae_lens.evals.get_recons_loss``: the reconstruction is spliced into the model
at the SAE's hook (special-token positions keep their clean activations), zero ablation of the hook is the
floor, and ``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)``,
``kl_div_score = (KL_zero - KL_sae) / KL_zero`` with KL(clean || spliced).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_lens_hierarchical.hierarchical_topk_sae import _VariableKMixin, decode_rows, validate_k
from sae_lens_hierarchical.loading import load_sae


@dataclass(frozen=True)
class BudgetMetrics:
    """Quality at one budget k.

    Reconstruction metrics are over the evaluated activations: ``mse`` follows SAELens (squared error summed
    over d_in, mean over tokens); ``fvu`` is the fraction of variance unexplained (total squared error / total
    squared deviation from the mean activation); ``explained_variance = 1 - fvu``; ``l0`` the mean number of
    non-zero activations per token; ``alive_fraction`` the share of latents active on at least one token at
    this budget (``dead_fraction = 1 - alive_fraction``). Downstream metrics (``None`` without a model) are
    over the evaluated token sequences, as in ``sae_lens.evals``.
    """

    k: int
    mse: float
    fvu: float
    explained_variance: float
    cossim: float
    l0: float
    alive_fraction: float
    dead_fraction: float
    ce_loss_score: float | None = None
    kl_div_score: float | None = None
    ce_loss_with_sae: float | None = None
    ce_loss_without_sae: float | None = None
    ce_loss_with_ablation: float | None = None
    kl_div_with_sae: float | None = None
    kl_div_with_ablation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)  # eq would compare tensors, which have no single truth value
class FirstRanks:
    """The first (smallest) rank at which each latent fired on any evaluated token, up to ``max_rank``.

    Budgets are nested, so a latent is alive at budget k exactly when its first rank is <= k: this is the whole
    ``alive_fraction`` curve at every k, not only at the evaluated ones. Latents first firing at small ranks carry
    the coarse, frequent directions; latents whose first rank is large are used only by large budgets.
    """

    ranks: torch.Tensor
    """``[d_sae]`` long, on CPU: 1-based first rank, or 0 for a latent that never fired within the top ``max_rank``."""
    max_rank: int
    """The largest rank looked at: the largest evaluated budget."""

    @property
    def counts(self) -> list[int]:
        """``counts[r - 1]``: the number of latents whose first rank is r, for r = 1..max_rank."""
        return torch.bincount(self.ranks, minlength=self.max_rank + 1)[1:].tolist()

    @property
    def never_fired(self) -> int:
        """Latents that fired at no rank <= max_rank on any token."""
        return int((self.ranks == 0).sum())

    def alive_fraction(self, k: int) -> float:
        """The share of latents active on at least one token at budget ``k`` (first rank in 1..k)."""
        k = validate_k(k, self.max_rank)
        return float(((self.ranks >= 1) & (self.ranks <= k)).double().mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the histogram over ranks 1..max_rank and the never-fired count (not the ranks)."""
        return {
            "max_rank": self.max_rank,
            "d_sae": self.ranks.numel(),
            "counts": self.counts,
            "never_fired": self.never_fired,
        }


class BudgetResults(list[BudgetMetrics]):
    """What :func:`evaluate_over_k` returns: the per-budget metrics (a plain list, as always) plus ``first_ranks``."""

    def __init__(self, metrics: list[BudgetMetrics], first_ranks: FirstRanks):
        super().__init__(metrics)
        self.first_ranks = first_ranks


def max_budget(sae: SAE[Any]) -> int | None:
    """The largest budget ``sae`` can be evaluated at: K for TopK-family SAEs, None when it has no k."""
    k = getattr(sae.cfg, "k", None)
    return int(k) if isinstance(k, int) and not isinstance(k, bool) else None


@contextmanager
def flat_inputs(sae: SAE[Any]) -> Iterator[None]:
    """Let a hook_z inference SAE take flat ``[tokens, d_in]`` rows (it expects ``[..., n_heads, d_head]``).

    Evaluation works on flattened activations, as SAELens's activation store and trainer do.
    """
    if not getattr(sae, "hook_z_reshaping_mode", False):
        yield
        return
    sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        sae.turn_on_forward_pass_hook_z_reshaping()


def ranked_latents(sae: SAE[Any], x: torch.Tensor, n_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(activations, latent indices, decoder coefficients)``, each ``[tokens, n_ranks]``, largest first.

    HierarchicalTopK SAEs use their own nested ranking; other SAEs are encoded and their active latents
    ranked by activation, which is what truncating them to k keeps.
    """
    with flat_inputs(sae):
        if isinstance(sae, _VariableKMixin):
            top_acts, top_indices = sae.encode_top_k(x, k=n_ranks)
            return top_acts, top_indices, sae.decoder_coefficients(top_acts, top_indices)
        top_acts, top_indices = sae.encode(x).topk(n_ranks, dim=-1, sorted=True)
    coefficients = top_acts
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        coefficients = top_acts / sae.W_dec.norm(dim=-1)[top_indices]
    return top_acts, top_indices, coefficients


def prefix_reconstructions(
    sae: SAE[Any], x: torch.Tensor, ks: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Reconstructions of ``x`` ``[tokens, d_in]`` at each budget in sorted ``ks``, and the ranking used.

    Each budget adds the decoder rows of ranks ``previous..k`` to the last reconstruction with ``embedding_bag``,
    so no ``[tokens, k - previous, d_in]`` tensor of gathered rows is ever built (600 MB at d_in 2304, K 128 and
    1024 tokens); the extra memory is one ``[tokens, d_in]`` reconstruction per budget.
    """
    top_acts, top_indices, coefficients = ranked_latents(sae, x, ks[-1])
    reconstruction = sae.b_dec.expand_as(x)
    reconstructions = []
    previous = 0
    for k in ks:
        block = decode_rows(sae.W_dec, top_indices[:, previous:k], coefficients[:, previous:k])  # [tokens, d_in]
        reconstruction = reconstruction + block
        reconstructions.append(sae.run_time_activation_norm_fn_out(reconstruction))
        previous = k
    return reconstructions, top_acts, top_indices


@torch.no_grad()
def evaluate_over_k(
    sae: SAE[Any] | str | Path,
    activations: torch.Tensor,
    ks: list[int] | None = None,
    batch_size: int = 1024,
    progress: bool = True,
    *,
    model: HookedRootModule | None = None,
    tokens: torch.Tensor | None = None,
    exclude_token_ids: list[int] | None = None,
    hook_name: str | None = None,
    sequence_batch_size: int = 8,
) -> BudgetResults:
    """Metrics of ``sae`` at each budget in ``ks`` (default: powers of two up to K, and K), in one pass.

    Returns the metrics in the order of sorted ``ks`` (a list of :class:`BudgetMetrics`), whose ``first_ranks``
    attribute holds each latent's first rank up to the largest budget (:class:`FirstRanks`).

    Args:
        sae: a HierarchicalTopK SAE, or any SAELens SAE (evaluated truncated to its top-k activations); in
            memory, or a saved SAE's directory (loaded with :func:`sae_lens_hierarchical.load_sae`).
        activations: ``[tokens, d_in]`` activations at the SAE's hook, in the units the SAE was saved in.
        ks: budgets in 1..K (required for SAEs without a ``k``).
        model, tokens: with both, also CE-loss and KL scores per k with the SAE spliced into ``model`` at
            ``hook_name`` (default: the SAE's metadata) on ``tokens`` ``[sequences, context]``.
        exclude_token_ids: tokens (e.g. BOS) whose positions keep clean activations and are not scored.
    """
    if isinstance(sae, (str, Path)):
        sae = load_sae(sae, device=str(activations.device))
    ks = _check_budgets(sae, ks)
    _check_activations(sae, activations)
    n_tokens = activations.shape[0]
    squared_error = torch.zeros(len(ks), dtype=torch.float64)
    cossim_sum = torch.zeros(len(ks), dtype=torch.float64)
    l0_sum = torch.zeros(len(ks), dtype=torch.float64)
    # The best (smallest) rank at which each latent fired: it is alive at budget k iff that rank is < k.
    best_rank = torch.full((sae.cfg.d_sae,), ks[-1], dtype=torch.long, device=sae.device)
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq_norm = torch.zeros((), dtype=torch.float64)
    for start in tqdm(range(0, n_tokens, batch_size), desc="Evaluating budgets", disable=not progress):
        x = activations[start : start + batch_size].to(sae.device, sae.dtype)
        reconstructions, top_acts, top_indices = prefix_reconstructions(sae, x, ks)
        for position, (k, reconstruction) in enumerate(zip(ks, reconstructions, strict=True)):
            squared_error[position] += (reconstruction - x).double().pow(2).sum().cpu()
            cossim_sum[position] += F.cosine_similarity(reconstruction, x, dim=-1).double().sum().cpu()
            l0_sum[position] += (top_acts[:, :k] > 0).sum().cpu()
        ranks = torch.arange(ks[-1], device=sae.device).expand_as(top_indices)
        ranks = torch.where(top_acts > 0, ranks, ks[-1])
        best_rank.scatter_reduce_(0, top_indices.reshape(-1), ranks.reshape(-1), reduce="amin")
        sum_x += x.double().sum(dim=0).cpu()
        sum_sq_norm += x.double().pow(2).sum().cpu()
    total_variance = sum_sq_norm - sum_x.pow(2).sum() / n_tokens
    downstream: list[dict[str, float]] = [{} for _ in ks]
    if model is not None or tokens is not None:
        if model is None or tokens is None:
            raise ValueError("CE-loss and KL scores need both model and tokens; pass both or neither")
        downstream = downstream_metrics_over_k(
            sae, model, tokens, ks, exclude_token_ids, hook_name, sequence_batch_size, progress
        )
    first_ranks = FirstRanks(torch.where(best_rank < ks[-1], best_rank + 1, 0).cpu(), ks[-1])
    results = []
    for position, k in enumerate(ks):
        fvu = float(squared_error[position] / total_variance)
        alive = first_ranks.alive_fraction(k)
        results.append(
            BudgetMetrics(
                k=k,
                mse=float(squared_error[position] / n_tokens),
                fvu=fvu,
                explained_variance=1.0 - fvu,
                cossim=float(cossim_sum[position] / n_tokens),
                l0=float(l0_sum[position] / n_tokens),
                alive_fraction=alive,
                dead_fraction=1.0 - alive,
                **downstream[position],
            )
        )
    return BudgetResults(results, first_ranks)


@torch.no_grad()
def downstream_metrics_over_k(
    sae: SAE[Any],
    model: HookedRootModule,
    tokens: torch.Tensor,
    ks: list[int],
    exclude_token_ids: list[int] | None = None,
    hook_name: str | None = None,
    sequence_batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, float]]:
    """CE-loss and KL scores at each budget in sorted ``ks``, with the same definitions as ``sae_lens.evals``.

    Each batch of sequences runs the model clean (recording the hook's activations), zero-ablated, and once
    per budget with the level-k reconstruction spliced in; the ranking is computed once per batch.
    """
    hook_name = hook_name or sae.cfg.metadata.hook_name
    if not hook_name or hook_name not in model.hook_dict:
        raise ValueError(f"hook_name {hook_name!r} is not a hook of the model; pass hook_name= explicitly")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [sequences, context >= 2]; got shape {tuple(tokens.shape)}")
    if sae.cfg.metadata.hook_head_index is not None:
        raise ValueError("SAEs on a single attention head (hook_head_index set) are not supported here")
    excluded = torch.tensor(sorted(exclude_token_ids or []), dtype=torch.long)
    ce = torch.zeros(len(ks), dtype=torch.float64)
    kl = torch.zeros(len(ks), dtype=torch.float64)
    ce_clean = ce_zero = kl_zero = torch.zeros((), dtype=torch.float64)
    n_ce = n_kl = 0
    batches = range(0, tokens.shape[0], sequence_batch_size)
    for start in tqdm(batches, desc="Spliced forward passes", disable=not progress):
        batch = tokens[start : start + sequence_batch_size].to(model.cfg.device)
        keep = ~torch.isin(batch, excluded.to(batch.device))
        (clean_logits, clean_loss), cache = model.run_with_cache(
            batch, names_filter=hook_name, return_type="both", loss_per_token=True
        )
        clean_log_probs = clean_logits.log_softmax(dim=-1)
        del clean_logits
        flat = cache[hook_name].reshape(-1, sae.cfg.d_in).to(sae.device, sae.dtype)
        reconstructions, _, _ = prefix_reconstructions(sae, flat, ks)
        ce_clean = ce_clean + clean_loss[keep[:, :-1]].double().sum().cpu()
        zero_ce, zero_kl = _spliced_losses(model, batch, hook_name, None, keep, clean_log_probs)
        ce_zero, kl_zero = ce_zero + zero_ce, kl_zero + zero_kl
        for position, reconstruction in enumerate(reconstructions):
            spliced_ce, spliced_kl = _spliced_losses(model, batch, hook_name, reconstruction, keep, clean_log_probs)
            ce[position] += spliced_ce
            kl[position] += spliced_kl
        n_ce += int(keep[:, :-1].sum())
        n_kl += int(keep.sum())
    if n_ce == 0:
        raise ValueError("no token positions left to score after excluding exclude_token_ids")
    clean_mean, zero_mean, kl_zero_mean = float(ce_clean / n_ce), float(ce_zero / n_ce), float(kl_zero / n_kl)
    metrics = []
    for position in range(len(ks)):
        ce_mean, kl_mean = float(ce[position] / n_ce), float(kl[position] / n_kl)
        metrics.append(
            {
                "ce_loss_score": (zero_mean - ce_mean) / (zero_mean - clean_mean),
                "kl_div_score": (kl_zero_mean - kl_mean) / kl_zero_mean,
                "ce_loss_with_sae": ce_mean,
                "ce_loss_without_sae": clean_mean,
                "ce_loss_with_ablation": zero_mean,
                "kl_div_with_sae": kl_mean,
                "kl_div_with_ablation": kl_zero_mean,
            }
        )
    return metrics


def _spliced_losses(
    model: HookedRootModule,
    batch: torch.Tensor,
    hook_name: str,
    replacement: torch.Tensor | None,
    keep: torch.Tensor,
    clean_log_probs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE and KL(clean || spliced) over kept positions, with ``replacement`` at the hook.

    ``replacement=None`` zero-ablates the hook at every position (SAELens's floor); otherwise kept positions
    get ``replacement`` (flattened ``[tokens, d_in]``) and the others their clean activation.
    """

    def splice(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        if replacement is None:
            return torch.zeros_like(activation)
        new = replacement.reshape(activation.shape).to(activation.device, activation.dtype)
        return torch.where(keep.reshape(*keep.shape, *[1] * (activation.ndim - 2)), new, activation)

    logits, loss = model.run_with_hooks(batch, return_type="both", loss_per_token=True, fwd_hooks=[(hook_name, splice)])
    divergence = F.kl_div(logits.log_softmax(dim=-1), clean_log_probs, log_target=True, reduction="none").sum(dim=-1)
    return loss[keep[:, :-1]].double().sum().cpu(), divergence[keep].double().sum().cpu()


def _check_budgets(sae: SAE[Any], ks: list[int] | None) -> list[int]:
    max_k = max_budget(sae)
    if max_k is None:
        if not ks:
            raise ValueError(f"{type(sae).__name__} has no k; pass the budgets to evaluate (ks=[...])")
        max_k = sae.cfg.d_sae
    return sorted({validate_k(k, max_k) for k in (ks or default_budgets(max_k))})


def _check_activations(sae: SAE[Any], activations: torch.Tensor) -> None:
    if activations.ndim != 2 or activations.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"activations must be [tokens, d_in={sae.cfg.d_in}]; got shape {tuple(activations.shape)}")
    if activations.shape[0] < 2:
        raise ValueError(f"need at least 2 activation rows to measure variance; got {activations.shape[0]}")
    if not activations.is_floating_point():
        raise ValueError(f"activations must be floating point; got dtype {activations.dtype}")
    if sae.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale"):
        raise ValueError(
            f"evaluate_over_k does not support normalize_activations={sae.cfg.normalize_activations!r} "
            "(allowed: 'none', or a scaling already folded into the weights, as in saved SAEs)"
        )


def default_budgets(max_k: int) -> list[int]:
    """Powers of two below K, and K itself."""
    budgets = [2**i for i in range(max_k.bit_length()) if 2**i < max_k]
    return [*budgets, max_k]


def figure_over_k(results: list[BudgetMetrics], title: str = "HierarchicalTopK SAE") -> Any:
    """A matplotlib figure: FVU, explained variance (and the CE-loss score when measured) against k (log-x), and
    the first-rank histogram (:func:`draw_first_ranks`) when ``results`` came from :func:`evaluate_over_k`.

    Built without pyplot, so it leaves no global figure state (and no backend switch) behind; a notebook shows it.
    """
    from matplotlib.figure import Figure

    ks = [r.k for r in results]
    has_ce = all(r.ce_loss_score is not None for r in results)
    first_ranks = results.first_ranks if isinstance(results, BudgetResults) else None
    n_panels = 2 + has_ce + (first_ranks is not None)
    figure = Figure(figsize=(4.5 * n_panels, 3.5))
    axes = figure.subplots(1, n_panels)
    axes[0].plot(ks, [r.fvu for r in results], marker="o")
    axes[0].set(xscale="log", xlabel="budget k", ylabel="FVU (lower is better)", title="Unexplained variance")
    axes[1].plot(ks, [r.explained_variance for r in results], marker="o", color="tab:green")
    axes[1].set(xscale="log", xlabel="budget k", ylabel="explained variance", title="Explained variance")
    if has_ce:
        axes[2].plot(ks, [r.ce_loss_score for r in results], marker="o", color="tab:red")
        axes[2].set(xscale="log", xlabel="budget k", ylabel="CE-loss score (higher is better)", title="CE-loss score")
    for axis in axes[: 2 + has_ce]:
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.grid(alpha=0.3)
    if first_ranks is not None:
        draw_first_ranks(axes[-1], first_ranks)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_over_k(results: list[BudgetMetrics], path: str | Path, title: str = "HierarchicalTopK SAE") -> Path:
    """Save :func:`figure_over_k` as a PNG at ``path``."""
    return _save_figure(figure_over_k(results, title), path)


def draw_first_ranks(axis: Any, first_ranks: FirstRanks) -> None:
    """On ``axis``: the number of latents whose first rank is r, against r = 1..max_rank (log-x)."""
    ranks = list(range(1, first_ranks.max_rank + 1))
    axis.plot(ranks, first_ranks.counts, marker=".", color="tab:purple")
    axis.set(xscale="log", xlabel="first rank r", ylabel="latents first firing at rank r")
    axis.set_title(f"First rank of each latent ({first_ranks.never_fired} never fired)")
    axis.grid(alpha=0.3)


def plot_first_ranks(first_ranks: FirstRanks, path: str | Path, title: str = "HierarchicalTopK SAE") -> Path:
    """Save the first-rank histogram (:func:`draw_first_ranks`) alone as a PNG at ``path``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.8))
    axis = figure.subplots()
    draw_first_ranks(axis, first_ranks)
    figure.suptitle(title)
    figure.tight_layout()
    return _save_figure(figure, path)


def _save_figure(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a 120-dpi PNG and free it (from pyplot too, when it was made there)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def format_first_rank_table(first_ranks: FirstRanks) -> str:
    """Markdown: how many latents first fire in each rank range (1, 2, 3-4, 5-8, ... up to max_rank), and never.

    The cumulative share at the end of a range is the alive fraction at that budget.
    """
    counts = first_ranks.counts
    d_sae = first_ranks.ranks.numel()
    lines = ["| first rank | latents | share | cumulative share |", "|---:|---:|---:|---:|"]
    previous = cumulative = 0
    for edge in default_budgets(first_ranks.max_rank):
        n = sum(counts[previous:edge])
        cumulative += n
        span = str(edge) if edge == previous + 1 else f"{previous + 1}-{edge}"
        lines.append(f"| {span} | {n} | {n / d_sae:.3f} | {cumulative / d_sae:.3f} |")
        previous = edge
    lines.append(f"| never | {first_ranks.never_fired} | {first_ranks.never_fired / d_sae:.3f} | |")
    return "\n".join(lines)


def format_markdown_table(results: list[BudgetMetrics]) -> str:
    """A markdown table, one row per budget (CE-loss and KL scores when measured)."""
    has_downstream = all(r.ce_loss_score is not None for r in results)
    header = "| k | L0 | FVU | explained variance | MSE | cos sim | alive |"
    rule = "|---:|---:|---:|---:|---:|---:|---:|"
    if has_downstream:
        header += " CE-loss score | KL score | CE with SAE |"
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for r in results:
        line = (
            f"| {r.k} | {r.l0:.2f} | {r.fvu:.4f} | {r.explained_variance:.4f} | {r.mse:.4g} | {r.cossim:.4f} "
            f"| {r.alive_fraction:.3f} |"
        )
        if has_downstream:
            line += f" {r.ce_loss_score:.4f} | {r.kl_div_score:.4f} | {r.ce_loss_with_sae:.4f} |"
        lines.append(line)
    return "\n".join(lines)


FAMILY_LABELS = {
    "hierarchical": "HierarchicalTopK (one SAE, any k)",
    "topk_fixed": "TopK trained at k (one SAE per k)",
    "topk_truncated": "TopK trained at K, truncated to k",
    "multi_topk": "Multi-TopK, L(K/4) + L(K)/8",
}
_FAMILY_STYLES = {
    "hierarchical": {"color": "tab:red", "linewidth": 3.0, "marker": "o", "zorder": 5},
    "topk_fixed": {"color": "tab:blue", "linewidth": 1.5, "marker": "s"},
    "topk_truncated": {"color": "tab:gray", "linewidth": 1.5, "marker": "v", "linestyle": "--"},
    "multi_topk": {"color": "tab:green", "linewidth": 1.5, "marker": "^", "linestyle": ":"},
}


def by_family(results: dict[str, list[BudgetMetrics]], families: dict[str, str]) -> dict[str, dict[int, BudgetMetrics]]:
    """Group per-SAE results into one ``{k: metrics}`` line per family (fixed-k TopK SAEs share a line)."""
    lines: dict[str, dict[int, BudgetMetrics]] = {}
    for name, rows in results.items():
        line = lines.setdefault(families[name], {})
        for row in rows:
            if row.k in line:
                raise ValueError(f"two SAEs of family {families[name]!r} were evaluated at k={row.k}")
            line[row.k] = row
        if families[name] == "topk_truncated":
            # Untruncated, the TopK SAE trained at K is also the fixed-k TopK SAE for k = K.
            lines.setdefault("topk_fixed", {})[rows[-1].k] = rows[-1]
    return lines


def format_comparison_table(results: dict[str, list[BudgetMetrics]], families: dict[str, str]) -> str:
    """Markdown: FVU, CE-loss score and KL score per k, one column per family, then HTopK against each baseline."""
    lines = by_family(results, families)
    order = [family for family in FAMILY_LABELS if family in lines]
    ks = sorted({k for line in lines.values() for k in line})
    metrics = [("fvu", "FVU (lower is better)")]
    if all(r.ce_loss_score is not None for rows in results.values() for r in rows):
        metrics += [("ce_loss_score", "CE-loss score (higher is better)"), ("kl_div_score", "KL score")]
    sections = []
    for metric, heading in metrics:
        table = [f"**{heading}**", "", "| k | " + " | ".join(FAMILY_LABELS[f] for f in order) + " |"]
        table.append("|---:|" + "---:|" * len(order))
        for k in ks:
            cells = [f"{getattr(lines[f][k], metric):.4f}" if k in lines[f] else "" for f in order]
            table.append(f"| {k} | " + " | ".join(cells) + " |")
        sections.append("\n".join(table))
    sections.append(_comparison_summary(lines))
    return "\n\n".join(section for section in sections if section)


def _comparison_summary(lines: dict[str, dict[int, BudgetMetrics]]) -> str:
    """HTopK's FVU relative to each baseline at the budgets both were evaluated at."""
    htopk = lines.get("hierarchical")
    if htopk is None:
        return ""
    baselines = [family for family in FAMILY_LABELS if family in lines and family != "hierarchical"]
    header = "| k | " + " | ".join(f"HTopK FVU vs {FAMILY_LABELS[f]}" for f in baselines) + " |"
    rows = [header, "|---:|" + "---:|" * len(baselines)]
    for k in sorted(htopk):
        cells = []
        for family in baselines:
            other = lines[family].get(k)
            cells.append(f"{100 * (htopk[k].fvu / other.fvu - 1):+.1f}%" if other is not None else "")
        if any(cells):
            rows.append(f"| {k} | " + " | ".join(cells) + " |")
    note = "Relative FVU difference (negative: HierarchicalTopK reconstructs better)."
    return f"**HierarchicalTopK against each baseline**\n\n{note}\n\n" + "\n".join(rows)


def plot_comparison(
    results: dict[str, list[BudgetMetrics]], families: dict[str, str], path: str | Path, metric: str, title: str
) -> Path:
    """One line per family of ``metric`` against k (log-x), HierarchicalTopK drawn thick and on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = by_family(results, families)
    ylabels = {
        "fvu": "FVU (lower is better)",
        "ce_loss_score": "CE-loss score (higher is better)",
        "kl_div_score": "KL score (higher is better)",
        "explained_variance": "explained variance",
    }
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for family in (f for f in FAMILY_LABELS if f in lines):
        ks = sorted(lines[family])
        values = [getattr(lines[family][k], metric) for k in ks]
        axis.plot(ks, values, label=FAMILY_LABELS[family], **_FAMILY_STYLES[family])  # type: ignore[arg-type]
    all_ks = sorted({k for line in lines.values() for k in line})
    axis.set(xscale="log", xlabel="budget k (active latents per token)", ylabel=ylabels.get(metric, metric))
    axis.set_xticks(all_ks, [str(k) for k in all_ks])
    if metric == "fvu":
        axis.set_yscale("log")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return _save_figure(figure, path)
