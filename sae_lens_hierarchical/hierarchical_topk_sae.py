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

import copy
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from torch import nn
from typing_extensions import Self, override

from sae_lens_hierarchical._files import save_files_atomically
from sae_lens_hierarchical.budget import Budget, is_int, validate_k, validate_threshold
from sae_lens_hierarchical.conversion import from_sae as convert_sae
from sae_lens_hierarchical.losses import (
    HIERARCHICAL_LOSSES,
    auto_uses_triton,
    uniform_level_weights,
    validate_level_weights,
    validate_levels,
)
from sae_lens_hierarchical.sparse_training import PreActivationsAt, auxk_loss_on_dead_columns, sparse_activations

ARCHITECTURE = "hierarchical_topk"

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


def resolve_levels(k: int, hierarchy_levels: list[int] | None) -> list[int]:
    """The budgets J whose errors the loss sums; default every budget 1..K (the paper's choice)."""
    return list(range(1, k + 1)) if hierarchy_levels is None else validate_levels(k, hierarchy_levels)


def resolve_level_weights(levels: list[int], hierarchy_weights: list[float] | None) -> list[float]:
    """Per-level weights; default uniform 1/|J|. Given weights are used as is (not renormalised)."""
    if hierarchy_weights is None:
        return uniform_level_weights(levels)
    return validate_level_weights(levels, hierarchy_weights)


