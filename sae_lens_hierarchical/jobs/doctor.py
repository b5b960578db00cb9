"""The ``doctor`` job: what this installation trains with, and why.

Versions, devices and ``torch.distributed`` backends, then for every device and dtype the loss implementation that
``loss_implementation="auto"`` picks and the reason, and the Triton self-check (:mod:`sae_lens_hierarchical.losses.
self_check`) on every CUDA device: the check "auto" would run at the first training step, run up front so that a
broken GPU setup shows before a job starts. Nothing here needs a GPU; on a CPU-only machine it says what "auto" would
do on CUDA, and ``interpret=True`` runs the check's kernels in Triton's CPU interpreter.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_lens_hierarchical.losses import auto_loss_choice, triton_available
from sae_lens_hierarchical.losses.self_check import TOLERANCE, TritonCheck, TritonSelfCheckWarning, triton_self_check

PACKAGES = ("torch", "triton", "sae-lens", "transformer-lens", "sae-lens-hierarchical")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DISTRIBUTED_BACKENDS = ("gloo", "nccl")
INTERPRETED_DEVICE = "cpu (Triton interpreter)"
NOT_INSTALLED = "not installed"

# Run in a fresh interpreter: TRITON_INTERPRET is read when the kernels are jitted (on import), so a process that has
# already compiled them for CUDA cannot interpret them, and one that interprets them cannot check a GPU.
_INTERPRETED_CHECK = (
    "import dataclasses, json\n"
    "from sae_lens_hierarchical.losses.self_check import check_triton\n"
    "print(json.dumps(dataclasses.asdict(check_triton('cpu'))))\n"
)


@dataclass(frozen=True)
class CudaDevice:
    """One CUDA device as torch sees it."""

    device: str
    name: str
    capability: str
    memory_gib: float


@dataclass(frozen=True)
class DoctorReport:
    """Everything ``doctor`` found; :attr:`ok` is False when a self-check failed (the command then exits with 1)."""

    versions: dict[str, str]
    cpu_cores: int
    cpu_threads: int
    cuda_devices: list[CudaDevice]
    distributed_backends: dict[str, bool]
    auto_loss: list[dict[str, Any]]  # device, present (False: no such device here), dtype, implementation, reason
    self_checks: list[TritonCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.self_checks)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (an infinite or NaN error becomes the string ``"inf"`` / ``"nan"``)."""
        report = dataclasses.asdict(self)
        for check in report["self_checks"]:
            check["max_errors"] = {
                name: error if math.isfinite(error) else str(error) for name, error in check["max_errors"].items()
            }
        return report | {"ok": self.ok}


