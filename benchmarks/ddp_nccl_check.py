"""Data-parallel training over NCCL on one GPU: DataParallelSAETrainer in a one-process NCCL group (every collective,
the scaling estimate's included, goes through NCCL) against SAELens's SAETrainer on the same batches, float64.

Run from the repository root on a CUDA machine: ``python benchmarks/ddp_nccl_check.py``; prints each tensor's largest
difference (expect ~1e-15) and "OK". tests/test_data_parallel.py checks the same over gloo with two processes.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sae_lens.training.sae_trainer import SAETrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import data_parallel_worker as w

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE
from sae_lens_hierarchical.distributed import DataParallelSAETrainer
from sae_lens_hierarchical.presets import tiny_runner_config

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.cuda.set_device(0)
dist.init_process_group("nccl")
states = []
for cls in (SAETrainer, DataParallelSAETrainer):
    cfg = tiny_runner_config(
        None,
        training_tokens=w.STEPS * w.GLOBAL_BATCH,
        d_sae=w.D_SAE,
        k=w.K,
        hierarchy_levels=w.LEVELS,
        train_batch_size_tokens=w.GLOBAL_BATCH,
        dead_feature_window=3,
        feature_sampling_window=4,
        n_batches_for_norm_estimate=w.NORM_BATCHES,
        lr=3e-2,
        device="cuda",
    )
    sae_cfg = cfg.sae.__class__.from_dict(
        {
            **cfg.get_training_sae_cfg_dict(),
            "d_in": w.D_IN,
            "dtype": "float64",
            "device": "cuda",
            "b_dec_init": "mean",
            "normalize_activations": "expected_average_only_in",
        }
    )
    torch.manual_seed(0)
    sae = HierarchicalTopKTrainingSAE(sae_cfg)
    trainer = cls(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=(b.cuda() for b in w.global_batches()))
    trainer.fit()
    states.append(
        {k: v.detach().cpu() for k, v in sae.state_dict().items()}
        | {"dead": trainer.n_forward_passes_since_fired.cpu()}
    )
differences = {name: float((states[0][name].double() - states[1][name].double()).abs().max()) for name in states[0]}
for name, difference in differences.items():
    print(name, difference)
if max(differences.values()) > 1e-10:  # float64: only the order of sums may differ
    raise SystemExit(f"data-parallel training over NCCL differs from SAETrainer: {differences}")
print("backend", dist.get_backend(), "OK")
dist.destroy_process_group()
