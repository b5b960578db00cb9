"""An on-disk activation cache in SAELens's cached-activations format, resumable and never half-complete.

Running the language model dominates the cost of training small SAEs on a CPU, and a fair comparison needs
every SAE to see identical inputs, so activations are computed once and reused. The cache directory is
named by a digest of everything that determines its content (model, hook, corpus, context size, token
count, dtype). It holds:

- ``activations/``: a ``datasets`` dataset with one ``[context_size, d_in]`` column named after the hook
  and a ``token_ids`` column, exactly what SAELens's ``use_cached_activations=True`` reads;
- ``manifest.json``: written last, atomically. A cache without it is incomplete and is never used.

Work happens in shards, each renamed into place only when fully written; an interrupted run resumes from
the shards already present. A file lock serialises processes filling the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Array2D, Dataset, Features, Sequence, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import (
    exclusive_lock,
    remove_stale_temporaries,
    save_dataset_atomically,
    write_json_atomically,
)
from sae_lens_hierarchical.preemption import Preempted, current_request

# Activation caches and converted model checkpoints live here (override with SAE_LENS_HIERARCHICAL_CACHE).
DEFAULT_CACHE_ROOT = Path(os.environ.get("SAE_LENS_HIERARCHICAL_CACHE", "~/.cache/sae_lens_hierarchical")).expanduser()
MANIFEST_FILENAME = "manifest.json"
ACTIVATIONS_DIRNAME = "activations"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ActivationCacheKey:
    """Everything that determines a cache's content; its digest names the cache directory."""

    model_name: str
    hook_name: str
    corpus: str
    context_size: int
    n_sequences: int
    dtype: str = "float32"

    @property
    def n_tokens(self) -> int:
        return self.n_sequences * self.context_size

    def directory_name(self) -> str:
        payload = json.dumps({**asdict(self), "format": _FORMAT_VERSION}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        readable = f"{self.model_name}-{self.hook_name}-{self.corpus}".replace("/", "_")
        return f"{readable}-{digest}"


@dataclass(frozen=True)
class ActivationCache:
    """A complete cache on disk: the first ``key.n_sequences`` rows of the dataset in ``directory`` (which may be a
    larger cache of the same sequences, see :func:`open_cache` with ``covering``)."""

    directory: Path
    key: ActivationCacheKey
    d_in: int

    @property
    def activations_path(self) -> Path:
        """What to pass as SAELens's ``cached_activations_path`` (the whole dataset in ``directory``)."""
        return self.directory / ACTIVATIONS_DIRNAME

    def load(self) -> Dataset:
        """The cached dataset's first ``key.n_sequences`` rows, torch-formatted (memory-mapped, not read into RAM)."""
        dataset = load_from_disk(str(self.activations_path))
        if len(dataset) > self.key.n_sequences:
            dataset = dataset.select(range(self.key.n_sequences))
        dataset.set_format(type="torch", columns=[self.key.hook_name, "token_ids"])
        return dataset

    def token_activations(self, exclude_token_ids: list[int] | None = None) -> torch.Tensor:
        """``[tokens, d_in]`` activations, dropping positions whose token id is in ``exclude_token_ids``."""
        dataset = self.load()
        acts = dataset[:][self.key.hook_name].reshape(-1, self.d_in)
        if not exclude_token_ids:
            return acts
        token_ids = dataset[:]["token_ids"].reshape(-1)
        keep = ~torch.isin(token_ids, torch.tensor(exclude_token_ids, dtype=token_ids.dtype))
        return acts[keep]


def open_cache(cache_root: str | Path, key: ActivationCacheKey, covering: bool = False) -> ActivationCache | None:
    """The complete cache for ``key`` under ``cache_root``, or None if there is none (or only a partial one).

    With ``covering``, a complete cache of more sequences of the same model, hook, corpus, context and dtype serves
    too (the smallest one): its first ``key.n_sequences`` rows are exactly these sequences, since every cache of a
    split takes a prefix of one fixed order. Only readers that take exactly those rows (:meth:`ActivationCache.load`)
    may use it; SAELens's store reads ``activations_path`` whole.
    """
    exact = _open_exact(cache_root, key)
    if exact is not None or not covering:
        return exact
    larger = []
    for manifest_path in Path(cache_root).glob(f"*/{MANIFEST_FILENAME}"):
        recorded = json.loads(manifest_path.read_text()).get("key", {})
        same_sequences = {**recorded, "n_sequences": key.n_sequences} == asdict(key)
        if same_sequences and recorded["n_sequences"] > key.n_sequences:
            larger.append(ActivationCacheKey(**recorded))
    if not larger:
        return None
    found = _open_exact(cache_root, min(larger, key=lambda candidate: candidate.n_sequences))
    assert found is not None
    return ActivationCache(directory=found.directory, key=key, d_in=found.d_in)


def _open_exact(cache_root: str | Path, key: ActivationCacheKey) -> ActivationCache | None:
    directory = Path(cache_root) / key.directory_name()
    manifest_path = directory / MANIFEST_FILENAME
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("key") != asdict(key) or manifest.get("format") != _FORMAT_VERSION:
        raise ValueError(f"activation cache {directory} has a manifest for a different key: {manifest.get('key')}")
    if not (directory / ACTIVATIONS_DIRNAME).is_dir():
        raise ValueError(f"activation cache {directory} is marked complete but {ACTIVATIONS_DIRNAME}/ is missing")
    return ActivationCache(directory=directory, key=key, d_in=int(manifest["d_in"]))


def cache_activations(
    model: HookedTransformer,
    token_sequences: Dataset,
    key: ActivationCacheKey,
    cache_root: str | Path,
    batch_size: int = 8,
    shard_sequences: int = 256,
    progress: bool = True,
    covering: bool = False,
) -> ActivationCache:
    """Return the cache for ``key`` (with ``covering``, also a larger one of the same sequences: see
    :func:`open_cache`), computing (or finishing) it if needed.

    Args:
        model: the language model; the forward pass stops after the hooked block.
        token_sequences: a dataset with an ``input_ids`` column of ``key.context_size`` tokens per row; the
            first ``key.n_sequences`` rows are cached, in order.
        key: what is cached (it must describe ``model`` and ``token_sequences`` truthfully).
        cache_root: directory that holds caches.
        batch_size: sequences per forward pass.
        shard_sequences: sequences per shard, the unit of resumption.
    """
    if key.n_sequences < 1 or key.n_sequences > len(token_sequences):
        raise ValueError(
            f"n_sequences must be in 1..{len(token_sequences)} (the sequences available); got {key.n_sequences}"
        )
    if shard_sequences < 1 or batch_size < 1:
        raise ValueError(f"batch_size and shard_sequences must be >= 1; got {batch_size}, {shard_sequences}")
    if covering and (found := open_cache(cache_root, key, covering=True)) is not None:
        return found  # complete caches are never written to again: no lock needed to read one
    directory = Path(cache_root) / key.directory_name()
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".lock"):
        existing = open_cache(cache_root, key)
        if existing is not None:
            return existing
        shards_dir = directory / "shards"
        shards_dir.mkdir(exist_ok=True)
        remove_stale_temporaries(directory)
        remove_stale_temporaries(shards_dir)
        hook_layer(key.hook_name)  # fail before any work on a bad hook name
        starts = range(0, key.n_sequences, shard_sequences)
        shard_paths = [shards_dir / f"shard_{i:05d}" for i in range(len(starts))]
        todo = [i for i, path in enumerate(shard_paths) if not path.is_dir()]
        bar = tqdm(total=key.n_tokens, desc="Caching activations", unit="tok", disable=not progress)
        bar.update((len(starts) - len(todo)) * shard_sequences * key.context_size)
        request = current_request()
        done = len(starts) - len(todo)
        for index in todo:
            if request.requested:  # each rank fills its own shards: no collective here, every rank got the signal
                raise Preempted(
                    f"caching stopped by {request.signal_name} after {done} of {len(starts)} shards, which are kept: "
                    "rerun the same command to go on from them"
                )
            stop = min(starts[index] + shard_sequences, key.n_sequences)
            tokens = torch.tensor(token_sequences[starts[index] : stop]["input_ids"])
            if tokens.shape[1] != key.context_size:
                raise ValueError(f"input_ids rows must have {key.context_size} tokens; got {tokens.shape[1]}")
            # One token's activations flattened (attn.hook_z is [n_heads, d_head] per token).
            acts = hook_activations(model, tokens, key.hook_name, batch_size, bar).flatten(start_dim=2)
            shard = Dataset.from_dict(
                {key.hook_name: acts.to(torch.float32).numpy(), "token_ids": tokens.to(torch.int32).numpy()},
                features=_features(key, acts.shape[-1]),
            )
            save_dataset_atomically(shard, shard_paths[index])
            done += 1
        bar.close()
        combined = concatenate_datasets([load_from_disk(str(path)) for path in shard_paths])
        d_in = combined.features[key.hook_name].shape[1]
        activations_dir = directory / ACTIVATIONS_DIRNAME
        if activations_dir.exists():  # left by a run interrupted between this rename and the manifest
            shutil.rmtree(activations_dir)
        save_dataset_atomically(combined, activations_dir)
        manifest = {"format": _FORMAT_VERSION, "key": asdict(key), "d_in": d_in, "n_tokens": key.n_tokens}
        write_json_atomically(directory / MANIFEST_FILENAME, manifest)
        shutil.rmtree(shards_dir)
    return ActivationCache(directory=directory, key=key, d_in=d_in)


