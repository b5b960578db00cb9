"""The coarse-to-fine view (ranks at which latents fire vs the topic entropy of their top documents), against
brute-force loops and hand-computed values on planted examples."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig

from sae_lens_hierarchical.interpretability.coarse_to_fine import (
    CoarseToFine,
    coarse_to_fine,
    format_coarse_to_fine_table,
    null_topic_entropy,
    plot_coarse_to_fine,
    top_document_entropy,
    topic_entropy,
)
from sae_lens_hierarchical.interpretability.documents import TOPIC_TASK, LabelledDocuments
from tests.test_probing import HOOK, identity_sae, planted_documents


def brute_force_ranks(sae: SAE, documents: LabelledDocuments, max_rank: int) -> dict[int, list[int]]:
    """``{latent: [rank of each firing]}`` over the topic documents' tokens: float64 pre-activations straight from
    the weights (times the decoder norms when the SAE ranks by them), each token's positive values sorted in a loop."""
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    norms = W_dec.norm(dim=-1) if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else torch.ones(len(W_dec))
    ranks: dict[int, list[int]] = {}
    for d in documents.task(TOPIC_TASK).documents():
        x = documents.activations[documents.offsets[d] : documents.offsets[d + 1]].float().double()
        for token in x:
            values = ((token - b_dec * sae.cfg.apply_b_dec_to_input) @ W_enc + b_enc) * norms
            ordered = sorted(range(len(values)), key=lambda j: (-float(values[j]), j))[:max_rank]
            for rank, latent in enumerate(ordered, start=1):
                if values[latent] > 0:
                    ranks.setdefault(latent, []).append(rank)
    return ranks


