"""active_latents against a full forward pass of the model and a float64 ranking of the SAE's weights."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import HierarchicalTopKSAE, HierarchicalTopKSAEConfig, active_latents, presets
from tests.test_evaluation import float64_ranking, random_topk_sae

TEXT = "The cat sat."


def hierarchical_sae(hook_name: str = presets.TINY_HOOK_NAME) -> HierarchicalTopKSAE:
    """A random float64 HierarchicalTopK SAE at the tiny model's hook (float64: no near-ties against the reference)."""
    torch.manual_seed(1)
    cfg = HierarchicalTopKSAEConfig(d_in=32, d_sae=64, k=8, rescale_acts_by_decoder_norm=True)
    cfg.metadata.hook_name = hook_name
    sae = HierarchicalTopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    return sae.to(torch.float64)


def expected_rows(
    model: HookedTransformer, sae: SAE, tokens: torch.Tensor, k: int, sequence: int, special: bool = False
) -> pd.DataFrame:
    """The rows for one sequence ``[context]``, from the whole model's forward pass and the float64 reference; BOS and
    other special tokens (the tokenizer's ``all_special_ids``) only with ``special``."""
    _, cache = model.run_with_cache(tokens[None], names_filter=sae.cfg.metadata.hook_name)
    acts, indices, _ = float64_ranking(sae, cache[sae.cfg.metadata.hook_name][0], k)
    left_out = set() if special else set(model.tokenizer.all_special_ids)
    rows = [
        (sequence, position, model.tokenizer.decode([int(tokens[position])]), rank + 1, int(indices[position, rank]))
        for position in range(len(tokens))
        for rank in range(k)
        if acts[position, rank] > 0 and int(tokens[position]) not in left_out
    ]
    frame = pd.DataFrame(rows, columns=["sequence", "position", "token", "rank", "latent"])
    frame["activation"] = [float(acts[row.position, row.rank - 1]) for row in frame.itertuples()]
    return frame


def assert_same_rows(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(actual.columns) == ["sequence", "position", "token", "rank", "latent", "activation"]
    keys = ["sequence", "position", "token", "rank", "latent"]
    assert actual[keys].values.tolist() == expected[keys].values.tolist()
    assert actual["activation"].tolist() == pytest.approx(expected["activation"].tolist(), rel=1e-5)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_hierarchical_latents_are_the_first_k_of_the_float64_ranking(tiny_model: HookedTransformer, k: int) -> None:
    sae = hierarchical_sae()
    tokens = tiny_model.to_tokens(TEXT)[0]
    frame = active_latents(tiny_model, sae, TEXT, k)
    assert_same_rows(frame, expected_rows(tiny_model, sae, tokens, k, sequence=0))
    assert frame.groupby("position")["rank"].max().max() == k  # some token uses the whole budget


def test_special_tokens_are_left_out_unless_asked_for(tiny_model: HookedTransformer) -> None:
    sae = hierarchical_sae()
    tokens = tiny_model.to_tokens(TEXT)[0]
    assert int(tokens[0]) in tiny_model.tokenizer.all_special_ids  # BOS, prepended
    listed = active_latents(tiny_model, sae, TEXT, 4, exclude_special_tokens=False)
    assert_same_rows(listed, expected_rows(tiny_model, sae, tokens, 4, sequence=0, special=True))
    assert 0 in set(listed["position"]) and 0 not in set(active_latents(tiny_model, sae, TEXT, 4)["position"])


def test_sae_lens_topk_latents_are_its_largest_activations(tiny_model: HookedTransformer) -> None:
    sae = random_topk_sae(d_in=32, d_sae=64, k=8)
    sae.cfg.metadata.hook_name = presets.TINY_HOOK_NAME
    tokens = tiny_model.to_tokens(TEXT)[0]
    assert_same_rows(active_latents(tiny_model, sae, TEXT, 5), expected_rows(tiny_model, sae, tokens, 5, sequence=0))


def test_lists_of_strings_and_token_ids_are_one_sequence_each(tiny_model: HookedTransformer) -> None:
    sae = hierarchical_sae()
    texts = ["ab", "cdef"]
    tokens = [tiny_model.to_tokens(text)[0] for text in texts]
    expected = pd.concat(
        [expected_rows(tiny_model, sae, t, 4, sequence=i) for i, t in enumerate(tokens)], ignore_index=True
    )
    assert_same_rows(active_latents(tiny_model, sae, texts, 4), expected)
    same_length = torch.stack([tokens[1], tokens[1].flip(0)])
    expected = pd.concat(
        [expected_rows(tiny_model, sae, t, 4, sequence=i) for i, t in enumerate(same_length)], ignore_index=True
    )
    assert_same_rows(active_latents(tiny_model, sae, same_length, 4), expected)
    assert_same_rows(active_latents(tiny_model, sae, tokens[0], 4), expected_rows(tiny_model, sae, tokens[0], 4, 0))


@pytest.mark.parametrize(
    ("text", "k", "hook_name", "message"),
    [
        (TEXT, 0, presets.TINY_HOOK_NAME, r"1\.\.K=8 .*got k=0"),
        (TEXT, 9, presets.TINY_HOOK_NAME, r"1\.\.K=8 .*got k=9"),
        (TEXT, 2, "blocks.7.hook_resid_pre", "'blocks.7.hook_resid_pre' is not a hook of the model"),
        (torch.zeros(2, 3), 2, presets.TINY_HOOK_NAME, "token ids must be integers"),
        ([], 2, presets.TINY_HOOK_NAME, "non-empty list of strings"),
        (TEXT, 2, "blocks.0.mlp.hook_post", r"shape \(128,\) per token; the SAE's d_in is 32"),
    ],
)
def test_bad_inputs_name_the_value(
    tiny_model: HookedTransformer, text: object, k: int, hook_name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        active_latents(tiny_model, hierarchical_sae(hook_name), text, k)  # type: ignore[arg-type]
