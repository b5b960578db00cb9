"""torchrun's environment as one object: this process's rank, its device, its share of the corpus and of the batch.

``torchrun --nproc-per-node N -m sae_lens_hierarchical train ...`` starts N copies of the command, each with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (and the rendezvous address) in its environment. :func:`joined_process_group`
turns that into a :class:`DataParallel` (NCCL between GPUs, gloo on CPU); a plain ``python -m`` or a one-process
torchrun gets :data:`SINGLE_PROCESS`, and every job behaves exactly as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig

from sae_lens_hierarchical.presets import replace_runner_config

# How long a collective may wait for a rank before the job fails. torchrun's agent already stops every worker as
# soon as one dies; this bounds a rank that hangs without dying (a stuck data loader, a deadlocked device). Each rank
# caches its share of an embedded corpus before the first collective, so uneven caching time counts against it.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=30)

DatasetT = TypeVar("DatasetT", Dataset, IterableDataset)
RunnerConfigT = TypeVar("RunnerConfigT", bound=LanguageModelSAERunnerConfig)  # type: ignore[type-arg]


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands among the data-parallel ranks of one job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def active(self) -> bool:
        """Whether there are other ranks to share work and gradients with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, the final SAE and the reports, and evaluates."""
        return self.rank == 0

    def device(self, requested: str) -> str:
        """This rank's device: ``cuda`` becomes this rank's own GPU, ``cuda:<local rank>``; anything else is kept."""
        if self.active and torch.device(requested).type == "cuda":
            return f"cuda:{self.local_rank}"
        return requested

    def shard(self, dataset: DatasetT) -> DatasetT:
        """This rank's share of a corpus, disjoint from every other rank's (``datasets``' own node split)."""
        if not self.active:
            return dataset
        return split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)

    def runner_config(self, cfg: RunnerConfigT) -> RunnerConfigT:
        """This rank's SAELens runner config: B/N of each global batch of B tokens, and the same number of steps.

        ``train_batch_size_tokens`` and ``training_tokens`` stay global on the command line; N ranks of B/N tokens
        take the step one process takes on B (the gradients are averaged), so learning-rate schedules, dead-latent
        windows and checkpoints, all counted in steps, mean the same whatever N is.
        """
        if not self.active:
            return cfg
        batch = cfg.train_batch_size_tokens
        if batch % self.world_size:
            raise ValueError(
                f"train_batch_size_tokens={batch} must be divisible by the {self.world_size} data-parallel processes "
                "(each takes an equal share of every batch)"
            )
        # SAELens steps while fewer than training_tokens samples were seen (ceil(T/B) steps) and schedules over
        # T // B of them; one sample more than whole rank batches keeps both counts.
        rank_batch = batch // self.world_size
        rank_tokens = cfg.training_tokens // batch * rank_batch + (1 if cfg.training_tokens % batch else 0)
        return replace_runner_config(cfg, train_batch_size_tokens=rank_batch, training_tokens=rank_tokens)

    def barrier(self) -> None:
        """Wait for every rank (a no-op alone)."""
        if self.active:
            dist.barrier()


SINGLE_PROCESS = DataParallel(rank=0, world_size=1, local_rank=0)


@contextmanager
def joined_process_group(
    device: str = "cpu", timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT
) -> Iterator[DataParallel]:
    """Join torchrun's process group for the duration of a job (NCCL for CUDA, gloo for CPU), then leave it.

    Outside torchrun, or with one process, nothing is initialised and :data:`SINGLE_PROCESS` is yielded.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield SINGLE_PROCESS
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA devices; start at most "
                "one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    elif torch.device(device).type != "cpu":
        raise ValueError(f"data-parallel training runs on 'cpu' (gloo) or 'cuda' (NCCL); got device {device!r}")
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if on_cuda else "gloo", timeout=timeout)
    try:
        yield DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    finally:
        if owns_group:
            dist.destroy_process_group()
