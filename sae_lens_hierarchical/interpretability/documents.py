"""Labelled documents for the interpretability measures, and their hook activations cached once on disk.

Sparse probing and the coarse-to-fine view score many SAEs (the baseline suite at every k, several seeds) on the
same documents; running the language model over them is the expensive part (~2,000 tokens/s for Gemma-3-270M to
block 6 on 2 CPU cores), so the activations are computed once per (model, hook, documents, length) and kept in
float16 under ``DEFAULT_CACHE_ROOT/labelled_documents``. SAEs are then scored from the cache alone: pass the model's
name instead of the model (:func:`labelled_documents`) and the model is never loaded.

Which documents, their tasks and their train/test split are
:mod:`~sae_lens_hierarchical.interpretability.document_selection`'s. The default selection, 2,250 documents, is
201,224 tokens besides BOS, 258 MB of float16 on disk; about 2 minutes of Gemma-3-270M on 2 free CPU cores
(22 minutes measured with the cores shared by three other jobs).

Each document is BOS followed by its first ``max_tokens - 1`` tokens (SAEBench truncates the same way, keeping the
beginning). Activations are stored flat ``[tokens, d_in]`` without BOS positions: SAEBench masks BOS (and padding)
out of the mean pooling, and BOS's residual norm (~1e5) would not fit float16. No padding is stored either:
documents run in padded batches of similar length, and a causal model's activations at a document's own positions
do not depend on the padding after it (tested).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from sae_lens import SAE
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import exclusive_lock, write_json_atomically, write_new_directory
from sae_lens_hierarchical.budget import is_int
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT, hook_activations
from sae_lens_hierarchical.data.corpora import WIKIPEDIA_LANGUAGES, wikipedia_dataset
from sae_lens_hierarchical.interpretability.document_selection import (
    ENGLISH,
    LANGUAGE_TASK,
    STORAGE_DTYPES,
    TOPIC_TASK,
    UNCATEGORIZED,
    DocumentSelection,
    DocumentSpec,
    ProbingTask,
    select_documents,
)

DOCUMENT_CACHE_DIRNAME = "labelled_documents"
ACTIVATIONS_FILENAME = "activations.safetensors"
MANIFEST_FILENAME = "manifest.json"
_FORMAT_VERSION = 1
_POOLING_ROWS = 16_384


@dataclass(frozen=True, eq=False)
class LabelledDocuments:
    """Labelled documents and their hook activations, flat over tokens (BOS positions excluded).

    Attributes:
        titles, languages, topics: per document.
        tasks: the probing tasks by name.
        offsets: ``[documents + 1]`` int64; document d's tokens are rows ``offsets[d]:offsets[d + 1]``.
        token_ids: ``[tokens]`` int64 token ids (BOS excluded).
        activations: ``[tokens, d_in]`` hook activations (float16 or float32, as cached).
        model_name, hook_name: where the activations come from.
        cache_dir: the cache directory they were read from or written to (None when built in memory).
    """

    titles: list[str]
    languages: list[str]
    topics: list[str]
    tasks: dict[str, ProbingTask]
    offsets: torch.Tensor
    token_ids: torch.Tensor
    activations: torch.Tensor
    model_name: str
    hook_name: str
    cache_dir: Path | None = None
    _document_of_token: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.titles)
        if len(self.languages) != n or len(self.topics) != n or tuple(self.offsets.shape) != (n + 1,):
            raise ValueError(
                f"titles ({n}), languages ({len(self.languages)}), topics ({len(self.topics)}) and offsets "
                f"({tuple(self.offsets.shape)}) must describe the same documents (offsets has one more entry)"
            )
        counts = self.offsets.diff()
        if self.offsets[0] != 0 or (counts < 1).any():
            raise ValueError("offsets must start at 0 and grow strictly: every document needs at least one token")
        n_tokens = int(self.offsets[-1])
        if self.activations.ndim != 2 or self.activations.shape[0] != n_tokens or self.token_ids.shape != (n_tokens,):
            raise ValueError(
                f"activations must be [tokens={n_tokens}, d_in] and token_ids [tokens]; got "
                f"{tuple(self.activations.shape)} and {tuple(self.token_ids.shape)}"
            )
        for task in self.tasks.values():
            if task.labels.shape != (n,) or task.test.shape != (n,):
                raise ValueError(f"task {task.name!r} must label all {n} documents; got {task.labels.shape}")
        object.__setattr__(self, "_document_of_token", torch.repeat_interleave(torch.arange(n), counts))

    @property
    def n_documents(self) -> int:
        return len(self.titles)

    @property
    def d_in(self) -> int:
        return self.activations.shape[1]

    @property
    def token_counts(self) -> torch.Tensor:
        """``[documents]`` int64: tokens pooled per document (BOS excluded)."""
        return self.offsets.diff()

    @property
    def document_of_token(self) -> torch.Tensor:
        """``[tokens]`` int64: the document each activation row belongs to."""
        return self._document_of_token

    def task(self, name: str) -> ProbingTask:
        """The task called ``name``; one ValueError lists the others."""
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; these documents have tasks {sorted(self.tasks)}")
        return self.tasks[name]

    def mean_pooled(self) -> torch.Tensor:
        """``[documents, d_in]`` float32: each document's activations averaged over its tokens (SAEBench's pooling)."""
        sums = torch.zeros(self.n_documents, self.d_in, dtype=torch.float64)
        for start in range(0, self.activations.shape[0], _POOLING_ROWS):  # a float64 copy of all rows would be GBs
            rows = slice(start, start + _POOLING_ROWS)
            sums.index_add_(0, self.document_of_token[rows], self.activations[rows].to(torch.float64))
        return (sums / self.token_counts[:, None]).to(torch.float32)

    def token_batches(
        self, documents: np.ndarray | None = None, batch_tokens: int = 4096, desc: str = "", progress: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(activations [t, d_in] float32, document index [t])`` over the tokens of ``documents`` (all by default),
        in batches of whole documents of about ``batch_tokens`` tokens (at least one document each)."""
        if not is_int(batch_tokens, allow_numpy=True) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be an int >= 1; got {batch_tokens!r}")
        order = np.arange(self.n_documents) if documents is None else np.asarray(documents, dtype=np.int64)
        counts = self.token_counts[torch.from_numpy(order)].tolist() if len(order) else []
        bar = tqdm(total=sum(counts), desc=desc or "Encoding documents", unit="tok", disable=not progress)
        start = 0
        while start < len(order):
            stop, size = start, 0
            while stop < len(order) and (stop == start or size + counts[stop] <= batch_tokens):
                size += counts[stop]
                stop += 1
            rows = torch.cat([torch.arange(self.offsets[d], self.offsets[d + 1]) for d in order[start:stop]])
            yield self.activations[rows].to(torch.float32), self.document_of_token[rows]
            bar.update(size)
            start = stop
        bar.close()

    def check_sae(self, sae: SAE[Any]) -> None:
        """One ValueError when ``sae`` reads another hook or another width than these activations."""
        hook_name = getattr(sae.cfg.metadata, "hook_name", None)
        if hook_name and hook_name != self.hook_name:
            raise ValueError(
                f"the SAE reads {hook_name!r} but these documents' activations are from {self.hook_name!r}; "
                "build the documents at the SAE's hook"
            )
        if sae.cfg.d_in != self.d_in:
            raise ValueError(f"the SAE's d_in is {sae.cfg.d_in} but these activations have d_in {self.d_in}")