def _features(key: ActivationCacheKey, d_in: int) -> Features:
    """The cached dataset's columns: ``[context, d_in]`` activations named after the hook, and the token ids."""
    return Features(
        {
            key.hook_name: Array2D(shape=(key.context_size, d_in), dtype=key.dtype),
            "token_ids": Sequence(Value("int32"), length=key.context_size),
        }
    )


@torch.no_grad()
def hook_activations(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    batch_size: int = 8,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """``[sequences, context, d_in]`` activations at ``hook_name`` for ``[sequences, context]`` token ids.

    The forward pass stops after the hooked block: for a real LM the unembedding dominates time and memory.
    """
    layer = hook_layer(hook_name)
    chunks = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=layer + 1)
        chunks.append(cache[hook_name].cpu())
        if bar is not None:
            bar.update(batch.numel())
    return torch.cat(chunks)


def hook_layer(hook_name: str) -> int:
    """The block index of a TransformerLens hook name ``blocks.<layer>.<hook>``."""
    parts = hook_name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"hook_name must look like 'blocks.<layer>.<hook>'; got {hook_name!r}")
    return int(parts[1])


def collect_activations(
    model: HookedTransformer,
    token_sequences: torch.Tensor,
    hook_name: str,
    batch_size: int = 16,
    drop_bos: bool = True,
) -> torch.Tensor:
    """``[tokens, d_model]`` activations at ``hook_name`` for ``[sequences, context]`` token ids, not cached.

    BOS positions are dropped by default: their residual norms are orders of magnitude larger than text
    tokens', and SAEs are neither trained nor evaluated on them.
    """
    acts = hook_activations(model, token_sequences, hook_name, batch_size)
    if drop_bos:
        acts = acts[:, 1:]
    return acts.reshape(-1, acts.shape[-1])