class NestedTopK(nn.Module):
    """ReLU of a budget's share of the *sorted* top-K pre-activations, returned dense ``[..., d_sae]``.

    Slicing one sorted top-K (instead of calling ``topk(k)``) guarantees that budget k selects exactly the
    first k latents of budget K, ties included, and a threshold keeps a per-token prefix of the same ranking.
    ``k`` and ``threshold`` are the SAE's default budget (``set_k``, ``set_threshold``); callers pass an explicit
    budget as ``forward(hidden_pre, k, threshold)``.
    """

    def __init__(self, max_k: int):
        super().__init__()
        self.max_k = max_k
        self.k = max_k
        self.threshold: float | None = None

    def top_k(self, hidden_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([..., K] values >= 0 sorted descending, [..., K] latent indices)`` of the K largest."""
        values, indices = torch.topk(hidden_pre, k=self.max_k, dim=-1, sorted=True)
        return values.relu(), indices

    def forward(self, hidden_pre: torch.Tensor, k: int | None = None, threshold: float | None = None) -> torch.Tensor:
        budget = Budget(self.k if k is None else k, self.threshold if threshold is None else threshold).validated(
            self.max_k
        )
        values, indices = self.top_k(hidden_pre)
        n_ranks = budget.ranks(self.max_k)
        values, indices = values[..., :n_ranks], indices[..., :n_ranks]
        if budget.threshold is not None:
            values = torch.where(budget.keep(values), values, 0.0)
        return torch.zeros_like(hidden_pre).scatter(-1, indices, values)


def check_sae_input(sae_in: torch.Tensor, d_in: int, hook_z_reshaping: bool = False) -> None:
    """Refuse integer/bool inputs and a width other than ``d_in`` with one clear message.

    ``hook_z_reshaping`` is the SAE's *current* mode: inference SAEs on ``hook_z`` take ``[..., n_heads, d_head]``,
    while SAELens's training SAEs turn that reshaping off and take flat ``[..., d_in]`` activations.
    """
    if not sae_in.is_floating_point():
        raise ValueError(
            f"SAE input must be a floating-point tensor (float16, bfloat16, float32, float64); got {sae_in.dtype}"
        )
    width = sae_in.shape[-1] if sae_in.ndim else 0
    if hook_z_reshaping and sae_in.ndim >= 2:
        width = sae_in.shape[-2] * sae_in.shape[-1]
    if sae_in.ndim == 0 or width != d_in:
        expected = "[..., n_heads, d_head] with n_heads * d_head" if hook_z_reshaping else "last dimension"
        raise ValueError(f"SAE input must have {expected} d_in={d_in}; got shape {tuple(sae_in.shape)}")


T_CFG = TypeVar("T_CFG", "HierarchicalTopKSAEConfig", "HierarchicalTopKTrainingSAEConfig")

# ``use_k`` / ``use_threshold`` budgets: {id(sae): Budget}, an immutable mapping per context, so per thread and per
# asyncio task, and restored by token on exit whatever ran in between. Keyed by id rather than stored on the SAE so that
# SAEs stay deep-copyable; an entry lives only inside a ``use_*`` block, which holds its SAE alive.
_USE_K_BUDGETS: ContextVar[dict[int, Budget]] = ContextVar("sae_lens_hierarchical_use_k", default={})  # noqa: B039


def _applied_to_root(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` on the SAE an ``at_k`` view was made from, then bring every view's config, dtype and device up
    to date: the weights are shared, so a fold or ``to`` must change the SAE and all its views together."""

    @functools.wraps(method)
    def on_root(self: Any, *args: Any, **kwargs: Any) -> Any:
        root = self._view_root if self._view_root is not None else self
        if root is not self:
            result = getattr(root, method.__name__)(*args, **kwargs)
            return self if result is root else result
        result = method(self, *args, **kwargs)
        self._sync_views()
        return result

    return on_root


def _has_hooks(hook_point: nn.Module) -> bool:
    return bool(hook_point._forward_hooks or hook_point._forward_pre_hooks or hook_point._backward_hooks)


class VariableKMixin(Generic[T_CFG]):
    """Budget selection shared by the inference and training SAEs.

    The budget is an argument (``encode(x, k=)``, ``forward(x, k=)``, ``encode_top_k(x, k=)``, ``at_k(k)``); the
    SAE's state (``set_k`` for every thread, ``use_k`` for the calling thread) only supplies the default, for
    SAELens and TransformerLens hooks that call ``encode(x)`` bare.
    """

    cfg: T_CFG
    activation_fn: NestedTopK

    @property
    def budget(self) -> Budget:
        """The budget ``encode(x)`` uses: the innermost ``use_k``/``use_threshold`` of this thread/task, else the
        ``set_k``/``set_threshold`` defaults. Its ``k`` is never None here."""
        budgets = _USE_K_BUDGETS.get()
        if budgets and id(self) in budgets:  # no identity check otherwise: compiled code stays shared across SAEs
            return budgets[id(self)]
        return Budget(self.activation_fn.k, self.activation_fn.threshold)

    @property
    def k(self) -> int:
        """The budget k ``encode(x)`` uses (see :attr:`budget`)."""
        return self.budget.k  # type: ignore[return-value]

    @k.setter
    def k(self, k: int) -> None:
        self.set_k(k)

    @property
    def threshold(self) -> float | None:
        """The threshold ``encode(x)`` uses, None for none (see :attr:`budget`)."""
        return self.budget.threshold

    def set_k(self, k: int) -> None:
        """Use budget ``k`` (1..K) from now on, in every thread; nothing is retrained, top-k is a prefix of top-K."""
        self.activation_fn.k = validate_k(k, self.cfg.k)

    def set_threshold(self, threshold: float | None) -> None:
        """Keep only activations >= ``threshold`` (> 0) from now on, in every thread, on top of the budget k (None:
        no threshold). Each token keeps a prefix of its own ranking, so tokens spend different numbers of latents;
        :func:`sae_lens_hierarchical.calibrate_threshold` finds the threshold of a target mean L0."""
        self.activation_fn.threshold = None if threshold is None else validate_threshold(threshold)

    @contextmanager
    def use_k(self, k: int) -> Iterator[None]:
        """Run this thread's (or asyncio task's) calls with budget ``k`` inside the block; restored on exit.

        Safe under threads and tasks: the budget is kept in a ``contextvars`` context, so other threads and tasks
        keep theirs; blocks nest. ``set_k`` inside a block takes effect after it. For one SAE at two budgets in one
        thread, use ``at_k``. Under ``torch.compile``, pass ``k=`` instead: a state budget is a constant to dynamo.
        The threshold in effect (if any) still applies.
        """
        with self._use_budget(Budget(validate_k(k, self.cfg.k), self.threshold)):
            yield

    @contextmanager
    def use_threshold(self, threshold: float | None) -> Iterator[None]:
        """Like :meth:`use_k`, for the threshold (None: none inside the block); the budget k in effect still applies."""
        threshold = None if threshold is None else validate_threshold(threshold)
        with self._use_budget(Budget(self.k, threshold)):
            yield

    @contextmanager
    def _use_budget(self, budget: Budget) -> Iterator[None]:
        token = _USE_K_BUDGETS.set({**_USE_K_BUDGETS.get(), id(self): budget})
        try:
            yield
        finally:
            _USE_K_BUDGETS.reset(token)

    def _budget(self, k: int | None, threshold: float | None = None) -> Budget:
        """The budget of a call: ``k`` and ``threshold`` when given, else the ones in effect."""
        current = self.budget
        return Budget(current.k if k is None else k, current.threshold if threshold is None else threshold).validated(
            self.cfg.k
        )

    # Set on views only (see ``at_k``): the SAE whose parameters a view shares.
    _view_root: Any = None

    def at_k(self, k: int) -> Self:
        """A view of this SAE fixed at budget ``k``: the same parameter objects (no copy), its own hooks and budget.

        The view's ``k`` is ``k`` until its own ``set_k``/``use_k``; hooks added to it are its own, and so is
        ``cfg.metadata`` (set ``view.cfg.metadata.hook_name`` to splice it at another hook), so the same weights can be
        attached at two budgets (``HookedSAETransformer.add_sae(sae.at_k(4))``). Everything else stays the SAE's:
        ``to`` and the ``fold_*`` methods on either one change both, and a view refuses to load weights or train.
        """
        return self._view(Budget(validate_k(k, self.cfg.k)))

    def at_threshold(self, threshold: float) -> Self:
        """A view of this SAE that keeps, per token, the activations >= ``threshold`` (at most K): like :meth:`at_k`,
        sharing the parameters, with its own hooks and budget."""
        return self._view(Budget(self.cfg.k, validate_threshold(threshold)))

    def _view(self, budget: Budget) -> Self:
        root = self._view_root if self._view_root is not None else self
        cfg = copy.deepcopy(root.cfg)
        cfg.metadata = copy.deepcopy(self.cfg.metadata)
        cfg.device = "meta"  # builds without allocating weights; the real ones are attached below
        with warnings.catch_warnings():  # SAELens's construction-time notices were already shown for the SAE itself
            warnings.simplefilter("ignore")
            view = type(root)(cfg)  # type: ignore[call-arg]
            view.use_error_term = self.use_error_term  # type: ignore[attr-defined]
        view.__dict__["_view_root"] = root  # a plain attribute, not a submodule: the view holds no state of its own
        root._register_view(view)
        root._sync_views()
        view.train(self.training)  # type: ignore[attr-defined]
        view.set_k(budget.k)  # type: ignore[arg-type]
        view.set_threshold(budget.threshold)
        return view

    def _register_view(self, view: Any) -> None:
        """Remember ``view`` (weakly: a view nobody holds is forgotten), dropping views already gone."""
        live = [reference for reference in self.__dict__.get("_view_refs", []) if reference() is not None]
        self.__dict__["_view_refs"] = [*live, weakref.ref(view)]

    # SAELens keeps closures as attributes (input reshaping, run-time normalisation): they capture the SAE they were
    # made for and cannot be pickled. A copy rebuilds its own; the weak references to views stay with their SAE.
    _REBUILT_ON_COPY = (
        "reshape_fn_in",
        "reshape_fn_out",
        "run_time_activation_norm_fn_in",
        "run_time_activation_norm_fn_out",
        "_view_refs",
    )

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` copy: everything but the closures and the views (see above)."""
        return {name: value for name, value in self.__dict__.items() if name not in self._REBUILT_ON_COPY}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy gets closures of its own, and a copied view is a view of its copied SAE."""
        super().__setstate__(state)  # type: ignore[misc]
        self._setup_activation_normalization()  # type: ignore[attr-defined]
        d_head = state.get("d_head")
        if state.get("hook_z_reshaping_mode"):
            self.turn_on_forward_pass_hook_z_reshaping()  # type: ignore[attr-defined]
        else:
            self.turn_off_forward_pass_hook_z_reshaping()  # type: ignore[attr-defined]
        self.__dict__["d_head"] = d_head
        if self._view_root is not None:
            self._view_root._register_view(self)

    def _sync_views(self) -> None:
        """Give every live view this SAE's parameters, config (except its own metadata), dtype and device."""
        self.__dict__["_view_refs"] = [r for r in self.__dict__.get("_view_refs", []) if r() is not None]
        for reference in self.__dict__["_view_refs"]:
            view = reference()
            if view is None:
                continue
            for field in fields(self.cfg):
                if field.name != "metadata":
                    setattr(view.cfg, field.name, copy.deepcopy(getattr(self.cfg, field.name)))
            for name, parameter in self.named_parameters(recurse=False):  # type: ignore[attr-defined]
                view._parameters[name] = parameter
            view.dtype, view.device = self.dtype, self.device  # type: ignore[attr-defined]

    @_applied_to_root
    def to(self, *args: Any, **kwargs: Any) -> Self:
        return super().to(*args, **kwargs)  # type: ignore[misc]

    @_applied_to_root
    def fold_W_dec_norm(self) -> None:
        return super().fold_W_dec_norm()  # type: ignore[misc]

    @_applied_to_root
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        return super().fold_activation_norm_scaling_factor(scaling_factor)  # type: ignore[misc]

    @_applied_to_root
    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        return super().fold_activation_whitening(*args, **kwargs)  # type: ignore[misc]

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.load_state_dict``, refused on an ``at_k`` view (load into the SAE it was made from)."""
        self._refuse_on_view("load weights")
        result = super().load_state_dict(*args, **kwargs)  # type: ignore[misc]
        self._sync_views()  # assign=True replaces the parameter objects
        return result

    def _refuse_on_view(self, action: str) -> None:
        if self._view_root is not None:
            raise ValueError(f"this SAE is an {self._view_name()} view and cannot {action}; use the SAE itself")

    def _view_name(self) -> str:
        budget = self.budget
        if budget.threshold is None:
            return f"at_k({budget.k})"
        name = f"at_threshold({budget.threshold:.6g})"
        return name if budget.k == self.cfg.k else f"{name} at_k({budget.k})"

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The nested top-K activation, for SAELens's constructor (both SAEs rank the same way)."""
        return NestedTopK(self.cfg.k)

    def _scaled_hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``[..., d_sae]`` used for ranking (scaled by decoder norms when configured)."""
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)  # type: ignore[attr-defined]
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)  # type: ignore[attr-defined]
        return hidden_pre

    def decoder_coefficients(
        self, top_acts: torch.Tensor, top_indices: torch.Tensor, decoder_norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What multiplies each selected decoder row: the activation, over the row norm when rescaling.

        ``decoder_norms``: ``W_dec``'s row norms where the caller already has them (else computed here).
        """
        if not self.cfg.rescale_acts_by_decoder_norm:
            return top_acts
        norms = self.W_dec.norm(dim=-1) if decoder_norms is None else decoder_norms  # type: ignore[attr-defined]
        return top_acts / norms[top_indices]

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's input processing, after checking the input so a wrong tensor fails with its shape named."""
        check_sae_input(sae_in, self.cfg.d_in, self.hook_z_reshaping_mode)  # type: ignore[attr-defined]
        return super().process_sae_in(sae_in)  # type: ignore[misc]

    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """SAELens's ``save_model``, with each file replaced atomically (see :func:`save_files_atomically`); a
        non-finite weight is refused before anything is written."""
        check_weights_finite(self, "not saved")
        return save_files_atomically(path, super().save_model)  # type: ignore[misc]

    def encode_top_k(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranking: ``([..., k] activations sorted descending, [..., k] latent indices)``; ``k`` defaults to K.

        Column ``i`` is the latent of rank ``i + 1``; budget k uses columns ``:k``. Activations are in the same units
        as ``encode``'s output and keep their gradients (for attribution); wrap in ``torch.no_grad()`` when not needed.
        """
        n_ranks = self.cfg.k if k is None else validate_k(k, self.cfg.k)
        top_acts, top_indices = self.activation_fn.top_k(self._scaled_hidden_pre(self.process_sae_in(x)))
        return top_acts[..., :n_ranks], top_indices[..., :n_ranks]

    def encode(self, x: torch.Tensor, k: int | None = None, threshold: float | None = None) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` activations at budget ``k`` and/or ``threshold`` (default: the ones in
        effect, :attr:`budget`): at most k per token, and only those >= threshold."""
        budget = self._budget(k, threshold)
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(x))
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre, budget.k, budget.threshold))  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor, k: int | None = None, threshold: float | None = None) -> torch.Tensor:
        """Reconstruction at budget ``k`` and/or ``threshold`` (default: those in effect), decoded sparsely when
        nothing watches.

        SAELens's path scatters dense ``[..., d_sae]`` activations and multiplies them by the whole decoder. When no
        hook watches or edits the activations, no error term is wanted, ``encode``/``decode`` are not overridden and
        autocast is off, the output is the same sum of k decoder rows, from ``embedding_bag`` (no ``[..., k, d_in]``).
        """
        budget = self._budget(k, threshold)
        if (
            self.use_error_term  # type: ignore[attr-defined]
            or _has_hooks(self.hook_sae_acts_post)  # type: ignore[attr-defined]
            or self._overrides_methods()
            or torch.is_autocast_enabled(x.device.type)  # SAELens's decode rounds to the autocast dtype
        ):
            with self._use_budget(budget):
                return super().forward(x)  # type: ignore[misc]
        hidden_pre = self._scaled_hidden_pre(self.process_sae_in(x))
        top_acts, top_indices = self.activation_fn.top_k(hidden_pre)
        top_acts, top_indices = top_acts[..., : budget.k], top_indices[..., : budget.k]
        coefficients = self.decoder_coefficients(top_acts, top_indices)
        if budget.threshold is not None:
            coefficients = torch.where(budget.keep(top_acts), coefficients, 0.0)
        decoded = decode_rows(self.W_dec, top_indices, coefficients)  # type: ignore[attr-defined]
        sae_out_pre = self.hook_sae_recons(decoded + self.b_dec)  # type: ignore[attr-defined]
        sae_out = self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out_pre), self.d_head)  # type: ignore[attr-defined]
        return self.hook_sae_output(sae_out)  # type: ignore[attr-defined]

    def to_topk(self, k: int) -> TopKSAE:
        """SAELens's own ``TopKSAE`` computing what this SAE computes at budget ``k`` (see ``sharing.to_topk``)."""
        from sae_lens_hierarchical.sharing import to_topk  # sharing builds on this module

        return to_topk(self, k)  # type: ignore[arg-type]

    def save_as_topk(self, path: str | Path, k: int) -> Path:
        """Write :meth:`to_topk` to the new directory ``path``, loadable by SAELens alone (``sharing.save_as_topk``)."""
        from sae_lens_hierarchical.sharing import save_as_topk

        return save_as_topk(self, path, k)  # type: ignore[arg-type]

    def to_jumprelu(self, threshold: float) -> Any:
        """SAELens's own ``JumpReLUSAE`` serving this SAE at ``threshold`` (see ``sharing.to_jumprelu``)."""
        from sae_lens_hierarchical.sharing import to_jumprelu

        return to_jumprelu(self, threshold)  # type: ignore[arg-type]

    def save_as_jumprelu(
        self,
        path: str | Path,
        *,
        threshold: float | None = None,
        mean_l0: float | None = None,
        activations: torch.Tensor | None = None,
    ) -> Path:
        """Write :meth:`to_jumprelu` (``threshold``, or ``mean_l0`` calibrated on ``activations``) to the new directory
        ``path``, loadable by SAELens alone (``sharing.save_as_jumprelu``)."""
        from sae_lens_hierarchical.sharing import save_as_jumprelu

        return save_as_jumprelu(self, path, threshold=threshold, mean_l0=mean_l0, activations=activations)  # type: ignore[arg-type]

    # Methods the sparse paths do not call: replacing one (in a subclass or on the instance) selects SAELens's path.
    _SPARSE_BYPASSED_METHODS: tuple[str, ...] = ("encode", "decode", "encode_with_hidden_pre")

    def _overrides_methods(self) -> bool:
        """Whether a method in ``_SPARSE_BYPASSED_METHODS`` was replaced by a subclass or on the instance: the sparse
        paths would otherwise bypass the replacement."""
        cls = type(self)
        package_class = next(c for c in cls.__mro__ if c.__module__ == __name__ and c is not VariableKMixin)
        names = self._SPARSE_BYPASSED_METHODS
        replaced = any(getattr(cls, name, None) is not getattr(package_class, name, None) for name in names)
        # SAELens's ``compile_sae`` puts a compiled ``training_forward_pass`` on the instance: that one is not a change.
        return replaced or any(name in self.__dict__ for name in names if name != "training_forward_pass")


def decode_rows(W_dec: torch.Tensor, indices: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``sum_i coefficients[..., i] * W_dec[indices[..., i]]`` ``[..., d_in]``, gathering only the selected rows."""
    n_rows = indices.shape[-1]
    decoded = nn.functional.embedding_bag(
        indices.reshape(-1, n_rows),
        W_dec,
        per_sample_weights=coefficients.reshape(-1, n_rows).to(W_dec.dtype),
        mode="sum",
    )
    return decoded.reshape(*indices.shape[:-1], W_dec.shape[-1])


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


class HierarchicalTopKSAE(VariableKMixin[HierarchicalTopKSAEConfig], TopKSAE):
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


class HierarchicalTopKTrainingSAE(VariableKMixin[HierarchicalTopKTrainingSAEConfig], TopKTrainingSAE):
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
        return any(_has_hooks(hook) for hook in watched) or self._overrides_methods() or sae_in.requires_grad

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
            raw_hidden_pre = self.hook_sae_acts_pre(_encoder_product(centered, self.W_enc, self.b_enc))
            hidden_pre = raw_hidden_pre if decoder_norms is None else raw_hidden_pre * decoder_norms
            top_indices = self.activation_fn.top_k(hidden_pre)[1]
        dead_columns = _dead_columns(dead_neuron_mask, self.cfg.d_sae, hidden_pre.device)
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


def _encoder_product(centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """``centered @ W_enc + b_enc``, with the bias riding on the product (``addmm``) instead of a second pass over
    ``[tokens, d_sae]``; under autocast as SAELens computes it, since ``addmm`` would round the bias to half too."""
    if torch.is_autocast_enabled(centered.device.type):
        return centered @ W_enc + b_enc
    flat = torch.addmm(b_enc, centered.reshape(-1, centered.shape[-1]), W_enc)
    return flat.reshape(*centered.shape[:-1], -1)


def _dead_columns(dead_neuron_mask: torch.Tensor | None, d_sae: int, device: torch.device) -> torch.Tensor:
    """Indices of the dead latents (empty when there is no mask); one host sync, as SAELens's own count."""
    if dead_neuron_mask is None:
        return torch.empty(0, dtype=torch.long, device=device)
    if dead_neuron_mask.dtype != torch.bool or tuple(dead_neuron_mask.shape) != (d_sae,):
        raise ValueError(
            f"dead_neuron_mask must be a bool tensor of shape ({d_sae},) (one flag per latent); got "
            f"{dead_neuron_mask.dtype} of shape {tuple(dead_neuron_mask.shape)}"
        )
    return dead_neuron_mask.nonzero().reshape(-1).to(device)


def check_weights_finite(sae: nn.Module, consequence: str) -> None:
    """Raise :func:`raise_non_finite` if any weight of ``sae`` (any SAELens SAE) is NaN or infinite."""
    if not all(bool(torch.isfinite(parameter).all()) for parameter in sae.parameters()):
        raise_non_finite(sae, consequence)


def raise_non_finite(sae: nn.Module, when: str) -> None:
    """One clear error: which weight is not finite, when, and the likely cause."""
    names = [name for name, parameter in sae.named_parameters() if not bool(torch.isfinite(parameter).all())]
    dtype = getattr(sae, "dtype", None)
    cause = (
        "float16 weights with Adam (its eps is 0 in float16): train in bfloat16 or float32"
        if dtype == torch.float16
        else "a learning rate too high for the activations' scale: lower lr, or normalise the activations "
        "(normalize_activations='expected_average_only_in')"
    )
    raise ValueError(f"non-finite weights (NaN or inf) in {', '.join(names)} {when}; likely cause: {cause}")


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
