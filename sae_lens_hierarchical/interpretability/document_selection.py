"""Which labelled documents the interpretability measures read, and their tasks: drawn from a corpus before any
model runs.

The documents, from the embedded Wikipedia corpus (:func:`~sae_lens_hierarchical.data.corpora.wikipedia_dataset`):

- **topic task**: ``docs_per_topic`` English leads from each of the eleven topics (``"Uncategorized"`` left out),
  drawn at random with ``seed``;
- **language task**: ``docs_per_language`` leads per language (en/es/fr); the English ones are a random subset of
  the topic task's documents, so they cost no extra forward pass.

Within each task and class the first ``round(test_fraction * n)`` documents of the seeded draw are held out for
testing. Defaults: 150 per topic and 300 per language, 128 tokens (BOS included, as SAEBench's ``context_length``),
25% held out: 2,250 documents. :mod:`~sae_lens_hierarchical.interpretability.documents` runs the model over them
and caches the activations; drawing them needs no model, and the cache is named after what is drawn here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from sae_lens_hierarchical.budget import is_int
from sae_lens_hierarchical.data.corpora import WIKIPEDIA_LANGUAGES

TOPIC_TASK = "topic"
LANGUAGE_TASK = "language"
ENGLISH = "en-us"
# Wikipedia's catch-all section: not a topic, so not a class of the topic task.
UNCATEGORIZED = "Uncategorized"
# How the cached activations may be stored (DocumentSpec.dtype).
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class DocumentSpec:
    """Which documents, how long, and how they are split (with the model and hook, it fixes the cached set).

    Attributes:
        docs_per_topic: English documents per topic (topic task), at least 2 so that both splits have one.
        docs_per_language: documents per language (language task); the English ones come from the topic documents,
            so at most ``docs_per_topic`` times the number of topics.
        max_tokens: tokens per document, BOS included (longer documents keep their beginning).
        test_fraction: share of each class held out for testing, in (0, 1).
        seed: seed of the document draw and of the train/test split.
        dtype: storage dtype of the cached activations, ``"float16"`` or ``"float32"``.
    """

    docs_per_topic: int = 150
    docs_per_language: int = 300
    max_tokens: int = 128
    test_fraction: float = 0.25
    seed: int = 0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("docs_per_topic", "docs_per_language"):
            value = getattr(self, name)
            if not is_int(value, allow_numpy=True) or value < 2:
                raise ValueError(f"{name} must be an int >= 2 (one training and one test document); got {value!r}")
        if not is_int(self.max_tokens, allow_numpy=True) or self.max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2 (BOS and at least one token); got {self.max_tokens!r}")
        if not isinstance(self.test_fraction, float | int) or not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1); got {self.test_fraction!r}")
        if not is_int(self.seed, allow_numpy=True):
            raise ValueError(f"seed must be an int; got {self.seed!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}; got {self.dtype!r}")

    def n_test(self, n_documents: int) -> int:
        """Held-out documents of a class of ``n_documents``: ``round(test_fraction * n)``, kept in 1..n-1."""
        return min(max(round(self.test_fraction * n_documents), 1), n_documents - 1)


@dataclass(frozen=True, eq=False)  # eq would compare arrays, which have no single truth value
class ProbingTask:
    """A classification of (some of) the documents, with its train/test split.

    Attributes:
        name: ``"topic"``, ``"language"``, ...
        classes: class names; ``labels`` index into them.
        labels: ``[documents]`` int64 class index, -1 for documents outside the task.
        test: ``[documents]`` bool, True for held-out documents (meaningful where ``labels >= 0``).
    """

    name: str
    classes: tuple[str, ...]
    labels: np.ndarray
    test: np.ndarray

    def documents(self, split: str | None = None) -> np.ndarray:
        """Indices of the task's documents: all of them, or those of ``split`` ("train" or "test")."""
        if split not in (None, "train", "test"):
            raise ValueError(f"split must be None, 'train' or 'test'; got {split!r}")
        keep = self.labels >= 0
        if split is not None:
            keep &= self.test if split == "test" else ~self.test
        return np.flatnonzero(keep)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "labels": self.labels.tolist(),
            "test": self.test.tolist(),
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> ProbingTask:
        return cls(
            name=payload["name"],
            classes=tuple(payload["classes"]),
            labels=np.asarray(payload["labels"], dtype=np.int64),
            test=np.asarray(payload["test"], dtype=bool),
        )


