"""Feature absorption per k against synthetic worlds whose absorption is planted, so the answer is known by hand.

The world: 26 orthogonal letter directions e_L in the residual stream, one "letter latent" per letter that reads and
writes e_L, and some held-out words whose activation carries a private direction f_w beside e_L. For those words an
"absorbing latent" reads f_w and writes (e_L + f_w)/sqrt(2), while the letter latent's encoder subtracts f_w:

- fully absorbed (subtract 2 f_w): the letter latent is silent, the absorbing latent carries the letter;
- partly absorbed (subtract 0.7 f_w): the letter latent fires at 0.3 of its usual value, so with the probe direction
  e_L the probe projection is P = 4, the main latents' projection M = 1.2 and the absorbing latent's T = 4/sqrt(2):
  SAEBench's fraction is min(T, P - M) / (min(T, P - M) + M) = 2.8 / 4 = 0.7. At k = 1 only the absorbing latent
  (activation 4 > 1.2) survives, so the word becomes fully absorbed.

Expected rates below are counted from the planting, never from the module's own code.
"""

from __future__ import annotations

import json
import math
import re

import matplotlib.image
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from sae_lens_hierarchical import HierarchicalTopKSAE, HierarchicalTopKSAEConfig
from sae_lens_hierarchical.interpretability import first_letter
from sae_lens_hierarchical.interpretability.absorption import (
    AbsorptionConfig,
    AbsorptionResults,
    absorption_for_saes,
    absorption_over_k,
    aggregate_absorption,
    format_absorption_table,
    plot_absorption,
)
from sae_lens_hierarchical.interpretability.first_letter import (
    LETTERS,
    FirstLetterData,
    FirstLetterProbe,
    FirstLetterTask,
    first_letter_probe,
    first_letter_prompts,
    first_letter_vocabulary,
)

N_TRAIN, N_TEST = 16, 8  # words per letter
SCALE = 4.0  # a letter's activation along e_L
FULL = {letter: letter % 3 for letter in range(26)}  # fully absorbed held-out words per letter: 0, 1 or 2
PARTIAL = {1: 1, 4: 2}  # partly absorbed held-out words (letters b and e), placed after the fully absorbed ones
N_NOISE = 8


def planted_world(seed: int = 0) -> tuple[FirstLetterData, torch.Tensor, torch.Tensor]:
    """``(data, W_enc [d_in, d_sae], W_dec [d_sae, d_in])`` of the absorption world described above."""
    generator = torch.Generator().manual_seed(seed)
    n_absorbed = sum(FULL.values()) + sum(PARTIAL.values())
    d_in = 26 + n_absorbed + N_NOISE
    d_sae = 26 + n_absorbed
    w_enc = torch.zeros(d_in, d_sae)
    w_dec = torch.zeros(d_sae, d_in)
    for letter in range(26):
        w_enc[letter, letter] = 1.0
        w_dec[letter, letter] = 1.0
    rows: list[tuple[str, int, torch.Tensor]] = [[], []]  # type: ignore[assignment]
    private = 0
    for split, n_words in enumerate((N_TRAIN, N_TEST)):
        for letter in range(26):
            for index in range(n_words):
                x = torch.zeros(d_in)
                x[letter] = SCALE
                x[26 + n_absorbed :] = 0.3 * torch.randn(N_NOISE, generator=generator)
                n_full, n_partial = (FULL[letter], PARTIAL.get(letter, 0)) if split == 1 else (0, 0)
                if index < n_full + n_partial:
                    dim, latent = 26 + private, 26 + private
                    x[dim] = SCALE
                    w_enc[dim, letter] = -2.0 if index < n_full else -0.7
                    w_enc[dim, latent] = 1.0
                    w_dec[latent, letter] = w_dec[latent, dim] = 1 / math.sqrt(2)
                    private += 1
                rows[split].append((f" {LETTERS[letter]}word{index}", letter, x))
    words = [word for split in rows for word, _, _ in split]
    letters = torch.tensor([letter for split in rows for _, letter, _ in split])
    acts = torch.stack([x for split in rows for _, _, x in split])
    data = FirstLetterData(words, letters, acts, n_train=26 * N_TRAIN, model_name="world", hook_name="blocks.0.hook_x")
    return data, w_enc, w_dec


