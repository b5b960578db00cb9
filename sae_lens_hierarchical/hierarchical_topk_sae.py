"""HierarchicalTopK SAE (Balagansky et al., EMNLP 2025): one TopK SAE that serves every budget k <= K.

A TopK SAE keeps the K largest pre-activations per token. HierarchicalTopK trains it so that the
*prefixes* of that ranking are good reconstructions too: the loss averages the reconstruction error of
the top-1, top-2, ..., top-K latents (or of a chosen subset of budgets, the "levels"). At inference the
same weights can then be run at any k <= K: the latents active at budget k are exactly the first k of
the top-K ranking, so smaller budgets are nested inside larger ones.

This module follows SAELens's one-file-per-architecture layout: the activation, the inference config
and SAE, and the training config and SAE. The loss math lives in :mod:`sae_lens_hierarchical.losses`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from torch import nn
from typing_extensions import override

from sae_lens_hierarchical.losses import HIERARCHICAL_LOSSES, uniform_level_weights

ARCHITECTURE = "hierarchical_topk"

# Budgets whose MSE is logged every step, as fractions of K (the nearest level at or above is used).
_LOGGED_BUDGET_FRACTIONS = (0.0, 0.25, 0.5, 1.0)
# SAELens normalisations applied inside the SAE; prefix reconstructions would need un-normalising
# one by one, which the hierarchical loss does not do (SAELens's TopK AuxK loss rejects them too).
_UNSUPPORTED_TRAINING_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")
_B_DEC_INITS = ("zeros", "mean")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_k(k: object, max_k: int) -> int:
    """Return ``k`` if it is a valid inference budget for an SAE trained with ``K = max_k``."""
    if not _is_int(k) or not 1 <= k <= max_k:  # type: ignore[operator]
        raise ValueError(f"k must be an int in 1..K={max_k} (the largest budget this SAE was trained for); got k={k!r}")
    return k  # type: ignore[return-value]


# ``k`` has no usable default in our configs: SAELens's TopK defaults to k=100, which would silently give a saved SAE
# whose cfg.json lost its ``k`` the wrong largest budget. K must always be given.


def _validate_max_k(k: object, d_sae: int) -> None:
    if k is None:
        raise ValueError(
            f"k (K, the largest budget the SAE was trained for) must be given, as an int in 1..d_sae={d_sae}; a saved "
            "cfg.json must contain it (SAELens's TopK default k=100 is deliberately not used)"
        )
    if not _is_int(k) or not 1 <= k <= d_sae:  # type: ignore[operator]
        raise ValueError(f"k (K, the largest budget) must be an int in 1..d_sae={d_sae}; got k={k!r}")


def resolve_levels(k: int, hierarchy_levels: list[int] | None) -> list[int]:
    """The budgets J whose errors the loss sums; default every budget 1..K (the paper's choice)."""
    if hierarchy_levels is None:
        return list(range(1, k + 1))
    levels = list(hierarchy_levels)
    if not levels:
        raise ValueError(f"hierarchy_levels must be non-empty, a strictly increasing list in 1..K={k} ending at K")
    for level in levels:
        if not _is_int(level) or not 1 <= level <= k:
            raise ValueError(f"hierarchy_levels entries must be ints in 1..K={k}; got {level!r} in {levels}")
    if any(b <= a for a, b in itertools.pairwise(levels)):
        raise ValueError(f"hierarchy_levels must be strictly increasing (sorted, no duplicates); got {levels}")
    if levels[-1] != k:
        # Latents ranked past the last level would be selected at inference but never trained.
        raise ValueError(
            f"hierarchy_levels must end at K={k} (the largest budget trained); got {levels}. "
            f"Lower k to {levels[-1]} or append {k}."
        )
    return levels


def resolve_level_weights(levels: list[int], hierarchy_weights: list[float] | None) -> list[float]:
    """Per-level weights; default uniform 1/|J|. Given weights are used as is (not renormalised)."""
    if hierarchy_weights is None:
        return uniform_level_weights(levels)
    weights = list(hierarchy_weights)
    if len(weights) != len(levels):
        raise ValueError(
            f"hierarchy_weights must have one weight per level ({len(levels)} levels: {levels}); "
            f"got {len(weights)} weights {weights}"
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < float("inf"):
            raise ValueError(f"hierarchy_weights must be finite numbers >= 0; got {weight!r} in {weights}")
    if sum(weights) <= 0:
        raise ValueError(f"hierarchy_weights must not all be zero; got {weights}")
    return [float(w) for w in weights]


class NestedTopK(nn.Module):
    """ReLU of the top-k of the *sorted* top-K pre-activations, returned dense ``[..., d_sae]``.

    Slicing one sorted top-K (instead of calling ``topk(k)``) guarantees that budget k selects exactly the
    first k latents of budget K, ties included. ``k`` is runtime state so that SAELens and
    TransformerLens hooks, which call ``encode(x)`` without arguments, see the chosen budget.
    """

    def __init__(self, max_k: int):
        super().__init__()
        self.max_k = max_k
        self.k = max_k

    def top_k(self, hidden_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([..., K] values >= 0 sorted descending, [..., K] latent indices)`` of the K largest."""
        values, indices = torch.topk(hidden_pre, k=self.max_k, dim=-1, sorted=True)
        return values.relu(), indices

    def forward(self, hidden_pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        k = self.k if k is None else validate_k(k, self.max_k)
        values, indices = self.top_k(hidden_pre)
        return torch.zeros_like(hidden_pre).scatter_(-1, indices[..., :k], values[..., :k])


def check_sae_input(sae_in: torch.Tensor, d_in: int, reshape_activations: str = "none") -> None:
    """Refuse integer/bool inputs and a last dimension other than ``d_in`` with one clear message."""
    if not sae_in.is_floating_point():
        raise ValueError(
            f"SAE input must be a floating-point tensor (float16, bfloat16, float32, float64); got {sae_in.dtype}"
        )
    width = sae_in.shape[-1] if sae_in.ndim else 0
    if reshape_activations == "hook_z" and sae_in.ndim >= 2:
        width = sae_in.shape[-2] * sae_in.shape[-1]
    if sae_in.ndim == 0 or width != d_in:
        raise ValueError(f"SAE input must have last dimension d_in={d_in}; got shape {tuple(sae_in.shape)}")


def save_files_atomically(path: str | Path, save: Callable[[Path], tuple[Path, Path]]) -> tuple[Path, Path]:
    """Run SAELens's ``save(directory)`` into a staging directory inside ``path``, then rename each file into place.

    A crash mid-save leaves every file in ``path`` either wholly old or wholly new, never truncated, so the
    previous save stays loadable. The weights are moved before the config, which SAELens reads first.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=path))
    try:
        staged = save(staging)
        for file in staged:
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        final = tuple(path / file.name for file in staged)
        for file, target in zip(staged, final, strict=True):
            os.replace(file, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final[0], final[1]


T_CFG = TypeVar("T_CFG", "HierarchicalTopKSAEConfig", "HierarchicalTopKTrainingSAEConfig")


class _VariableKMixin(Generic[T_CFG]):
    """Budget selection shared by the inference and training SAEs (``k``, ``set_k``, ``use_k``)."""

    cfg: T_CFG
    activation_fn: NestedTopK

    @property
    def k(self) -> int:
        """The budget ``encode`` currently uses (K = ``cfg.k`` until changed)."""
        return self.activation_fn.k

    @k.setter
    def k(self, k: int) -> None:
        self.set_k(k)

    def set_k(self, k: int) -> None:
        """Use budget ``k`` (1..K) from now on; nothing is retrained, the top-k is a prefix of the top-K."""
        self.activation_fn.k = validate_k(k, self.cfg.k)

    @contextmanager
    def use_k(self, k: int) -> Iterator[None]:
        """Run with budget ``k`` inside the block and restore the previous budget afterwards, even on error."""
        previous = self.k
        self.set_k(k)
        try:
            yield
        finally:
            self.activation_fn.k = previous

    def _scaled_hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``[..., d_sae]`` used for ranking (scaled by decoder norms when configured)."""
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)  # type: ignore[attr-defined]
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)  # type: ignore[attr-defined]
        return hidden_pre

    def decoder_coefficients(self, top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """What multiplies each selected decoder row: the activation, over the row norm when rescaling."""
        if not self.cfg.rescale_acts_by_decoder_norm:
            return top_acts
        return top_acts / self.W_dec.norm(dim=-1)[top_indices]

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's input processing, after checking the input so a wrong tensor fails with its shape named."""
        check_sae_input(sae_in, self.cfg.d_in, self.cfg.reshape_activations)
        return super().process_sae_in(sae_in)  # type: ignore[misc]

    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """SAELens's ``save_model``, with each file replaced atomically (see :func:`save_files_atomically`)."""
        return save_files_atomically(path, super().save_model)  # type: ignore[misc]

    @torch.no_grad()
    def encode_top_k(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ranking: ``([..., K] activations sorted descending, [..., K] latent indices)``.

        Column ``i`` is the latent of rank ``i + 1``; budget k uses columns ``:k``. Activations are in the
        same units as ``encode``'s output.
        """
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(x))  # type: ignore[attr-defined]
        return self.activation_fn.top_k(hidden_pre)


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


class HierarchicalTopKSAE(_VariableKMixin[HierarchicalTopKSAEConfig], TopKSAE):
    """Inference HierarchicalTopK SAE: a TopK SAE whose budget k can be chosen at run time.

    ``encode`` returns dense ``[..., d_sae]`` activations with (at most) k non-zeros per token, the first
    k of the sorted top-K; ``decode`` of them is the level-k prefix reconstruction. Works unchanged inside
    ``HookedSAETransformer`` (``with sae.use_k(8): model.run_with_saes(...)``).
    """

    cfg: HierarchicalTopKSAEConfig  # type: ignore[assignment]
    activation_fn: NestedTopK

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return NestedTopK(self.cfg.k)

    @override
    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` activations at budget ``k`` (default: the current ``self.k``)."""
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(x))
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre, k))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction at the current budget; decodes sparsely from the k selected rows when it can.

        SAELens's path scatters dense ``[..., d_sae]`` activations and multiplies them by the whole decoder. When no
        hook watches or edits the activations (no cache, no ablation) and no error term is wanted, the output is
        the same sum of k decoder rows, computed directly with ``embedding_bag`` (never a ``[..., k, d_in]`` tensor).
        """
        if self.use_error_term or _has_hooks(self.hook_sae_acts_post):
            return super().forward(x)
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(x))
        top_acts, top_indices = self.activation_fn.top_k(hidden_pre)
        k = self.k
        coefficients = self.decoder_coefficients(top_acts[..., :k], top_indices[..., :k])
        flat_indices = top_indices[..., :k].reshape(-1, k)
        decoded = nn.functional.embedding_bag(
            flat_indices, self.W_dec, per_sample_weights=coefficients.reshape(-1, k).to(self.W_dec.dtype), mode="sum"
        )
        sae_out_pre = self.hook_sae_recons(decoded.reshape(*hidden_pre.shape[:-1], -1) + self.b_dec)
        sae_out = self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out_pre), self.d_head)
        return self.hook_sae_output(sae_out)


def _has_hooks(hook_point: nn.Module) -> bool:
    return bool(hook_point._forward_hooks or hook_point._forward_pre_hooks or hook_point._backward_hooks)


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
        aux_loss_coefficient (float): weight of TopK's AuxK dead-latent loss, computed on the full top-K
            reconstruction exactly as in SAELens.
        rescale_acts_by_decoder_norm (bool): rank by ``pre-activation * ||W_dec row||`` and decode with
            unit-norm rows (SAELens TopK default: True). Norms are folded into the weights on save.
        loss_implementation (str): how the hierarchical loss is computed; the value is the same either way.
            ``"auto"`` (default) is ``"triton"`` for CUDA tensors when triton is installed (not float64), else
            ``"fused"``. ``"fused"`` walks the ranks in chunks inside a custom autograd function in torch, so memory
            stays flat in K; ``"triton"`` runs the same algorithm as one Triton kernel per pass (CUDA only, needs
            the ``gpu`` extra); ``"reference"`` is plain autograd over every prefix reconstruction
            (``[tokens, K, d_in]`` tensors), kept as the readable definition and for cross-checking.
        use_sparse_activations (bool): must stay False; the hierarchical loss always decodes sparsely from
            the K selected decoder rows.
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
        if self.b_dec_init not in _B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {list(_B_DEC_INITS)}; got {self.b_dec_init!r}")
        if self.use_sparse_activations:
            raise ValueError(
                "use_sparse_activations=True is not supported by hierarchical_topk (allowed: False); "
                "its loss already decodes sparsely from the K selected decoder rows"
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
        """The per-level weights actually used by the loss."""
        return resolve_level_weights(self.levels, self.hierarchy_weights)

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


class HierarchicalTopKTrainingSAE(_VariableKMixin[HierarchicalTopKTrainingSAEConfig], TopKTrainingSAE):
    """Training HierarchicalTopK SAE: TopK encoder, AuxK dead-latent loss, hierarchical prefix loss.

    ``training_forward_pass`` never builds the dense ``[tokens, d_sae]`` activations with gradients: the
    loss decodes from the K selected decoder rows. The dense activations SAELens's trainer needs for its
    firing statistics are built without gradients.
    """

    cfg: HierarchicalTopKTrainingSAEConfig  # type: ignore[assignment]
    activation_fn: NestedTopK

    def __init__(self, cfg: HierarchicalTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.levels = cfg.levels
        self.level_weights = cfg.level_weights
        self._logged_level_positions = _logged_level_positions(self.levels)

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """SAELens's ``save_inference_model``, with each file replaced atomically."""
        return save_files_atomically(path, super().save_inference_model)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return NestedTopK(self.cfg.k)

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(x))
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        if not bool(torch.isfinite(sae_in).all()):  # one host sync a step; NaN weights would otherwise be saved
            raise ValueError(
                f"non-finite activations (NaN or inf) at training step {step_input.n_training_steps}, hook "
                f"{self.cfg.metadata.hook_name!r}: activations must be finite; stopping before any weight changes"
            )
        if self.cfg.b_dec_init == "mean" and step_input.n_training_steps == 0:
            with torch.no_grad():  # step 0 only, so resuming from a checkpoint never re-initialises
                self.b_dec.copy_(sae_in.reshape(-1, sae_in.shape[-1]).mean(dim=0))
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(sae_in))
        top_acts, top_indices = self.activation_fn.top_k(hidden_pre)
        result = HIERARCHICAL_LOSSES[self.cfg.loss_implementation](
            sae_in=sae_in.to(self.dtype),
            top_acts=self.decoder_coefficients(top_acts, top_indices),
            top_indices=top_indices,
            W_dec=self.W_dec,
            b_dec=self.b_dec,
            levels=self.levels,
            level_weights=self.level_weights,
        )
        with torch.no_grad():
            feature_acts = torch.zeros_like(hidden_pre).scatter_(-1, top_indices, top_acts)
        aux_losses = self.calculate_aux_loss(
            step_input=step_input,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            sae_out=result.reconstruction,
        )
        losses = {"mse_loss": result.loss, **aux_losses}
        loss = sum(losses.values(), torch.zeros((), device=sae_in.device))
        if not bool(torch.isfinite(loss)):  # raising before backward keeps the last finite weights
            raise ValueError(
                f"training diverged: non-finite loss ({float(loss)}) at training step {step_input.n_training_steps}, "
                f"hook {self.cfg.metadata.hook_name!r}; the weights are still those of the previous step. Lower the "
                "learning rate or check the activations' scale (normalize_activations='expected_average_only_in')"
            )
        metrics: dict[str, Any] = {
            f"mse_at_k_{self.levels[position]}": result.level_mse[position] for position in self._logged_level_positions
        }
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=result.reconstruction,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=loss,
            losses=losses,
            metrics=metrics,
        )


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
