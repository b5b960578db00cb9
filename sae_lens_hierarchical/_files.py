"""Writing files so that a crash leaves the old version or the new one, never a half-written one.

Every writer in the package goes through here: SAE weights and configs (SAELens's save, staged then renamed file by
file), activation-cache shards and manifests, results directories (built in a scratch directory beside the target,
then renamed into place), exports to a new directory (all of it appears, or none), checkpoint markers. Renames are
atomic only within one file system, so temporaries always live beside their target. The cross-process lock is
``filelock``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset
from filelock import FileLock

# Temporary files and directories beside a target: ``.<name>.tmp-<pid>`` (removed by the next writer under the lock).
_TEMPORARY_INFIX = ".tmp-"


def _temporary_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}{_TEMPORARY_INFIX}{os.getpid()}")


def save_files_atomically(path: str | Path, save: Callable[[Path], tuple[Path, Path]]) -> tuple[Path, Path]:
    """Run SAELens's ``save(directory)`` into a staging directory inside ``path``, then rename each file into place.

    A crash mid-save leaves every file in ``path`` either wholly old or wholly new, never truncated, so the
    previous save stays loadable. The weights are moved before the config, which SAELens reads first.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=path))
    try:
        staged = save(staging)
        _fsync(staged)
        final = tuple(path / file.name for file in staged)
        for file, target in zip(staged, final, strict=True):
            os.replace(file, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final[0], final[1]


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to a temporary file, fsync it, then rename it over ``path``: readers see old or new."""
    temporary = _temporary_beside(path)
    with open(temporary, "w") as file:
        json.dump(payload, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def save_dataset_atomically(dataset: Dataset, target: Path) -> None:
    """``dataset.save_to_disk`` into a temporary directory beside ``target``, then rename it to ``target``."""
    temporary = _temporary_beside(target)
    dataset.save_to_disk(str(temporary))
    os.replace(temporary, target)


def remove_stale_temporaries(directory: Path) -> None:
    """Partial writes of killed runs in ``directory``; call it holding the lock, so no live writer owns them."""
    for leftover in directory.glob(f".*{_TEMPORARY_INFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """One process at a time inside the block, across processes (``filelock``, any platform)."""
    with FileLock(str(path)):
        yield


@contextmanager
def scratch_beside(target: Path) -> Iterator[Path]:
    """A scratch directory on the same file system as ``target`` (so the final rename is atomic).

    Its name records this process's id; scratch directories of ``target`` left by processes that no longer exist
    (killed jobs) are removed first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    for stale in target.parent.glob(f"{prefix}*"):
        owner = stale.name[len(prefix) :].split("-", 1)[0]
        if owner.isdigit() and not _process_exists(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp's 0700 would otherwise become the results directory's mode
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_new_directory(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(scratch)``, then rename the scratch directory to ``path``: all of it appears, or none.

    ``path`` must not exist or be an empty directory; the final ``os.replace`` itself refuses a non-empty one, so a
    directory filled meanwhile is not overwritten either.
    """
    path = check_new_directory(path)
    with scratch_beside(path) as scratch:
        write(scratch)
        _fsync(file for file in scratch.rglob("*") if file.is_file())
        os.replace(scratch, path)
    return path


def check_new_directory(path: str | Path) -> Path:
    """``path`` if it does not exist or is an empty directory; else one ``ValueError`` (nothing is overwritten)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"output {path} exists and is not an empty directory; choose a new one (nothing is overwritten)"
        )
    return path


def move_into_place(scratch: Path, target: Path) -> None:
    """Rename ``scratch`` to ``target``; an old ``target`` is moved aside first and removed only after."""
    if not target.exists():
        os.replace(scratch, target)
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, aside)
    os.replace(scratch, target)
    shutil.rmtree(aside)


def _fsync(files: Iterable[Path]) -> None:
    """Flush each file's data to disk before the rename that publishes it."""
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