def topk_sae(w_enc: torch.Tensor, w_dec: torch.Tensor, k: int, rescale: bool = False) -> TopKSAE:
    cfg = TopKSAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1], k=k, rescale_acts_by_decoder_norm=rescale)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def exact_probe(data: FirstLetterData, bias: float = -2.0) -> FirstLetterProbe:
    """The probe whose direction for letter L is exactly e_L (score 4 - 2 on L-words, -2 on others)."""
    weight = torch.zeros(26, data.d_in)
    weight[:, :26] = torch.eye(26)
    return FirstLetterProbe.from_weights(data, weight, torch.full((26,), bias))


def expected_rates(k: int) -> tuple[float, float]:
    """(mean full absorption rate, mean absorption fraction) over the 26 letters, counted from the planting."""
    full_rates, fractions = [], []
    for letter in range(26):
        n_full, n_partial = FULL[letter], PARTIAL.get(letter, 0)
        if k == 1:  # the weakened letter latent loses its place to the absorbing latent
            n_full, n_partial = n_full + n_partial, 0
        full_rates.append(n_full / N_TEST)
        fractions.append((n_full + 0.7 * n_partial) / N_TEST)
    return sum(full_rates) / 26, sum(fractions) / 26


def test_planted_absorption_is_measured_exactly_at_every_k() -> None:
    data, w_enc, w_dec = planted_world()
    probe = exact_probe(data)
    assert probe.accuracy == 1.0 and probe.letter_f1 == [1.0] * 26
    results = absorption_over_k(topk_sae(w_enc, w_dec, k=4), probe, ks=[1, 2, 4], progress=False)
    assert [row.k for row in results.per_k] == [1, 2, 4]
    for row in results.per_k:
        full, fraction = expected_rates(row.k)
        assert row.full_absorption_rate == pytest.approx(full, abs=1e-6)
        assert row.absorption_fraction == pytest.approx(fraction, abs=1e-6)
        assert row.n_letters_scored == 26
        for letter in row.letters:
            index = LETTERS.index(letter.letter)
            assert letter.main_latents == [index]  # the planted letter latent, alone
            if index not in PARTIAL:  # it fires on every held-out word of its letter but the absorbed ones
                n_fired = N_TEST - FULL[index]
                assert letter.main_f1 == pytest.approx(2 * n_fired / (n_fired + N_TEST))
            assert letter.n_probe_true_positives == N_TEST
            n_full = FULL[index] + (PARTIAL.get(index, 0) if row.k == 1 else 0)
            assert letter.n_full_absorption == n_full
    assert expected_rates(1) != expected_rates(2)  # the world tells k = 1 apart


def test_no_absorption_without_planted_absorbers() -> None:
    """Letter latents that fire on every word of their letter: absorption 0 at every k."""
    data, w_enc, w_dec = planted_world()
    clean_acts = data.activations.clone()
    clean_acts[:, 26 : data.d_in - N_NOISE] = 0.0  # no word carries a private direction
    clean = FirstLetterData(data.words, data.letters, clean_acts, data.n_train)
    results = absorption_over_k(topk_sae(w_enc, w_dec, k=4), exact_probe(clean), ks=[1, 4], progress=False)
    for row in results.per_k:
        assert (row.full_absorption_rate, row.absorption_fraction, row.mean_split_features) == (0.0, 0.0, 1.0)


