"""The step benchmark's Markdown: every row at each K with its ratios and the targets' verdicts, and the breakdown's
table; what ``bench_step.py`` prints and writes to ``--output-dir``."""

from __future__ import annotations

from typing import Any

from bench_step_rows import LABELS
from bench_step_targets import Rows, target_lines
from bench_step_timing import breakdown_implementation

# What each precision means for the rows, said under the table so that a report read alone says how it was run.
PRECISION_NOTES = {
    "fp32": [
        "Precision fp32: float32 matmuls throughout (TF32 off); sparsify's forward runs under its own bf16 "
        "autocast on CUDA, as its code does."
    ],
    "tf32": ["Precision tf32: float32 tensors, matmuls in TF32 (set_float32_matmul_precision('high')) for every row."],
    "bf16": [
        "Precision bf16: float32 weights; the SAELens rows' forward pass under torch.autocast(bfloat16), as "
        "SAELens's runner with autocast=True (backward, clipping and Adam outside it); the floor's matmul under "
        "the same autocast; sparsify runs its own way (its forward under bf16 autocast on CUDA, fp32 on CPU)."
    ],
}


def _number(value: float) -> str:
    """Three significant figures below 100, whole numbers above: small quick-run values stay readable."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds, the unit of every time in the reports and of the progress lines."""
    return _number(seconds * 1e3)


def _mb(value: float | None) -> str:
    """Bytes as MiB; "n/a" where memory was not measured."""
    return "n/a" if value is None else _number(value / 2**20)


def _ratio(value: float | None, base: float | None) -> str:
    """``value / base``; "n/a" where either is missing."""
    return "n/a" if value is None or not base else f"{value / base:.2f}x"


def breakdown_report(k: int, parts: dict[str, float], header: dict[str, Any]) -> str:
    """``--breakdown``'s table: each part's time and its share of the whole step, under a line saying how it ran."""
    whole = parts["whole step"]
    lines = [
        f"Where an {LABELS[breakdown_implementation(header['device'])]} step's time goes at K={k} "
        f"({header['device']}, {header['device_name']}, {header['precision']}, {header['threads']} threads, d_in "
        f"{header['d_in']}, d_sae {header['d_sae']}, {header['tokens']} tokens, dead fraction {header['dead_fraction']}"
        f"): each part timed alone, median of {header['repeats']}.",
        "",
        "| part | ms | share of the step |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {format_ms(seconds)} | {seconds / whole:.0%} |" for name, seconds in parts.items()]
    return "\n".join(lines) + "\n"


def markdown_report(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The run's report: a table per K (time and memory, and their ratios to sparsify, the floor and SAELens TopK),
    reference over fused where both ran, then the targets."""
    sparsify = (
        f"sparsify {header['sparsify']} (auxk_alpha {header['sparsify_auxk_alpha']:.4g}); "
        if header.get("sparsify")
        else ""
    )
    lines = [
        f"Training step on {header['device']} ({header['device_name']}, {header['threads']} threads, "
        f"precision {header['precision']}): "
        f"d_in={header['d_in']}, d_sae={header['d_sae']}, {header['tokens']} tokens, "
        f"median of {header['repeats']} steps after {header['warmup']} warm-up; "
        f"dead-latent fraction {header['dead_fraction']}; {sparsify}torch {header['torch']}.",
        "",
        "Ratios: step time, or peak tensor memory, over that of the named row at the same K.",
        *PRECISION_NOTES[header["precision"]],
    ]
    by_key: Rows = {(row["k"], row["implementation"]): row for row in rows}
    ks = sorted({row["k"] for row in rows})
    for k in ks:
        lines += [
            "",
            f"K = {k}:",
            "",
            "| implementation | step ms | time / sparsify | time / floor | time / SAELens TopK | peak tensor MB "
            "| memory / SAELens TopK | step transient MB | peak RSS +MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        sparsify_row, floor, topk = (by_key.get((k, name), {}) for name in ("sparsify", "floor", "topk"))
        for row in (row for row in rows if row["k"] == k):
            lines.append(
                f"| {LABELS[row['implementation']]} | {format_ms(row['median_s'])} "
                f"| {_ratio(row['median_s'], sparsify_row.get('median_s'))} "
                f"| {_ratio(row['median_s'], floor.get('median_s'))} "
                f"| {_ratio(row['median_s'], topk.get('median_s'))} | {_mb(row.get('peak_tensor_bytes'))} "
                f"| {_ratio(row.get('peak_tensor_bytes'), topk.get('peak_tensor_bytes'))} "
                f"| {_mb(row.get('step_transient_bytes'))} | {_mb(row.get('peak_rss_increase_bytes'))} |"
            )
    if all((k, name) in by_key for k in ks for name in ("htopk_reference", "htopk_fused")):
        lines += ["", "Reference -> fused (same K): step time and peak tensor memory divided by the fused ones.", ""]
        lines += ["| K | time reference / fused | memory reference / fused |", "|---:|---:|---:|"]
        for k in ks:
            reference, fused = by_key[(k, "htopk_reference")], by_key[(k, "htopk_fused")]
            lines.append(
                f"| {k} | {_ratio(reference['median_s'], fused['median_s'])} "
                f"| {_ratio(reference.get('peak_tensor_bytes'), fused.get('peak_tensor_bytes'))} |"
            )
    lines += ["", *target_lines(by_key, ks, header)]
    return "\n".join(lines) + "\n"
