"""Data-parallel training on torch.distributed: ``torchrun --nproc-per-node N -m sae_lens_hierarchical train ...``.

``process_group`` reads torchrun's environment (rank, device, the rank's share of corpus and batch); ``trainer`` is
SAELens's trainer with gradients averaged by DDP and every rank-dependent statistic reduced across ranks.
"""

from sae_lens_hierarchical.distributed.process_group import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    SINGLE_PROCESS,
    DataParallel,
    joined_process_group,
)
from sae_lens_hierarchical.distributed.trainer import (
    DataParallelActivationScaler,
    DataParallelSAETrainer,
    data_parallel_trainers,
)

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT",
    "SINGLE_PROCESS",
    "DataParallel",
    "DataParallelActivationScaler",
    "DataParallelSAETrainer",
    "data_parallel_trainers",
    "joined_process_group",
]