def test_a_fitted_probe_finds_the_same_absorption() -> None:
    data, w_enc, w_dec = planted_world()
    probe = FirstLetterProbe.fit(data, progress=False)
    assert probe.accuracy == 1.0
    results = absorption_over_k(topk_sae(w_enc, w_dec, k=4), probe, ks=[2], progress=False)
    assert results.per_k[0].full_absorption_rate == pytest.approx(expected_rates(2)[0], abs=1e-6)
    assert results.per_k[0].absorption_fraction == pytest.approx(expected_rates(2)[1], abs=0.02)


@pytest.mark.parametrize("rescale", [False, True])
def test_decoder_norms_do_not_change_the_answer(rescale: bool) -> None:
    """Decoder rows scaled by n_i and encoder columns by 1/n_i reconstruct the same: the same absorption follows.

    Without rescaling the activations shrink by 1/n_i; with ``rescale_acts_by_decoder_norm`` they are unchanged and
    the SAE divides by the norm when decoding. Both contribute ``a_i d_i`` to the reconstruction.
    """
    data, w_enc, w_dec = planted_world()
    norms = torch.linspace(0.5, 3.0, w_dec.shape[0])
    sae = topk_sae(w_enc / norms, w_dec * norms[:, None], k=4, rescale=rescale)
    results = absorption_over_k(sae, exact_probe(data), ks=[2, 4], progress=False)
    for row in results.per_k:
        full, fraction = expected_rates(row.k)
        assert row.full_absorption_rate == pytest.approx(full, abs=1e-6)
        assert row.absorption_fraction == pytest.approx(fraction, abs=1e-5)


def test_subtract_b_dec_measures_the_share_of_what_the_latents_explain() -> None:
    """The world shifted by a bias c = 20 * sum(e_L) that the SAE's b_dec removes: latent activations are unchanged.
    SAEBench's P = x . e_L grows from 4 to 24, so the absorbing latent's 2.83 falls below 0.4 P and no absorption is
    found; measured on x - b_dec, P is 4 again and the planted rates come back exactly."""
    data, w_enc, w_dec = planted_world()
    bias = torch.zeros(data.d_in)
    bias[:26] = 20.0
    shifted = FirstLetterData(data.words, data.letters, data.activations + bias, data.n_train)
    sae = topk_sae(w_enc, w_dec, k=4)
    with torch.no_grad():
        sae.b_dec.copy_(bias)
    probe = exact_probe(shifted, bias=-22.0)
    assert probe.accuracy == 1.0 and probe.letter_f1 == [1.0] * 26  # scores 24 - 22 on the word's letter, 20 - 22
    saebench = absorption_over_k(sae, probe, ks=[2], progress=False).per_k[0]
    assert (saebench.full_absorption_rate, saebench.absorption_fraction) == (0.0, 0.0)
    config = AbsorptionConfig(subtract_b_dec=True)
    centred = absorption_over_k(sae, probe, ks=[2], config=config, progress=False)
    assert centred.subtract_b_dec
    row = centred.per_k[0]
    assert (row.full_absorption_rate, row.absorption_fraction) == pytest.approx(expected_rates(2), abs=1e-6)


def test_a_hierarchical_sae_is_scored_at_its_nested_budgets() -> None:
    data, w_enc, w_dec = planted_world()
    sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1], k=4))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    for config in (AbsorptionConfig(), AbsorptionConfig(main_latents="max_k")):
        results = absorption_over_k(sae, exact_probe(data), config=config, progress=False)
        assert [row.k for row in results.per_k] == [1, 2, 4]  # default budgets: powers of two below K, and K
        assert results.main_latents == config.main_latents
        measured = [value for row in results.per_k for value in (row.full_absorption_rate, row.absorption_fraction)]
        assert measured == pytest.approx([value for k in (1, 2, 4) for value in expected_rates(k)], abs=1e-6)


