"""Evaluation of a HierarchicalTopK SAE at every budget k from one encoding pass.

The ranking of a token's K latents is computed once; the reconstruction at budget k is the running sum
of the first k ranked decoder rows, so all budgets cost one top-K plus K row additions per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKSAE, HierarchicalTopKTrainingSAE, validate_k


@dataclass(frozen=True)
class BudgetMetrics:
    """Reconstruction quality at one budget k, over all evaluated tokens.

    ``mse`` follows SAELens (squared error summed over d_in, mean over tokens); ``fvu`` is the fraction of
    variance unexplained (total squared error / total squared deviation from the mean activation);
    ``explained_variance = 1 - fvu``; ``l0`` the mean number of non-zero activations per token.
    """

    k: int
    mse: float
    fvu: float
    explained_variance: float
    cossim: float
    l0: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate_over_k(
    sae: HierarchicalTopKSAE | HierarchicalTopKTrainingSAE,
    activations: torch.Tensor,
    ks: list[int] | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> list[BudgetMetrics]:
    """Reconstruction metrics of ``sae`` at each budget in ``ks`` (default: powers of two up to K, and K).

    Args:
        activations: ``[tokens, d_in]`` activations at the SAE's hook, in the units the SAE was saved in.
        ks: budgets in 1..K; evaluated in one pass.
    """
    max_k = sae.cfg.k
    ks = sorted({validate_k(k, max_k) for k in (ks or default_budgets(max_k))})
    if activations.ndim != 2 or activations.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"activations must be [tokens, d_in={sae.cfg.d_in}]; got shape {tuple(activations.shape)}")
    if sae.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale"):
        raise ValueError(
            f"evaluate_over_k does not support normalize_activations={sae.cfg.normalize_activations!r} "
            "(allowed: 'none', or a scaling already folded into the weights, as in saved SAEs)"
        )
    squared_error = torch.zeros(len(ks), dtype=torch.float64)
    cossim_sum = torch.zeros(len(ks), dtype=torch.float64)
    l0_sum = torch.zeros(len(ks), dtype=torch.float64)
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq_norm = torch.zeros((), dtype=torch.float64)
    n_tokens = activations.shape[0]
    batches = range(0, n_tokens, batch_size)
    for start in tqdm(batches, desc="Evaluating budgets", disable=not progress):
        x = activations[start : start + batch_size].to(sae.device, sae.dtype)
        top_acts, top_indices = sae.encode_top_k(x)
        coefficients = sae.decoder_coefficients(top_acts, top_indices)
        reconstruction = sae.b_dec.expand_as(x).clone()
        previous = 0
        for position, k in enumerate(ks):
            rows = sae.W_dec[top_indices[:, previous:k]]
            reconstruction += torch.einsum("tr,trd->td", coefficients[:, previous:k], rows)
            previous = k
            squared_error[position] += (reconstruction - x).double().pow(2).sum()
            cossim_sum[position] += torch.nn.functional.cosine_similarity(reconstruction, x, dim=-1).double().sum()
            l0_sum[position] += (top_acts[:, :k] > 0).sum()
        sum_x += x.double().sum(dim=0)
        sum_sq_norm += x.double().pow(2).sum()
    total_variance = sum_sq_norm - sum_x.pow(2).sum() / n_tokens
    results = []
    for position, k in enumerate(ks):
        fvu = float(squared_error[position] / total_variance)
        results.append(
            BudgetMetrics(
                k=k,
                mse=float(squared_error[position] / n_tokens),
                fvu=fvu,
                explained_variance=1.0 - fvu,
                cossim=float(cossim_sum[position] / n_tokens),
                l0=float(l0_sum[position] / n_tokens),
            )
        )
    return results


def default_budgets(max_k: int) -> list[int]:
    """Powers of two below K, and K itself."""
    budgets = [2**i for i in range(max_k.bit_length()) if 2**i < max_k]
    return [*budgets, max_k]


def plot_over_k(results: list[BudgetMetrics], path: str | Path, title: str = "HierarchicalTopK SAE") -> Path:
    """Save FVU and explained variance against k (log-x) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r.k for r in results]
    figure, (fvu_axis, ev_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    fvu_axis.plot(ks, [r.fvu for r in results], marker="o")
    fvu_axis.set(xscale="log", xlabel="budget k", ylabel="FVU (lower is better)", title="Unexplained variance")
    ev_axis.plot(ks, [r.explained_variance for r in results], marker="o", color="tab:green")
    ev_axis.set(xscale="log", xlabel="budget k", ylabel="explained variance", title="Explained variance")
    for axis in (fvu_axis, ev_axis):
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def format_markdown_table(results: list[BudgetMetrics]) -> str:
    """A markdown table, one row per budget."""
    lines = [
        "| k | L0 | FVU | explained variance | MSE | cos sim |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.k} | {r.l0:.2f} | {r.fvu:.4f} | {r.explained_variance:.4f} | {r.mse:.4g} | {r.cossim:.4f} |"
        )
    return "\n".join(lines)
