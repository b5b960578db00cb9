"""Checkpoints that a job can resume from, and stopping at a step boundary when the job is preempted.

A checkpoint counts only once its marker (:data:`CHECKPOINT_MARKER`) is written, after every file of it; the marker
records the steps done and the job's settings, so a rerun resumes from the newest complete checkpoint of the same job
and refuses one of another. On SIGTERM/SIGINT (:func:`~sae_lens_hierarchical.preemption.stop_on_signals`) the training
loop writes such a checkpoint after the step it is in and raises
:class:`~sae_lens_hierarchical.preemption.Preempted` with the way to resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from sae_lens_hierarchical._files import write_json_atomically
from sae_lens_hierarchical.distributed import SINGLE_PROCESS, DataParallel
from sae_lens_hierarchical.preemption import Preempted, current_request, stop_if_requested

CHECKPOINT_MARKER = "checkpoint_complete.json"


def mark_complete(checkpoint_path: Path, n_training_steps: int, settings: dict[str, Any]) -> None:
    """Write ``checkpoint_path``'s marker: from now on it is a checkpoint a rerun may resume from."""
    state = {"n_training_steps": n_training_steps, "settings": settings}
    write_json_atomically(checkpoint_path / CHECKPOINT_MARKER, state)


def latest_checkpoint(checkpoint_dir: Path, settings: dict[str, Any], ignored: Collection[str] = ()) -> Path | None:
    """The newest checkpoint under ``checkpoint_dir`` whose completion marker exists, or None.

    A checkpoint interrupted while being written has no marker and is ignored. A complete one written with
    different settings is refused, naming the directory, rather than silently mixed into this run. ``ignored``: dotted
    paths into the settings that may differ between a run and its resumption (its device, its output paths), left out
    on both sides, so that a marker written before such a field was left out still matches.
    """
    if not checkpoint_dir.is_dir():
        return None
    markers = {path.parent: json.loads(path.read_text()) for path in checkpoint_dir.glob(f"*/{CHECKPOINT_MARKER}")}
    if not markers:
        return None
    newest = max(markers, key=lambda path: markers[path]["n_training_steps"])
    written = markers[newest]["settings"]
    differences = settings_differences(without_fields(written, ignored), without_fields(settings, ignored))
    if differences:
        shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
        raise ValueError(
            f"checkpoint {newest} was written with different settings; delete {checkpoint_dir} to start afresh "
            f"(what differs: {shown})"
        )
    return newest


def settings_differences(written: Any, now: Any, path: str = "") -> list[str]:
    """``"dotted.path: written -> now"`` for every leaf where two settings differ (``<absent>`` where one lacks it), so
    that a refused resume says what changed, such as a config field added by a newer version of the package."""
    if isinstance(written, dict) and isinstance(now, dict):
        found = []
        for name in sorted(written.keys() | now.keys(), key=str):
            below = f"{path}.{name}" if path else str(name)
            found += settings_differences(written.get(name, _ABSENT), now.get(name, _ABSENT), below)
        return found
    if written == now:
        return []
    return [f"{path or '<settings>'}: {written!r} -> {now!r}"]


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def without_fields(settings: dict[str, Any], dotted: Collection[str]) -> dict[str, Any]:
    """A copy of nested ``settings`` without the ``dotted`` paths (``"runner.sae.device"``)."""
    kept = {}
    for name, value in settings.items():
        if name in dotted:
            continue
        below = {path.removeprefix(f"{name}.") for path in dotted if path.startswith(f"{name}.")}
        kept[name] = without_fields(value, below) if below and isinstance(value, dict) else value
    return kept


def json_safe(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so settings compare equal after a round trip."""
    return json.loads(json.dumps(value, default=str))


def stop_at_step_boundaries(
    trainer: Any,
    checkpoint_dir: Path,
    parallel: DataParallel = SINGLE_PROCESS,
    on_saved: Callable[[Path], None] | None = None,
) -> None:
    """When SIGTERM/SIGINT arrive, ``trainer`` (SAELens's ``MultiSAETrainer``, which marks its own checkpoints, or
    ``SAETrainer``, whose checkpoint goes to ``checkpoint_dir`` and is passed to ``on_saved``) checkpoints after the
    step it is in, every rank at the same step, and stops with :class:`Preempted`."""
    request = current_request()
    own_check = trainer._checkpoint_if_needed

    def checkpoint_then_maybe_stop() -> None:
        own_check()
        if not request.agreed(parallel.device("cpu")):
            return
        name = str(trainer.n_training_samples)
        if on_saved is None:
            trainer.save_checkpoint(checkpoint_name=name)
        else:
            trainer.save_checkpoint(checkpoint_name=name, base_path=checkpoint_dir)
            if parallel.is_main:
                on_saved(checkpoint_dir / name)
        step, total = trainer.n_training_steps + 1, trainer.cfg.total_training_steps
        raise Preempted(
            f"stopped by {request.signal_name or 'another rank'} after training step {step} of {total}; checkpoint "
            f"in {checkpoint_dir}: rerun the same command to resume from it"
        )

    trainer._checkpoint_if_needed = checkpoint_then_maybe_stop


def stop_between_evaluations(resumes_from: str) -> None:
    """Between two evaluations, honour a SIGTERM/SIGINT that came after training: nothing is written, and a rerun
    trains again from ``resumes_from`` (its last checkpoint, or the start) before evaluating."""
    stop_if_requested(
        f"while evaluating, after training: rerun the same command to train again from {resumes_from} and evaluate"
    )