def test_feature_splitting_gives_two_main_latents() -> None:
    """Letter s written by two latents that each cover half its words: k-sparse probing keeps both."""
    data, w_enc, w_dec = planted_world()
    s = LETTERS.index("s")
    acts = data.activations.clone()
    halves = torch.zeros(len(data.words), dtype=torch.bool)
    halves[(data.letters == s).nonzero()[::2, 0]] = True
    extra = torch.zeros(len(data.words), 2)
    extra[halves, 0] = SCALE
    extra[(data.letters == s) & ~halves, 1] = SCALE
    split = FirstLetterData(data.words, data.letters, torch.cat([acts, extra], dim=1), data.n_train)
    d_in, d_sae = split.d_in, w_enc.shape[1] + 1
    enc = torch.zeros(d_in, d_sae)
    dec = torch.zeros(d_sae, d_in)
    enc[: w_enc.shape[0], : w_enc.shape[1]] = w_enc
    dec[: w_dec.shape[0], : w_dec.shape[1]] = w_dec
    enc[s, s] = 0.0  # latent s now reads half A of s-words, the new latent the other half
    enc[d_in - 2, s] = 1.0
    enc[d_in - 1, d_sae - 1] = 1.0
    dec[d_sae - 1, s] = 1.0
    weight = torch.zeros(26, d_in)
    weight[:, :26] = torch.eye(26)
    probe = FirstLetterProbe.from_weights(split, weight, torch.full((26,), -2.0))
    results = absorption_over_k(topk_sae(enc, dec, k=4), probe, ks=[4], progress=False)
    by_letter = {row.letter: row for row in results.per_k[0].letters}
    assert sorted(by_letter["s"].main_latents) == [s, d_sae - 1]
    assert by_letter["s"].main_f1 == pytest.approx(1.0)
    assert by_letter["s"].n_full_absorption == FULL[s]  # the split is not absorption
    assert all(len(row.main_latents) == 1 for letter, row in by_letter.items() if letter != "s")
    assert results.per_k[0].mean_split_features == pytest.approx(27 / 26)


def test_the_probe_separates_separable_letters_in_raw_units() -> None:
    """Letters along orthogonal directions, shifted by a large mean and scaled up, as Gemma's residuals are: the
    probe (fit on centred, rescaled features, then mapped back) classifies the raw held-out activations perfectly."""
    generator = torch.Generator().manual_seed(1)
    n, d_in = 26 * 30, 40
    letters = torch.arange(n) % 26
    acts = 3.0 * torch.eye(d_in)[letters] + 0.3 * torch.randn(n, d_in, generator=generator)
    acts = 500.0 * acts + 1000.0
    data = FirstLetterData([f" {LETTERS[int(i)]}x" for i in letters], letters, acts, n_train=26 * 20)
    probe = FirstLetterProbe.fit(data, progress=False)
    assert probe.accuracy == 1.0
    assert probe.letter_f1 == [1.0] * 26
    x_test, y_test = data.test
    assert torch.equal(probe.scores(x_test).argmax(dim=1), y_test)


def test_a_probe_on_letterless_activations_is_near_chance_and_refused() -> None:
    generator = torch.Generator().manual_seed(2)
    n = 26 * 30
    letters = torch.arange(n) % 26
    data = FirstLetterData([" w"] * n, letters, torch.randn(n, 40, generator=generator), n_train=26 * 20)
    probe = FirstLetterProbe.fit(data, progress=False)
    assert probe.accuracy < 0.15  # chance is 1/26
    sae = topk_sae(torch.zeros(40, 8), torch.zeros(8, 40), k=2)
    n_reliable = len(probe.reliable_letters(0.6))
    with pytest.raises(
        ValueError, match=rf"too weak .*: {n_reliable} letters have held-out F1 > 0\.6 \(need min_letters=20"
    ):
        absorption_over_k(sae, probe, progress=False)


