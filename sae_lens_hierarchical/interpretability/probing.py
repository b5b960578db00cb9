"""Sparse probing at every budget k: how well do n latents of an SAE at budget k tell document classes apart?

SAEBench's sparse-probing definition (Karvonen et al. 2025; ``sae_bench/evals/sparse_probing`` in
adamkarvonen/SAEBench), implemented here because sae-bench cannot be installed beside sae-lens 6.54. What it does,
and what this module does the same way:

- **Pooling.** Documents are truncated to 128 tokens (the beginning is kept); BOS, padding and EOS positions are
  masked out and each document's activations are averaged over its remaining tokens: the residual stream for the
  model baselines, the SAE latents (encoded per token, then averaged) for the SAE probes.
- **One binary task per class, balanced.** For each class of a dataset, positives are all its documents; negatives
  are ``ceil(n_positive / n_other_classes)`` documents drawn at random from each other class, of which
  ``n_positive`` are drawn at random. Train and test sets are built this way separately.
- **Top-n latents by class-mean difference.** On the training set, ``|mean over positives - mean over negatives|``
  per latent; the n largest are kept (:func:`top_mean_difference`).
- **The probe.** scikit-learn's ``LogisticRegression`` with its defaults (L2 penalty, ``C = 1.0``, lbfgs) and
  ``max_iter = 1000``, on the n selected latents, unscaled; its accuracy on the held-out balanced set.
- **Scores.** A dataset's score is the mean of its classes' test accuracies. The model baselines are the same
  probe on the top-n residual dimensions (SAEBench's ``llm_top_n``) and a probe on all residual dimensions.

Where this differs, and why:

- **Budget k.** The SAE's latents at budget k (:func:`~sae_lens_hierarchical.evaluation.latent_activations`: a
  HierarchicalTopK SAE's nested ranking, any other TopK-family SAE truncated to its k largest); SAEBench takes the
  SAE as it encodes. All budgets come from one encoding pass (the budget-k latents are the first k of the ranking).
- **Datasets.** Wikipedia topic (eleven English topics) and language identity (en/es/fr) from the embedded corpus
  (:mod:`~sae_lens_hierarchical.interpretability.documents`), instead of bias-in-bios, Amazon reviews, GitHub code,
  AG News and Europarl, which need the Hugging Face Hub.
- **Sizes.** 150 documents per topic and 300 per language, a quarter held out (SAEBench: 4,000 train and 1,000 test
  documents per dataset), so that caching takes about two minutes on 2 CPU cores. Test sets are small: 38 positives
  and 38 negatives per topic, 75 and 75 per language, so one document moves a class's accuracy by 1.3 or 0.7 points.
- **n.** {1, 2, 5, 20} (SAEBench's default {1, 2, 5}).
- **The all-dimensions residual probe** is the same scikit-learn probe as the others. SAEBench trains that one
  with AdamW on a GPU and keeps the epoch with the best *test* accuracy, which selects on the test set.
- **Seeded negatives.** The balanced negatives are drawn with numpy from ``(seed, class)``, never from the SAE, so
  every SAE and the residual baseline are probed on exactly the same documents; ties in the class-mean difference
  go to the lower index (a stable sort).

Read small n with care: the class-mean difference is not scale-free, so it favours latents (and residual dimensions)
of large magnitude. On Gemma-3-270M the n = 1 probes pick a few frequent, strongly activating latents: at k = 64 the
preset HierarchicalTopK SAE's probes for en, es and fr all select the same latent, of typical rank 1, which fires on
over half the tokens, rather than a language-specific one. The probe sees unscaled features spanning three orders
of magnitude or more, so lbfgs sometimes stops at ``max_iter`` (as SAEBench's does);
:attr:`~sae_lens_hierarchical.interpretability.probing_results.ProbeScore.unconverged` names those classes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sae_lens import SAE
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from sae_lens_hierarchical.evaluation.budgets import ranked_latents, resolve_budgets
from sae_lens_hierarchical.interpretability.document_selection import ProbingTask
from sae_lens_hierarchical.interpretability.documents import LabelledDocuments
from sae_lens_hierarchical.interpretability.probing_report import (
    figure_sparse_probing,
    format_probing_table,
    plot_sparse_probing,
    summarize_probing,
)
from sae_lens_hierarchical.interpretability.probing_results import ProbeScore, ScoreSummary, SparseProbingResults

DEFAULT_NS = (1, 2, 5, 20)
# SAEBench's probe: scikit-learn's defaults (L2, C = 1.0, lbfgs) with more iterations.
PROBE_C = 1.0
PROBE_MAX_ITER = 1000


@dataclass(frozen=True, eq=False)
class ClassSplit:
    """One class's balanced one-vs-rest task: document indices and labels (1 = the class, 0 = another class)."""

    name: str
    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


def balanced_splits(task: ProbingTask, seed: int = 0) -> list[ClassSplit]:
    """SAEBench's balanced one-vs-rest sets, one per class of ``task``, in each split (see the module docstring).

    Drawn from ``numpy.random.default_rng([seed, class index])`` alone, so they are the same for every SAE.
    """
    splits = []
    for index, name in enumerate(task.classes):
        rng = np.random.default_rng([seed, index])
        sets = [_one_vs_rest(task, index, split, rng) for split in ("train", "test")]
        splits.append(ClassSplit(name, *sets[0], *sets[1]))
    return splits