@pytest.mark.parametrize("kind", ["hierarchical", "topk"])
def test_rank_histograms_and_typical_ranks_equal_a_float64_loop(kind: str) -> None:
    documents = planted_documents(classes=3, per_class=8)
    sae = identity_sae(8, 24, 6, kind, seed=4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 24))
        sae.b_enc.copy_(0.5 * torch.randn(24) - 4.0)  # some tokens have fewer than K positive latents
    result = coarse_to_fine(sae, documents, n_top_documents=3, batch_tokens=40, progress=False)
    ranks = brute_force_ranks(sae, documents, 6)
    assert result.max_rank == 6 and len(result.rank_counts) == 24
    for latent in range(24):
        firings = ranks.get(latent, [])
        assert result.rank_counts[latent] == [firings.count(r) for r in range(1, 7)], latent
        if firings:
            assert result.typical_rank[latent] == sorted(firings)[(len(firings) - 1) // 2]
            assert result.mean_rank[latent] == pytest.approx(statistics.mean(firings))
        else:
            assert result.typical_rank[latent] is None and result.mean_rank[latent] is None
    assert sum(map(sum, result.rank_counts)) < 6 * result.n_tokens  # the ReLU left some ranks empty


def test_topic_entropy_is_the_hand_computed_value() -> None:
    assert float(topic_entropy([0, 0, 1, 2], 3)) == pytest.approx(1.5)
    assert float(topic_entropy([2, 2, 2], 3)) == 0.0
    assert float(topic_entropy([0, 1, 2, 3], 4)) == pytest.approx(2.0)
    assert float(topic_entropy([0, 0, 1], 5)) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert topic_entropy(np.array([[0, 0], [0, 1]]), 2).tolist() == [0.0, 1.0]


def test_top_document_entropy_on_a_planted_example() -> None:
    """Latent 0's top two documents share a topic (0 bits), latent 1's have two (1 bit), latent 2 fires in one
    document only (not scored), latent 3 ties everywhere (the lowest document indices win)."""
    topics = np.array([0, 0, 1, 1, 2, 2])
    maxima = torch.tensor(
        [
            [5.0, 1.0, 0.0, 1.0],
            [4.0, 0.0, 0.0, 1.0],
            [0.0, 3.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 2.0, 0.0, 1.0],
            [0.0, 0.0, 7.0, 1.0],
        ]
    )
    two = top_document_entropy(maxima, topics, 3, 2)
    assert two[0] == 0.0 and two[1] == pytest.approx(1.0) and math.isnan(two[2]) and two[3] == 0.0
    three = top_document_entropy(maxima, topics, 3, 3)
    assert three[0] != three[0]  # latent 0 fires in two documents only
    assert three[1] == pytest.approx(math.log2(3))
    assert three[3] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    with pytest.raises(ValueError, match=r"n_top_documents must be an int in 1\.\.6"):
        top_document_entropy(maxima, topics, 3, 7)


def test_null_entropy_is_the_expected_entropy_of_random_documents() -> None:
    """Two documents drawn from topics [0, 0, 1, 1] differ with probability 4/6: expected entropy 2/3 bit."""
    mean, std = null_topic_entropy(np.array([0, 0, 1, 1]), 2, 2, draws=20_000, seed=1)
    assert mean == pytest.approx(2 / 3, abs=0.02)
    assert std == pytest.approx(math.sqrt(2 / 9), abs=0.02)
    assert null_topic_entropy(np.array([1, 1, 1, 1, 1]), 2, 3, draws=10) == (0.0, 0.0)
    with pytest.raises(ValueError, match="null_draws"):
        null_topic_entropy(np.array([0, 1]), 2, 1, draws=0)


def spearman_by_hand(x: list[float], y: list[float]) -> float:
    """Pearson's correlation of average ranks (ties share the mean of their positions), in plain Python."""

    def average_ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        ranks = [0.0] * len(values)
        start = 0
        while start < len(order):
            stop = start
            while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
                stop += 1
            for i in order[start : stop + 1]:
                ranks[i] = (start + stop) / 2 + 1
            start = stop + 1
        return ranks

    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return covariance / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


@pytest.mark.parametrize("kind", ["hierarchical", "topk"])
def test_a_planted_coarse_latent_ranks_first_and_fine_latents_are_topic_pure(kind: str, tmp_path: Path) -> None:
    """Every token carries 10 along e_7 and 5 along its topic's e_c: latent 7 fires at rank 1 everywhere, and its
    top documents are topic-blind (entropy within the null's spread); latent c fires at rank 2 on topic c, and its
    top documents all share topic c (0 bits). Spearman's rho, the bins, JSON, table and plot check out."""
    documents = planted_documents(classes=3, per_class=30, shared=10.0)
    sae = identity_sae(8, 32, 4, kind)
    result = coarse_to_fine(sae, documents, n_top_documents=12, name="planted", progress=False)
    assert result.n_documents == 90 and result.topics == ["topic0", "topic1", "topic2"]
    assert result.typical_rank[7] == 1 and result.rank_counts[7][0] == result.n_tokens
    assert abs(result.topic_entropy[7] - result.null_entropy) < 3 * result.null_entropy_std + 1e-9
    assert result.null_entropy > 1.2  # 12 documents of 3 balanced topics
    for c in range(3):
        assert result.typical_rank[c] == 2
        assert result.topic_entropy[c] == 0.0
    pairs = [(r, e) for r, e in zip(result.typical_rank, result.topic_entropy, strict=True) if r and e is not None]
    assert result.scored_latents == len(pairs)
    assert result.spearman == pytest.approx(spearman_by_hand([r for r, _ in pairs], [e for _, e in pairs]))
    first = result.bins[0]
    assert (first.low, first.high, first.latents) == (1, 1, 1)
    assert first.mean == pytest.approx(result.topic_entropy[7])
    second = result.bins[1]
    assert (second.low, second.high, second.latents, second.mean) == (2, 2, 3, 0.0)
    assert sum(b.latents for b in result.bins) == result.scored_latents
    restored = CoarseToFine.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    table = format_coarse_to_fine_table({"planted": result, "seeds": [result, restored]})
    assert "| planted | " in table and f"{result.topic_entropy[7]:.2f} (1)" in table and "0.00 (3)" in table
    assert plot_coarse_to_fine(result, tmp_path / "c2f.png").stat().st_size > 10_000


def test_bad_inputs_raise_one_value_error_naming_the_range() -> None:
    documents = planted_documents(classes=3, per_class=4)
    sae = identity_sae(8, 32, 4)
    for kwargs, message in (
        ({"n_top_documents": 0}, r"n_top_documents must be an int in 1\.\.12 \(the topic documents\); got 0"),
        ({"n_top_documents": 13}, r"1\.\.12"),
        ({"max_rank": 5}, r"k must be an int in 1\.\.K=4"),
        ({"task": "sentiment"}, r"unknown task 'sentiment'"),
        ({"null_draws": 0, "n_top_documents": 4}, "null_draws must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            coarse_to_fine(sae, documents, progress=False, **kwargs)
    relu = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
    relu.cfg.metadata.hook_name = HOOK
    with pytest.raises(ValueError, match="has no k; pass max_rank"):
        coarse_to_fine(relu, documents, n_top_documents=4, progress=False)
    assert coarse_to_fine(relu, documents, n_top_documents=4, max_rank=3, progress=False).max_rank == 3
