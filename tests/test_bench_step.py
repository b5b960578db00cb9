"""benchmarks/bench_step.py's rows and options: what each row runs, and a quick run of every CPU row and option.

The step benchmark's claims rest on its rows doing what their labels say: the dense-``feature_acts`` HTopK row must be
the same training step as the sparse one (it differs only in the form SAELens's trainer reads), the clipped sparsify
row must clip, and the floor rows must compute the encoder product.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH = BENCHMARKS / "bench_step.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The rows' module, imported as ``bench_step.py`` imports it when run as a script: with ``benchmarks/`` on the
    path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module("bench_step_rows")


def test_the_dense_and_sparse_htopk_rows_are_the_same_training_step(bench: ModuleType) -> None:
    sizes = bench.Sizes(d_in=16, d_sae=64, tokens=32, ks=(8,))
    sparse, dense = (bench.make_step(name, sizes, 8, "cpu", 0.1) for name in ("htopk_fused", "htopk_fused_dense"))
    assert sparse.sae.cfg.use_sparse_activations and not dense.sae.cfg.use_sparse_activations
    for _ in range(2):
        sparse()
        dense()
    for (name, a), b in zip(sparse.sae.named_parameters(), dense.sae.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(sparse.act_freq, dense.act_freq)  # the firing statistics read both forms alike


def test_the_clipped_sparsify_row_clips_and_the_other_does_not(bench: ModuleType, monkeypatch) -> None:
    pytest.importorskip("sparsify")
    sizes = bench.Sizes(d_in=16, d_sae=64, tokens=32, ks=(8,))
    norms: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):  # type: ignore[no-untyped-def]
        norms.append(float(max_norm))
        return original(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    bench.make_step("sparsify", sizes, 8, "cpu", 0.1)()
    assert norms == []
    bench.make_step("sparsify_clipped", sizes, 8, "cpu", 0.1)()
    assert norms == [1.0]


def test_both_floors_compute_the_encoder_product(bench: ModuleType, monkeypatch) -> None:
    sizes = bench.Sizes(d_in=16, d_sae=64, tokens=32, ks=(8,))
    results: list[torch.Tensor] = []
    for name, function in (("floor", "mm"), ("floor_linear", "linear")):
        step = bench.make_step(name, sizes, 8, "cpu", 0.0)
        module = torch if function == "mm" else torch.nn.functional
        original = getattr(module, function)
        monkeypatch.setattr(module, function, lambda *a, _f=original: results.append(_f(*a)) or results[-1])
        step()
        weight = step.W_enc if function == "mm" else step.W_enc.T
        torch.testing.assert_close(results[-1], step.batch.double().mm(weight.double()).float(), rtol=1e-5, atol=1e-5)


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(BENCH), "--quick", "--warmup", "0", "--repeats", "1", "--output-dir", str(tmp_path)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, check=False)


def test_a_quick_run_of_every_cpu_row_in_bf16_checks_both_settings(tmp_path: Path) -> None:
    rows = ["sparsify", "sparsify_clipped", "htopk_fused", "htopk_fused_dense", "floor", "floor_linear"]
    completed = run_bench(tmp_path, "--no-memory", "--precision", "bf16", "--ks", "8", "--implementations", *rows)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "bench_step_cpu_bf16_quick.json").read_text())
    assert result["config"]["precision"] == "bf16"
    assert {row["implementation"] for row in result["rows"]} >= set(rows) - {"sparsify", "sparsify_clipped"}
    report = (tmp_path / "bench_step_cpu_bf16_quick.md").read_text()
    assert "[project] HTopK fused:" in report and "[independent] HTopK fused, dense acts:" in report
    assert "under torch.autocast(bfloat16)" in report


def test_tf32_is_refused_on_cpu_and_profile_and_breakdown_write_their_reports(tmp_path: Path) -> None:
    refused = run_bench(tmp_path, "--precision", "tf32")
    assert refused.returncode == 2 and "--precision tf32 runs with --device cuda only" in refused.stderr
    profiled = run_bench(tmp_path, "--profile", "8", "--implementations", "htopk_fused", "floor")
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    profile = (tmp_path / "bench_step_profile_cpu_quick_k8.md").read_text()
    assert "## HTopK fused" in profile and "## floor (x @ W_enc)" in profile and "Self CPU" in profile
    broken_down = run_bench(tmp_path, "--breakdown", "8")
    assert broken_down.returncode == 0, broken_down.stderr[-3000:]
    parts = json.loads((tmp_path / "bench_step_breakdown_cpu_quick_k8.json").read_text())["seconds"]
    assert {"hierarchical loss, forward + backward", "whole step"} <= set(parts)
