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
from sae_lens_hierarchical.evaluation import max_budget, resolve_budgets
from sae_lens_hierarchical.interpretability.dashboard_site import DashboardSite
from sae_lens_hierarchical.interpretability.latent_statistics import (
    LATENTS_DIRNAME,
    SUMMARY_FILENAME,
    collect_latent_statistics,
    dashboard_budgets,
    default_dashboard_latents,
    rank_ranges,
    visible_token,
)
from sae_lens_hierarchical.loading import load_sae

__all__ = ["LatentDashboard", "collect_latent_statistics", "latent_dashboard", "rank_ranges", "visible_token"]


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
