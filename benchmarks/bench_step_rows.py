"""The rows of ``benchmarks/bench_step.py``: the training steps it times, built alike so that they compare.

Rows (``--implementations``, default all of them):

- ``topk``, SAELens TopK: the body of SAELens's ``SAETrainer._train_step``: ``training_forward_pass`` (with AuxK),
  the firing statistics computed from ``feature_acts`` (dense; sparse COO from HTopK's sparse step, which the
  trainer reads the same way), ``backward``, gradient clipping to norm 1.0, ``Adam.step`` and ``zero_grad``.
- ``sparsify``, sparsify's TopK (``eai-sparsify``, the ``[bench]`` extra; skipped with a note where it is not
  installed): the step of its ``Trainer``: ``set_decoder_norm_to_unit_norm``, the ``SparseCoder`` forward with the
  dead mask, loss ``fvu + auxk_alpha * auxk_loss`` with ``auxk_alpha = 1/32`` (its suggested value), ``backward``,
  ``remove_gradient_parallel_to_decoder_directions``, ``Adam.step``, ``zero_grad`` and its firing statistics from
  ``latent_indices``; no gradient clipping, as in its trainer. On CPU ``SPARSIFY_DISABLE_TRITON=1`` is set before it
  is imported, so that it uses its eager decoder (it would pick its Triton one, which needs a GPU). On CUDA its
  forward runs under bf16 autocast, as sparsify writes it; the other rows run in fp32.
  Its encoder is an autograd function (``FusedEncoder``) whose backward uses only the gradient of the K selected
  activations and ignores that of ``pre_acts``: its AuxK loss, computed from ``pre_acts``, trains the decoder only,
  never the encoder. SAELens's AuxK gradient and ours reach the encoder too, so sparsify's step does less AuxK work.
- ``sparsify_clipped``: the same with gradient clipping to norm 1.0 before Adam, like the SAELens rows.
- ``htopk_reference``, ``htopk_fused``: the SAELens step above with ``HierarchicalTopKTrainingSAE``, the reference
  and the fused (torch) hierarchical loss, with ``use_sparse_activations=True`` as this package's presets and jobs
  train (``feature_acts`` as a sparse COO tensor).
- ``htopk_fused_dense``: the same with the config's default, dense ``feature_acts`` (what a SAELens runner config
  written by hand gives, for code that reads them as SAELens's TopK returns them).
- ``htopk_triton`` (CUDA only): the same fused algorithm as Triton kernels (``loss_implementation="triton"``, what the
  default ``"auto"`` picks on GPU).
- ``floor``: one dense encoder matmul ``x @ W_enc`` for the batch (``[tokens, d_in] @ [d_in, d_sae]``, no grad):
  the work every TopK-family step must do; ``floor_linear``: the same as ``F.linear(x, W)`` with ``W``
  ``[d_sae, d_in]`` (an ``nn.Linear`` encoder's layout).

All rows get the same seed, batch, Adam learning rate (3e-4) and dead latents: the first ``--dead-fraction`` of them
(default 0.1), held fixed so that AuxK runs every step.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig

IMPLEMENTATIONS = (
    "topk",
    "sparsify",
    "sparsify_clipped",
    "htopk_reference",
    "htopk_fused",
    "htopk_fused_dense",
    "htopk_triton",
    "floor",
    "floor_linear",
)
CUDA_ONLY = ("htopk_triton",)
LABELS = {
    "topk": "SAELens TopK",
    "sparsify": "sparsify TopK",
    "sparsify_clipped": "sparsify TopK, clipped",
    "htopk_reference": "HTopK reference",
    "htopk_fused": "HTopK fused",
    "htopk_fused_dense": "HTopK fused, dense acts",
    "htopk_triton": "HTopK triton",
    "floor": "floor (x @ W_enc)",
    "floor_linear": "floor F.linear(x, W)",
}
PRECISIONS = ("fp32", "tf32", "bf16")
SPARSIFY_AUXK_ALPHA = 1 / 32  # sparsify's suggested auxk_alpha (its TrainConfig default is 0: no AuxK)
LEARNING_RATE = 3e-4


def implementations(device: str) -> tuple[str, ...]:
    """All the rows that run on ``device``: the Triton kernels run on CUDA only."""
    return tuple(name for name in IMPLEMENTATIONS if device == "cuda" or name not in CUDA_ONLY)


def import_sparsify(device: str) -> ModuleType:
    """sparsify, imported on first use; on CPU with its Triton decoder switched off (that one needs a GPU)."""
    if device == "cpu":
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    with contextlib.redirect_stdout(sys.stderr):  # it prints which decoder it picked
        import sparsify
    return sparsify


@dataclass(frozen=True)
class Sizes:
    """A run's shapes: the SAE's input and dictionary widths, the batch's tokens, and the budgets K timed."""

    d_in: int
    d_sae: int
    tokens: int
    ks: tuple[int, ...]


