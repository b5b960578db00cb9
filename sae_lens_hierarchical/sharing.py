"""Share a HierarchicalTopK SAE: export one budget k as a plain SAELens TopK SAE, and publish on the Hugging Face Hub.

SAELens has no plugin discovery, so a ``"hierarchical_topk"`` SAE loads only where this package is installed and
imported. :func:`to_topk` / :func:`save_as_topk` turn the SAE at one budget k into SAELens's own ``"topk"``
architecture, which loads with SAELens alone (``SAE.load_from_disk`` / ``SAE.from_pretrained``). :func:`upload`
publishes the SAE, optionally with such TopK exports, through SAELens's ``upload_saes_to_huggingface`` (one folder
per SAE id) plus a model card; ``dry_run`` writes exactly the files the upload would commit into a local folder.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

from huggingface_hub import HfApi
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.training import upload_saes_to_huggingface as sae_lens_upload

from sae_lens_hierarchical._files import check_new_directory, write_new_directory
from sae_lens_hierarchical.hierarchical_topk_sae import (
    ARCHITECTURE,
    HierarchicalTopKSAE,
    HierarchicalTopKTrainingSAE,
    resolve_level_weights,
    resolve_levels,
    validate_k,
)
from sae_lens_hierarchical.loading import load_sae

HierarchicalSAE = HierarchicalTopKSAE | HierarchicalTopKTrainingSAE

EXPORT_METADATA_KEY = "hierarchical_topk_export"
MODEL_CARD_FILENAME = "README.md"
PER_K_FILENAME = "per_k.md"


# --- Export at one budget k as SAELens's "topk" -----------------------------------------------------------------


def hierarchy_of(sae: HierarchicalSAE) -> tuple[list[int] | None, list[float] | None]:
    """The levels and level weights the SAE was trained with; ``(None, None)`` when nothing records them.

    A training SAE has them on its config; a saved (inference) SAE keeps them in
    ``cfg.metadata.training_architecture_details``, where ``null`` means the defaults (every budget 1..K, uniform).
    """
    if isinstance(sae, HierarchicalTopKTrainingSAE):
        return sae.cfg.levels, sae.cfg.level_weights
    details = sae.cfg.metadata.get("training_architecture_details")
    if not isinstance(details, dict) or "hierarchy_levels" not in details:
        return None, None
    levels = resolve_levels(sae.cfg.k, details["hierarchy_levels"])
    return levels, resolve_level_weights(levels, details.get("hierarchy_weights"))


def to_topk(sae: HierarchicalSAE, k: int, *, source: str | None = None) -> TopKSAE:
    """SAELens's own ``TopKSAE`` that computes what ``sae`` computes at budget ``k``: same encode, decode, forward.

    The weights are copied (``sae`` is left untouched). When ``rescale_acts_by_decoder_norm`` is set (SAELens's TopK
    training default; an in-memory training SAE still has unnormalised decoder rows), the decoder norms are folded
    into ``W_enc``/``b_enc``/``W_dec`` exactly as SAELens's TopK save does, and the flag is then turned off: the
    weights alone define the exported SAE, so tools that ignore the flag read it correctly too. Agreement with
    ``sae.encode(x, k=k)`` is to float rounding (folding reorders a few multiplications), so two pre-activations
    within rounding of each other at the k-th place could in principle swap; ``sae`` itself is then no more certain.

    Ties: SAELens's TopK takes ``torch.topk(k, sorted=False)`` while this package slices a sorted top-K, so the two may
    pick different latents among *equal* pre-activations at the k-th place. With continuous inputs exact ties happen
    only among values that ReLU sets to zero (e.g. latents whose encoder is zero, or fewer than k positive
    pre-activations), which contribute nothing: the activations and reconstructions agree regardless.

    ``cfg.metadata[EXPORT_METADATA_KEY]`` records the source (``source``: a path or repo id, when known), K, k and the
    hierarchy levels and weights.
    """
    if not isinstance(sae, HierarchicalTopKSAE | HierarchicalTopKTrainingSAE):
        raise ValueError(
            f"to_topk exports a {ARCHITECTURE} SAE (HierarchicalTopKSAE or HierarchicalTopKTrainingSAE); "
            f"got {type(sae).__name__}"
        )
    k = validate_k(k, sae.cfg.k)
    # What SAELens would save for this SAE (a training SAE's inference config keeps training details in metadata).
    cfg_dict = (
        sae.cfg.get_inference_sae_cfg_dict() if isinstance(sae, HierarchicalTopKTrainingSAE) else sae.cfg.to_dict()
    )
    levels, weights = hierarchy_of(sae)
    export_record = {
        "source_architecture": ARCHITECTURE,
        "source": source,
        "K": sae.cfg.k,
        "k": k,
        "hierarchy_levels": levels,
        "hierarchy_weights": weights,
        "exported_by": f"sae-lens-hierarchical {_package_version()}",
    }
    metadata = {**cfg_dict["metadata"], EXPORT_METADATA_KEY: export_record}
    cfg = TopKSAEConfig.from_dict({**cfg_dict, "architecture": "topk", "k": k, "metadata": metadata})
    device, cfg.device = cfg.device, "meta"  # as SAELens's loaders: no random initialisation, no second copy
    topk = TopKSAE(cfg)
    topk.cfg.device = device
    topk.load_state_dict({name: tensor.detach().clone() for name, tensor in sae.state_dict().items()}, assign=True)
    if cfg.rescale_acts_by_decoder_norm:
        topk.fold_W_dec_norm()
        topk.cfg.rescale_acts_by_decoder_norm = False
    return topk


def save_as_topk(sae: HierarchicalSAE, path: str | Path, k: int, *, source: str | None = None) -> Path:
    """Write :func:`to_topk` ``(sae, k)`` to the new directory ``path`` in SAELens format; returns ``path``.

    The files are written to a scratch directory beside ``path`` and renamed into place at the end, so ``path`` holds
    either the whole SAE or nothing. An existing non-empty ``path`` is refused (nothing is overwritten).
    """
    topk = to_topk(sae, k, source=source)
    return write_new_directory(path, topk.save_model)


def save_as_topk_variants(
    sae: HierarchicalSAE, path: str | Path, ks: Sequence[int], *, source: str | None = None
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


def _package_version() -> str:
    try:
        return version("sae-lens-hierarchical")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


# --- Publishing on the Hub ---------------------------------------------------------------------------------------


class FolderRepo:
    """Stands in for ``HfApi`` in a dry run: writes what ``upload_folder`` / ``upload_file`` would commit to ``root``.

    ``upload_folder`` selects files the way ``HfApi.upload_folder`` does (its ``allow_patterns`` / ``ignore_patterns``
    plus the Hub's default ignores, matched on paths relative to the folder, prefixed by ``path_in_repo``), so running
    SAELens's ``upload_saes_to_huggingface`` against it lays out exactly the repository the real upload would.
    """

    def __init__(self, root: Path):
        self.root = root

    def repo_info(self, repo_id: str, **_: Any) -> None:
        """The repository "exists", so SAELens does not try to create it."""

    def upload_folder(
        self,
        *,
        folder_path: str | Path,
        path_in_repo: str | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        **_: Any,
    ) -> None:
        folder = Path(folder_path)
        files = {file.relative_to(folder).as_posix(): file for file in sorted(folder.glob("**/*")) if file.is_file()}
        ignored = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        selected = filter_repo_objects(
            files, allow_patterns=allow_patterns, ignore_patterns=[*ignored, *DEFAULT_IGNORE_PATTERNS]
        )
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        for relative in selected:
            self._write(prefix + relative, files[relative].read_bytes())

    def upload_file(self, *, path_or_fileobj: bytes | io.BytesIO, path_in_repo: str, **_: Any) -> None:
        content = path_or_fileobj.getvalue() if isinstance(path_or_fileobj, io.BytesIO) else path_or_fileobj
        self._write(path_in_repo, content)

    def _write(self, path_in_repo: str, content: bytes) -> None:
        target = self.root / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def topk_sae_id(sae_id: str, k: int) -> str:
    """The repo folder of the TopK export at budget ``k``: inside the hierarchical SAE's own folder."""
    return f"{sae_id}/topk_k{k}"


def upload(
    sae_dir: str | Path,
    repo_id: str,
    *,
    sae_id: str | None = None,
    topk_ks: Sequence[int] = (),
    dry_run: str | Path | None = None,
    revision: str = "main",
) -> dict[str, str]:
    """Publish the saved HierarchicalTopK SAE in ``sae_dir`` to the Hub repo ``repo_id`` (``owner/name``).

    Uses SAELens's ``upload_saes_to_huggingface``: the SAE goes to the folder ``sae_id`` (default: its hook name) with
    the files SAELens uploads (``cfg.json``, ``sae_weights.safetensors``, and ``sparsity.safetensors`` /
    ``runner_cfg.json`` when present); each budget in ``topk_ks`` is exported with :func:`to_topk` to the folder
    ``<sae_id>/topk_k<k>``. Then ``README.md`` (:func:`model_card`) is written at the top, replacing any there.
    With ``dry_run`` nothing touches the network: the same files are written to the new directory ``dry_run``.
    Returns ``{sae_id: what it is}`` for every SAE uploaded.
    """
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be 'owner/name' (one '/'); got {repo_id!r}")
    validate_repo_id(repo_id)
    sae = load_sae(sae_dir)
    if not isinstance(sae, HierarchicalTopKSAE):
        raise ValueError(f"{sae_dir} holds a {sae.cfg.architecture()!r} SAE; upload publishes {ARCHITECTURE!r} SAEs")
    sae_id = _check_sae_id(sae_id if sae_id is not None else sae.cfg.metadata.hook_name)
    topk_ks = check_budgets(topk_ks, sae.cfg.k) if topk_ks else []
    if dry_run is not None:
        check_new_directory(dry_run)  # before any work
    with TemporaryDirectory() as staging:
        saes: dict[str, Path] = {sae_id: Path(sae_dir)}
        contents = {sae_id: f"{ARCHITECTURE} SAE, K={sae.cfg.k}"}
        for k in topk_ks:
            variant = topk_sae_id(sae_id, k)
            saes[variant] = save_as_topk(sae, Path(staging) / f"k_{k}", k, source=f"{repo_id}/{sae_id}")
            contents[variant] = f"topk SAE, k={k}"
        card = model_card(sae, repo_id, sae_id, topk_ks=topk_ks, per_k_table=find_per_k_table(sae_dir))
        if dry_run is None:
            _publish(HfApi(), saes, repo_id, card, revision)
        else:
            write_new_directory(dry_run, lambda root: _publish(FolderRepo(root), saes, repo_id, card, revision))
    return contents


def _publish(api: Any, saes: Mapping[str, Path], repo_id: str, card: str, revision: str) -> None:
    """SAELens's upload with ``api`` as its ``HfApi``, then the model card (SAELens's default README is skipped)."""
    with mock.patch.object(sae_lens_upload, "HfApi", return_value=api):
        sae_lens_upload.upload_saes_to_huggingface(
            dict(saes), repo_id, hf_revision=revision, show_progress=False, add_default_readme=False
        )
    api.upload_file(
        path_or_fileobj=card.encode("utf-8"),
        path_in_repo=MODEL_CARD_FILENAME,
        repo_id=repo_id,
        revision=revision,
        commit_message="Add model card",
    )


def _check_sae_id(sae_id: str | None) -> str:
    """A folder path inside the repo: non-empty, relative, no ``..`` or empty parts."""
    if sae_id is None:
        raise ValueError("the SAE's metadata has no hook_name to use as its folder in the repo; pass sae_id")
    parts = sae_id.split("/")
    if not sae_id or sae_id.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"sae_id must be a relative folder path such as 'blocks.6.hook_resid_post'; got {sae_id!r}")
    return sae_id