def test_prompts_follow_saebench_and_are_seeded() -> None:
    vocabulary = [(f" {letter}{suffix}", 1000 + 30 * i + j) for i, letter in enumerate(LETTERS) for j, suffix in
                  enumerate(["ab", "cd", "ef", "gh", "ij", "kl"])]  # fmt: skip
    vocabulary.append((" Zebra", 5))
    task = FirstLetterTask(n_words_per_letter=5, train_fraction=0.8, n_icl_examples=3, seed=7)
    prompts, n_train = first_letter_prompts(vocabulary, task)
    assert (len(prompts), n_train) == (26 * 5, 26 * 4)  # 5 sampled per letter, 4 train + 1 held out
    assert first_letter_prompts(vocabulary, task) == (prompts, n_train)
    assert first_letter_prompts(vocabulary, FirstLetterTask(5, 0.8, 3, seed=8))[0] != prompts
    splits = [{word for word, _, _ in prompts[:n_train]}, {word for word, _, _ in prompts[n_train:]}]
    assert not splits[0] & splits[1]
    for position, (word, token_id, prompt) in enumerate(prompts):
        assert dict(vocabulary)[word] == token_id
        *examples, last = prompt.split("\n")
        assert last == f"{word} has the first letter:"
        assert len(examples) == 3
        for line in examples:
            example, answer = re.fullmatch(r"( \w+) has the first letter: ([A-Z])", line).groups()  # type: ignore[union-attr]
            assert answer == example[1].upper() and example != word
            assert example in splits[position >= n_train]


def test_vocabulary_keeps_space_plus_ascii_letters_only() -> None:
    class Tokenizer:
        def get_vocab(self) -> dict[str, int]:
            return {"▁cat": 3, "▁Paris": 1, "dog": 2, "▁x2": 4, "▁café": 5, "▁": 6, "▁a": 7, "▁ab-c": 8}

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            return tokens[0].replace("▁", " ")

    assert first_letter_vocabulary(Tokenizer()) == [(" Paris", 1), (" cat", 3), (" a", 7)]