def package_versions() -> dict[str, str]:
    """Python's version and each of :data:`PACKAGES`' installed version, or ``"not installed"``."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = NOT_INSTALLED
    versions["torch CUDA build"] = torch.version.cuda or "none (CPU-only torch)"
    return versions


def cuda_devices() -> list[CudaDevice]:
    """Every CUDA device torch can use (none on a CPU-only machine or torch build)."""
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        devices.append(
            CudaDevice(
                device=f"cuda:{index}",
                name=properties.name,
                capability=f"{properties.major}.{properties.minor}",
                memory_gib=round(properties.total_memory / 2**30, 1),
            )
        )
    return devices


def distributed_backends() -> dict[str, bool]:
    """Whether this torch build has each of :data:`DISTRIBUTED_BACKENDS`."""
    if not torch.distributed.is_available():
        return dict.fromkeys(DISTRIBUTED_BACKENDS, False)
    return {backend: bool(getattr(torch.distributed, f"is_{backend}_available")()) for backend in DISTRIBUTED_BACKENDS}


def interpreted_check() -> TritonCheck:
    """:func:`~sae_lens_hierarchical.losses.self_check.check_triton` on CPU with ``TRITON_INTERPRET=1``, in a
    subprocess (see ``_INTERPRETED_CHECK``); a subprocess that fails is a failed check naming its last error line."""
    completed = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_CHECK],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        error = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return TritonCheck(
            device=INTERPRETED_DEVICE,
            ok=False,
            cause=f"the check's subprocess exited with {completed.returncode}: {error}",
        )
    return dataclasses.replace(TritonCheck(**json.loads(lines[-1])), device=INTERPRETED_DEVICE)


def _choices(device: str, present: bool) -> list[dict[str, Any]]:
    """What "auto" picks on ``device`` for each of :data:`DTYPES`, and why."""
    rows = []
    for dtype in DTYPES:
        choice = auto_loss_choice(device, dtype)
        rows.append(
            {
                "device": device,
                "present": present,
                "dtype": str(dtype).removeprefix("torch."),
                "implementation": choice.implementation,
                "reason": choice.reason,
            }
        )
    return rows


def run_doctor_job(*, interpret: bool = False) -> DoctorReport:
    """Collect the report; runs the Triton self-check on every CUDA device (and, with ``interpret``, in the CPU
    interpreter). The verdicts are the ones "auto" then uses in this process."""
    devices = cuda_devices()
    checks: list[TritonCheck] = []
    notes: list[str] = []
    if not triton_available():
        notes.append("triton is not installed: 'auto' uses the fused torch loss everywhere; no kernels to check")
    else:
        with warnings.catch_warnings():  # the report states each failure; the warning would repeat it
            warnings.simplefilter("ignore", TritonSelfCheckWarning)
            checks = [triton_self_check(device.device) for device in devices]
        if not devices:
            notes.append(
                "no CUDA device: the self-check runs on the first 'auto' loss on a CUDA device; nothing to check here"
                + ("" if interpret else " (--interpret runs its kernels in Triton's CPU interpreter)")
            )
        if interpret:
            checks.append(interpreted_check())
    choices = _choices("cpu", present=True)
    for device in devices:
        choices += _choices(device.device, present=True)
    if not devices:
        choices += _choices("cuda", present=False)
    return DoctorReport(
        versions=package_versions(),
        cpu_cores=os.cpu_count() or 1,
        cpu_threads=torch.get_num_threads(),
        cuda_devices=devices,
        distributed_backends=distributed_backends(),
        auto_loss=choices,
        self_checks=checks,
        notes=notes,
    )


def _check_line(check: TritonCheck) -> str:
    if not check.ok:
        consequence = "" if check.device == INTERPRETED_DEVICE else "; 'auto' uses the fused torch loss there"
        return f"  {check.device}: FAILED ({check.cause}){consequence}"
    name, error = max(check.max_errors.items(), key=lambda item: item[1], default=("nothing compared", 0.0))
    return f"  {check.device}: passed in {check.seconds:.1f} s (largest error {error:.1e}, {name})"


def format_doctor_report(report: DoctorReport) -> str:
    """The report as plain text, one section per topic."""
    lines = ["Versions:"]
    lines += [f"  {name}: {version}" for name, version in report.versions.items()]
    lines += ["", "Devices:", f"  cpu: {report.cpu_cores} cores, torch uses {report.cpu_threads} threads"]
    lines += [
        f"  {device.device}: {device.name}, compute capability {device.capability}, {device.memory_gib} GiB"
        for device in report.cuda_devices
    ] or ["  no CUDA device"]
    backends = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in report.distributed_backends.items())
    lines += ["", f"torch.distributed backends: {backends}", "", "loss_implementation='auto' picks:"]
    device = None
    for row in report.auto_loss:
        if row["device"] != device:
            device = row["device"]
            lines.append(f"  {device}:" if row["present"] else f"  {device} (no such device here; what it would pick):")
        lines.append(f"    {row['dtype']:<9} {row['implementation']:<7} {row['reason']}")
    if not report.cuda_devices:
        lines.append("  In short, cuda: triton if triton is installed and the self-check passes, else fused.")
    lines += [
        "",
        f"Triton self-check (loss values and gradients, sparse encoder backward; tolerance {TOLERANCE:.0e} of each "
        "tensor's largest magnitude):",
    ]
    lines += [_check_line(check) for check in report.self_checks]
    lines += [f"  {note}" for note in report.notes]
    if not report.self_checks:
        summary = "No self-check ran here."
    else:
        summary = "Every self-check passed." if report.ok else "A self-check FAILED (exit code 1)."
    lines += ["", summary]
    return "\n".join(lines)
