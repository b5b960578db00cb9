"""One-call loading of saved SAEs from a local directory or a Hugging Face repo / SAELens release.

SAELens splits this between ``SAE.load_from_disk`` (local paths only) and ``SAE.from_pretrained``
(releases and repo ids only); researchers pass around both kinds of location, so ``load_sae`` accepts
either. Importing this module registers ``"hierarchical_topk"`` (via the package ``__init__``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.registry import SAE_CLASS_REGISTRY
from safetensors import SafetensorError

from sae_lens_hierarchical.serving import ARCHITECTURE


def _looks_local(source: str | Path) -> bool:
    """A Path, an existing path, or a string that cannot be a ``owner/name`` repo id."""
    if isinstance(source, Path) or Path(source).expanduser().exists():
        return True
    return source.startswith((".", "/", "~")) or source.count("/") != 1


def load_sae(
    source: str | Path,
    sae_id: str | None = None,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    k: int | None = None,
) -> SAE[Any]:
    """Load an SAELens-format SAE from a local directory, a Hugging Face repo id or a SAELens release.

    Args:
        source: a directory holding ``cfg.json`` and ``sae_weights.safetensors``; or a repo id
            (``owner/name``) or SAELens release name, as for ``SAE.from_pretrained``.
        sae_id: for a repo or release, the SAE inside it (a folder of the repo); for a local directory, an
            optional sub-directory.
        device: where to put the weights.
        dtype: weight dtype (default: as saved for a directory, float32 for the hub, as in SAELens).
        k: for a HierarchicalTopK SAE, the inference budget to start with (default K).
    """
    if _looks_local(source):
        path = Path(source).expanduser()
        if sae_id is not None:
            path = path / sae_id
        _check_sae_directory(path)
        weights_path = path / SAE_WEIGHTS_FILENAME
        try:
            sae = SAE.load_from_disk(path, device=device, dtype=dtype)
        except (SafetensorError, RuntimeError) as error:  # truncated/corrupt file, or shapes that contradict cfg.json
            raise ValueError(f"could not load {weights_path}: {error}") from error
    else:
        if sae_id is None:
            raise ValueError(f"sae_id (the SAE's folder inside {source!r}) is required to load from the hub")
        sae = SAE.from_pretrained(str(source), sae_id, device=device, dtype=dtype or "float32")
    if k is not None:
        if not hasattr(sae, "set_k"):
            raise ValueError(f"k={k!r} was given but {type(sae).__name__} has no variable budget")
        sae.set_k(k)
    return sae


def _check_sae_directory(path: Path) -> None:
    """Fail with a message naming the file when a saved SAE is incomplete or its config cannot be used.

    SAELens would otherwise raise a bare ``KeyError`` for an unknown architecture, or silently fall back to a
    default ``k`` when the config has none.
    """
    cfg_path = path / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no SAE at {path}: {cfg_path} does not exist")
    if not (path / SAE_WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(f"incomplete SAE at {path}: {path / SAE_WEIGHTS_FILENAME} does not exist")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{cfg_path} is not valid JSON: {error}") from error
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object; got {type(cfg).__name__}")
    architecture = cfg.get("architecture", "standard")
    if architecture not in SAE_CLASS_REGISTRY:
        raise ValueError(
            f"{cfg_path} has architecture {architecture!r}, which SAELens does not know; registered: "
            f"{sorted(SAE_CLASS_REGISTRY)} (import the package that provides it before loading)"
        )
    if architecture == ARCHITECTURE and "k" not in cfg:
        raise ValueError(f"{cfg_path} has no 'k' (K, the largest budget this {ARCHITECTURE} SAE was trained for)")
