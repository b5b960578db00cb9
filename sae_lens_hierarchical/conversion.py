"""Turn a pretrained SAE into a HierarchicalTopK training SAE that computes what the source computes at k = K.

Conversions live at the edge: this module reads a source (a SAELens directory, a Hugging Face repo or SAELens release,
or a directory in EleutherAI sparsify's own format), maps its weights and conventions onto a ``hierarchical_topk``
training SAE, and records where it came from; fine-tuning is SAELens's runner's job
(:mod:`sae_lens_hierarchical.jobs.hierarchicalize`).

What is kept, so that at k = K the new SAE equals the source before any training step:

- TopK (SAELens ``topk``, this package's ``hierarchical_topk``, sparsify): K, the weights, ``apply_b_dec_to_input``
  and the ranking (by pre-activation, times decoder row norms when the source rescales by them);
- JumpReLU with one threshold for every latent (BatchTopK and Matryoshka SAEs as SAELens saves them): the weights, a
  K given or read off the source's L0 on calibration activations, and the threshold as the new SAE's default
  serving threshold, so that at (k = K, that threshold) it equals the source on every token the source keeps at most
  K latents for;
- an activation scaling that SAELens folded into the weights at the end of training (``expected_average_only_in``,
  ``covariance_whitening`` in a saved config) stays folded: the new SAE takes raw activations.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE
from safetensors.torch import load_file

from sae_lens_hierarchical.budget import is_int

SOURCE_METADATA_KEY = "hierarchicalized_from"
# SAE config fields the source fixes (a fine-tune's settings may not change them).
SOURCE_FIELDS = (
    "d_in",
    "d_sae",
    "k",
    "dtype",
    "apply_b_dec_to_input",
    "rescale_acts_by_decoder_norm",
    "reshape_activations",
)
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
# Normalisations SAELens folds into the weights when training ends: a saved SAE with one of them takes raw inputs.
_FOLDED_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")
_CONVERTIBLE = "topk, hierarchical_topk, sparsify TopK, or jumprelu with one threshold for every latent (BatchTopK)"


def is_sparsify_directory(path: Path) -> bool:
    """A directory in sparsify's own format: ``cfg.json`` with sparsify's fields and ``sae.safetensors``."""
    if not (path / SPARSIFY_WEIGHTS).is_file() or not (path / SPARSIFY_CONFIG).is_file():
        return False
    cfg = json.loads((path / SPARSIFY_CONFIG).read_text())
    return isinstance(cfg, dict) and "k" in cfg and ("num_latents" in cfg or "expansion_factor" in cfg)


def load_sparsify_directory(path: str | Path, device: str = "cpu") -> TopKSAE:
    """A sparsify ``SparseCoder`` saved with ``save_to_disk`` as SAELens's ``TopKSAE`` computing the same thing.

    sparsify encodes ``relu((x - b_dec) @ encoder.weight.T + encoder.bias)``, keeps the k largest, and decodes with
    ``W_dec`` ``[num_latents, d_in]`` plus ``b_dec``. (SAELens 6.54's ``sparsify_disk_loader`` transposes ``W_dec``
    and ties ``apply_b_dec_to_input`` to ``normalize_decoder``, which do not match sparsify 1.3's files, so the files
    are read here.) Transcoders, skip connections and the ``groupmax`` activation are refused.
    """
    path = Path(path)
    cfg = json.loads((path / SPARSIFY_CONFIG).read_text())
    for flag, meaning in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(flag):
            raise ValueError(f"{path} holds a sparsify SAE with {meaning} ({flag}=true); only plain TopK SAEs convert")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path} holds a sparsify SAE with activation {cfg['activation']!r}; only 'topk' converts")
    weights = load_file(path / SPARSIFY_WEIGHTS, device=device)
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or d_in * cfg["expansion_factor"])
    topk_cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=int(cfg["k"]), dtype=str(weights["W_dec"].dtype).split(".")[1])
    topk_cfg.metadata.hook_name = _sparsify_hook_name(path.name)
    state = {
        "W_enc": weights["encoder.weight"].T.contiguous(),
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    topk_cfg.device = device
    return sae_with_weights(TopKSAE, topk_cfg, state)


def _sparsify_hook_name(folder: str) -> str | None:
    """sparsify names a residual-stream SAE's folder by its layer (``layers.6``): TransformerLens's hook after it."""
    parts = folder.replace("_", ".").split(".")
    if len(parts) == 2 and parts[0] == "layers" and parts[1].isdigit():
        return f"blocks.{parts[1]}.hook_resid_post"
    return None


def file_hashes(path: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the files of a saved SAE: what identifies the source wherever it was copied."""
    return {
        file.name: hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.iterdir())
        if file.is_file() and file.suffix in (".json", ".safetensors")
    }


