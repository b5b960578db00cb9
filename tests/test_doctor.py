"""``sae-lens-hierarchical doctor`` through the command line, on CPU; a CUDA device is simulated where one is needed."""

from __future__ import annotations

import json
import platform
import re

import pytest
import sae_lens
import torch

from sae_lens_hierarchical import losses
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.jobs import doctor
from sae_lens_hierarchical.losses import self_check
from sae_lens_hierarchical.losses.self_check import TritonCheck

DTYPES = ["float32", "bfloat16", "float16", "float64"]
FAKE_GPU = doctor.CudaDevice(device="cuda:0", name="Fake H100", capability="9.0", memory_gib=79.1)


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CUDA device whatever the machine has, and no verdict from an earlier test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(self_check, "_VERDICTS", {})


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One CUDA device, as the doctor and the automatic choice see it, with triton installed."""
    monkeypatch.setattr(doctor, "cuda_devices", lambda: [FAKE_GPU])
    monkeypatch.setattr(doctor, "triton_available", lambda: True)
    monkeypatch.setattr(losses, "triton_available", lambda: True)


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``(exit code, stdout)`` of ``sae-lens-hierarchical doctor ARGS``."""
    try:
        main(["doctor", *args])
    except SystemExit as stop:
        return int(stop.code or 0), capsys.readouterr().out
    return 0, capsys.readouterr().out


def choices(report: dict) -> dict[tuple[str, str], str]:
    return {(row["device"], row["dtype"]): row["implementation"] for row in report["auto_loss"]}


def test_doctor_on_cpu_prints_versions_devices_and_the_auto_choice(capsys) -> None:
    code, out = run_doctor(capsys)
    assert code == 0, out
    for line in (
        f"python: {platform.python_version()}",
        f"torch: {torch.__version__}",
        f"sae-lens: {sae_lens.__version__}",
        "no CUDA device",
        "gloo yes",
        "In short, cuda: triton if triton is installed and the self-check passes, else fused.",
        "nothing to check here",
    ):
        assert line in out, line
    triton_line = re.search(r"^  triton: (.+)$", out, re.MULTILINE)
    assert triton_line is not None
    if triton_installed():
        import triton

        assert triton_line.group(1) == triton.__version__
    else:
        assert triton_line.group(1) == "not installed"
    assert re.search(r"^  transformer-lens: \d+\.\d+", out, re.MULTILINE)
    assert re.search(r"^  cpu: \d+ cores, torch uses \d+ threads$", out, re.MULTILINE)
    cpu_block = "\n".join(rf"    {dtype}\s+fused\s+the Triton kernels run on CUDA only.*" for dtype in DTYPES)
    assert re.search(rf"^  cpu:\n{cpu_block}$", out, re.MULTILINE), out
    on_cuda = "triton" if triton_installed() else "fused"
    cuda_block = "\n".join(rf"    {dtype}\s+{on_cuda if dtype != 'float64' else 'fused'}\s+.*" for dtype in DTYPES)
    assert re.search(rf"^  cuda \(no such device here; what it would pick\):\n{cuda_block}$", out, re.MULTILINE), out


def test_doctor_json_has_every_section(capsys) -> None:
    code, out = run_doctor(capsys, "--json")
    assert code == 0
    report = json.loads(out)
    assert set(report) >= {
        "versions",
        "cpu_cores",
        "cpu_threads",
        "cuda_devices",
        "distributed_backends",
        "auto_loss",
        "self_checks",
        "ok",
    }
    assert set(report["versions"]) >= {
        "python",
        "torch",
        "triton",
        "sae-lens",
        "transformer-lens",
        "sae-lens-hierarchical",
    }
    assert report["versions"]["torch"] == torch.__version__
    assert report["cuda_devices"] == [] and report["self_checks"] == [] and report["ok"] is True
    assert set(report["distributed_backends"]) == {"gloo", "nccl"}
    assert all(isinstance(value, bool) for value in report["distributed_backends"].values())
    on_cuda = "triton" if triton_installed() else "fused"
    assert choices(report) == {
        **{("cpu", dtype): "fused" for dtype in DTYPES},
        **{("cuda", dtype): on_cuda for dtype in DTYPES[:3]},
        ("cuda", "float64"): "fused",
    }
    assert all(row["reason"] for row in report["auto_loss"])
    assert {row["present"] for row in report["auto_loss"] if row["device"] == "cuda"} == {False}


@pytest.mark.usefixtures("fake_gpu")
def test_doctor_exits_1_when_the_self_check_fails_on_a_gpu(capsys, monkeypatch) -> None:
    cause = "gradient of W_dec differs from the torch path by 3.00e-02 of its largest magnitude (tolerance 1e-04)"
    checked = []

    def failing(device: torch.device) -> TritonCheck:
        checked.append(str(device))
        return TritonCheck(device=str(device), ok=False, cause=cause, max_errors={"gradient of W_dec": 0.03})

    monkeypatch.setattr(self_check, "check_triton", failing)
    code, out = run_doctor(capsys)
    assert code == 1
    assert checked == ["cuda:0"]
    assert "cuda:0: Fake H100, compute capability 9.0, 79.1 GiB" in out
    assert f"cuda:0: FAILED ({cause}); 'auto' uses the fused torch loss there" in out
    assert re.search(
        r"^  cuda:0:\n    float32\s+fused\s+the Triton self-check failed on cuda:0: gradient of W_dec", out, re.M
    )
    assert "In short" not in out, "a machine with a GPU reports what happens, not what would"

    code, out = run_doctor(capsys, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["self_checks"][0]["cause"] == cause
    assert choices(report)[("cuda:0", "bfloat16")] == "fused"
    assert checked == ["cuda:0"], "the verdict of the first run is kept for the process"


@pytest.mark.usefixtures("fake_gpu")
def test_doctor_exits_0_when_the_self_check_passes_on_a_gpu(capsys, monkeypatch) -> None:
    def passing(device: torch.device) -> TritonCheck:
        return TritonCheck(
            device=str(device), ok=True, max_errors={"loss": 2e-7, "gradient of b_dec": 5e-7}, seconds=1.5
        )

    monkeypatch.setattr(self_check, "check_triton", passing)
    code, out = run_doctor(capsys, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert [row["implementation"] for row in report["auto_loss"] if row["device"] == "cuda:0"] == [
        "triton",
        "triton",
        "triton",
        "fused",
    ]
    assert report["cuda_devices"] == [
        {"device": "cuda:0", "name": "Fake H100", "capability": "9.0", "memory_gib": 79.1}
    ]
    code, out = run_doctor(capsys)
    assert "cuda:0: passed in 1.5 s (largest error 5.0e-07, gradient of b_dec)" in out


def test_doctor_interpret_runs_the_real_kernels_in_a_subprocess(capsys) -> None:
    if not triton_installed():
        pytest.skip("needs triton")
    code, out = run_doctor(capsys, "--interpret", "--json")
    report = json.loads(out)
    assert code == 0, report["self_checks"]
    [check] = report["self_checks"]
    assert check["device"] == "cpu (Triton interpreter)" and check["ok"] is True
    assert "sparse encoder backward (scatter of outer products)" in check["max_errors"]
    assert "gradient of top_acts" in check["max_errors"]
    assert max(check["max_errors"].values()) < 1e-5
