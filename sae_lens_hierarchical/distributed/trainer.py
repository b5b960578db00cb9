"""SAELens's trainer, data-parallel: one SAE replica per rank, trained as one process would train it on the whole batch.

What one process does on a batch of B tokens, N ranks do on B/N tokens each:

- gradients are averaged by torch's ``DistributedDataParallel`` (each rank's loss is a mean over its tokens, so the
  average of N such gradients is the gradient of the mean over all B; clipping then sees the same global gradient);
- the firing statistics behind dead latents (AuxK's mask, the sparsity logs, the saved L0) count every rank's tokens;
- ``b_dec_init="mean"`` takes the mean over the whole first batch, and the activation-scaling estimate the mean norm
  over every rank's estimation batches;
- checkpoints are written by rank 0 only (SAELens's trainer would have every rank write the same files).

SAELens's runners build ``SAETrainer`` themselves; :func:`data_parallel_trainers` has them build this one instead
while a job runs under torchrun.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import llm_sae_training_runner
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training import multi_sae_trainer
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens.training.types import DataProvider
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class DataParallelActivationScaler(ActivationScaler):
    """SAELens's activation scaler with the norm estimate averaged over ranks (each reads equal-sized batches, so the
    mean of the ranks' mean norms is the mean norm over all of them), so every replica scales alike."""

    def _calculate_mean_norm(self, data_provider: DataProvider, n_batches_for_norm_estimate: int = int(1e3)) -> float:
        local = super()._calculate_mean_norm(data_provider, n_batches_for_norm_estimate)
        return _sum_over_ranks(torch.tensor([local], dtype=torch.float64)).item() / dist.get_world_size()

    def estimate_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "normalize_activations='covariance_whitening' is not supported with data-parallel training (its covariance "
            "is not reduced across ranks); use 'expected_average_only_in' or 'none', or train in one process"
        )


class _TrainingStep(nn.Module):
    """The module DDP wraps: its forward is the SAE's training step, so DDP averages that step's gradients."""

    def __init__(self, sae: TrainingSAE[Any]) -> None:
        super().__init__()
        self.sae = sae
        self.step: Any = None  # the SAE's own training_forward_pass (or SAELens's compiled one), set each step

    def forward(self, step_input: Any) -> Any:
        return self.step(step_input=step_input)


class DataParallelSAETrainer(SAETrainer):  # type: ignore[type-arg]
    """:class:`SAETrainer` for one rank of a torchrun job (see the module docstring); same arguments.

    The replicas start from rank 0's weights (DDP broadcasts them), and stay identical: every rank applies the same
    averaged gradients, and every rank-dependent statistic is reduced before it is used.
    """

    def __init__(self, cfg: Any, sae: Any, data_provider: DataProvider, *args: Any, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallelSAETrainer needs torch.distributed's process group (run under torchrun)")
        super().__init__(cfg, sae, data_provider, *args, **kwargs)
        self.activation_scaler = DataParallelActivationScaler()
        self.sae.to(cfg.device)
        device = torch.device(cfg.device)
        self._step_module = _TrainingStep(self.sae)
        self._ddp = DistributedDataParallel(self._step_module, device_ids=[device] if device.type == "cuda" else None)

    def _train_step(self, sae: Any, sae_in: torch.Tensor) -> Any:
        self._initialise_b_dec_with_global_mean(sae, sae_in)
        before = (self.act_freq_scores.clone(), self.n_frac_active_samples)
        self._step_module.step = sae.training_forward_pass
        own_step = sae.__dict__.get("training_forward_pass")  # SAELens's compile_sae sets one on the instance
        sae.training_forward_pass = self._ddp.__call__  # SAELens's step calls this: the forward DDP reduces
        try:
            output = super()._train_step(sae, sae_in)
        finally:
            if own_step is None:
                del sae.training_forward_pass
            else:
                sae.training_forward_pass = own_step
        self._reduce_firing_statistics(*before)
        return output

    def _initialise_b_dec_with_global_mean(self, sae: Any, sae_in: torch.Tensor) -> None:
        """``b_dec_init="mean"``: the mean over every rank's first batch, set before the SAE would take its own."""
        if not getattr(sae, "b_dec_pending_mean_init", False):
            return
        rows = sae_in.reshape(-1, sae_in.shape[-1])
        sums = torch.cat([rows.sum(dim=0, dtype=torch.float64), rows.new_tensor([rows.shape[0]], dtype=torch.float64)])
        sums = _sum_over_ranks(sums)
        with torch.no_grad():
            sae.b_dec.copy_((sums[:-1] / sums[-1]).to(sae.b_dec.dtype))
        sae.b_dec_pending_mean_init = False

    @torch.no_grad()
    def _reduce_firing_statistics(self, act_freq_before: torch.Tensor, n_samples_before: int) -> None:
        """Make this step's firing statistics those of the whole batch: a latent fired if it fired on any rank.

        Before the step every rank held the same counters; SAELens's step zeroed ``n_forward_passes_since_fired`` for
        the latents that fired on this rank's tokens and added this rank's firing counts to ``act_freq_scores``.
        """
        fired_here = (self.n_forward_passes_since_fired == 0).to(self.act_freq_scores.dtype)
        counts = _sum_over_ranks(torch.stack([fired_here, self.act_freq_scores - act_freq_before]))
        self.n_forward_passes_since_fired[counts[0] > 0] = 0
        self.act_freq_scores = act_freq_before + counts[1]
        local_samples = self.n_frac_active_samples - n_samples_before
        self.n_frac_active_samples = n_samples_before + local_samples * dist.get_world_size()

    def save_checkpoint(self, checkpoint_name: str, base_path: Path | str | None = None, **kwargs: Any) -> None:
        """SAELens's checkpoint, written by rank 0 only (the replicas are identical); the others wait for it."""
        if dist.get_rank() == 0:
            super().save_checkpoint(checkpoint_name, base_path=base_path, **kwargs)
        dist.barrier()


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, on ``tensor``'s device; NCCL reduces GPU tensors only, so a CPU statistic (the
    scaling estimate) travels through this rank's GPU there."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.to(tensor.device)


@contextmanager
def data_parallel_trainers() -> Iterator[None]:
    """While a job runs under a multi-process torchrun, SAELens's runners build :class:`DataParallelSAETrainer`.

    ``LanguageModelSAETrainingRunner.run`` and ``MultiSAETrainer`` create their ``SAETrainer`` by that module-level
    name; this swaps the name in both modules and puts it back afterwards. Alone, it changes nothing.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    modules = (llm_sae_training_runner, multi_sae_trainer)
    saved = [module.SAETrainer for module in modules]
    for module in modules:
        module.SAETrainer = DataParallelSAETrainer  # type: ignore[attr-defined,misc]
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.SAETrainer = original  # type: ignore[attr-defined,misc]
