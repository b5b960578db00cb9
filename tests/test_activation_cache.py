"""The activation cache: right content, reused, resumable, never complete-looking when it is not."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import presets
from sae_lens_hierarchical.data import activation_cache
from sae_lens_hierarchical.data.activation_cache import ActivationCacheKey, cache_activations, open_cache

CONTEXT = 32


def tiny_key(n_sequences: int = 40) -> ActivationCacheKey:
    return ActivationCacheKey(
        model_name=presets.TINY_MODEL_NAME,
        hook_name=presets.TINY_HOOK_NAME,
        corpus="zipf-seed0",
        context_size=CONTEXT,
        n_sequences=n_sequences,
    )


@pytest.fixture(scope="module")
def sequences():
    return presets.tiny_token_dataset(60, CONTEXT, seed=0)


def count_forward_passes(monkeypatch: pytest.MonkeyPatch, model: HookedTransformer) -> list[int]:
    calls: list[int] = []
    original = model.run_with_cache

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "run_with_cache", counting)
    return calls


def test_cache_holds_the_hook_activations_and_is_reused(
    tmp_path: Path, tiny_model: HookedTransformer, sequences, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tiny_key()
    assert open_cache(tmp_path, key) is None
    cache = cache_activations(tiny_model, sequences, key, tmp_path, batch_size=8, shard_sequences=16, progress=False)
    dataset = cache.load()
    assert len(dataset) == 40
    tokens = torch.tensor(sequences[:40]["input_ids"])
    expected = activation_cache.hook_activations(tiny_model, tokens, key.hook_name)
    torch.testing.assert_close(dataset[:][key.hook_name], expected)
    assert torch.equal(dataset[:]["token_ids"].long(), tokens)
    without_bos = cache.token_activations(exclude_token_ids=[0])
    torch.testing.assert_close(without_bos, expected[:, 1:].reshape(-1, expected.shape[-1]))
    assert not (cache.directory / "shards").exists()

    calls = count_forward_passes(monkeypatch, tiny_model)
    again = cache_activations(tiny_model, sequences, key, tmp_path, progress=False)
    assert again.directory == cache.directory
    assert calls == [], "a complete cache must be reused, not recomputed"


def test_interrupted_run_is_not_complete_and_resumes_from_its_shards(
    tmp_path: Path, tiny_model: HookedTransformer, sequences, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tiny_key(n_sequences=48)
    original_save = activation_cache.save_dataset_atomically
    saved: list[Path] = []

    def crash_on_third_shard(dataset, target: Path) -> None:
        if len(saved) == 2:
            raise KeyboardInterrupt("killed")
        original_save(dataset, target)
        saved.append(target)

    monkeypatch.setattr(activation_cache, "save_dataset_atomically", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(tiny_model, sequences, key, tmp_path, batch_size=8, shard_sequences=16, progress=False)
    assert open_cache(tmp_path, key) is None, "an interrupted cache must not look complete"
    monkeypatch.setattr(activation_cache, "save_dataset_atomically", original_save)

    calls = count_forward_passes(monkeypatch, tiny_model)
    cache = cache_activations(tiny_model, sequences, key, tmp_path, batch_size=8, shard_sequences=16, progress=False)
    assert len(calls) == 2, "only the missing shard (16 sequences = 2 batches) is recomputed"
    tokens = torch.tensor(sequences[:48]["input_ids"])
    expected = activation_cache.hook_activations(tiny_model, tokens, key.hook_name)
    torch.testing.assert_close(cache.load()[:][key.hook_name], expected)


def test_bad_cache_requests_raise_before_work(tmp_path: Path, tiny_model: HookedTransformer, sequences) -> None:
    with pytest.raises(ValueError, match=r"n_sequences must be in 1..60 .*got 61"):
        cache_activations(tiny_model, sequences, tiny_key(61), tmp_path, progress=False)
    bad_hook = ActivationCacheKey("m", "resid_post", "c", CONTEXT, 4)
    with pytest.raises(ValueError, match=r"hook_name must look like 'blocks.<layer>.<hook>'; got 'resid_post'"):
        cache_activations(tiny_model, sequences, bad_hook, tmp_path, progress=False)


def test_sae_lens_runner_trains_from_the_cache(
    tmp_path: Path, tiny_model: HookedTransformer, sequences, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = cache_activations(tiny_model, sequences, tiny_key(), tmp_path / "cache", progress=False)
    calls = count_forward_passes(monkeypatch, tiny_model)
    cfg = presets.tiny_runner_config(
        str(tmp_path / "sae"),
        training_tokens=4096,
        use_cached_activations=True,
        cached_activations_path=str(cache.activations_path),
        exclude_special_tokens=True,
    )
    sae = LanguageModelSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=sequences).run()
    assert sae.cfg.architecture() == "hierarchical_topk"
    assert calls == [], "training must read the cache, not run the model"
    assert (tmp_path / "sae" / "sae_weights.safetensors").is_file()


def test_a_larger_cache_of_the_same_sequences_serves_its_first_rows(tmp_path: Path) -> None:
    """``covering``: a prefix of a larger cache is exactly what a cache of that prefix would hold; without it, or for
    other sequences (another corpus split), a larger cache is not used."""
    model = presets.tiny_random_model(seed=0)
    sequences = presets.tiny_token_sequences(model.tokenizer, 32).select(range(40))
    key = ActivationCacheKey(
        model_name="tiny", hook_name="blocks.0.hook_resid_post", corpus="c", context_size=32, n_sequences=24
    )
    large = cache_activations(model, sequences, replace(key, n_sequences=40), tmp_path / "a", progress=False)
    prefix = cache_activations(model, sequences, key, tmp_path / "a", progress=False, covering=True)
    assert prefix.directory == large.directory and len(prefix.load()) == 24
    own = cache_activations(model, sequences, key, tmp_path / "b", progress=False)
    assert torch.equal(prefix.token_activations(), own.token_activations())
    assert open_cache(tmp_path / "a", key) is None  # without covering: only its own cache
    assert open_cache(tmp_path / "a", replace(key, corpus="other"), covering=True) is None
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [large.directory.name], "no empty directory left"
