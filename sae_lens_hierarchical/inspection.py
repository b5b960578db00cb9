"""Notebook helpers: which latents a text activates at a budget (k, threshold or both), as a table."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from sae_lens import SAE
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

from sae_lens_hierarchical.budget import Budget
from sae_lens_hierarchical.data.activation_cache import hook_activations
from sae_lens_hierarchical.evaluation import max_budget, ranked_latents

ACTIVE_LATENT_COLUMNS = ["sequence", "position", "token", "rank", "latent", "activation"]


@torch.no_grad()
def active_latents(
    model: HookedTransformer,
    sae: SAE[Any],
    text: str | list[str] | torch.Tensor,
    k: int | None = None,
    *,
    threshold: float | None = None,
    exclude_special_tokens: bool = True,
) -> pd.DataFrame:
    """One row per (token, active latent) at budget ``k`` and/or ``threshold``: ``sequence, position, token, rank,
    latent, activation``.

    The model runs on ``text`` up to the block of the SAE's hook (``sae.cfg.metadata.hook_name``); each token's
    latents are ranked as a budget selects them: a HierarchicalTopK SAE's nested ranking (``encode_top_k``), or for
    any other SAELens SAE its activations sorted and truncated to the k largest (as ``evaluate_over_k`` does). With
    ``threshold``, only activations >= it are listed, so tokens keep different numbers of latents. Only latents with a
    positive activation are listed, ``rank`` 1 first; ``token`` is the token's string.

    Args:
        text: a string (BOS prepended, as ``model.to_tokens`` does), a list of strings (each its own sequence,
            so no padding is listed), or token ids ``[context]`` / ``[sequences, context]``.
        k: the budget, in 1..K for TopK-family SAEs (1..d_sae for SAEs without a k); default K (with a threshold,
            every latent the SAE activates for SAEs without a k).
        threshold: keep only activations >= it (in the units of ``sae.encode``'s output).
        exclude_special_tokens: leave out BOS, padding and other special-token positions (default), whose
            activations are outliers (BOS: ~100x the norm of text) and take latents of their own.
    """
    max_k = max_budget(sae)
    if k is None and threshold is None and max_k is None:
        raise ValueError(f"{type(sae).__name__} has no k: pass k (1..d_sae={sae.cfg.d_sae}) or threshold")
    budget = Budget(k if k is not None else max_k, threshold).validated(sae.cfg.d_sae if max_k is None else max_k)
    hook_name = sae.cfg.metadata.hook_name
    if not hook_name or hook_name not in model.hook_dict:
        raise ValueError(
            f"sae.cfg.metadata.hook_name {hook_name!r} is not a hook of the model; set it to one of model.hook_dict"
        )
    if isinstance(text, torch.Tensor):
        if text.ndim not in (1, 2) or text.is_floating_point():
            raise ValueError(
                "token ids must be integers of shape [context] or [sequences, context]; "
                f"got {text.dtype} of shape {tuple(text.shape)}"
            )
        sequences = list(text.reshape(-1, text.shape[-1]))
    else:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(item, str) for item in texts):
            raise ValueError("text must be a string, a non-empty list of strings, or a tensor of token ids")
        sequences = [model.to_tokens(item)[0] for item in texts]
    excluded = set(get_special_token_ids(model.tokenizer)) if exclude_special_tokens and model.tokenizer else set()
    frames = [
        _sequence_latents(model, sae, hook_name, tokens, budget, index, excluded)
        for index, tokens in enumerate(sequences)
    ]
    return pd.concat(frames, ignore_index=True)


def _sequence_latents(
    model: HookedTransformer,
    sae: SAE[Any],
    hook_name: str,
    tokens: torch.Tensor,
    budget: Budget,
    sequence: int,
    excluded: set[int],
) -> pd.DataFrame:
    """The rows of :func:`active_latents` for one sequence of token ids ``[context]``."""
    activations = hook_activations(model, tokens[None], hook_name)[0]  # [context, ...]
    if activations[0].numel() != sae.cfg.d_in:
        raise ValueError(
            f"activations at {hook_name!r} have shape {tuple(activations.shape[1:])} per token; the SAE's d_in is "
            f"{sae.cfg.d_in} (SAEs on one attention head are not supported here)"
        )
    x = activations.reshape(len(activations), sae.cfg.d_in).to(sae.device, sae.dtype)
    top_acts, top_indices, _ = ranked_latents(sae, x, budget.k)  # [context, ranks] each, largest first
    kept = budget.keep(top_acts).cpu()
    kept[[position for position, token in enumerate(tokens.tolist()) if token in excluded]] = False
    top_acts, top_indices = top_acts.float().cpu(), top_indices.cpu()
    position, rank = torch.nonzero(kept, as_tuple=True)
    strings = model.to_str_tokens(tokens)
    return pd.DataFrame(
        {
            "sequence": sequence,
            "position": position.numpy(),
            "token": [strings[p] for p in position.tolist()],
            "rank": (rank + 1).numpy(),
            "latent": top_indices[position, rank].numpy(),
            "activation": top_acts[position, rank].numpy(),
        },
        columns=ACTIVE_LATENT_COLUMNS,
    )
