"""The ``inspect`` job: a latent dashboard of a saved SAE on its embedded preset's held-out tokens.

The held-out tokens and activations are the ones ``evaluate`` scores (the same cache, so nothing is recomputed after a
training job), and special tokens such as BOS are excluded as there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_lens import SAE

from sae_lens_hierarchical.data import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.interpretability.dashboard import LatentDashboard, latent_dashboard
from sae_lens_hierarchical.jobs.common import check_output_dir, prepare_embedded_activations
from sae_lens_hierarchical.presets import Preset


def default_dashboard_dir(source: str | Path, sae_id: str | None = None) -> Path:
    """Where ``inspect`` writes by default: ``<SAE_DIR>-dashboard`` beside a local SAE directory (so several SAEs in
    one folder each get their own), ``results/dashboards/<owner>_<name>[_<sae_id>]`` for a Hugging Face repo."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / sae_id if sae_id else path
        return path.resolve().with_name(f"{path.resolve().name}-dashboard")
    name = "_".join(part for part in (str(source), sae_id) if part).replace("/", "_")
    return Path("results") / "dashboards" / name


def run_inspect_job(
    sae: SAE[Any],
    preset: Preset,
    output_dir: Path,
    *,
    latents: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    n_contexts: int = 10,
    eval_tokens: int | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> LatentDashboard:
    """Load the preset's model, cache (or reuse) its held-out activations, write the dashboard to ``output_dir``.

    ``eval_tokens`` (default the preset's) held-out tokens are read as whole sequences, as ``evaluate`` reads them;
    ``latents``, ``ks`` and ``n_contexts`` are :func:`latent_dashboard`'s.
    """
    if not preset.embedded:
        raise ValueError(f"preset {preset.name!r} has no embedded held-out corpus to inspect on")
    check_output_dir(output_dir, overwrite)  # before the model loads
    model = preset.load_model(device)
    activations = prepare_embedded_activations(
        preset, model, eval_tokens=eval_tokens or preset.eval_tokens, cache_root=cache_root, progress=progress
    )
    held_out = activations.held_out.load()[:]
    return latent_dashboard(
        model,
        sae,
        held_out["token_ids"],
        output_dir,
        activations=held_out[activations.held_out.key.hook_name],
        latents=latents,
        ks=ks,
        n_contexts=n_contexts,
        exclude_token_ids=activations.special_token_ids,
        overwrite=overwrite,
        progress=progress,
        title=f"{sae.cfg.architecture()} SAE on {preset.model_name} ({preset.hook_name}), held-out {preset.corpus}",
    )
