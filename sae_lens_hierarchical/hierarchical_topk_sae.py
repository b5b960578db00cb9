"""HierarchicalTopK SAE (Balagansky et al., EMNLP 2025): one TopK SAE that serves every budget k <= K.

A TopK SAE keeps the K largest pre-activations per token. HierarchicalTopK trains it so that the
*prefixes* of that ranking are good reconstructions too: the loss averages the reconstruction error of
the top-1, top-2, ..., top-K latents (or of a chosen subset of budgets, the "levels"). At inference the
same weights can then be run at any k <= K: the latents active at budget k are exactly the first k of
the top-K ranking, so smaller budgets are nested inside larger ones.

This module follows SAELens's one-file-per-architecture layout: the inference config and SAE, and the training config
and SAE with its training step. The budget API both SAEs share (k, threshold, views) and the nested top-K activation
are in :mod:`sae_lens_hierarchical.serving`, their exports as SAELens TopK / JumpReLU SAEs in
:mod:`sae_lens_hierarchical.exports`, the loss math in :mod:`sae_lens_hierarchical.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from torch import nn
from typing_extensions import override

from sae_lens_hierarchical._files import save_files_atomically
from sae_lens_hierarchical.budget import Budget, is_int
from sae_lens_hierarchical.conversion import from_sae as convert_sae
from sae_lens_hierarchical.exports import ExportMethods
from sae_lens_hierarchical.losses import (
    HIERARCHICAL_LOSSES,
    auto_uses_triton,
)
from sae_lens_hierarchical.objectives import resolve_level_weights, resolve_levels
from sae_lens_hierarchical.serving import (
    ARCHITECTURE,
    NestedTopK,
    VariableKMixin,
    check_weights_finite,
    has_hooks,
    raise_non_finite,
)
from sae_lens_hierarchical.sparse_training import (
    PreActivationsAt,
    auxk_loss_on_dead_columns,
    dead_latent_indices,
    encoder_product,
    sparse_activations,
)

# Budgets whose MSE is logged every step, as fractions of K (the nearest level at or above is used).
_LOGGED_BUDGET_FRACTIONS = (0.0, 0.25, 0.5, 1.0)
# SAELens normalisations applied inside the SAE; prefix reconstructions would need un-normalising
# one by one, which the hierarchical loss does not do (SAELens's TopK AuxK loss rejects them too).
_UNSUPPORTED_TRAINING_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")
_B_DEC_INITS = ("zeros", "mean")
# The level-weight schedule rides on SAELens's coefficient schedulers (linear warm-up 0 -> 1, saved with checkpoints).
SCHEDULE_COEFFICIENT = "hierarchy_schedule"
_SCHEDULE_STAGES = 64
# Level draws (``hierarchy_sampled_levels``) come from a generator seeded with this plus the step number.
_LEVEL_SAMPLING_SEED = 20_250_524


# ``k`` has no usable default in our configs: SAELens's TopK defaults to k=100, which would silently give a saved SAE
# whose cfg.json lost its ``k`` the wrong largest budget. K must always be given.


def _validate_max_k(k: object, d_sae: int) -> None:
    if k is None:
        raise ValueError(
            f"k (K, the largest budget the SAE was trained for) must be given, as an int in 1..d_sae={d_sae}; a saved "
            "cfg.json must contain it (SAELens's TopK default k=100 is deliberately not used)"
        )
    if not is_int(k) or not 1 <= k <= d_sae:  # type: ignore[operator]
        raise ValueError(f"k (K, the largest budget) must be an int in 1..d_sae={d_sae}; got k={k!r}")


@dataclass
class HierarchicalTopKSAEConfig(TopKSAEConfig):
    """Configuration for inference with a HierarchicalTopK SAE.

    Args:
        k (int): K, the largest budget the SAE was trained for, and the default inference budget. Any
            budget 1..K can be chosen at run time with ``sae.set_k`` / ``sae.use_k`` / ``encode(x, k=)``.
            Same meaning as SAELens TopK's ``k``.
        rescale_acts_by_decoder_norm (bool): Rank latents by ``pre-activation * ||W_dec row||`` and decode
            with unit-norm rows. Saved SAEs have the norms folded in, so this is a no-op on them.
        d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations,
            metadata: inherited from SAELens's ``SAEConfig``.
    """

    k: int = None  # type: ignore[assignment]  # required; see _validate_max_k

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_max_k(self.k, self.d_sae)

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class HierarchicalTopKSAE(VariableKMixin[HierarchicalTopKSAEConfig], ExportMethods, TopKSAE):
    """Inference HierarchicalTopK SAE: a TopK SAE whose budget k can be chosen at run time.

    ``encode`` returns dense ``[..., d_sae]`` activations with (at most) k non-zeros per token, the first
    k of the sorted top-K; ``decode`` of them is the level-k prefix reconstruction. Works unchanged inside
    ``HookedSAETransformer`` (``with sae.use_k(8): model.run_with_saes(...)``).
    """

    cfg: HierarchicalTopKSAEConfig  # type: ignore[assignment]
    activation_fn: NestedTopK


@dataclass
class HierarchicalTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """Configuration for training a HierarchicalTopK SAE.

    Args:
        k (int): K, the largest budget trained (same meaning as SAELens TopK's ``k``); required, no default.
        hierarchy_levels (list[int] | None): J, the budgets whose reconstruction errors are summed, strictly
            increasing in 1..K and ending at K. ``None`` (default) means every budget 1..K, as in the paper.
            ``[K]`` alone is exactly SAELens's TopK loss.
        hierarchy_weights (list[float] | None): one weight >= 0 per level, used as given. ``None`` (default)
            means uniform 1/|J|, which keeps the loss on the scale of a single-level MSE. Multi-TopK
            (Gao et al. 2024, L(k) + L(4k)/8) is ``k=4*k0, hierarchy_levels=[k0, 4*k0],
            hierarchy_weights=[1.0, 0.125]``.
        hierarchy_final_weights (list[float] | None): optional weights (one per level, rules as above) that the
            level weights move to, linearly, over ``hierarchy_schedule_steps`` training steps, then keep (for example
            from uniform towards more weight on K). Driven by SAELens's coefficient scheduler
            (``get_coefficients()["hierarchy_schedule"]``, 0 -> 1), so it resumes with the trainer's checkpoints; a
            step given no such coefficient uses the final weights.
        hierarchy_schedule_steps (int): length of that schedule in training steps (>= 1 with final weights, else 0).
        hierarchy_sampled_levels (int): 0 (default) uses every level at every step. n >= 1 draws, at each step, n
            levels of J below K at random (uniform, without replacement) and always K, weighted equally (1/(n + 1)
            each), Matryoshka-style: K gets 1/(n + 1) of every step. The draw depends only on the step number, so a
            resumed run draws what the uninterrupted one did. Needs the default weights (no hierarchy_weights or
            schedule); n must be below the number of levels.
        served_k (int | None): the largest budget the SAE is meant to serve, when it is trained at a larger K
            (recorded in the saved metadata; reports serve budgets up to it). The ``train-at-2K`` recipe trains at
            K = 2 * served_k: the capacity spent on budgets above served_k removes the price a HierarchicalTopK SAE
            otherwise pays at its largest budget (docs/quality.md). None (default): K.
        aux_loss_coefficient (float): weight of TopK's AuxK dead-latent loss, computed on the full top-K
            reconstruction exactly as in SAELens.
        rescale_acts_by_decoder_norm (bool): rank by ``pre-activation * ||W_dec row||`` and decode with
            unit-norm rows (SAELens TopK default: True). Norms are folded into the weights on save.
        loss_implementation (str): how the hierarchical loss is computed; the value is the same either way.
            ``"auto"`` (default) is ``"triton"`` for CUDA tensors when triton is installed (not float64), else
            ``"fused"``. ``"fused"`` walks the ranks in chunks inside a custom autograd function in torch, so memory
            stays flat in K; ``"triton"`` runs the same algorithm as one Triton kernel per pass (CUDA only, needs
            the ``gpu`` extra); ``"reference"`` is plain autograd over every prefix reconstruction
            (``[tokens, K, d_in]`` tensors), kept as the readable definition and for cross-checking. ``"auto"`` and
            ``"triton"`` also let the sparse encoder backward use its Triton kernel on CUDA.
        use_sparse_activations (bool): the form of ``feature_acts`` in the training step's output, as for SAELens's
            TopK: dense ``[tokens, d_sae]`` (default), or a sparse COO tensor (what this package's jobs use: SAELens's
            trainer reads it without a dense ``[tokens, d_sae]`` pass). The loss decodes sparsely either way.
        b_dec_init (str): ``"zeros"`` (default, as SAELens) or ``"mean"``: set ``b_dec`` to the mean of the
            first training batch (after SAELens's activation scaling) before the first step. Residual streams
            have a large mean; starting from zero, one latent spends the top rank of every token on it, which
            costs a HierarchicalTopK SAE most at small k.
        decoder_init_norm, d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
            reshape_activations, metadata: inherited from SAELens's ``TrainingSAEConfig``. The
            in-SAE normalisations ``layer_norm`` and ``constant_norm_rescale`` are not supported.
    """

    k: int = None  # type: ignore[assignment]  # required; see _validate_max_k
    hierarchy_levels: list[int] | None = None
    hierarchy_weights: list[float] | None = None
    hierarchy_final_weights: list[float] | None = None
    hierarchy_schedule_steps: int = 0
    hierarchy_sampled_levels: int = 0
    served_k: int | None = None
    loss_implementation: str = "auto"
    b_dec_init: str = "zeros"

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_max_k(self.k, self.d_sae)
        if self.loss_implementation not in HIERARCHICAL_LOSSES:
            raise ValueError(
                f"loss_implementation must be one of {sorted(HIERARCHICAL_LOSSES)}; got {self.loss_implementation!r}"
            )
        if self.hierarchy_levels is not None:
            self.hierarchy_levels = resolve_levels(self.k, self.hierarchy_levels)
        if self.hierarchy_weights is not None:
            self.hierarchy_weights = resolve_level_weights(self.levels, self.hierarchy_weights)
        self._validate_schedule()
        self._validate_sampling()
        if self.served_k is not None and (not is_int(self.served_k) or not 1 <= self.served_k <= self.k):
            raise ValueError(f"served_k must be None or an int in 1..K={self.k}; got {self.served_k!r}")
        if self.b_dec_init not in _B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {list(_B_DEC_INITS)}; got {self.b_dec_init!r}")
        if str(self.dtype).removeprefix("torch.") == "float16":
            raise ValueError(
                "dtype='float16' SAE weights cannot train: Adam's eps (1e-8) is 0 in float16, so the first update "
                "divides by zero and every weight becomes NaN (SAELens's TopK as well). Use dtype='bfloat16', or "
                "float32 with autocast=True (SAELens's runner) for half-precision speed; allowed: float32, float64, "
                "bfloat16"
            )
        if self.normalize_activations in _UNSUPPORTED_TRAINING_NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported for training "
                "hierarchical_topk; use 'none', 'expected_average_only_in' or 'covariance_whitening'"
            )
        # Keep the metadata copy in sync with the validated (normalised) fields.
        self.add_training_info_to_metadata()

    @property
    def levels(self) -> list[int]:
        """The budgets J actually used by the loss."""
        return resolve_levels(self.k, self.hierarchy_levels)

    @property
    def level_weights(self) -> list[float]:
        """The per-level weights the loss starts from (and keeps, without a schedule)."""
        return resolve_level_weights(self.levels, self.hierarchy_weights)

    def level_weights_at(self, progress: float) -> list[float]:
        """The weights a ``progress`` (0..1) through the schedule: ``level_weights`` moved linearly towards
        ``hierarchy_final_weights``, in steps of 1/64 (each distinct set of weights is a cached loss plan)."""
        if self.hierarchy_final_weights is None:
            return self.level_weights
        t = round(min(max(float(progress), 0.0), 1.0) * _SCHEDULE_STAGES) / _SCHEDULE_STAGES
        final = self.hierarchy_final_weights
        return [(1 - t) * start + t * end for start, end in zip(self.level_weights, final, strict=True)]

    def levels_at(self, progress: float, step: int) -> tuple[list[int], list[float]]:
        """The levels and weights of training step ``step`` at ``progress`` (0..1) through the schedule: every level
        with :meth:`level_weights_at`, or with ``hierarchy_sampled_levels`` the levels drawn for that step."""
        n_sampled = self.hierarchy_sampled_levels
        if not n_sampled:
            return self.levels, self.level_weights_at(progress)
        below_k = self.levels[:-1]
        generator = torch.Generator().manual_seed(_LEVEL_SAMPLING_SEED + step)
        drawn = sorted(torch.randperm(len(below_k), generator=generator)[:n_sampled].tolist())
        levels = [below_k[position] for position in drawn] + [self.k]
        return levels, [1.0 / len(levels)] * len(levels)

    def _validate_sampling(self) -> None:
        n_sampled = self.hierarchy_sampled_levels
        n_below = len(self.levels) - 1
        if not is_int(n_sampled) or not 0 <= n_sampled <= max(0, n_below - 1):
            raise ValueError(
                f"hierarchy_sampled_levels must be an int in 0..{max(0, n_below - 1)} (levels drawn per step below "
                f"K, fewer than the {n_below} there are; 0: all); got {n_sampled!r}"
            )
        if n_sampled and (self.hierarchy_weights is not None or self.hierarchy_final_weights is not None):
            raise ValueError(
                "hierarchy_sampled_levels weighs the drawn levels equally; it cannot be combined with "
                "hierarchy_weights or hierarchy_final_weights (leave those None)"
            )

    def _validate_schedule(self) -> None:
        steps = self.hierarchy_schedule_steps
        if not is_int(steps) or steps < 0:
            raise ValueError(f"hierarchy_schedule_steps must be an int >= 0; got {steps!r}")
        if self.hierarchy_final_weights is None:
            if steps:
                raise ValueError(
                    f"hierarchy_schedule_steps={steps} needs hierarchy_final_weights (the weights to move towards)"
                )
            return
        self.hierarchy_final_weights = resolve_level_weights(self.levels, self.hierarchy_final_weights)
        if steps < 1:
            raise ValueError(
                "hierarchy_final_weights needs hierarchy_schedule_steps >= 1 (training steps over which the weights "
                f"move from hierarchy_weights to them); got {steps}. For fixed weights, set hierarchy_weights instead"
            )

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> HierarchicalTopKTrainingSAEConfig:
        """Build from a saved dict, taking training-only fields from the metadata when absent.

        An inference save keeps ``hierarchy_levels`` etc. only under
        ``metadata.training_architecture_details``; SAELens would otherwise silently use the defaults
        when such an SAE is loaded for fine-tuning.
        """
        metadata = config_dict.get("metadata")
        details = metadata.get("training_architecture_details") if isinstance(metadata, dict) else None
        if details:
            config_dict = {**config_dict}
            for field in fields(cls):
                if field.name not in config_dict and field.name in details:
                    config_dict[field.name] = details[field.name]
        return super().from_dict(config_dict)  # type: ignore[return-value]


class HierarchicalTopKTrainingSAE(VariableKMixin[HierarchicalTopKTrainingSAEConfig], ExportMethods, TopKTrainingSAE):
    """Training HierarchicalTopK SAE: TopK encoder, AuxK dead-latent loss, hierarchical prefix loss.

    ``training_forward_pass`` does one dense ``[tokens, d_sae]`` product, the encoder's, and nothing else that size
    with gradients: the encoder's backward touches the K selected latents of each token, the loss decodes from their K
    decoder rows, AuxK works on the dead latents' columns, and the dense activations SAELens's trainer needs for its
    firing statistics are built without gradients. When a hook watches the SAE's input, pre- or post-activations or
    reconstruction, or a subclass replaces a method that path bypasses, it runs SAELens's dense path instead (see
    :meth:`training_forward_pass`), so instrumentation sees and edits what it would see on SAELens's TopK.
    """

    cfg: HierarchicalTopKTrainingSAEConfig  # type: ignore[assignment]
    activation_fn: NestedTopK
    # ``training_forward_pass`` too: a subclass that extends it (SAELens's way to add a loss on ``hidden_pre``) gets
    # SAELens's outputs, whose ``hidden_pre`` carries gradients; the sparse step's does not.
    _SPARSE_BYPASSED_METHODS = (
        *VariableKMixin._SPARSE_BYPASSED_METHODS,
        "process_sae_in",
        "calculate_aux_loss",
        "calculate_topk_aux_loss",
        "training_forward_pass",
    )

    def __init__(self, cfg: HierarchicalTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.levels = cfg.levels
        self.level_weights = cfg.level_weights
        self._logged_level_positions = _logged_level_positions(self.levels)
        # ``b_dec_init="mean"`` applies to a freshly built SAE only: any weights loaded into it (SAELens's
        # ``load_from_disk`` for fine-tuning, ``load_weights_from_checkpoint`` on resume) are trained and are kept.
        self.b_dec_pending_mean_init = cfg.b_dec_init == "mean"
        self.register_load_state_dict_post_hook(trained_b_dec_loaded)

    @classmethod
    def from_sae(
        cls,
        sae: Any,
        k: int | None = None,
        *,
        calibration_activations: torch.Tensor | None = None,
        l0_percentile: float = 99.0,
        **training_settings: Any,
    ) -> HierarchicalTopKTrainingSAE:
        """A HierarchicalTopK training SAE that equals the pretrained ``sae`` at k = K before any training step, ready
        for a hierarchical fine-tune (:func:`sae_lens_hierarchical.conversion.from_sae` says what each source keeps).

        TopK and HierarchicalTopK sources bring K; a JumpReLU (BatchTopK) source needs ``k``, or
        ``calibration_activations`` ``[tokens, d_in]`` to take K from its L0 there (``l0_percentile``).
        ``training_settings``: further config fields (``hierarchy_levels``, ``normalize_activations``, ...).
        """
        return convert_sae(
            cls,
            sae,
            k,
            calibration_activations=calibration_activations,
            l0_percentile=l0_percentile,
            **training_settings,
        )

    @override
    def get_coefficients(self) -> dict[str, TrainCoefficientConfig | float]:
        """SAELens's coefficients, plus the level-weight schedule's progress when one is configured."""
        coefficients = super().get_coefficients()
        if self.cfg.hierarchy_final_weights is not None:
            coefficients[SCHEDULE_COEFFICIENT] = TrainCoefficientConfig(1.0, self.cfg.hierarchy_schedule_steps)
        return coefficients

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """SAELens's ``save_inference_model``, with each file replaced atomically; a non-finite weight (also one the
        last update made, which no step checked) is refused before anything is written."""
        check_weights_finite(self, "not saved")
        return save_files_atomically(path, super().save_inference_model)

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(x))
        budget = self.budget
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre, budget.k, budget.threshold)), hidden_pre

    @override
    def encode(self, x: torch.Tensor, k: int | None = None, threshold: float | None = None) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` at budget ``k`` and/or ``threshold``, via a subclass's
        ``encode_with_hidden_pre`` if any."""
        if type(self).encode_with_hidden_pre is HierarchicalTopKTrainingSAE.encode_with_hidden_pre:
            return super().encode(x, k, threshold)
        with self._use_budget(self._budget(k, threshold)):
            return self.encode_with_hidden_pre(x)[0]

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One step's losses, exactly SAELens's TopK step when ``hierarchy_levels == [K]``.

        Sparse path (:meth:`_sparse_step`): one dense encoder product without autograd, then only the K selected
        entries per token and the dead latents' columns carry gradients. Instrumented path (a hook on
        ``hook_sae_input``/``hook_sae_acts_pre``/``hook_sae_acts_post``/``hook_sae_recons``, a method the sparse path
        bypasses replaced, or an input that requires grad): the dense activations go through
        ``hook_sae_acts_post`` and every level is decoded by ``self.decode`` from the activations of ranks <= level
        (``hook_sae_recons`` fires once per level, K last), with SAELens's ``mse_loss_fn``. Both give the same loss.
        """
        self._refuse_on_view("train")
        self._check_weights_finite(step_input)
        sae_in = step_input.sae_in
        if not bool(torch.isfinite(sae_in).all()):  # one host sync a step; NaN weights would otherwise be saved
            raise ValueError(
                f"non-finite activations (NaN or inf) at training step {step_input.n_training_steps}, hook "
                f"{self.cfg.metadata.hook_name!r}: activations must be finite; stopping before any weight changes"
            )
        if self.b_dec_pending_mean_init:
            with torch.no_grad():
                self.b_dec.copy_(sae_in.reshape(-1, sae_in.shape[-1]).mean(dim=0))
            self.b_dec_pending_mean_init = False
        progress = step_input.coefficients.get(SCHEDULE_COEFFICIENT, 1.0)
        levels, level_weights = self.cfg.levels_at(progress, step_input.n_training_steps)
        if self._needs_dense_step(sae_in):
            mse_loss, level_mse, sae_out, feature_acts, hidden_pre = self._hierarchical_loss_through_decode(
                sae_in, levels, level_weights
            )
            aux_losses = self.calculate_aux_loss(
                step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=sae_out
            )
            if self.cfg.use_sparse_activations:  # the form SAELens's TopK returns with this flag
                feature_acts = feature_acts.to_sparse()
        else:
            mse_loss, level_mse, sae_out, feature_acts, hidden_pre, aux_loss = self._sparse_step(
                sae_in, step_input.dead_neuron_mask, levels, level_weights
            )
            aux_losses = {"auxiliary_reconstruction_loss": aux_loss}
        losses = {"mse_loss": mse_loss, **aux_losses}
        loss = sum(losses.values(), torch.zeros((), device=sae_in.device))
        if not bool(torch.isfinite(loss)):  # raising before backward keeps the last finite weights
            raise ValueError(
                f"training diverged: non-finite loss ({float(loss.detach())}) at training step "
                f"{step_input.n_training_steps}, "
                f"hook {self.cfg.metadata.hook_name!r}; the weights are still those of the previous step. Lower the "
                "learning rate or check the activations' scale (normalize_activations='expected_average_only_in')"
            )
        logged = [len(levels) - 1] if self.cfg.hierarchy_sampled_levels else self._logged_level_positions  # drawn: K
        metrics: dict[str, Any] = {f"mse_at_k_{levels[position]}": level_mse[position] for position in logged}
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=loss,
            losses=losses,
            metrics=metrics,
        )

    def _check_weights_finite(self, step_input: TrainStepInput) -> None:
        """Stop at the first step whose weights an update made non-finite: on CPU at every step; on an accelerator
        (where reading a flag waits for the device) the flag is kept on the device and read at logging steps, and the
        save refuses what it missed. SAELens's trainer never looks after its last update."""
        flags = torch.stack([torch.isfinite(parameter).all() for parameter in self.parameters()])
        pending = self.__dict__.get("_nonfinite_step")
        if flags.device.type != "cpu" and not step_input.is_logging_step:
            step = torch.full_like(flags[:1], step_input.n_training_steps, dtype=torch.long)
            missing = torch.where(flags.all(), torch.full_like(step, -1), step - 1)
            self.__dict__["_nonfinite_step"] = (
                missing if pending is None else torch.where(pending >= 0, pending, missing)
            )
            return
        if pending is not None and int(pending) >= 0:
            raise_non_finite(self, f"after the update of training step {int(pending)}")
        if not bool(flags.all()):
            raise_non_finite(self, f"after the update of training step {step_input.n_training_steps - 1}")

    def _needs_dense_step(self, sae_in: torch.Tensor) -> bool:
        """Whether SAELens's dense step must run: a hook watches the SAE's activations, a subclass replaced a method the
        sparse step bypasses, or the input itself wants a gradient (attribution through the training SAE)."""
        watched = (self.hook_sae_input, self.hook_sae_acts_pre, self.hook_sae_acts_post, self.hook_sae_recons)
        return any(has_hooks(hook) for hook in watched) or self._overrides_methods() or sae_in.requires_grad

    def _sparse_step(
        self,
        sae_in: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
        levels: list[int],
        level_weights: list[float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, level MSEs, sae_out, feature_acts, hidden_pre, AuxK loss)`` with one dense matmul.

        The encoder runs without autograd; :class:`PreActivationsAt` hands the losses the K selected entries of each
        token and the dead latents' columns, each with a backward over those entries only. ``feature_acts`` and
        ``hidden_pre`` are returned without gradients, for SAELens's firing statistics and logging; ``feature_acts`` is
        dense ``[tokens, d_sae]`` as SAELens's TopK returns it, or with ``use_sparse_activations`` a sparse COO tensor
        (as its TopK then does), which SAELens's trainer reads without filling and scanning a dense tensor.
        """
        decoder_norms = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        with torch.no_grad():
            centered = self.process_sae_in(sae_in)
            raw_hidden_pre = self.hook_sae_acts_pre(encoder_product(centered, self.W_enc, self.b_enc))
            hidden_pre = raw_hidden_pre if decoder_norms is None else raw_hidden_pre * decoder_norms
            top_indices = self.activation_fn.top_k(hidden_pre)[1]
        dead_columns = dead_latent_indices(dead_neuron_mask, self.cfg.d_sae, hidden_pre.device)
        pre_at_top, pre_at_dead = PreActivationsAt.apply(
            centered,
            self.W_enc,
            self.b_enc,
            self.b_dec if self.cfg.apply_b_dec_to_input else None,
            raw_hidden_pre,
            top_indices,
            dead_columns,
            self._sparse_backward_may_use_triton(centered),
        )
        del raw_hidden_pre  # only hidden_pre (scaled) is returned; the gathered entries are all the losses need
        if decoder_norms is not None:
            pre_at_top = pre_at_top * decoder_norms[top_indices]
            pre_at_dead = pre_at_dead * decoder_norms[dead_columns]
        top_acts = pre_at_top.relu()
        coefficients = self.decoder_coefficients(top_acts, top_indices, decoder_norms)
        mse_loss, level_mse, sae_out = self._hierarchical_loss_fused(
            sae_in, coefficients, top_indices, levels, level_weights
        )
        feature_acts = sparse_activations(top_acts.detach(), top_indices, hidden_pre.shape[-1])
        if not self.cfg.use_sparse_activations:
            feature_acts = feature_acts.to_dense()
        if not len(dead_columns):
            return mse_loss, level_mse, sae_out, feature_acts, hidden_pre, sae_out.new_tensor(0.0)
        residual = (sae_in - sae_out).detach()
        aux_loss, scale = auxk_loss_on_dead_columns(pre_at_dead, dead_columns, self.W_dec, residual, decoder_norms)
        return mse_loss, level_mse, sae_out, feature_acts, hidden_pre, self.cfg.aux_loss_coefficient * scale * aux_loss

    def _sparse_backward_may_use_triton(self, centered: torch.Tensor) -> bool:
        """The encoder backward's Triton kernel follows the loss: always with ``"triton"``; with ``"auto"`` only
        where the kernels passed their self-check on this device (a failed check keeps both on torch)."""
        implementation = self.cfg.loss_implementation
        return implementation == "triton" or (
            implementation == "auto" and auto_uses_triton(centered.device, centered.dtype)
        )

    def _hierarchical_loss_fused(
        self,
        sae_in: torch.Tensor,
        coefficients: torch.Tensor,
        top_indices: torch.Tensor,
        levels: list[int],
        level_weights: list[float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, [n_levels] detached level MSEs, detached [..., d_in] top-K reconstruction)`` from K rows a token,
        weighted by their ``coefficients`` (:meth:`decoder_coefficients`).

        Under autocast the decoder products take the autocast dtype's inputs, as SAELens's ``feature_acts @ W_dec``
        does; the sums over ranks stay in float32 (SAELens rounds its decoded output to bfloat16 as well).
        """
        W_dec = self.W_dec
        device_type = sae_in.device.type
        if torch.is_autocast_enabled(device_type):
            autocast_dtype = torch.get_autocast_dtype(device_type)
            coefficients, W_dec = coefficients.to(autocast_dtype), W_dec.to(autocast_dtype)
        result = HIERARCHICAL_LOSSES[self.cfg.loss_implementation](
            sae_in=sae_in,
            top_acts=coefficients,
            top_indices=top_indices,
            W_dec=W_dec,
            b_dec=self.b_dec,
            levels=levels,
            level_weights=level_weights,
        )
        return result.loss, result.level_mse, result.reconstruction.to(self.dtype)  # SAELens's sae_out dtype

    def _hierarchical_loss_through_decode(
        self, sae_in: torch.Tensor, levels: list[int], level_weights: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAELens's dense path, ``encode_with_hidden_pre`` at K then one ``self.decode`` per level.

        Returns ``(loss, level MSEs, sae_out, feature_acts, hidden_pre)``. Level j decodes the activations of the
        latents ranked <= j by ``hidden_pre``; latents a hook activates outside the top-K count at every level, edits
        to the kept ones count from their rank. Memory: one dense ``[tokens, d_sae]`` graph per level.
        """
        with self._use_budget(Budget(self.cfg.k)):  # training ranks at K, whatever budget serving was set to
            feature_acts, hidden_pre = self.encode_with_hidden_pre(sae_in)
        top_indices = self.activation_fn.top_k(hidden_pre)[1]
        level_mses = []
        sae_out = feature_acts
        for level in levels:
            ranks_kept = torch.ones_like(feature_acts).scatter(-1, top_indices[..., level:], 0.0)
            sae_out = self.decode(feature_acts * ranks_kept)
            level_mses.append(self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean())
        level_mse = torch.stack(level_mses)
        weights = torch.tensor(level_weights, dtype=level_mse.dtype, device=level_mse.device)
        return (level_mse * weights).sum(), level_mse.detach(), sae_out, feature_acts, hidden_pre


def trained_b_dec_loaded(module: nn.Module, incompatible_keys: Any) -> None:
    """A loaded b_dec is a trained b_dec: no initialisation may overwrite it (``load_state_dict`` post-hook)."""
    if "b_dec" not in incompatible_keys.missing_keys:
        module.b_dec_pending_mean_init = False


def _logged_level_positions(levels: list[int]) -> list[int]:
    """Indices into ``levels`` of the budgets nearest (at or above) 1, K/4, K/2 and K."""
    max_k = levels[-1]
    positions = []
    for fraction in _LOGGED_BUDGET_FRACTIONS:
        target = max(1, round(fraction * max_k))
        position = next(i for i, level in enumerate(levels) if level >= target)
        if position not in positions:
            positions.append(position)
    return positions
