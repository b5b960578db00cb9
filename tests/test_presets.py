"""Presets build valid SAELens runner configs; the paper's Gemma-2 2B loader asks for the right model."""

from __future__ import annotations

import pytest
from sae_lens import LanguageModelSAERunnerConfig
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import HierarchicalTopKTrainingSAEConfig, presets


def test_gemma_2_2b_preset_is_the_papers_setting() -> None:
    preset = presets.get_preset("gemma-2-2b")
    cfg = preset.runner_config("out")
    assert isinstance(cfg, LanguageModelSAERunnerConfig)
    assert isinstance(cfg.sae, HierarchicalTopKTrainingSAEConfig)
    assert (cfg.model_name, cfg.hook_name) == ("gemma-2-2b", "blocks.12.hook_resid_post")
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.k) == (2304, 65_536, 128)
    assert cfg.sae.levels == list(range(1, 129))
    assert cfg.dataset_path == "HuggingFaceFW/fineweb"
    assert cfg.streaming and not cfg.is_dataset_tokenized
    assert cfg.exclude_special_tokens is True
    # SAELens's mixing buffer must hold a training batch.
    assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens


def test_gemma_2_2b_loader_calls_transformer_lens_with_the_official_name(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_from_pretrained_no_processing(name: str, **kwargs):
        calls.append((name, kwargs))
        return "model"

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", fake_from_pretrained_no_processing)
    assert presets.get_preset("gemma-2-2b").load_model("cuda") == "model"
    assert calls == [("gemma-2-2b", {"device": "cuda", "dtype": "float32"})]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_builds_a_valid_runner_config(name: str) -> None:
    preset = presets.get_preset(name)
    cfg = preset.runner_config(None, sae_overrides={"hierarchy_levels": [1, preset.k]})
    assert cfg.sae.levels == [1, preset.k]
    assert cfg.sae.d_in == preset.d_in
    assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens
    assert preset.embedded == (preset.load_token_sequences is not None)


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; choose one of \["):
        presets.get_preset("nope")


def test_overriding_the_batch_or_context_resizes_the_mixing_buffer_or_refuses_early() -> None:
    """SAELens's mixing buffer must hold a training batch but checks only at the first batch (after caching);
    overrides resize it with the batch and context, and an explicit size too small is one clear error now."""
    from sae_lens_hierarchical.jobs.overrides import apply_overrides

    cfg = presets.get_preset("tiny-random").runner_config(None)
    for overrides in ({"train_batch_size_tokens": 4096}, {"context_size": 16, "train_batch_size_tokens": 1024}):
        resized = apply_overrides(cfg, overrides)
        assert resized.n_batches_in_buffer * resized.context_size >= resized.train_batch_size_tokens
    assert apply_overrides(cfg, {"lr": 1e-3}).n_batches_in_buffer == cfg.n_batches_in_buffer
    with pytest.raises(ValueError, match=r"n_batches_in_buffer=2 sequences of .* use at least"):
        apply_overrides(cfg, {"n_batches_in_buffer": 2, "train_batch_size_tokens": 4096})
