"""evaluate_over_k, its tables and plots against independent float64 computations and SAELens's own evals.

The reference ranks each token's latents with ``torch.topk`` on ``W_enc``/``b_enc`` in float64 and rebuilds every
budget's reconstruction by a loop over ranks: nothing in it calls the SAE's encode, decode or ranking.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.evals import get_recons_loss
from sae_lens.training.activation_scaler import ActivationScaler
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import HierarchicalTopKSAE, HierarchicalTopKSAEConfig, load_sae, presets
from sae_lens_hierarchical.evaluation import (
    BudgetMetrics,
    BudgetResults,
    evaluate_over_k,
    figure_over_k,
    format_first_rank_table,
    format_markdown_table,
    latent_activations,
    plot_first_ranks,
    plot_over_k,
)
from sae_lens_hierarchical.jobs import write_report
from tests.conftest import TRAINED_K

BUDGETS = [1, 3, 8, 16]
METRICS = ["mse", "fvu", "cossim", "l0", "alive_fraction"]


@torch.no_grad()
def float64_ranking(sae: SAE, x: torch.Tensor, n_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(activations, latent indices, decoder coefficients)``, each ``[tokens, n_ranks]`` float64, largest first.

    Pre-activations straight from the weights, ranked (times the decoder row norms when the SAE rescales by them)
    with ``torch.topk``; a ReLU SAE's ranking is the same, since ReLU keeps the order of positive values.
    """
    W_enc, b_enc, W_dec, b_dec = (t.detach().double().cpu() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    hidden_pre = (x.double().cpu() - b_dec * sae.cfg.apply_b_dec_to_input) @ W_enc + b_enc
    norms = W_dec.norm(dim=-1) if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else torch.ones(len(W_dec))
    values, indices = torch.topk(hidden_pre * norms, n_ranks, dim=-1, sorted=True)
    acts = values.relu()
    return acts, indices, acts / norms[indices]


@torch.no_grad()
def float64_reference(sae: SAE, x: torch.Tensor, ks: list[int]) -> tuple[list[dict[str, float]], torch.Tensor]:
    """Per budget in ``ks``: MSE, FVU, cosine, L0 and alive fraction; and each latent's first rank (0: never)."""
    acts, indices, coefficients = float64_ranking(sae, x, max(ks))
    W_dec, b_dec = sae.W_dec.detach().double().cpu(), sae.b_dec.detach().double().cpu()
    x = x.double().cpu()
    total_variance = (x - x.mean(dim=0)).pow(2).sum()
    metrics = []
    for k in ks:
        reconstruction = b_dec.expand_as(x).clone()
        for rank in range(k):
            reconstruction += coefficients[:, rank, None] * W_dec[indices[:, rank]]
        active = acts[:, :k] > 0
        metrics.append(
            {
                "mse": float((reconstruction - x).pow(2).sum(dim=-1).mean()),
                "fvu": float((reconstruction - x).pow(2).sum() / total_variance),
                "cossim": float(torch.nn.functional.cosine_similarity(reconstruction, x, dim=-1).mean()),
                "l0": float(active.sum(dim=-1).double().mean()),
                "alive_fraction": len(set(indices[:, :k][active].tolist())) / sae.cfg.d_sae,
            }
        )
    first_rank = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for rank in reversed(range(max(ks))):  # smaller ranks overwrite larger ones
        first_rank[indices[:, rank][acts[:, rank] > 0]] = rank + 1
    return metrics, first_rank


def assert_matches_reference(
    sae: SAE, activations: torch.Tensor, results: list[BudgetMetrics], rel: float, abs: float = 1e-7
) -> None:
    """Every metric of every budget, the first ranks and the histogram of ``results`` equal the float64 reference."""
    ks = [r.k for r in results]
    reference, first_rank = float64_reference(sae, activations, ks)
    for result, expected in zip(results, reference, strict=True):
        for name in METRICS:
            assert getattr(result, name) == pytest.approx(expected[name], rel=rel, abs=abs), (result.k, name)
        assert result.explained_variance == pytest.approx(1 - expected["fvu"], rel=rel, abs=abs)
        assert result.dead_fraction == pytest.approx(1 - expected["alive_fraction"], rel=rel, abs=abs)
    assert isinstance(results, BudgetResults)
    first_ranks = results.first_ranks
    assert first_ranks.max_rank == ks[-1]
    assert torch.equal(first_ranks.ranks, first_rank)
    assert first_ranks.counts == [int((first_rank == r).sum()) for r in range(1, ks[-1] + 1)]
    assert first_ranks.never_fired == int((first_rank == 0).sum())


def random_topk_sae(d_in: int = 32, d_sae: int = 96, k: int = 12, **kwargs: object) -> TopKSAE:
    """A SAELens TopK SAE whose decoder rows have unequal norms (so rescaling by them matters)."""
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **kwargs))  # type: ignore[arg-type]
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
    return sae


