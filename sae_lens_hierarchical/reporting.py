"""What people look at: markdown tables and matplotlib plots of per-budget results and of the baseline comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_lens_hierarchical.evaluation.budgets import default_budgets
from sae_lens_hierarchical.evaluation.metrics import BudgetMetrics, BudgetResults, FirstRanks


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


# Colours of further HierarchicalTopK objectives drawn beside the first (compare --objectives).
_OBJECTIVE_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def family_label(line: str) -> str:
    """The legend/column label of a report line: a family, or ``hierarchical:<objective>`` for one of several
    HierarchicalTopK objectives compared side by side."""
    family, _, objective = line.partition(":")
    return f"HierarchicalTopK, {objective}" if objective else FAMILY_LABELS[family]


def _line_order(lines: dict[str, Any]) -> list[str]:
    """HierarchicalTopK lines first (in the order given), then the baselines in ``FAMILY_LABELS`` order."""
    hierarchical = [line for line in lines if line.partition(":")[0] == "hierarchical"]
    return hierarchical + [family for family in FAMILY_LABELS if family != "hierarchical" and family in lines]


def _line_style(line: str, hierarchical_index: int) -> dict[str, Any]:
    family = line.partition(":")[0]
    style = dict(_FAMILY_STYLES[family])
    if family == "hierarchical" and hierarchical_index > 0:
        style["color"] = _OBJECTIVE_COLORS[(hierarchical_index - 1) % len(_OBJECTIVE_COLORS)]
    return style


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
    order = _line_order(lines)
    ks = sorted({k for line in lines.values() for k in line})
    metrics = [("fvu", "FVU (lower is better)")]
    if all(r.ce_loss_score is not None for rows in results.values() for r in rows):
        metrics += [("ce_loss_score", "CE-loss score (higher is better)"), ("kl_div_score", "KL score")]
    sections = []
    for metric, heading in metrics:
        table = [f"**{heading}**", "", "| k | " + " | ".join(family_label(f) for f in order) + " |"]
        table.append("|---:|" + "---:|" * len(order))
        for k in ks:
            cells = [f"{getattr(lines[f][k], metric):.4f}" if k in lines[f] else "" for f in order]
            table.append(f"| {k} | " + " | ".join(cells) + " |")
        sections.append("\n".join(table))
    sections.append(_comparison_summary(lines))
    return "\n\n".join(section for section in sections if section)


def _comparison_summary(lines: dict[str, dict[int, BudgetMetrics]]) -> str:
    """Each HierarchicalTopK line's FVU relative to each baseline at the budgets both were evaluated at."""
    order = _line_order(lines)
    hierarchical = [line for line in order if line.partition(":")[0] == "hierarchical"]
    baselines = [line for line in order if line not in hierarchical]
    if not hierarchical:
        return ""
    pairs = [(h, b) for h in hierarchical for b in baselines]
    name = "HTopK" if len(hierarchical) == 1 else "{}"
    header = "| k | " + " | ".join(f"{name.format(family_label(h))} FVU vs {family_label(b)}" for h, b in pairs) + " |"
    rows = [header, "|---:|" + "---:|" * len(pairs)]
    for k in sorted({k for h in hierarchical for k in lines[h]}):
        cells = []
        for h, b in pairs:
            mine, other = lines[h].get(k), lines[b].get(k)
            cells.append(f"{100 * (mine.fvu / other.fvu - 1):+.1f}%" if mine and other else "")
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
    for index, line in enumerate(_line_order(lines)):
        ks = sorted(lines[line])
        values = [getattr(lines[line][k], metric) for k in ks]
        axis.plot(ks, values, label=family_label(line), **_line_style(line, index))
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