SIZES = {  # by (device, --quick)
    ("cpu", False): Sizes(d_in=640, d_sae=8192, tokens=2048, ks=(16, 32, 64, 128)),
    ("cpu", True): Sizes(d_in=64, d_sae=1024, tokens=256, ks=(8, 16, 32)),
    ("cuda", False): Sizes(d_in=2304, d_sae=65536, tokens=4096, ks=(32, 64, 128)),
    ("cuda", True): Sizes(d_in=256, d_sae=4096, tokens=512, ks=(8, 16, 32)),
}


def build_sae(implementation: str, sizes: Sizes, k: int, device: str) -> TrainingSAE:
    """A freshly initialised SAELens training SAE; every implementation gets the same seed and SAELens TopK defaults.

    HTopK rows use ``use_sparse_activations=True``, as this package's presets and jobs do (``feature_acts`` as a sparse
    COO tensor, which SAELens's trainer reads without a dense ``[tokens, d_sae]`` pass), except ``htopk_fused_dense``:
    the config's default, dense ``feature_acts`` as SAELens's TopK returns them.
    """
    torch.manual_seed(0)
    common = {"d_in": sizes.d_in, "d_sae": sizes.d_sae, "k": k, "device": device}
    if implementation == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    dense = implementation.endswith("_dense")
    loss_implementation = implementation.removeprefix("htopk_").removesuffix("_dense")
    return HierarchicalTopKTrainingSAE(
        HierarchicalTopKTrainingSAEConfig(
            **common, loss_implementation=loss_implementation, use_sparse_activations=not dense
        )
    )