def test_hierarchical_budgets_match_a_float64_ranking_of_the_weights(
    trained_sae_dir: Path, held_out_activations: torch.Tensor
) -> None:
    sae = load_sae(trained_sae_dir)
    results = evaluate_over_k(trained_sae_dir, held_out_activations, ks=BUDGETS, batch_size=300, progress=False)
    assert [r.k for r in results] == BUDGETS
    assert_matches_reference(sae, held_out_activations, results, rel=1e-4)
    # In float64 the ranking is the reference's exactly, at every budget 1..K: equal to rounding error.
    every_k = list(range(1, TRAINED_K + 1))
    sae64 = sae.to(torch.float64)
    results64 = evaluate_over_k(sae64, held_out_activations.double(), ks=every_k, batch_size=300, progress=False)
    assert_matches_reference(sae64, held_out_activations, results64, rel=1e-9, abs=1e-12)
    assert [results64.first_ranks.alive_fraction(k) for k in every_k] == [r.alive_fraction for r in results64]
    assert results[0].alive_fraction < results[-1].alive_fraction


@pytest.mark.parametrize("rescale", [False, True])
def test_sae_lens_topk_is_evaluated_truncated_to_its_largest_activations(
    held_out_activations: torch.Tensor, rescale: bool
) -> None:
    sae = random_topk_sae(rescale_acts_by_decoder_norm=rescale)
    results = evaluate_over_k(sae, held_out_activations, ks=[2, 5, 12], progress=False)
    assert_matches_reference(sae, held_out_activations, results, rel=1e-4)
    # At its own k, truncation is the identity: the FVU is that of SAELens's own forward pass.
    x = held_out_activations.double()
    with torch.no_grad():
        fvu = (sae(held_out_activations).double() - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    assert results[-1].fvu == pytest.approx(float(fvu), rel=1e-5)


@pytest.mark.parametrize("kind", ["hierarchical", "topk", "topk_rescaled"])
def test_latent_activations_at_k_are_the_float64_ranking_scattered(
    trained_sae_dir: Path, held_out_activations: torch.Tensor, kind: str
) -> None:
    """Dense activations at k: the k top-ranked latents of the float64 ranking carry their activations, none other."""
    if kind == "hierarchical":
        sae = load_sae(trained_sae_dir).to(torch.float64)
    else:
        sae = random_topk_sae(rescale_acts_by_decoder_norm=kind == "topk_rescaled").to(torch.float64)
    x = held_out_activations.double()
    for k in (1, 3, 8):
        acts, indices, _ = float64_ranking(sae, x, k)
        expected = torch.zeros(x.shape[0], sae.cfg.d_sae, dtype=torch.float64)
        for rank in range(k):
            expected[torch.arange(x.shape[0]), indices[:, rank]] = acts[:, rank]
        with torch.no_grad():
            got = latent_activations(sae, x, k)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        assert int((got > 0).sum(dim=-1).max()) <= k
    with pytest.raises(ValueError, match="k"):
        latent_activations(sae, x, sae.cfg.k + 1)


def test_sae_without_k_needs_budgets_and_counts_only_active_latents(held_out_activations: torch.Tensor) -> None:
    """A ReLU SAE has inactive latents inside its top-k: they count neither for L0 nor as alive."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-40.0, 0.0, 64))  # some latents never fire, others rarely
    with pytest.raises(ValueError, match="has no k"):
        evaluate_over_k(sae, held_out_activations, progress=False)
    results = evaluate_over_k(sae, held_out_activations, ks=[2, 64], progress=False)
    assert_matches_reference(sae, held_out_activations, results, rel=1e-4)
    assert 0 < results[-1].alive_fraction < 1
    assert results.first_ranks.never_fired > 0


def peak_allocated_bytes(run: object) -> int:
    """Most bytes held at once by CPU tensors allocated during ``run()``, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()  # type: ignore[operator]
    events, allocations = list(profiler.profiler.kineto_results.experimental_event_tree()), []  # type: ignore[union-attr]
    while events:
        event = events.pop()
        events.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))  # negative for frees
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def test_prefixes_are_decoded_without_gathering_decoder_rows() -> None:
    """Peak memory stays far below one ``[batch, Δk, d_in]`` block of gathered decoder rows; results are exact."""
    torch.manual_seed(0)
    sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=64, d_sae=256, k=64))
    activations = torch.randn(1024, 64)
    batch_size, ks = 512, [1, 64]
    returned: dict[str, BudgetResults] = {}
    peak = peak_allocated_bytes(
        lambda: returned.update(results=evaluate_over_k(sae, activations, ks, batch_size=batch_size, progress=False))
    )
    gathered_rows = batch_size * (ks[1] - ks[0]) * sae.cfg.d_in * 4  # 8.3 MB; gathering them peaked at 10.0 MB
    assert peak < gathered_rows / 2, f"peak {peak / 1e6:.2f} MB"  # embedding_bag: 2.1 MB
    assert_matches_reference(sae, activations, returned["results"], rel=1e-4)


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """``(header cells, rows of cells)`` of the first markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert all(re.fullmatch(r"-*:?", cell) for cell in cells[1]), "second line must be the rule"
    return cells[0], cells[2:]


def synthetic_results(downstream: bool) -> list[BudgetMetrics]:
    """Budgets whose every field has a distinct value, so a swapped or misformatted column cannot match."""
    results = []
    for i, k in enumerate((1, 4, 32)):
        fvu = 0.61 / (i + 1)
        scores = (0.5 + i / 10, 0.4 + i / 9, 3.3 - i / 7, 2.9, 9.1, 0.2 / (i + 1), 2.2) if downstream else ()
        results.append(
            BudgetMetrics(k, 1234.5 / (i + 1), fvu, 1 - fvu, 0.9 + i / 50, k - 0.25, 0.3 + i / 5, 0.7 - i / 5, *scores)
        )
    return results


@pytest.mark.parametrize("downstream", [False, True])
def test_markdown_table_parses_back_to_the_results(downstream: bool) -> None:
    results = synthetic_results(downstream)
    header, rows = parse_markdown_table(format_markdown_table(results))
    columns = ["k", "l0", "fvu", "explained_variance", "mse", "cossim", "alive_fraction"]
    names = ["k", "L0", "FVU", "explained variance", "MSE", "cos sim", "alive"]
    if downstream:
        columns += ["ce_loss_score", "kl_div_score", "ce_loss_with_sae"]
        names += ["CE-loss score", "KL score", "CE with SAE"]
    assert header == names
    assert len(rows) == len(results)
    for row, result in zip(rows, results, strict=True):
        assert len(row) == len(columns)
        for cell, column in zip(row, columns, strict=True):
            # Four significant digits or decimals at most: within 5e-4 relative or 5e-5 absolute.
            assert float(cell) == pytest.approx(getattr(result, column), rel=5e-4, abs=5e-5), column


def test_first_rank_table_and_report_files(held_out_activations: torch.Tensor, tmp_path: Path) -> None:
    sae = random_topk_sae(d_sae=64, k=12)
    results = evaluate_over_k(sae, held_out_activations, ks=[1, 3, 12], progress=False)
    _, first_rank = float64_reference(sae, held_out_activations, [12])
    _, rows = parse_markdown_table(format_first_rank_table(results.first_ranks))
    spans = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 12)]
    assert [row[0] for row in rows] == ["1", "2", "3-4", "5-8", "9-12", "never"]
    for row, (low, high) in zip(rows, spans, strict=False):
        assert int(row[1]) == int(((first_rank >= low) & (first_rank <= high)).sum()), row
        alive = float(((first_rank >= 1) & (first_rank <= high)).double().mean())
        assert float(row[3]) == pytest.approx(alive, abs=5e-4), row
    assert int(rows[-1][1]) == int((first_rank == 0).sum())
    assert float(rows[4][3]) == pytest.approx(results[-1].alive_fraction, abs=5e-4)

    write_report(results, tmp_path, title="t")
    report = json.loads((tmp_path / "per_k.json").read_text())
    assert report["per_k"] == [r.to_dict() for r in results]
    assert report["first_rank"]["counts"] == [
        int((first_rank == r).sum()) for r in range(1, len(report["first_rank"]["counts"]) + 1)
    ]
    assert report["first_rank"]["never_fired"] == int((first_rank == 0).sum())
    report = (tmp_path / "per_k.md").read_text()
    assert report.startswith(format_markdown_table(results) + "\n\n")
    assert report.endswith(format_first_rank_table(results.first_ranks) + "\n")
    assert matplotlib.image.imread(tmp_path / "per_k.png").shape == (420, 3 * 540, 4)


def test_plots_draw_the_results(held_out_activations: torch.Tensor, tmp_path: Path) -> None:
    sae = random_topk_sae(d_sae=64, k=12)
    results = evaluate_over_k(sae, held_out_activations, ks=[1, 3, 12], progress=False)
    _, first_rank = float64_reference(sae, held_out_activations, [12])
    figure = figure_over_k(results)
    fvu, explained, ranks = (axis.lines[0].get_xydata().tolist() for axis in figure.axes)
    assert fvu == [[r.k, r.fvu] for r in results]
    assert explained == [[r.k, r.explained_variance] for r in results]
    assert ranks == [[r, int((first_rank == r).sum())] for r in range(1, 13)]
    assert [axis.get_xscale() for axis in figure.axes] == ["log"] * 3
    assert f"({int((first_rank == 0).sum())} never fired)" in figure.axes[2].get_title()

    # With CE-loss scores a third panel; a plain list of metrics has no first ranks to draw.
    with_scores = synthetic_results(downstream=True)
    figure = figure_over_k(with_scores)
    assert len(figure.axes) == 3
    assert figure.axes[2].lines[0].get_xydata().tolist() == [[r.k, r.ce_loss_score] for r in with_scores]

    image = matplotlib.image.imread(plot_over_k(results, tmp_path / "p.png"))
    assert image.shape == (420, 3 * 540, 4)  # 3.5 x 4.5 inches per panel at 120 dpi, RGBA
    assert image[..., :3].std() > 0.05, "the PNG must not be blank"
    image = matplotlib.image.imread(plot_first_ranks(results.first_ranks, tmp_path / "r.png"))
    assert image.shape == (456, 660, 4)


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


def test_bos_like_rows_make_the_evaluation_warn() -> None:
    """Activations taken with ``cache[hook].reshape(-1, d_in)`` keep BOS rows (norms ~100x text): a warning says so."""
    torch.manual_seed(0)
    sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=16, d_sae=32, k=4))
    text = torch.randn(500, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_over_k(sae, text, [4], progress=False)  # clean rows: no warning
    with pytest.warns(UserWarning, match=r"5 of 505 activation rows have norms over 10x the median"):
        evaluate_over_k(sae, torch.cat([text, 100 * torch.randn(5, 16)]), [4], progress=False)