def from_sae(
    cls: Any,
    sae: SAE[Any],
    k: int | None = None,
    *,
    calibration_activations: torch.Tensor | None = None,
    l0_percentile: float = 99.0,
    source: dict[str, Any] | None = None,
    **training_settings: Any,
) -> Any:
    """A ``cls`` (:class:`~sae_lens_hierarchical.HierarchicalTopKTrainingSAE`) training SAE holding ``sae``'s weights,
    equal to it at k = K before any training (see the module docstring for each source kind).

    Args:
        sae: a SAELens SAE: ``topk``, ``hierarchical_topk``, or ``jumprelu`` with one threshold for every latent.
        k: K. TopK sources have theirs (``k`` must be None or equal to it). JumpReLU sources need it, or
            ``calibration_activations`` ``[tokens, d_in]`` to choose it: the ``l0_percentile`` percentile of the
            source's per-token L0 there (rounded up), so that tokens above it are rare.
        source: where the SAE came from (name, files), recorded with the conversion in ``cfg.metadata``.
        training_settings: further training-config fields (``hierarchy_levels``, ``loss_implementation``,
            ``aux_loss_coefficient``, ``normalize_activations`` for fine-tuning, ...).
    """
    architecture = sae.cfg.architecture()
    record: dict[str, Any] = {"architecture": architecture, **(source or {})}
    k = check_convertible(sae, k)
    threshold = None
    if isinstance(sae, JumpReLUSAE):
        thresholds = sae.threshold.detach()
        if k is None:
            k, record["K_from"] = _jumprelu_budget(sae, calibration_activations, l0_percentile)
        else:
            record["K_from"] = "given"
        # JumpReLU keeps pre-activations > θ; serving keeps >= θ': the next float above θ.
        threshold = float(torch.nextafter(thresholds.flatten()[:1], torch.tensor([math.inf], dtype=thresholds.dtype)))
        record["threshold"] = float(thresholds.flatten()[0])
        rescale = False
    else:
        record["K_from"] = "the source's k"
        rescale = bool(sae.cfg.rescale_acts_by_decoder_norm)
    record["K"] = k
    metadata = {**sae.cfg.metadata.to_dict(), SOURCE_METADATA_KEY: record}
    cfg_dict = {
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": sae.cfg.dtype,
        "device": sae.cfg.device,
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "reshape_activations": sae.cfg.reshape_activations,
        "rescale_acts_by_decoder_norm": rescale,
        "normalize_activations": "none",
        **training_settings,
        "k": k,
    }
    cfg = cls.get_sae_config_class_for_architecture("hierarchical_topk")(**cfg_dict)
    cfg.metadata = type(sae.cfg.metadata).from_dict(metadata)
    state = {name: sae.state_dict()[name].detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    converted = sae_with_weights(cls, cfg, state)
    converted.set_threshold(threshold)
    return converted


def check_convertible(sae: SAE[Any], k: int | None) -> int | None:
    """K of the converted SAE (None: to be chosen from calibration activations), after one clear error for a source
    that does not convert: another architecture, a threshold per latent, a per-token normalisation, a ``k`` that
    contradicts a TopK source's, or a K outside 1..d_sae."""
    architecture = sae.cfg.architecture()
    normalization = sae.cfg.normalize_activations
    if normalization not in _FOLDED_NORMALIZATIONS:
        raise ValueError(
            f"cannot convert an SAE with normalize_activations={normalization!r} (a per-token normalisation, not "
            f"folded into the weights); allowed: {list(_FOLDED_NORMALIZATIONS)}"
        )
    if isinstance(sae, TopKSAE | TopKTrainingSAE) and architecture in ("topk", "hierarchical_topk"):
        source_k = int(sae.cfg.k)
        if k is not None and k != source_k:
            raise ValueError(f"a {architecture} SAE's K is its k={source_k}; got k={k!r} (leave k out)")
        k = source_k
    elif isinstance(sae, JumpReLUSAE):
        thresholds = sae.threshold.detach()
        if not bool((thresholds == thresholds.flatten()[0]).all()):
            raise ValueError(
                "cannot convert a jumprelu SAE with a threshold per latent: a global ranking cannot reproduce it; "
                f"convertible: {_CONVERTIBLE}"
            )
    else:
        raise ValueError(f"cannot convert a {architecture!r} SAE ({type(sae).__name__}); convertible: {_CONVERTIBLE}")
    if k is not None and (not is_int(k) or not 1 <= k <= sae.cfg.d_sae):
        raise ValueError(f"K must be an int in 1..d_sae={sae.cfg.d_sae}; got k={k!r}")
    return k


def _jumprelu_budget(sae: JumpReLUSAE, activations: torch.Tensor | None, percentile: float) -> tuple[int, str]:
    """K for a JumpReLU source without a given one, and how it was chosen: a percentile of its L0 on
    ``activations``."""
    if activations is None:
        raise ValueError(
            "a jumprelu SAE has no K: pass k (1..d_sae) or calibration activations to choose it from the SAE's L0"
        )
    if not 0 < percentile <= 100:
        raise ValueError(f"l0_percentile must be in (0, 100]; got {percentile}")
    with torch.no_grad():
        counts = torch.cat(
            [(sae.encode(batch.to(sae.device, sae.dtype)) > 0).sum(dim=-1) for batch in activations.split(1024)]
        ).double()
    chosen = max(1, math.ceil(float(counts.quantile(percentile / 100))))
    return min(chosen, sae.cfg.d_sae), (
        f"L0 percentile {percentile:g} of {len(counts)} calibration tokens (mean L0 {float(counts.mean()):.2f})"
    )


def sae_with_weights(sae_class: Any, cfg: Any, state: dict[str, torch.Tensor]) -> Any:
    """``sae_class(cfg)`` holding ``state``'s tensors on ``cfg.device``, built as SAELens's loaders build: on the meta
    device first (no random initialisation, no second copy)."""
    device, cfg.device = cfg.device, "meta"
    sae = sae_class(cfg)
    sae.cfg.device = device
    sae.load_state_dict({name: tensor.to(device) for name, tensor in state.items()}, assign=True)
    sae.device = torch.device(device)
    return sae