def test_results_serialise_aggregate_and_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, w_enc, w_dec = planted_world()
    clean_acts = data.activations.clone()
    clean_acts[:, 26 : data.d_in - N_NOISE] = 0.0
    clean = exact_probe(FirstLetterData(data.words, data.letters, clean_acts, data.n_train))
    runs = {
        "planted": absorption_over_k(topk_sae(w_enc, w_dec, 4), exact_probe(data), ks=[1, 2], progress=False),
        "clean": absorption_over_k(topk_sae(w_enc, w_dec, 4), clean, ks=[1, 2], progress=False),
    }
    both = absorption_for_saes({"planted": (topk_sae(w_enc, w_dec, 4), [1, 2])}, exact_probe(data), progress=False)
    assert both["planted"] == runs["planted"]
    restored = AbsorptionResults.from_dict(json.loads(json.dumps(runs["planted"].to_dict())))
    assert restored == runs["planted"]
    rows = aggregate_absorption([runs["planted"], runs["clean"]])  # as if two seeds
    for row in rows:
        full = expected_rates(int(row["k"]))[0]
        assert row["full_absorption_rate"] == pytest.approx(full / 2)
        assert row["full_absorption_rate_half_range"] == pytest.approx(full / 2)
        assert row["n_runs"] == 2
    table = format_absorption_table({"planted": runs["planted"], "two seeds": [runs["planted"], runs["clean"]]})
    lines = table.splitlines()
    assert lines[0].startswith("| k | full absorption: planted | full absorption: two seeds |")
    assert "| main-latent F1: planted | main-latent F1: two seeds | letters scored |" in lines[0]
    full_1 = expected_rates(1)[0]
    assert lines[2].startswith(f"| 1 | {full_1:.3f} | {full_1 / 2:.3f} ± {full_1 / 2:.3f} |")
    path = plot_absorption(runs, tmp_path / "absorption.png")
    assert matplotlib.image.imread(path).shape[2] in (3, 4)
    with pytest.raises(ValueError, match=r"k must be one of the evaluated budgets \[1, 2\]; got 4"):
        runs["clean"].at(4)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AbsorptionConfig(max_main_latents=0), r"max_main_latents must be an int in 1\.\.1000; got 0"),
        (lambda: AbsorptionConfig(min_letters=27), r"min_letters must be an int in 1\.\.26; got 27"),
        (lambda: AbsorptionConfig(min_probe_f1=1.5), r"min_probe_f1 must be a number in \[0\.0, 1\.0\]; got 1\.5"),
        (lambda: AbsorptionConfig(main_latents="each"), r"main_latents must be 'per_k' or 'max_k'; got 'each'"),
        (lambda: FirstLetterTask(train_fraction=1.0), r"train_fraction must be a number in \(0\.0, 0\.95\]; got 1\.0"),
        (lambda: FirstLetterTask(n_words_per_letter=1), r"n_words_per_letter must be an int in 2\.\.100000; got 1"),
        (lambda: FirstLetterData([" a"] * 3, torch.zeros(3, dtype=torch.long), torch.zeros(3, 4), n_train=3),
         r"n_train must be an int in 1\.\.2; got 3"),
        (lambda: FirstLetterData([" a"] * 3, torch.full((3,), 26), torch.zeros(3, 4), n_train=1),
         r"letters must be in 0\.\.25; got"),
        (lambda: FirstLetterData([" a"] * 3, torch.zeros(3, dtype=torch.long), torch.zeros(2, 4), n_train=1),
         r"activations must be floating point \[n_words=3, d_in\]"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_one_value_error(build, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_budgets_and_mismatched_saes_are_refused() -> None:
    data, w_enc, w_dec = planted_world()
    probe = exact_probe(data)
    with pytest.raises(ValueError, match=r"k must be an int in 1\.\.K=4 .*; got k=5"):
        absorption_over_k(topk_sae(w_enc, w_dec, 4), probe, ks=[2, 5], progress=False)
    narrow = topk_sae(w_enc[:-1], w_dec[:, :-1], 4)
    with pytest.raises(ValueError, match=rf"d_in must equal the probe activations' width {data.d_in}; got"):
        absorption_over_k(narrow, probe, progress=False)
    elsewhere = topk_sae(w_enc, w_dec, 4)
    elsewhere.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match=r"hook 'blocks\.3\.hook_resid_post' must be the probe's hook"):
        absorption_over_k(elsewhere, probe, progress=False)


@pytest.mark.slow
def test_gemma_probe_accuracy_is_reported_and_its_cache_reused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sae_lens_hierarchical.presets import get_preset

    preset = get_preset("gemma-3-270m")
    model = preset.load_model("cpu")
    task = FirstLetterTask(n_words_per_letter=12, n_icl_examples=5)  # small: ~15k tokens through 7 blocks
    probe = first_letter_probe(model, preset.hook_name, task, cache_root=tmp_path, progress=False)
    data = probe.data
    assert len(data.words) + data.n_dropped == 26 * 12 and data.n_train > len(data.words) // 2
    assert data.activations.shape == (len(data.words), model.cfg.d_model)
    assert 2 / 26 < probe.accuracy <= 1.0  # above twice chance even at this size (0.35 measured)
    print(f"Gemma-3-270M {preset.hook_name} first-letter probe held-out accuracy: {probe.accuracy:.3f}")

    def no_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the cached activations should have been read, not recomputed")

    monkeypatch.setattr(first_letter, "hook_activations", no_forward)
    again = first_letter_probe(model, preset.hook_name, task, cache_root=tmp_path, progress=False)
    assert torch.equal(again.data.activations, data.activations) and again.data.words == data.words
    assert again.accuracy == probe.accuracy
    assert len(list((tmp_path / "first_letter").iterdir())) == 2  # the cache directory and its lock file