@dataclass(frozen=True)
class DocumentSelection:
    """The chosen documents (in order) and their tasks, before any model runs."""

    texts: list[str]
    titles: list[str]
    languages: list[str]
    topics: list[str]
    tasks: dict[str, ProbingTask]


def select_documents(corpus: Dataset, spec: DocumentSpec) -> DocumentSelection:
    """Draw the documents of ``spec`` from ``corpus`` (columns ``text``, ``title``, ``language``, ``topic``).

    The topic task takes the English documents of every topic but "Uncategorized"; the language task every language
    of ``corpus`` (English from the topic documents). A task with fewer than two classes is left out.
    """
    missing = {"text", "title", "language", "topic"} - set(corpus.column_names)
    if missing:
        raise ValueError(f"the corpus needs columns text, title, language and topic; {sorted(missing)} missing")
    languages = np.asarray(corpus["language"], dtype=object)
    topics_column = np.asarray(corpus["topic"], dtype=object)
    english = languages == ENGLISH
    topic_names = sorted({t for t in topics_column[english] if t and t != UNCATEGORIZED})
    rng = np.random.default_rng(spec.seed)
    chosen: list[int] = []  # corpus rows, in document order
    topic_classes: list[tuple[int, list[int]]] = []  # (class, document positions) in draw order
    for index, topic in enumerate(topic_names):
        rows = np.flatnonzero(english & (topics_column == topic))
        if len(rows) < spec.docs_per_topic:
            raise ValueError(
                f"docs_per_topic must be in 2..{len(rows)} (topic {topic!r} has {len(rows)} documents); "
                f"got {spec.docs_per_topic}"
            )
        drawn = rng.choice(rows, size=spec.docs_per_topic, replace=False).tolist()
        topic_classes.append((index, list(range(len(chosen), len(chosen) + len(drawn)))))
        chosen += drawn
    language_names = [language for language in WIKIPEDIA_LANGUAGES if (languages == language).any()]
    language_names += sorted(set(languages) - set(language_names))
    language_classes: list[tuple[int, list[int]]] = []
    for index, language in enumerate(language_names):
        if language == ENGLISH and topic_names:
            pool = list(range(len(chosen)))  # the topic documents: no extra forward pass
            positions = [pool[i] for i in rng.permutation(len(pool))[: spec.docs_per_language]]
            available = len(pool)
        else:
            rows = np.flatnonzero(languages == language)
            available = len(rows)
            drawn = rng.choice(rows, size=min(spec.docs_per_language, available), replace=False).tolist()
            positions = list(range(len(chosen), len(chosen) + len(drawn)))
            chosen += drawn
        if available < spec.docs_per_language:
            raise ValueError(
                f"docs_per_language must be in 2..{available} ({language} has {available} documents to draw from); "
                f"got {spec.docs_per_language}"
            )
        language_classes.append((index, positions))
    tasks = {}
    for name, classes, members in (
        (TOPIC_TASK, topic_names, topic_classes),
        (LANGUAGE_TASK, language_names, language_classes),
    ):
        if len(classes) >= 2:
            tasks[name] = _task(name, classes, members, len(chosen), spec)
    if not tasks:
        raise ValueError("the corpus gives no task with two classes (English topics, or two languages)")
    rows = corpus.select(chosen)
    return DocumentSelection(
        texts=list(rows["text"]),
        titles=list(rows["title"]),
        languages=list(rows["language"]),
        topics=list(rows["topic"]),
        tasks=tasks,
    )


def _task(
    name: str, classes: list[str], members: list[tuple[int, list[int]]], n_documents: int, spec: DocumentSpec
) -> ProbingTask:
    """A task over ``n_documents``: each class's documents in draw order, the first ``spec.n_test`` held out."""
    labels = np.full(n_documents, -1, dtype=np.int64)
    test = np.zeros(n_documents, dtype=bool)
    for index, positions in members:
        labels[positions] = index
        test[positions[: spec.n_test(len(positions))]] = True
    return ProbingTask(name=name, classes=tuple(classes), labels=labels, test=test)