def labelled_documents(
    model: HookedTransformer | str,
    hook_name: str,
    spec: DocumentSpec | None = None,
    cache_root: str | Path = DEFAULT_CACHE_ROOT,
    corpus: Dataset | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> LabelledDocuments:
    """The documents of ``spec`` with their activations at ``hook_name``, computed once and cached.

    Args:
        model: the language model, or its ``cfg.model_name`` to read an existing cache without loading the model
            (a ValueError says so when there is no cache yet).
        hook_name: TransformerLens hook, ``blocks.<layer>.<hook>``; the forward pass stops after that block.
        spec: which documents (default :class:`DocumentSpec`).
        cache_root: the package's cache root; documents live in ``<cache_root>/labelled_documents/``.
        corpus: a dataset with ``text``, ``title``, ``language`` and ``topic`` columns; default: the embedded
            Wikipedia leads in English, Spanish and French.
        batch_size: documents per forward pass.

    The cache is named by a digest of the model name, hook, length, dtype and the selected texts, so another
    corpus or draw never reads a stale cache. It is written whole or not at all, under a lock (a second process
    waits, then reads it).
    """
    spec = spec or DocumentSpec()
    if not is_int(batch_size, allow_numpy=True) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    selection = select_documents(corpus if corpus is not None else wikipedia_dataset(WIKIPEDIA_LANGUAGES), spec)
    model_name = model if isinstance(model, str) else model.cfg.model_name
    key = {
        "format": _FORMAT_VERSION,
        "model_name": model_name,
        "hook_name": hook_name,
        "max_tokens": spec.max_tokens,
        "dtype": spec.dtype,
        "texts": hashlib.sha256(json.dumps(selection.texts).encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_root).expanduser() / DOCUMENT_CACHE_DIRNAME
    directory = root / f"{model_name}-{hook_name}-{digest}".replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f"{directory.name}.lock"):
        if not (directory / MANIFEST_FILENAME).is_file():
            if isinstance(model, str):
                raise ValueError(
                    f"no cached activations for model {model_name!r} at {hook_name!r} in {root}; pass the model "
                    "itself to compute them"
                )
            tensors = _compute_activations(model, hook_name, selection.texts, spec, batch_size, progress)
            write_new_directory(directory, lambda scratch: _write_cache(scratch, tensors, key, selection))
    tensors = load_file(str(directory / ACTIVATIONS_FILENAME))
    return LabelledDocuments(
        titles=selection.titles,
        languages=selection.languages,
        topics=selection.topics,
        tasks=selection.tasks,
        offsets=tensors["offsets"],
        token_ids=tensors["token_ids"].to(torch.int64),
        activations=tensors["activations"],
        model_name=model_name,
        hook_name=hook_name,
        cache_dir=directory,
    )


def document_tokens(texts: list[str], tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Each text as BOS followed by its first ``max_tokens - 1`` tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens = [[bos, *document[: max_tokens - 1]] for document in ids]
    empty = [i for i, document in enumerate(tokens) if len(document) < 2]
    if empty:
        raise ValueError(f"documents {empty[:5]} have no tokens; every document needs at least one")
    return tokens


@torch.no_grad()
def _compute_activations(
    model: HookedTransformer, hook_name: str, texts: list[str], spec: DocumentSpec, batch_size: int, progress: bool
) -> dict[str, torch.Tensor]:
    """``activations [tokens, d_in]``, ``token_ids [tokens]``, ``offsets [documents + 1]``, BOS dropped.

    Documents run longest first in batches padded at the end (a causal model's activations at a document's own
    positions ignore what follows them), so padding costs little.
    """
    tokens = document_tokens(texts, model.tokenizer, spec.max_tokens)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.bos_token_id
    lengths = [len(document) for document in tokens]
    order = sorted(range(len(tokens)), key=lambda i: -lengths[i])
    per_document: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
    dtype = STORAGE_DTYPES[spec.dtype]
    limit = torch.finfo(dtype).max
    bar = tqdm(total=sum(lengths), desc="Caching document activations", unit="tok", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = lengths[batch[0]]
        padded = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, index in enumerate(batch):
            padded[row, : lengths[index]] = torch.tensor(tokens[index])
        acts = hook_activations(model, padded, hook_name, batch_size=len(batch))  # [batch, width, d_in]
        for row, index in enumerate(batch):
            document = acts[row, 1 : lengths[index]]
            if not torch.isfinite(document).all() or document.abs().max() > limit:
                raise ValueError(
                    f"document {index} has activations beyond {spec.dtype}'s range ({limit:.0f}) or non-finite; "
                    "use DocumentSpec(dtype='float32')"
                )
            per_document[index] = document.to(dtype)
        bar.update(sum(lengths[i] for i in batch))
    bar.close()
    counts = torch.tensor([length - 1 for length in lengths])
    return {
        "activations": torch.cat(per_document).contiguous(),
        "token_ids": torch.tensor([t for document in tokens for t in document[1:]], dtype=torch.int32),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
    }


def _write_cache(
    directory: Path, tensors: dict[str, torch.Tensor], key: dict[str, Any], selection: DocumentSelection
) -> None:
    """The tensors, then a manifest (the key, and what the documents are, for people reading the cache)."""
    save_file(tensors, str(directory / ACTIVATIONS_FILENAME))
    manifest = {
        "key": key,
        "n_documents": len(selection.titles),
        "n_tokens": int(tensors["offsets"][-1]),
        "d_in": int(tensors["activations"].shape[1]),
        "titles": selection.titles,
        "languages": selection.languages,
        "topics": selection.topics,
        "tasks": {name: task.to_dict() for name, task in selection.tasks.items()},
    }
    write_json_atomically(directory / MANIFEST_FILENAME, manifest)


__all__ = [
    "ACTIVATIONS_FILENAME",
    "DOCUMENT_CACHE_DIRNAME",
    "ENGLISH",
    "LANGUAGE_TASK",
    "MANIFEST_FILENAME",
    "TOPIC_TASK",
    "UNCATEGORIZED",
    "DocumentSelection",
    "DocumentSpec",
    "LabelledDocuments",
    "ProbingTask",
    "document_tokens",
    "labelled_documents",
    "select_documents",
]
