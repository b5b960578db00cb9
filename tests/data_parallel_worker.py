"""A few SAELens training steps of one HierarchicalTopK SAE on fixed global batches, alone or as one torchrun rank.

``python tests/data_parallel_worker.py OUT`` trains on every global batch of B tokens with SAELens's own
``SAETrainer``; ``torchrun --nproc-per-node N tests/data_parallel_worker.py OUT`` trains with
:class:`DataParallelSAETrainer`, rank r taking rows r*B/N..(r+1)*B/N of each batch. Each process writes its final
weights and trainer statistics to ``OUT/rank<r>.pt``; tests/test_data_parallel.py compares them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE
from sae_lens_hierarchical.distributed import DataParallelSAETrainer, joined_process_group
from sae_lens_hierarchical.presets import tiny_runner_config

D_IN, D_SAE, K, LEVELS = 16, 64, 8, [1, 2, 4, 8]
GLOBAL_BATCH, STEPS, NORM_BATCHES = 32, 12, 2


def global_batches() -> Iterator[torch.Tensor]:
    """The norm-estimate batches, then the training batches: one fixed sequence, whatever the number of ranks.

    A few directions with a large shared offset: ``b_dec_init="mean"`` matters, and with a 3-step dead window most
    of the 64 latents die early, so AuxK works on dead latents in later steps.
    """
    generator = torch.Generator().manual_seed(1234)
    directions = torch.randn(6, D_IN, generator=generator, dtype=torch.float64)
    offset = 3.0 * torch.randn(D_IN, generator=generator, dtype=torch.float64)
    for _ in range(NORM_BATCHES + STEPS + 1):
        codes = torch.rand(GLOBAL_BATCH, 6, generator=generator, dtype=torch.float64) ** 3
        noise = 0.05 * torch.randn(GLOBAL_BATCH, D_IN, generator=generator, dtype=torch.float64)
        yield offset + codes @ directions + noise


def main(out: Path) -> None:
    with joined_process_group("cpu") as parallel:
        rows = slice(
            parallel.rank * GLOBAL_BATCH // parallel.world_size,
            (parallel.rank + 1) * GLOBAL_BATCH // parallel.world_size,
        )
        local_batch = GLOBAL_BATCH // parallel.world_size
        cfg = tiny_runner_config(
            None,
            training_tokens=STEPS * local_batch,
            d_sae=D_SAE,
            k=K,
            hierarchy_levels=LEVELS,
            train_batch_size_tokens=local_batch,
            dead_feature_window=3,
            feature_sampling_window=4,
            n_batches_for_norm_estimate=NORM_BATCHES,
            lr=3e-2,
        )
        sae_cfg = cfg.sae.__class__.from_dict(
            {
                **cfg.get_training_sae_cfg_dict(),
                "d_in": D_IN,
                "dtype": "float64",
                "b_dec_init": "mean",
                "normalize_activations": "expected_average_only_in",
            }
        )
        torch.manual_seed(0 if parallel.rank == 0 else 99)  # DDP must hand every rank rank 0's initial weights
        sae = HierarchicalTopKTrainingSAE(sae_cfg)
        trainer_class = DataParallelSAETrainer if parallel.active else SAETrainer
        batches = (batch[rows] for batch in global_batches())
        trainer = trainer_class(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=batches)
        aux_losses: list[float] = []
        step = trainer._train_step

        def recording_step(sae: HierarchicalTopKTrainingSAE, sae_in: torch.Tensor):  # type: ignore[no-untyped-def]
            output = step(sae, sae_in)
            aux_losses.append(float(output.losses["auxiliary_reconstruction_loss"].detach()))
            return output

        trainer._train_step = recording_step  # type: ignore[method-assign]
        trainer.fit()
        state = {name: value.detach().clone() for name, value in sae.state_dict().items()}
        state |= {
            "act_freq_scores": trainer.act_freq_scores,
            "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired,
            "n_frac_active_samples": torch.tensor(trainer.n_frac_active_samples),
            "aux_losses": torch.tensor(aux_losses),
            "world_size": torch.tensor(parallel.world_size),
        }
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / f"rank{parallel.rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(Path(sys.argv[1]))
