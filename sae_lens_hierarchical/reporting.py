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


def format_mean_l0_rows(rows: list[BudgetMetrics], by_k: list[BudgetMetrics] | None = None) -> str:
    """A markdown table of an SAE served by threshold, one row per target mean L0 (and one for a JumpReLU SAE as
    saved, at its own thresholds): θ, the mean L0 reached and its spread over tokens, FVU (and CE-loss score when
    measured); with ``by_k``, the same SAE at fixed k = that mean L0 beside it and the ratio of the two FVUs."""
    fixed = {row.k: row for row in by_k or []}
    has_ce = all(row.ce_loss_score is not None for row in rows)
    header = "| mean L0 | θ | L0 reached | L0 p50 / p90 / max | tokens at the K cap | FVU |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if has_ce:
        header, rule = header + " CE-loss score |", rule + "---:|"
    if fixed:
        header, rule = header + " FVU at fixed k | FVU ratio, threshold / fixed k |", rule + "---:|---:|"
        if has_ce:
            header, rule = header + " CE-loss score at fixed k |", rule + "---:|"
    lines = [header, rule]
    for row in rows:
        cap = "" if row.at_cap_fraction is None else f"{row.at_cap_fraction:.3f}"
        target = "as saved" if row.mean_l0_target is None else f"{row.mean_l0_target:g}"
        threshold = "its own" if row.threshold is None else f"{row.threshold:.4g}"
        line = (
            f"| {target} | {threshold} | {row.l0:.2f} | {row.l0_p50:g} / {row.l0_p90:g} / "
            f"{row.l0_max:g} | {cap} | {row.fvu:.4f} |"
        )
        if has_ce:
            line += f" {row.ce_loss_score:.4f} |"
        if fixed:
            other = fixed.get(row.mean_l0_target)  # type: ignore[arg-type]
            line += f" {other.fvu:.4f} | {row.fvu / other.fvu:.3f} |" if other else " | |"
            if has_ce:
                line += f" {other.ce_loss_score:.4f} |" if other and other.ce_loss_score is not None else " |"
        lines.append(line)
    return "\n".join(lines)


