"""Export a HierarchicalTopK SAE as SAELens's own SAEs: one budget k as ``"topk"``, one threshold as ``"jumprelu"``.

Both load with SAELens alone (``SAE.load_from_disk`` / ``SAE.from_pretrained``), where this package is not installed:
the form Neuronpedia, SAEBench and sae_dashboard read. The SAEs get these as methods (:class:`ExportMethods`);
:mod:`sae_lens_hierarchical.sharing` publishes them on the Hub. Built on the budget API
(:mod:`sae_lens_hierarchical.serving`) and the threshold calibration, never on the architecture module itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE

from sae_lens_hierarchical._files import check_new_directory, write_new_directory
from sae_lens_hierarchical.budget import validate_k, validate_threshold
from sae_lens_hierarchical.conversion import sae_with_weights
from sae_lens_hierarchical.evaluation.thresholds import calibrate_threshold
from sae_lens_hierarchical.objectives import resolve_level_weights, resolve_levels
from sae_lens_hierarchical.serving import ARCHITECTURE, VariableKMixin

EXPORT_METADATA_KEY = "hierarchical_topk_export"


class ExportMethods:
    """The export methods of both SAEs: SAELens's own TopK and JumpReLU SAEs computing what this SAE computes."""

    def to_topk(self, k: int) -> TopKSAE:
        """SAELens's own ``TopKSAE`` computing what this SAE computes at budget ``k`` (see ``exports.to_topk``)."""
        return to_topk(self, k)  # type: ignore[arg-type]

    def save_as_topk(self, path: str | Path, k: int) -> Path:
        """Write :meth:`to_topk` to the new directory ``path``, loadable by SAELens alone (``exports.save_as_topk``)."""
        return save_as_topk(self, path, k)  # type: ignore[arg-type]

    def to_jumprelu(self, threshold: float) -> Any:
        """SAELens's own ``JumpReLUSAE`` serving this SAE at ``threshold`` (see ``exports.to_jumprelu``)."""
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
        ``path``, loadable by SAELens alone (``exports.save_as_jumprelu``)."""
        return save_as_jumprelu(self, path, threshold=threshold, mean_l0=mean_l0, activations=activations)  # type: ignore[arg-type]


# --- Export at one budget k as SAELens's "topk" -----------------------------------------------------------------


def hierarchy_of(sae: Any) -> tuple[list[int] | None, list[float] | None]:
    """The levels and level weights the SAE was trained with; ``(None, None)`` when nothing records them.

    A training SAE has them on its config; a saved (inference) SAE keeps them in
    ``cfg.metadata.training_architecture_details``, where ``null`` means the defaults (every budget 1..K, uniform).
    """
    if isinstance(sae, TopKTrainingSAE) and hasattr(sae.cfg, "levels"):
        return sae.cfg.levels, sae.cfg.level_weights
    details = sae.cfg.metadata.get("training_architecture_details")
    if not isinstance(details, dict) or "hierarchy_levels" not in details:
        return None, None
    levels = resolve_levels(sae.cfg.k, details["hierarchy_levels"])
    return levels, resolve_level_weights(levels, details.get("hierarchy_weights"))


def to_topk(sae: Any, k: int, *, source: str | None = None) -> TopKSAE:
    """SAELens's own ``TopKSAE`` that computes what ``sae`` computes at budget ``k``: same encode, decode, forward.

    The weights are copied (``sae`` is left untouched). When ``rescale_acts_by_decoder_norm`` is set (SAELens's TopK
    training default; an in-memory training SAE still has unnormalised decoder rows), the decoder norms are folded
    into ``W_enc``/``b_enc``/``W_dec`` exactly as SAELens's TopK save does, and the flag is then turned off: the
    weights alone define the exported SAE, so tools that ignore the flag read it correctly too. Agreement with
    ``sae.encode(x, k=k)`` is to float rounding (folding reorders a few multiplications), so two pre-activations
    within rounding of each other at the k-th place could in principle swap; ``sae`` itself is then no more certain.

    Half precision: folding rounds the exported weights, so the export's pre-activations differ from ``sae``'s by a
    rounding step, and two values at the k-th and (k+1)-th places that are within that step can swap. In float32 and
    float64 no token was seen to differ (tested); in bfloat16 and float16 some do, always where the two values are
    within a few units of rounding of each other (tested: within 4 eps): measured on a random 512-latent SAE at k = 4
    and 16, 4-12% of tokens in bfloat16 and 0.7-1.3% in float16 keep another latent at the k-th place, with
    reconstructions that differ by that one latent's contribution. Export ``sae.to(torch.float32)`` where that matters.

    ``cfg.metadata[EXPORT_METADATA_KEY]`` records the source (``source``: a path or repo id, when known), K, k and the
    hierarchy levels and weights.
    """
    _check_exportable(sae, "to_topk")
    k = validate_k(k, sae.cfg.k)
    cfg_dict = _inference_cfg_dict(sae)
    metadata = {**cfg_dict["metadata"], EXPORT_METADATA_KEY: _export_record(sae, source, k=k)}
    cfg = TopKSAEConfig.from_dict({**cfg_dict, "architecture": "topk", "k": k, "metadata": metadata})
    topk = sae_with_weights(TopKSAE, cfg, {name: tensor.detach().clone() for name, tensor in sae.state_dict().items()})
    if cfg.rescale_acts_by_decoder_norm:
        topk.fold_W_dec_norm()
        topk.cfg.rescale_acts_by_decoder_norm = False
    return topk


def _check_exportable(sae: Any, action: str) -> None:
    if not isinstance(sae, VariableKMixin):
        raise ValueError(
            f"{action} exports a {ARCHITECTURE} SAE (HierarchicalTopKSAE or HierarchicalTopKTrainingSAE); "
            f"got {type(sae).__name__}"
        )


def _inference_cfg_dict(sae: Any) -> dict[str, Any]:
    """What SAELens would save for this SAE (a training SAE's inference config keeps training details in metadata)."""
    if isinstance(sae, TopKTrainingSAE):
        return sae.cfg.get_inference_sae_cfg_dict()
    return sae.cfg.to_dict()


def _export_record(sae: Any, source: str | None, **budget: Any) -> dict[str, Any]:
    """``cfg.metadata[EXPORT_METADATA_KEY]`` of an export: where it came from, K, the budget, the hierarchy."""
    levels, weights = hierarchy_of(sae)
    return {
        "source_architecture": ARCHITECTURE,
        "source": source,
        "K": sae.cfg.k,
        **budget,
        "hierarchy_levels": levels,
        "hierarchy_weights": weights,
        "exported_by": f"sae-lens-hierarchical {package_version()}",
    }


def save_as_topk(sae: Any, path: str | Path, k: int, *, source: str | None = None) -> Path:
    """Write :func:`to_topk` ``(sae, k)`` to the new directory ``path`` in SAELens format; returns ``path``.

    The files are written to a scratch directory beside ``path`` and renamed into place at the end, so ``path`` holds
    either the whole SAE or nothing. An existing non-empty ``path`` is refused (nothing is overwritten).
    """
    topk = to_topk(sae, k, source=source)
    return write_new_directory(path, topk.save_model)


def save_as_topk_variants(
    sae: Any, path: str | Path, ks: Sequence[int], *, source: str | None = None
) -> dict[int, Path]:
    """One TopK SAE per budget, ``path/k_<k>``, written all at once like :func:`save_as_topk`."""
    ks = check_budgets(ks, sae.cfg.k)

    def write(directory: Path) -> None:
        for k in ks:  # one export in memory at a time
            to_topk(sae, k, source=source).save_model(directory / f"k_{k}")

    write_new_directory(path, write)
    return {k: Path(path) / f"k_{k}" for k in ks}


def check_budgets(ks: Iterable[int], max_k: int) -> list[int]:
    """``ks`` as a list after checking each is in 1..K and none repeats (one ``ValueError`` naming the value)."""
    checked: list[int] = []
    for k in ks:
        if validate_k(k, max_k) in checked:
            raise ValueError(f"budget k={k} is given twice; each k in 1..K={max_k} at most once")
        checked.append(k)
    if not checked:
        raise ValueError(f"at least one budget k in 1..K={max_k} is needed")
    return checked


# --- Export served by one threshold as SAELens's "jumprelu" ----------------------------------------------------


def to_jumprelu(
    sae: Any,
    threshold: float,
    *,
    source: str | None = None,
    calibration: dict[str, Any] | None = None,
) -> JumpReLUSAE:
    """SAELens's own ``JumpReLUSAE`` that computes what ``sae.encode(x, threshold=threshold)`` computes, except the
    K cap: a JumpReLU SAE keeps *every* latent above its threshold, so a token with more than K activations >= θ
    keeps more than K latents there (:func:`tokens_over_k` measures how often). Everywhere else it agrees to float
    rounding: decoder norms are folded into the weights as in :func:`to_topk`, every latent gets the threshold just
    below θ (JumpReLU keeps ``> threshold``, serving by threshold keeps ``>= θ``), and decoding is the same sum.

    ``calibration`` (how θ was chosen: target mean L0, tokens, share over K) is recorded with the source in
    ``cfg.metadata[EXPORT_METADATA_KEY]``. ``sae`` is left untouched.
    """
    _check_exportable(sae, "to_jumprelu")
    threshold = validate_threshold(threshold)
    topk = to_topk(sae, sae.cfg.k, source=source)  # the folded weights
    cfg_dict = _inference_cfg_dict(sae)
    record = _export_record(sae, source, threshold=threshold, calibration=calibration)
    metadata = {**cfg_dict["metadata"], EXPORT_METADATA_KEY: record}
    cfg = JumpReLUSAEConfig.from_dict({**cfg_dict, "architecture": "jumprelu", "metadata": metadata})
    state = topk.state_dict()
    # JumpReLU keeps ``> threshold``; serving keeps ``>= θ`` (θ in the SAE's dtype, as its comparisons round it):
    # the next float below θ makes the two the same test.
    theta = torch.full_like(state["b_enc"], threshold)
    state["threshold"] = torch.nextafter(theta, torch.full_like(theta, -math.inf))
    return sae_with_weights(JumpReLUSAE, cfg, state)


@torch.no_grad()
def kept_counts(export: JumpReLUSAE, activations: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``[tokens]``: how many latents the JumpReLU ``export`` keeps on each token of ``activations``."""
    counts = []
    for start in range(0, activations.shape[0], batch_size):
        x = activations[start : start + batch_size].to(export.device, export.dtype)
        counts.append((export.encode(x) > 0).sum(dim=-1).cpu())
    return torch.cat(counts)


def share_over_k(export: JumpReLUSAE, activations: torch.Tensor, max_k: int, batch_size: int = 1024) -> float:
    """The share of tokens of ``activations`` ``[tokens, d_in]`` on which the JumpReLU ``export`` keeps more than
    ``max_k`` latents: there it differs from the HierarchicalTopK SAE it came from, which caps every token at K."""
    return float((kept_counts(export, activations, batch_size) > max_k).double().mean())


# A threshold below every activation that matters: the export keeps all positive activations.
_SMALLEST_THRESHOLD = 1e-30


def save_as_jumprelu(
    sae: Any,
    path: str | Path,
    *,
    threshold: float | None = None,
    mean_l0: float | None = None,
    activations: torch.Tensor | None = None,
    source: str | None = None,
) -> Path:
    """Write :func:`to_jumprelu` to the new directory ``path`` (atomically, never over an existing one); returns it.

    Give ``threshold``, or ``mean_l0`` with ``activations`` ``[tokens, d_in]`` (held-out, special tokens removed) to
    calibrate it on: the threshold at which the *export* has that mean L0 there. It keeps every activation above
    it, K cap or not, so where many tokens would exceed K this threshold is higher than the one that gives the capped
    SAE the same mean L0. With activations, the metadata also records the mean L0 reached there and the share of
    tokens over K (:func:`share_over_k`).
    """
    if (threshold is None) == (mean_l0 is None):
        raise ValueError(f"give exactly one of threshold and mean_l0; got threshold={threshold}, mean_l0={mean_l0}")
    if mean_l0 is not None and activations is None:
        raise ValueError("mean_l0 needs activations to calibrate the threshold on")
    _check_exportable(sae, "save_as_jumprelu")
    check_new_directory(path)
    calibration = None
    if activations is not None:
        if threshold is None:
            uncapped = to_jumprelu(sae, _SMALLEST_THRESHOLD)  # every positive activation: what the export ranks
            threshold = calibrate_threshold(uncapped, activations, mean_l0)  # type: ignore[arg-type]
        counts = kept_counts(to_jumprelu(sae, threshold, source=source), activations)
        calibration = {
            "mean_l0_target": mean_l0,
            "tokens": activations.shape[0],
            "mean_l0": float(counts.double().mean()),
            "share_of_tokens_over_K": float((counts > sae.cfg.k).double().mean()),
        }
    export = to_jumprelu(sae, threshold, source=source, calibration=calibration)  # type: ignore[arg-type]
    return write_new_directory(path, export.save_model)


def package_version() -> str:
    """This package's installed version, for records (\"unknown\" in a source tree that was not installed)."""
    try:
        return version("sae-lens-hierarchical")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"
