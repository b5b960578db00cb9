"""A latent dashboard's site: each page's JSON, the HTML rendered from it, the index and ``dashboard.json``.

Kept apart from :mod:`sae_lens_hierarchical.interpretability.dashboard` so that the statistics (one ranking pass) and
their presentation (inline CSS, SVG and a few lines of JS) are one concern each. This module builds on that one: it
reads its statistics and file names, and ``latent_dashboard`` imports it when it writes (deferred: no import cycle).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_hierarchical.interpretability.latent_statistics import (
    LATENTS_DIRNAME,
    SUMMARY_FILENAME,
    LatentStatistics,
    rank_ranges,
    visible_token,
)


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


class DashboardSite:
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
