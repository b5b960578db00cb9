"""Serving by threshold: ``encode/forward(x, threshold=)``, views, hooks, compile, calibration, evaluation by mean L0.

Every expectation is a float64 brute force written here from the raw weights: rank each token's pre-activations with a
full sort, keep the first K, keep those >= θ (and > 0), decode by summing rows. Nothing in it calls the SAE's own
encode, ranking or evaluation.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch._dynamo
from sae_lens import HookedSAETransformer, TopKSAE, TopKSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from torch._dynamo.testing import CompileCounter

from sae_lens_hierarchical import (
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    active_latents,
    calibrate_threshold,
    presets,
)
from sae_lens_hierarchical.evaluation import calibrate_thresholds, evaluate_over_k, evaluate_over_mean_l0

D_IN, D_SAE, K = 16, 64, 8
KINDS = ["inference", "training"]


def make_sae(kind: str, dtype: str = "float32") -> Any:
    torch.manual_seed(0)
    if kind == "inference":
        sae: Any = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype=dtype))
    else:
        sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype=dtype))
    with torch.no_grad():
        sae.b_enc.normal_(-0.5, 0.3)  # a token at x = b_dec has a few positive pre-activations, fewer than K
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=sae.W_dec.dtype) * 2 + 0.3)
    return sae


def brute_force(sae: Any, x: torch.Tensor, threshold: float, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense activations [tokens, d_sae], reconstruction [tokens, d_in])`` kept by "at most k, and >= θ"."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    hidden = (x.double() - b_dec) @ W_enc + b_enc
    norms = W_dec.norm(dim=-1)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        hidden = hidden * norms
    else:
        norms = torch.ones_like(norms)
    acts = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        order = sorted(range(hidden.shape[1]), key=lambda latent: -float(hidden[token, latent]))
        for latent in order[:k]:
            value = float(hidden[token, latent])
            if value > 0 and value >= threshold:
                acts[token, latent] = value
    return acts, (acts / norms) @ W_dec + b_dec


def has_few_positive_tokens(sae: Any, x: torch.Tensor) -> bool:
    hidden = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    return bool(((hidden > 0).sum(dim=-1) < K).any())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quantile", [0.2, 0.6, 0.9])
def test_encode_and_forward_by_threshold_match_the_brute_force(kind: str, quantile: float) -> None:
    sae = make_sae(kind, "float64")
    x = torch.randn(40, D_IN, dtype=torch.float64)
    x[:5] = sae.b_dec.detach()  # pre-activations b_enc: fewer than K positive
    assert has_few_positive_tokens(sae, x)
    acts, _ = brute_force(sae, x, 1e-12)
    threshold = float(acts[acts > 0].quantile(quantile))
    expected_acts, expected_out = brute_force(sae, x, threshold)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x, threshold=threshold), expected_acts, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae(x, threshold=threshold), expected_out, rtol=1e-12, atol=1e-12)
        both_acts, both_out = brute_force(sae, x, threshold, k=3)
        torch.testing.assert_close(sae.encode(x, k=3, threshold=threshold), both_acts, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae(x, k=3, threshold=threshold), both_out, rtol=1e-12, atol=1e-12)
    counts = (expected_acts > 0).sum(dim=-1)
    assert counts.min() < counts.max(), "a threshold gives tokens different numbers of latents"
    assert sae.threshold is None and sae.k == K  # arguments, not state


def tied_sae() -> HierarchicalTopKSAE:
    """Dyadic weights (every sum is exact in float32 and float64) and latents 0-3 copies of latent 4 (encoder column,
    bias and decoder row): exact ties, whose members are interchangeable in every output."""
    generator = torch.Generator().manual_seed(1)
    sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-64, 65, (D_IN, D_SAE), generator=generator) / 64)
        sae.b_enc.copy_(torch.randint(-32, 33, (D_SAE,), generator=generator) / 64)
        sae.W_dec.copy_(torch.randint(-8, 9, (D_SAE, D_IN), generator=generator) / 8)
        sae.b_dec.zero_()
        sae.W_enc[:, :4] = sae.W_enc[:, 4:5]
        sae.b_enc[:4] = sae.b_enc[4]
        sae.W_dec[:4] = sae.W_dec[4]
    sae.cfg.rescale_acts_by_decoder_norm = False
    return sae


def test_ties_at_the_threshold_are_kept_together() -> None:
    """θ equal to a tied value keeps every copy (up to K); the values kept, their count and the reconstruction match
    the brute force exactly (which copy fills the last place under the cap cannot change them)."""
    sae = tied_sae()
    x = torch.randint(-3, 4, (64, D_IN)).float()
    hidden = x.double() @ sae.W_enc.double() + sae.b_enc.double()
    others = hidden[:, 5:]
    tokens = [t for t in range(64) if len(set(others[t].tolist())) == others.shape[1]]  # no accidental ties
    x, hidden = x[tokens], hidden[tokens]
    positive_copies = hidden[:, 4] > 0
    threshold = float(hidden[positive_copies, 4].median())
    assert ((hidden[:, 4] == threshold).sum()) >= 1
    expected_acts, expected_out = brute_force(sae, x, threshold)
    with torch.no_grad():
        acts = sae.encode(x, threshold=threshold)
        out = sae(x, threshold=threshold)
    torch.testing.assert_close(acts.double().sort(dim=-1).values, expected_acts.sort(dim=-1).values, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), expected_out, rtol=0, atol=1e-6)
    at_threshold = (hidden[:, 4] == threshold).nonzero().reshape(-1).tolist()
    assert at_threshold
    for token in at_threshold:  # the copies fill what the cap leaves after the values above θ
        above = int((hidden[token] > threshold).sum())
        assert int((acts[token, :5] > 0).sum()) == max(0, min(5, K - above))


@pytest.mark.parametrize("kind", KINDS)
def test_views_state_and_hooks_serve_the_threshold(kind: str) -> None:
    sae = make_sae(kind)
    x = torch.randn(20, D_IN)
    threshold = 0.4
    expected = brute_force(sae, x, threshold)[1]
    view = sae.at_threshold(threshold)
    assert (view.k, view.threshold, sae.threshold) == (K, threshold, None)
    for name, parameter in sae.named_parameters():
        assert getattr(view, name) is parameter
    with torch.no_grad():
        torch.testing.assert_close(view(x).double(), expected, rtol=1e-5, atol=1e-5)
        with sae.use_threshold(threshold):
            assert sae.threshold == threshold
            torch.testing.assert_close(sae(x).double(), expected, rtol=1e-5, atol=1e-5)
            with sae.use_k(3):  # k and threshold together: at most 3, and only >= θ
                torch.testing.assert_close(sae(x).double(), brute_force(sae, x, threshold, 3)[1], rtol=1e-5, atol=1e-5)
        assert sae.threshold is None
        sae.set_threshold(threshold)
        torch.testing.assert_close(sae(x).double(), expected, rtol=1e-5, atol=1e-5)
        sae.set_threshold(None)
    with pytest.raises(ValueError, match=r"at_threshold\(0\.4\) view and cannot load weights"):
        view.load_state_dict(sae.state_dict())
    for bad in (0, -1.0, math.inf, math.nan, "0.5", True):
        with pytest.raises(ValueError, match=r"threshold must be a finite number > 0.*got threshold="):
            sae.encode(x, threshold=bad)
    with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
        sae.at_threshold(-0.1)


def test_threshold_views_in_a_hooked_transformer() -> None:
    tiny = presets.tiny_random_model(seed=0)
    model = HookedSAETransformer(tiny.cfg)
    model.load_state_dict(tiny.state_dict())
    torch.manual_seed(0)
    sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=tiny.cfg.d_model, d_sae=D_SAE, k=K))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 9))

    def splice(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = activation.reshape(-1, activation.shape[-1])
        return brute_force(sae, flat, 0.2)[1].reshape(activation.shape).to(activation.dtype)

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", splice)])
        torch.testing.assert_close(
            model.run_with_saes(tokens, saes=[sae.at_threshold(0.2)]), expected, atol=1e-4, rtol=1e-4
        )
        with sae.use_threshold(0.2):
            torch.testing.assert_close(model.run_with_saes(tokens, saes=[sae]), expected, atol=1e-4, rtol=1e-4)


def test_compiled_forward_takes_the_threshold_as_an_argument() -> None:
    torch._dynamo.reset()
    sae = make_sae("inference")
    x = torch.randn(12, D_IN)
    counter = CompileCounter()
    compiled = torch.compile(sae.forward, backend=counter)
    with torch.no_grad():
        for threshold in (0.1, 0.2, 0.3, 0.5, 0.8, 1.3):
            expected = brute_force(sae, x, threshold)[1]
            torch.testing.assert_close(compiled(x, threshold=threshold).double(), expected, rtol=1e-5, atol=1e-5)
    assert 1 <= counter.frame_count <= 3, f"compiled {counter.frame_count} graphs for 6 thresholds"
    torch._dynamo.reset()


def test_active_latents_by_threshold() -> None:
    tiny = presets.tiny_random_model(seed=0)
    torch.manual_seed(0)
    sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=tiny.cfg.d_model, d_sae=D_SAE, k=K))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(1, tiny.cfg.d_vocab, (12,))
    everything = active_latents(tiny, sae, tokens, k=K, exclude_special_tokens=False)
    threshold = float(everything["activation"].median())
    table = active_latents(tiny, sae, tokens, threshold=threshold, exclude_special_tokens=False)
    expected = everything[everything["activation"] >= threshold]
    assert len(table) == len(expected) and (table["activation"] >= threshold).all()
    assert sorted(zip(table["position"], table["latent"], strict=True)) == sorted(
        zip(expected["position"], expected["latent"], strict=True)
    )
    assert table.groupby("position").size().nunique() > 1  # tokens keep different numbers of latents


def brute_force_threshold(values: list[float], n_tokens: int, mean_l0: float) -> int:
    """The smallest distance between ``mean_l0 * n_tokens`` and any count reachable by a threshold among ``values``."""
    return min(abs(sum(v >= t for v in values) - mean_l0 * n_tokens) for t in set(values))


@pytest.mark.parametrize("mean_l0", [0.05, 1.0, 2.5, 4.0, 6.3])
def test_calibration_reaches_the_nearest_mean_l0_a_threshold_can(mean_l0: float) -> None:
    sae = make_sae("inference", "float64")  # float64: the brute force's values are the SAE's, bit for bit
    x = torch.randn(50, D_IN, dtype=torch.float64)
    x[:6] = sae.b_dec.detach()
    acts, _ = brute_force(sae, x, 1e-12)
    values = acts[acts > 0].tolist()
    threshold = calibrate_threshold(sae, x, mean_l0)
    count = int((acts >= threshold).sum())
    assert abs(count - mean_l0 * 50) <= brute_force_threshold(values, 50, mean_l0) + 1e-9
    assert threshold in values


def test_calibration_with_ties_and_the_k_cap() -> None:
    sae = tied_sae()
    x = torch.randint(-3, 4, (30, D_IN)).float()
    acts, _ = brute_force(sae, x, 1e-12)
    values = acts[acts > 0].tolist()
    largest = len(values) / 30  # the K cap: the mean L0 without a threshold
    for mean_l0 in (0.5, 2.0, 4.5, largest):
        threshold = calibrate_thresholds(sae, x, [mean_l0])[0]
        count = int((acts >= threshold).sum())
        assert abs(count - mean_l0 * 30) <= brute_force_threshold(values, 30, mean_l0) + 1e-9
    with pytest.raises(ValueError, match=rf"mean_l0 must be a number in \(0, {largest:.4g}\].*got mean_l0=9"):
        calibrate_threshold(sae, x, 9)
    with pytest.raises(ValueError, match="got mean_l0=0"):
        calibrate_threshold(sae, x, 0)


def rows_by_hand(x: torch.Tensor, acts: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    x = x.double()
    counts = (acts > 0).sum(dim=-1).double()
    return {
        "fvu": float((x - reconstruction).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()),
        "l0": float(counts.mean()),
        "l0_p50": float(counts.quantile(0.5)),
        "l0_p90": float(counts.quantile(0.9)),
        "l0_max": float(counts.max()),
        "alive_fraction": float((acts > 0).any(dim=0).double().mean()),
    }


def test_evaluation_by_mean_l0_matches_the_brute_force_for_any_sae() -> None:
    """HierarchicalTopK by threshold, SAELens's TopK (truncated by threshold) and a BatchTopK-style JumpReLU SAE (one
    threshold for every latent, replaced by the calibrated one), against the brute force at the calibrated θ."""
    x = torch.randn(300, D_IN, dtype=torch.float64)
    ours = make_sae("inference", "float64")  # float64: values at a calibrated θ compare the same in the brute force
    torch.manual_seed(1)
    topk = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float64"))
    jumprelu = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64"))
    with torch.no_grad():
        for sae in (topk, jumprelu):
            sae.W_enc.copy_(ours.W_enc)
            sae.W_dec.copy_(ours.W_dec)
            sae.b_enc.copy_(ours.b_enc)
            sae.b_dec.copy_(ours.b_dec)
        jumprelu.threshold.fill_(0.7)
    for sae, cap in ((ours, K), (topk, K), (jumprelu, D_SAE)):
        rows = evaluate_over_mean_l0(sae, x, [1, 2.5, 4], progress=False)
        assert [row.mean_l0_target for row in rows] == [1, 2.5, 4]
        for row in rows:
            acts, reconstruction = brute_force(sae, x, row.threshold, k=cap)
            expected = rows_by_hand(x, acts, reconstruction)
            for name, value in expected.items():
                assert getattr(row, name) == pytest.approx(value, rel=1e-4, abs=1e-6), (type(sae).__name__, name)
            assert row.l0 == pytest.approx(row.mean_l0_target, rel=0.01)
            assert row.k is None and row.threshold > 0
    by_k = evaluate_over_k(ours, x, [4], progress=False)[0]
    by_threshold = evaluate_over_mean_l0(ours, x, [4], progress=False)[0]
    assert by_k.l0_p50 == by_k.l0_max == 4 and by_threshold.l0_max > 4  # same mean L0, spent unevenly


def test_a_calibration_carries_over_to_text_it_did_not_see() -> None:
    sae = make_sae("inference")
    generator = torch.Generator().manual_seed(5)
    calibration, held_out = (torch.randn(20_000, D_IN, generator=generator) for _ in range(2))
    rows = evaluate_over_mean_l0(sae, held_out, [1, 2, 4], progress=False, calibration_activations=calibration)
    for row in rows:  # two samples of 20k tokens: a few percent apart at most (measured: 1.6%, 1.9%, 0.8%)
        assert row.l0 == pytest.approx(row.mean_l0_target, rel=0.03)
        assert row.l0 != row.mean_l0_target  # other text: not the calibration's count


def test_targets_the_sae_cannot_reach_are_skipped_with_a_warning_when_asked() -> None:
    """An SAE that keeps fewer than K latents on many tokens (negative encoder biases) cannot reach every mean L0 a
    report asks for; a report skips those targets (one warning naming them and the largest reachable) instead of
    failing after a long training run, and the reachable ones match the brute force."""
    sae = make_sae("inference", "float64")
    torch.manual_seed(0)
    x = sae.b_dec.detach() + 0.1 * torch.randn(200, D_IN, dtype=torch.float64)  # near b_dec: few positive
    acts, _ = brute_force(sae, x, 1e-12)
    largest = float((acts > 0).sum()) / 200
    assert 2 < largest < 6  # below K = 8: targets 6 and 8 are out of reach
    with pytest.raises(ValueError, match="got mean_l0=6"):
        evaluate_over_mean_l0(sae, x, [2, 6], progress=False)
    with pytest.warns(UserWarning, match=rf"mean L0 targets \[6, 8\] skipped: .* {largest:.4g}"):
        rows = evaluate_over_mean_l0(sae, x, [8, 2, 6], progress=False, unreachable="skip")
    assert [row.mean_l0_target for row in rows] == [2]
    assert rows[0].l0 == pytest.approx(2, rel=0.01)
    with pytest.raises(ValueError, match="unreachable must be 'error' or 'skip'; got 'drop'"):
        evaluate_over_mean_l0(sae, x, [2], progress=False, unreachable="drop")  # type: ignore[arg-type]