FAMILY_LABELS = {
    "hierarchical": "HierarchicalTopK (one SAE, any k)",
    "topk_fixed": "TopK trained at k (one SAE per k)",
    "topk_truncated": "TopK trained at K, truncated to k",
    "multi_topk": "Multi-TopK, L(K/4) + L(K)/8",
    "batchtopk": "BatchTopK trained at k (one SAE per k)",
    "matryoshka": "Matryoshka BatchTopK at K",
}
_FAMILY_STYLES = {
    "hierarchical": {"color": "tab:red", "linewidth": 3.0, "marker": "o", "zorder": 5},
    "topk_fixed": {"color": "tab:blue", "linewidth": 1.5, "marker": "s"},
    "topk_truncated": {"color": "tab:gray", "linewidth": 1.5, "marker": "v", "linestyle": "--"},
    "multi_topk": {"color": "tab:green", "linewidth": 1.5, "marker": "^", "linestyle": ":"},
    "batchtopk": {"color": "tab:orange", "linewidth": 1.5, "marker": "D"},
    "matryoshka": {"color": "tab:brown", "linewidth": 1.5, "marker": "P", "linestyle": "-."},
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


# --- One axis for every SAE: mean L0 ------------------------------------------------------------------------------

SERVINGS = {"k": "", "threshold": ", served by threshold", "saved": ", at its own thresholds"}


def mean_l0_lines(
    results: dict[str, list[BudgetMetrics]],
    mean_l0_results: dict[str, list[BudgetMetrics]],
    families: dict[str, str],
) -> dict[tuple[str, str], dict[float, BudgetMetrics]]:
    """Every way each family was served, as ``{(line, serving): {mean L0: metrics}}``: serving ``"k"`` keyed by k
    (fixed-k SAEs share a line, as in :func:`by_family`), ``"threshold"`` keyed by the target mean L0, ``"saved"``
    (JumpReLU SAEs at their own thresholds) keyed by the mean L0 they reached."""
    lines: dict[tuple[str, str], dict[float, BudgetMetrics]] = {
        (line, "k"): {float(k): row for k, row in rows.items()}
        for line, rows in by_family({name: rows for name, rows in results.items() if rows}, families).items()
    }
    for name, rows in mean_l0_results.items():
        for row in rows:
            serving = "saved" if row.mean_l0_target is None else "threshold"
            key = row.l0 if row.mean_l0_target is None else row.mean_l0_target
            line = lines.setdefault((families[name], serving), {})
            if key in line:
                raise ValueError(f"two SAEs of family {families[name]!r} were served at mean L0 {key} by {serving}")
            line[key] = row
    return lines


def _mean_l0_order(lines: dict[tuple[str, str], Any]) -> list[tuple[str, str]]:
    """HierarchicalTopK lines first, each by threshold then by k; then the baselines in ``FAMILY_LABELS`` order."""
    order = []
    for line in _line_order({line: None for line, _ in lines}):
        order += [(line, serving) for serving in ("threshold", "k", "saved") if (line, serving) in lines]
    return order


def mean_l0_label(line: str, serving: str) -> str:
    """A line's label: its family's, and how it was served (BatchTopK and Matryoshka by threshold: their own global
    threshold replaced, "re-thresholded")."""
    if serving == "threshold" and line in ("batchtopk", "matryoshka"):
        return family_label(line) + ", re-thresholded"
    return family_label(line) + SERVINGS[serving]


def format_mean_l0_table(lines: dict[tuple[str, str], dict[float, BudgetMetrics]]) -> str:
    """Markdown: FVU (and CE-loss score when measured) at each mean L0, one column per family and serving; the SAEs
    at their own thresholds in a table of their own (their mean L0 is what they reached); then HierarchicalTopK
    served by threshold against every other column at the same mean L0."""
    order = [key for key in _mean_l0_order(lines) if key[1] != "saved"]
    rows = [row for line in lines.values() for row in line.values()]
    metrics = [("fvu", "FVU by mean L0 (lower is better)")]
    if all(row.ce_loss_score is not None for row in rows):
        metrics.append(("ce_loss_score", "CE-loss score by mean L0 (higher is better)"))
    sections = []
    budgets = sorted({key for line in order for key in lines[line]})
    for metric, heading in metrics:
        table = [f"**{heading}**", "", "| mean L0 | " + " | ".join(mean_l0_label(*key) for key in order) + " |"]
        table.append("|---:|" + "---:|" * len(order))
        for budget in budgets:
            cells = [f"{getattr(lines[key][budget], metric):.4f}" if budget in lines[key] else "" for key in order]
            table.append(f"| {budget:g} | " + " | ".join(cells) + " |")
        sections.append("\n".join(table))
    saved = [key for key in _mean_l0_order(lines) if key[1] == "saved"]
    if saved:
        table = ["**At their own thresholds**", "", "| SAE | mean L0 | L0 p50 / p90 / max | FVU | CE-loss score |"]
        table.append("|---|---:|---:|---:|---:|")
        for key in saved:
            for l0, row in sorted(lines[key].items()):
                ce = "" if row.ce_loss_score is None else f"{row.ce_loss_score:.4f}"
                spread = f"{row.l0_p50:g} / {row.l0_p90:g} / {row.l0_max:g}"
                table.append(f"| {family_label(key[0])} | {l0:.2f} | {spread} | {row.fvu:.4f} | {ce} |")
        sections.append("\n".join(table))
    mine = [key for key in order if key[1] == "threshold" and key[0].partition(":")[0] == "hierarchical"]
    others = [key for key in order if key not in mine]
    if mine and others:
        pairs = [(m, o) for m in mine for o in others]
        table = [
            "**HierarchicalTopK served by threshold against each column, at the same mean L0**",
            "",
            "Relative FVU difference (negative: HierarchicalTopK by threshold reconstructs better).",
            "",
            "| mean L0 | " + " | ".join(f"vs {mean_l0_label(*o)}" for _, o in pairs) + " |",
            "|---:|" + "---:|" * len(pairs),
        ]
        for budget in budgets:
            cells = []
            for m, o in pairs:
                a, b = lines[m].get(budget), lines[o].get(budget)
                cells.append(f"{100 * (a.fvu / b.fvu - 1):+.1f}%" if a and b else "")
            if any(cells):
                table.append(f"| {budget:g} | " + " | ".join(cells) + " |")
        sections.append("\n".join(table))
    return "\n\n".join(sections)


def plot_mean_l0(lines: dict[tuple[str, str], dict[float, BudgetMetrics]], path: str | Path, title: str) -> Path:
    """FVU (and CE-loss score when measured) against the mean L0 each serving reached (log-x): fixed-k serving
    solid, threshold serving dashed, SAEs at their own thresholds as single markers."""
    from matplotlib.figure import Figure

    rows = [row for line in lines.values() for row in line.values()]
    metrics = ["fvu"] + (["ce_loss_score"] if all(row.ce_loss_score is not None for row in rows) else [])
    figure = Figure(figsize=(6.5 * len(metrics), 4.6))
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    hierarchical_index: dict[str, int] = {}
    for line, serving in _mean_l0_order(lines):
        index = hierarchical_index.setdefault(line, len(hierarchical_index))
        style = _line_style(line, index if line.partition(":")[0] == "hierarchical" else 0)
        if serving == "threshold":
            style = {**style, "linestyle": "--", "marker": "x"}
        if serving == "saved":
            style = {**style, "linestyle": "none", "markersize": 9}
        points = sorted(lines[(line, serving)].values(), key=lambda row: row.l0)
        for axis, metric in zip(axes, metrics, strict=False):
            axis.plot(
                [r.l0 for r in points],
                [getattr(r, metric) for r in points],
                label=mean_l0_label(line, serving),
                **style,
            )
    for axis, metric in zip(axes, metrics, strict=False):
        axis.set(xscale="log", xlabel="mean L0 (active latents per token, averaged)")
        axis.set_ylabel("FVU (lower is better)" if metric == "fvu" else "CE-loss score (higher is better)")
        if metric == "fvu":
            axis.set_yscale("log")
        axis.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save_figure(figure, path)