def precision_context(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """What the SAE step's forward runs under: bf16 autocast as SAELens's runner applies it (``autocast=True``), or
    nothing (fp32 and tf32 differ in the global matmul precision, set once by :func:`set_precision`)."""
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_precision(precision: str) -> None:
    """TF32 matmuls (and convolutions) for ``tf32``; full fp32 otherwise, whatever torch's default was."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


class Step:
    """One training step on a fixed batch ``[tokens, d_in]``, with the dead-latent mask all rows share."""

    optimizer: torch.optim.Optimizer | None = None

    precision = "fp32"

    def __init__(self, sizes: Sizes, device: str, dead_fraction: float):
        generator = torch.Generator().manual_seed(1)
        self.batch = torch.randn(sizes.tokens, sizes.d_in, generator=generator).to(device)
        n_dead = round(dead_fraction * sizes.d_sae)
        self.dead = (torch.arange(sizes.d_sae) < n_dead).to(device) if n_dead else None
        self.device = device

    def step(self) -> None:
        raise NotImplementedError

    def __call__(self) -> None:
        self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()

    def state_tensors(self) -> list[torch.Tensor]:
        """What stays live between steps: batch, dead mask, and parameters and Adam state where there is one."""
        tensors = [self.batch] if self.dead is None else [self.batch, self.dead]
        if self.optimizer is not None:
            tensors += [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
            tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return tensors

    def resident_bytes(self) -> int:
        """Bytes live between steps (gradients are freed by ``zero_grad``)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    def create_optimizer_state(self) -> None:
        """Adam's state, made by one update with zero gradients (a no-op on the parameters)."""
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = torch.zeros_like(parameter)
        self.optimizer.step()
        self.optimizer.zero_grad()


class SAELensStep(Step):
    """SAELens's ``_train_step`` body, with Adam as SAELens builds it."""

    def __init__(self, implementation: str, sizes: Sizes, k: int, device: str, dead_fraction: float):
        super().__init__(sizes, device, dead_fraction)
        self.sae = build_sae(implementation, sizes, k, device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(sizes.d_sae, device=device)
        self.act_freq = torch.zeros(sizes.d_sae, device=device)

    def step(self) -> None:
        with precision_context(self.device, self.precision):  # SAELens's trainer: the forward pass only
            output = self.sae.training_forward_pass(
                TrainStepInput(
                    sae_in=self.batch,
                    coefficients={},
                    dead_neuron_mask=self.dead,
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
        with torch.no_grad():  # SAELens's _train_step statistics, from dense or sparse COO feature_acts
            firing = output.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            self.since_fired += 1
            self.since_fired[did_fire] = 0
            self.act_freq += firing.sum(0)
        del firing, did_fire
        output.loss.backward()
        del output
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def state_tensors(self) -> list[torch.Tensor]:
        return [*super().state_tensors(), self.since_fired, self.act_freq]


class SparsifyStep(Step):
    """sparsify's ``Trainer`` step for one autoencoding ``SparseCoder`` (loss "fvu", one micro-batch), Adam; with
    ``clip``, gradient clipping to norm 1.0 before Adam as in the SAELens rows (its trainer does not clip)."""

    def __init__(self, sizes: Sizes, k: int, device: str, dead_fraction: float, clip: bool = False):
        super().__init__(sizes, device, dead_fraction)
        self.clip = clip
        sparsify = import_sparsify(device)
        torch.manual_seed(0)
        config = sparsify.SparseCoderConfig(num_latents=sizes.d_sae, k=k)
        self.sae = sparsify.SparseCoder(sizes.d_in, config, device=device, dtype=torch.float32)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(sizes.d_sae, device=device, dtype=torch.long)
        self.did_fire = torch.zeros(sizes.d_sae, device=device, dtype=torch.bool)

    def step(self) -> None:
        self.sae.set_decoder_norm_to_unit_norm()
        output = self.sae(self.batch, dead_mask=self.dead)
        self.did_fire[output.latent_indices.flatten()] = True
        loss = output.fvu + SPARSIFY_AUXK_ALPHA * output.auxk_loss
        loss.backward()
        del output, loss
        self.sae.remove_gradient_parallel_to_decoder_directions()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():  # its dead-latent bookkeeping: tokens since each latent last fired
            self.since_fired += self.batch.shape[0]
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        return [*super().state_tensors(), self.since_fired, self.did_fire]


class FloorStep(Step):
    """One dense encoder matmul for the batch, without gradients: ``x @ W_enc`` with ``W_enc`` ``[d_in, d_sae]``, or
    with ``linear`` ``F.linear(x, W)`` with ``W`` ``[d_sae, d_in]`` (an ``nn.Linear`` encoder's layout)."""

    def __init__(self, sizes: Sizes, device: str, linear: bool = False):
        super().__init__(sizes, device, dead_fraction=0.0)
        torch.manual_seed(0)
        self.linear = linear
        shape = (sizes.d_sae, sizes.d_in) if linear else (sizes.d_in, sizes.d_sae)
        self.W_enc = torch.randn(*shape, device=device) / sizes.d_in**0.5

    def step(self) -> None:
        with torch.no_grad(), precision_context(self.device, self.precision):
            if self.linear:
                torch.nn.functional.linear(self.batch, self.W_enc)
            else:
                torch.mm(self.batch, self.W_enc)

    def state_tensors(self) -> list[torch.Tensor]:
        return [*super().state_tensors(), self.W_enc]


def make_step(
    implementation: str, sizes: Sizes, k: int, device: str, dead_fraction: float, precision: str = "fp32"
) -> Step:
    """The step of the row named ``implementation`` at budget ``k``, in ``precision``."""
    step: Step
    if implementation.startswith("sparsify"):
        step = SparsifyStep(sizes, k, device, dead_fraction, clip=implementation == "sparsify_clipped")
    elif implementation.startswith("floor"):
        step = FloorStep(sizes, device, linear=implementation == "floor_linear")
    else:
        step = SAELensStep(implementation, sizes, k, device, dead_fraction)
    step.precision = precision
    return step
