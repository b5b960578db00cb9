"""evaluate_over_k against independent per-k computations and against SAELens's own evals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.evals import get_recons_loss
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import load_sae, presets
from sae_lens_hierarchical.evaluation import BudgetMetrics, evaluate_over_k, format_markdown_table, plot_over_k
from tests.conftest import TRAINED_K

BUDGETS = [1, 3, 8, 16]


@torch.no_grad()
def per_k_reference(reconstruct: object, x: torch.Tensor, encode: object) -> dict[str, float]:
    """FVU, cosine, L0 and alive fraction of one budget, computed in float64 from the SAE's own encode/decode."""
    x64 = x.double()
    recon = reconstruct(x).double()  # type: ignore[operator]
    acts = encode(x)  # type: ignore[operator]
    total_variance = (x64 - x64.mean(dim=0)).pow(2).sum()
    return {
        "fvu": float((recon - x64).pow(2).sum() / total_variance),
        "mse": float((recon - x64).pow(2).sum(dim=-1).mean()),
        "cossim": float(torch.nn.functional.cosine_similarity(recon, x64, dim=-1).mean()),
        "l0": float((acts > 0).sum(dim=-1).double().mean()),
        "alive_fraction": float((acts > 0).any(dim=0).double().mean()),
    }


def assert_matches(result: BudgetMetrics, reference: dict[str, float]) -> None:
    for name, value in reference.items():
        assert getattr(result, name) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert result.dead_fraction == pytest.approx(1 - reference["alive_fraction"])
    assert result.explained_variance == pytest.approx(1 - reference["fvu"])


def assert_matches_truncation(sae: SAE, activations: torch.Tensor, results: list[BudgetMetrics]) -> None:
    """Each result equals the SAE's own encode, cut to its k largest activations, then its own decode."""

    def truncated(x: torch.Tensor, k: int) -> torch.Tensor:
        acts = sae.encode(x)
        values, indices = acts.topk(k, dim=-1)
        return torch.zeros_like(acts).scatter(-1, indices, values)

    for result in results:
        reference = per_k_reference(
            lambda x, k=result.k: sae.decode(truncated(x, k)), activations, lambda x, k=result.k: truncated(x, k)
        )
        assert_matches(result, reference)


def test_hierarchical_budgets_match_encode_decode_at_each_k(
    trained_sae_dir: Path, held_out_activations: torch.Tensor
) -> None:
    sae = load_sae(trained_sae_dir)
    results = evaluate_over_k(trained_sae_dir, held_out_activations, ks=BUDGETS, batch_size=300, progress=False)
    assert [r.k for r in results] == BUDGETS
    for result in results:
        reference = per_k_reference(
            lambda x, k=result.k: sae.decode(sae.encode(x, k=k)),
            held_out_activations,
            lambda x, k=result.k: sae.encode(x, k=k),
        )
        assert_matches(result, reference)
    assert results[0].alive_fraction < results[-1].alive_fraction


def test_sae_lens_topk_is_evaluated_truncated_to_its_largest_activations(held_out_activations: torch.Tensor) -> None:
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=96, k=12, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)  # unequal row norms: the rescaling must be honoured
    results = evaluate_over_k(sae, held_out_activations, ks=[2, 5, 12], progress=False)
    assert_matches_truncation(sae, held_out_activations, results)
    # At its own k, truncation is the identity: the metrics are those of the SAE's forward pass.
    assert results[-1].fvu == pytest.approx(per_k_reference(sae, held_out_activations, sae.encode)["fvu"], rel=1e-5)