def top_mean_difference(features: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` columns of ``features`` ``[documents, d]`` with the largest ``|mean(label 1) - mean(label
    0)|`` (computed in float64), largest first; ties go to the lower index."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    difference = np.abs(features[labels == 1].mean(axis=0) - features[labels == 0].mean(axis=0))
    return np.argsort(-difference, kind="stable")[:n]


def probe_accuracy(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray
) -> tuple[float, bool]:
    """Held-out accuracy of SAEBench's logistic-regression probe (L2, C = 1, lbfgs, 1,000 iterations, unscaled), and
    whether lbfgs converged within those iterations (its warning is recorded instead of printed)."""
    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(train_features, dtype=np.float64), train_labels)
    converged = int(np.max(probe.n_iter_)) < PROBE_MAX_ITER
    return float(probe.score(np.asarray(test_features, dtype=np.float64), test_labels)), converged


def probe_features(
    features: np.ndarray | torch.Tensor,
    task: ProbingTask,
    ns: Sequence[int | None],
    splits: list[ClassSplit] | None = None,
    k: int | None = None,
    seed: int = 0,
) -> list[ProbeScore]:
    """Probe ``features`` ``[documents, d]`` (mean-pooled latents or residual) for ``task`` with the top n of each n
    in ``ns`` (None: all d columns, no selection): one :class:`ProbeScore` per n, labelled with budget ``k``."""
    features = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if features.ndim != 2 or features.shape[0] != task.labels.shape[0]:
        raise ValueError(f"features must be [documents={task.labels.shape[0]}, d]; got {features.shape}")
    check_ns([n for n in ns if n is not None], features.shape[1])
    splits = splits if splits is not None else balanced_splits(task, seed)
    scores = []
    for n in ns:
        accuracies: dict[str, float] = {}
        selected: dict[str, list[int]] = {}
        unconverged = []
        for split in splits:
            train, test = features[split.train], features[split.test]
            columns = slice(None) if n is None else top_mean_difference(train, split.train_labels, n)
            accuracies[split.name], converged = probe_accuracy(
                train[:, columns], split.train_labels, test[:, columns], split.test_labels
            )
            selected[split.name] = [] if n is None else [int(c) for c in columns]  # type: ignore[union-attr]
            if not converged:
                unconverged.append(split.name)
        mean = float(np.mean(list(accuracies.values())))
        scores.append(ProbeScore(task.name, k, n, mean, accuracies, selected, unconverged))
    return scores


@torch.no_grad()
def pooled_latents(
    sae: SAE[Any],
    documents: LabelledDocuments,
    ks: list[int] | None = None,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """``{k: [documents, d_sae] float32}``: each document's latent activations at budget k, averaged over its tokens.

    One encoding pass serves every budget: the budget-k latents of a token are the first k of its ranking
    (:func:`~sae_lens_hierarchical.evaluation.ranked_latents`), exactly what ``latent_activations(sae, x, k)``
    keeps (tested).
    """
    documents.check_sae(sae)
    ks = resolve_budgets(sae, ks)
    d_sae = sae.cfg.d_sae
    weight = sae.W_enc
    # blocks[k]: the activations of ranks (previous k, k], summed per (document, latent); cumulated at the end.
    blocks = {k: torch.zeros(documents.n_documents * d_sae, dtype=torch.float32) for k in ks}
    for acts, document in documents.token_batches(batch_tokens=batch_tokens, progress=progress, desc="SAE latents"):
        top_acts, top_indices, _ = ranked_latents(sae, acts.to(weight.device, weight.dtype), ks[-1])
        top_acts, top_indices = top_acts.float().cpu(), top_indices.cpu()
        previous = 0
        for k in ks:
            flat = document[:, None] * d_sae + top_indices[:, previous:k]
            blocks[k].index_add_(0, flat.reshape(-1), top_acts[:, previous:k].reshape(-1))
            previous = k
    counts = documents.token_counts.to(torch.float32)[:, None]
    pooled = {}
    running = torch.zeros(documents.n_documents * d_sae, dtype=torch.float32)
    for k in ks:
        running += blocks.pop(k)
        pooled[k] = running.view(documents.n_documents, d_sae) / counts
    return pooled


def residual_probing(
    documents: LabelledDocuments, ns: Sequence[int] = DEFAULT_NS, tasks: Sequence[str] | None = None, seed: int = 0
) -> list[ProbeScore]:
    """The ceiling: the same probes on the mean-pooled residual stream, top-n dimensions for each n, and all of them
    (n = None). Computed once per document set; pass it to :func:`sparse_probing` to reuse it across SAEs."""
    pooled = documents.mean_pooled().numpy()
    ns = check_ns(ns, documents.d_in)
    scores = []
    for name in resolve_tasks(documents, tasks):
        scores += probe_features(pooled, documents.task(name), [*ns, None], seed=seed)
    return scores


def sparse_probing(
    sae: SAE[Any],
    documents: LabelledDocuments,
    ks: list[int] | None = None,
    ns: Sequence[int] = DEFAULT_NS,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    ceiling: list[ProbeScore] | None = None,
    name: str = "",
    batch_tokens: int = 4096,
    progress: bool = True,
) -> SparseProbingResults:
    """Sparse probing of ``sae`` at each budget in ``ks`` (default: powers of two and K) for each n in ``ns``.

    Args:
        sae: any TopK-family SAELens SAE reading ``documents.hook_name`` (a HierarchicalTopK SAE at its nested
            budgets, others truncated to their k largest activations).
        documents: from :func:`~sae_lens_hierarchical.interpretability.documents.labelled_documents`.
        ks: budgets in 1..K.
        ns: latents per probe, each in 1..d_sae (and 1..d_in for the ceiling).
        tasks: task names (default: all of the documents' tasks).
        seed: of the balanced negatives (the same for every SAE with the same seed).
        ceiling: :func:`residual_probing` of these documents, ns and seed, to reuse; computed when None.
        name: recorded in the results.
    """
    documents.check_sae(sae)
    task_names = resolve_tasks(documents, tasks)
    ns = check_ns(ns, sae.cfg.d_sae)
    if ceiling is None:
        check_ns(ns, documents.d_in)  # before the SAE's work, not after it
    ks = resolve_budgets(sae, ks)
    splits = {task: balanced_splits(documents.task(task), seed) for task in task_names}
    pooled = pooled_latents(sae, documents, ks, batch_tokens, progress)
    scores = []
    for k in ks:
        features = pooled.pop(k).numpy()
        for task in task_names:
            scores += probe_features(features, documents.task(task), ns, splits[task], k=k)
    if ceiling is None:
        ceiling = residual_probing(documents, ns, task_names, seed)
    settings = {
        "seed": seed,
        "probe": f"LogisticRegression(C={PROBE_C}, max_iter={PROBE_MAX_ITER}), L2, unscaled",
        "model_name": documents.model_name,
        "hook_name": documents.hook_name,
        "d_sae": sae.cfg.d_sae,
        "documents": {
            task: {
                "classes": list(documents.task(task).classes),
                "train_per_class": [len(s.train) for s in splits[task]],
                "test_per_class": [len(s.test) for s in splits[task]],
            }
            for task in task_names
        },
    }
    return SparseProbingResults(name=name, ks=ks, ns=ns, scores=scores, ceiling=ceiling, settings=settings)


def check_ns(ns: Sequence[int], n_features: int) -> list[int]:
    """``ns`` sorted and distinct; one ValueError unless each is an int in 1..``n_features``."""
    ns = list(ns)
    bad = [n for n in ns if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= n_features]
    if not ns or bad:
        raise ValueError(f"ns must be a non-empty list of ints in 1..{n_features} (the features probed); got {ns}")
    return sorted({int(n) for n in ns})


def resolve_tasks(documents: LabelledDocuments, tasks: Sequence[str] | None) -> list[str]:
    """``tasks`` checked against the documents' tasks (all of them by default)."""
    if tasks is None:
        return list(documents.tasks)
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names from {sorted(documents.tasks)}; got {tasks!r}")
    return [documents.task(name).name for name in tasks]


def _one_vs_rest(task: ProbingTask, index: int, split: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(documents, labels)`` of class ``index`` against the rest in ``split``, balanced as SAEBench balances."""
    documents = task.documents(split)
    labels = task.labels[documents]
    positives = documents[labels == index]
    others = [c for c in range(len(task.classes)) if c != index]
    if len(positives) == 0 or not others:
        raise ValueError(
            f"class {task.classes[index]!r} of task {task.name!r} has {len(positives)} {split} documents and "
            f"{len(others)} other classes; every class needs >= 1 document in each split and a task >= 2 classes"
        )
    per_class = math.ceil(len(positives) / len(others))
    pool = np.concatenate([rng.permutation(documents[labels == c])[:per_class] for c in others])
    if len(pool) < len(positives):
        raise ValueError(
            f"class {task.classes[index]!r} of task {task.name!r} has {len(positives)} {split} documents but the "
            f"other classes only {len(pool)} to balance them with; the other classes need more {split} documents"
        )
    negatives = rng.permutation(pool)[: len(positives)]
    chosen = np.concatenate([positives, negatives])
    return chosen, np.concatenate([np.ones(len(positives), dtype=np.int64), np.zeros(len(negatives), dtype=np.int64)])


__all__ = [
    "DEFAULT_NS",
    "PROBE_C",
    "PROBE_MAX_ITER",
    "ClassSplit",
    "ProbeScore",
    "ScoreSummary",
    "SparseProbingResults",
    "balanced_splits",
    "check_ns",
    "figure_sparse_probing",
    "format_probing_table",
    "plot_sparse_probing",
    "pooled_latents",
    "probe_accuracy",
    "probe_features",
    "residual_probing",
    "resolve_tasks",
    "sparse_probing",
    "summarize_probing",
    "top_mean_difference",
]
