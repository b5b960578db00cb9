"""How a HierarchicalTopK SAE is served at a budget: k, a threshold, or both, from one sorted top-K ranking.

The budget API both SAEs share (:class:`VariableKMixin`: ``encode(x, k=, threshold=)``, ``at_k``/``at_threshold``
views, ``use_k``/``use_threshold`` blocks, ``set_k``/``set_threshold``), the nested top-K activation
(:class:`NestedTopK`), the sparse decode of the selected rows (:func:`decode_rows`) and the checks every SAE entry
point makes (input shape, finite weights). The architecture module builds its SAEs on these; the evaluations read an
SAE through them without depending on the architecture.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import nn
from typing_extensions import Self

from sae_lens_hierarchical._files import save_files_atomically
from sae_lens_hierarchical.budget import Budget, validate_k, validate_threshold

if TYPE_CHECKING:
    from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAEConfig

ARCHITECTURE = "hierarchical_topk"
# Where the SAE classes are defined: the sparse paths compare a subclass's methods with theirs.
ARCHITECTURE_MODULE = "sae_lens_hierarchical.hierarchical_topk_sae"


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


# The SAE's config: the architecture's inference or training config (both SAELens TopK configs with ``k``).
T_CFG = TypeVar("T_CFG", bound="TopKSAEConfig | TopKTrainingSAEConfig")

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


def has_hooks(hook_point: nn.Module) -> bool:
    """Whether anything watches or edits this hook point (then SAELens's dense path must run)."""
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
            or has_hooks(self.hook_sae_acts_post)  # type: ignore[attr-defined]
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

    # Methods the sparse paths do not call: replacing one (in a subclass or on the instance) selects SAELens's path.
    _SPARSE_BYPASSED_METHODS: tuple[str, ...] = ("encode", "decode", "encode_with_hidden_pre")

    def _overrides_methods(self) -> bool:
        """Whether a method in ``_SPARSE_BYPASSED_METHODS`` was replaced by a subclass or on the instance: the sparse
        paths would otherwise bypass the replacement."""
        cls = type(self)
        package_class = next(c for c in cls.__mro__ if c.__module__ == ARCHITECTURE_MODULE)
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