def test_downstream_scores_equal_sae_lens_get_recons_loss_at_each_k(
    trained_sae_dir: Path, tiny_model: HookedTransformer
) -> None:
    sae = load_sae(trained_sae_dir)
    tokens = torch.tensor(presets.tiny_token_dataset(12, 32, seed=7)["input_ids"])
    bos = [tiny_model.tokenizer.bos_token_id]
    activations = presets.collect_activations(tiny_model, tokens, presets.TINY_HOOK_NAME)
    results = evaluate_over_k(
        sae,
        activations,
        ks=[2, 8, TRAINED_K],
        model=tiny_model,
        tokens=tokens,
        exclude_token_ids=bos,
        sequence_batch_size=5,
        progress=False,
    )
    keep = tokens != bos[0]
    for result in results:
        with sae.use_k(result.k):
            reference = get_recons_loss(
                sae, tiny_model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True, ignore_tokens=bos
            )
        ce = {name: float(reference[name][keep[:, :-1]].mean()) for name in reference if name.startswith("ce_")}
        kl = {name: float(reference[name][keep].mean()) for name in reference if name.startswith("kl_")}
        assert result.ce_loss_with_sae == pytest.approx(ce["ce_loss_with_sae"], rel=1e-5)
        assert result.ce_loss_without_sae == pytest.approx(ce["ce_loss_without_sae"], rel=1e-5)
        assert result.ce_loss_with_ablation == pytest.approx(ce["ce_loss_with_ablation"], rel=1e-5)
        assert result.kl_div_with_sae == pytest.approx(kl["kl_div_with_sae"], rel=1e-4, abs=1e-7)
        expected_ce_score = (ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"]) / (
            ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"]
        )
        assert result.ce_loss_score == pytest.approx(expected_ce_score, rel=1e-4)
        assert result.kl_div_score == pytest.approx(1 - kl["kl_div_with_sae"] / kl["kl_div_with_ablation"], rel=1e-4)
    # More latents, closer to the clean model.
    assert results[0].kl_div_with_sae > results[-1].kl_div_with_sae


def test_reports_show_downstream_columns_and_plot(trained_sae_dir: Path, tmp_path: Path) -> None:
    without = [BudgetMetrics(k, 1.0, 0.5, 0.5, 0.9, float(k), 0.8, 0.2) for k in (1, 2)]
    with_scores = [
        BudgetMetrics(k, 1.0, 0.5, 0.5, 0.9, float(k), 0.8, 0.2, 0.7, 0.6, 3.0, 2.0, 9.0, 0.1, 2.0) for k in (1, 2)
    ]
    assert "CE-loss score" not in format_markdown_table(without)
    assert "| 2 | 2.00 | 0.5000 |" in format_markdown_table(with_scores)
    assert "0.7000 | 0.6000 | 3.0000 |" in format_markdown_table(with_scores)
    assert plot_over_k(with_scores, tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": [0]}, "k must be"),
        ({"ks": [TRAINED_K + 1]}, "k must be"),
        ({"activations": torch.zeros(10, 31)}, "d_in=32"),
        ({"activations": torch.zeros(1, 32)}, "at least 2"),
        ({"activations": torch.zeros(10, 32, dtype=torch.long)}, "floating point"),
        ({"tokens": torch.zeros(2, 8, dtype=torch.long)}, "both model and tokens"),
    ],
)
def test_bad_inputs_name_the_value(
    trained_sae_dir: Path, held_out_activations: torch.Tensor, kwargs: dict[str, object], message: str
) -> None:
    sae = load_sae(trained_sae_dir)
    arguments: dict[str, object] = {"activations": held_out_activations, **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate_over_k(sae, progress=False, **arguments)  # type: ignore[arg-type]


def test_sae_without_k_needs_budgets_and_counts_only_active_latents(held_out_activations: torch.Tensor) -> None:
    """A ReLU SAE has inactive latents inside its top-k: they count neither for L0 nor as alive."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-40.0, 0.0, 64))  # some latents never fire, others rarely
    with pytest.raises(ValueError, match="has no k"):
        evaluate_over_k(sae, held_out_activations, progress=False)
    results = evaluate_over_k(sae, held_out_activations, ks=[2, 64], progress=False)
    assert_matches_truncation(sae, held_out_activations, results)
    assert 0 < results[-1].alive_fraction < 1