def find_per_k_table(sae_dir: str | Path) -> str | None:
    """The ``per_k.md`` table of a results directory: next to the SAE's files or one level up (``results/x/sae``)."""
    sae_dir = Path(sae_dir)
    for candidate in (sae_dir / PER_K_FILENAME, sae_dir.parent / PER_K_FILENAME):
        if candidate.is_file():
            return candidate.read_text().strip()
    return None


def model_card(
    sae: HierarchicalTopKSAE,
    repo_id: str,
    sae_id: str,
    *,
    topk_ks: Sequence[int] = (),
    per_k_table: str | None = None,
) -> str:
    """The repo's ``README.md``: what the SAE is, its per-k quality when known, and how to load it."""
    cfg, metadata = sae.cfg, sae.cfg.metadata
    levels, weights = hierarchy_of(sae)
    if levels is None:
        levels_text = "not recorded"
    elif levels == list(range(1, cfg.k + 1)):
        levels_text = f"every budget 1..{cfg.k}"
    else:
        levels_text = ", ".join(map(str, levels))
    rows = [
        ("architecture", f"`{ARCHITECTURE}` (HierarchicalTopK, Balagansky et al., EMNLP 2025)"),
        ("K (largest budget; any k ≤ K at inference)", str(cfg.k)),
        ("hierarchy levels (budgets trained)", levels_text),
        ("level weights", _weights_text(weights)),
        ("d_in", str(cfg.d_in)),
        ("d_sae", str(cfg.d_sae)),
        ("model", f"`{metadata.model_name}`"),
        ("hook", f"`{metadata.hook_name}`"),
        ("dtype", cfg.dtype),
    ]
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "- sparse-autoencoder",
        "- saelens",
        "- hierarchical-topk",
        "---",
        "",
        f"# HierarchicalTopK SAE for {metadata.model_name}, `{metadata.hook_name}`",
        "",
        f"One TopK SAE trained at the largest budget K = {cfg.k}, whose budget k ≤ K is chosen at inference: the "
        "latents active at k are the first k of each token's sorted top-K, so budgets are nested.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    if per_k_table is not None:
        lines += ["## Quality at every budget k", "", per_k_table, ""]
    small, medium = max(1, cfg.k // 8), max(1, cfg.k // 4)
    lines += [
        "## Use it",
        "",
        f"Loading needs the `sae-lens-hierarchical` package, which registers the architecture {ARCHITECTURE!r} with "
        "SAELens when imported.",
        "",
        "```python",
        "import sae_lens_hierarchical",
        "from sae_lens_hierarchical import load_sae",
        "",
        f'sae = load_sae("{repo_id}", "{sae_id}", k={medium})  # or SAE.from_pretrained(...) after the import',
        f"with sae.use_k({small}):  # any budget 1..{cfg.k}, e.g. around HookedSAETransformer.run_with_saes",
        "    reconstruction = sae(activations)",
        f"acts = sae.encode(activations, k={medium})",
        "```",
        "",
    ]
    if topk_ks:
        lines += [
            "## Plain SAELens TopK exports",
            "",
            "The same SAE at fixed budgets, saved as SAELens's own `topk` architecture (decoder norms folded in): they "
            "load with SAELens alone and give the same activations and reconstructions as the SAE above at that k.",
            "",
            "| k | sae_id |",
            "|---:|---|",
            *(f"| {k} | `{topk_sae_id(sae_id, k)}` |" for k in topk_ks),
            "",
            "```python",
            "from sae_lens import SAE",
            "",
            f'sae = SAE.from_pretrained("{repo_id}", "{topk_sae_id(sae_id, topk_ks[0])}")',
            "```",
            "",
        ]
    return "\n".join(lines)


def _weights_text(weights: list[float] | None) -> str:
    if weights is None:
        return "not recorded"
    return "uniform" if len(set(weights)) == 1 else ", ".join(map(str, weights))
