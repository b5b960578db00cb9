"""CE-loss and KL scores at every budget (k or threshold), with the reconstruction spliced into the model.

Definitions follow ``sae_lens.evals.get_recons_loss``: the reconstruction is spliced into the model at the SAE's hook
(special-token positions keep their clean activations), zero ablation of the hook is the floor, and
``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)``, ``kl_div_score = (KL_zero - KL_sae) / KL_zero`` with
KL(clean || spliced).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_lens_hierarchical.budget import Budget
from sae_lens_hierarchical.evaluation.budgets import budget_reconstructions


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
    """:func:`downstream_metrics` at each budget k in sorted ``ks``."""
    budgets = [Budget(k) for k in ks]
    return downstream_metrics(sae, model, tokens, budgets, exclude_token_ids, hook_name, sequence_batch_size, progress)


@torch.no_grad()
def downstream_metrics(
    sae: SAE[Any],
    model: HookedRootModule,
    tokens: torch.Tensor,
    budgets: list[Budget],
    exclude_token_ids: list[int] | None = None,
    hook_name: str | None = None,
    sequence_batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, float]]:
    """CE-loss and KL scores at each budget, with the same definitions as ``sae_lens.evals``.

    Each batch of sequences runs the model clean (recording the hook's activations), zero-ablated, and once
    per budget with that budget's reconstruction spliced in; the ranking is computed once per batch.
    """
    hook_name = hook_name or sae.cfg.metadata.hook_name
    if not hook_name or hook_name not in model.hook_dict:
        raise ValueError(f"hook_name {hook_name!r} is not a hook of the model; pass hook_name= explicitly")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [sequences, context >= 2]; got shape {tuple(tokens.shape)}")
    if sae.cfg.metadata.hook_head_index is not None:
        raise ValueError("SAEs on a single attention head (hook_head_index set) are not supported here")
    excluded = torch.tensor(sorted(exclude_token_ids or []), dtype=torch.long)
    ce = torch.zeros(len(budgets), dtype=torch.float64)
    kl = torch.zeros(len(budgets), dtype=torch.float64)
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
        reconstructions = budget_reconstructions(sae, flat, budgets)[0]
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
    for position in range(len(budgets)):
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
