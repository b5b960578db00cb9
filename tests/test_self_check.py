"""The Triton self-check that guards ``loss_implementation="auto"``.

No GPU needed: the check runs the real kernels in Triton's CPU interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``), or torch stand-ins for them; a GPU is simulated for the automatic choice by letting "cpu"
count as a device type the kernels run on. Every verdict cache starts empty.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from sae_lens_hierarchical import losses
from sae_lens_hierarchical.losses import (
    HIERARCHICAL_LOSSES,
    HierarchicalMSE,
    auto_loss_implementation,
    auto_uses_triton,
    hierarchical_mse_auto,
    hierarchical_mse_fused,
    self_check,
)
from sae_lens_hierarchical.losses.self_check import (
    TritonCheck,
    TritonSelfCheckWarning,
    check_triton,
    known_verdict,
    triton_self_check,
)
from sae_lens_hierarchical.sparse_training import scatter_outer_products
from tests.test_fused_loss import gradients
from tests.test_losses import random_problem

# What the check must compare: the loss's three outputs, the four input gradients, the sparse backward's scatter.
COMPARED = {
    "loss",
    "level_mse",
    "reconstruction",
    "gradient of sae_in",
    "gradient of top_acts",
    "gradient of W_dec",
    "gradient of b_dec",
    "sparse encoder backward (scatter of outer products)",
}
LEVELS, WEIGHTS = [2, 5, 7], [0.5, 0.2, 0.3]


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(self_check, "_VERDICTS", {})


def torch_scatter(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int) -> torch.Tensor:
    """A correct stand-in for the Triton scatter: the torch product the sparse backward uses without triton."""
    return scatter_outer_products(indices, weights, rows, n_out, allow_triton=False)


def forbidden(*args: Any, **kwargs: Any) -> HierarchicalMSE:
    raise AssertionError("'auto' ran the Triton loss on a device whose self-check failed")


@pytest.fixture
def simulated_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU simulated: "cpu" counts as a device type the kernels run on, triton as installed; correct scatter."""
    monkeypatch.setattr(losses, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(losses, "triton_available", lambda: True)
    monkeypatch.setattr(self_check, "scatter_outer_products_triton", torch_scatter)


def scaled_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` with the same value, whose gradient reaches ``tensor`` multiplied by ``factor``."""
    return tensor + (factor - 1.0) * (tensor - tensor.detach())


def broken_loss(fault: str, calls: list[str]) -> Callable[..., HierarchicalMSE]:
    """A Triton stand-in: the fused loss, with one input's gradient 1% off, or its loss 1% off, or NaN."""

    def loss(sae_in, top_acts, top_indices, W_dec, b_dec, levels, level_weights) -> HierarchicalMSE:
        calls.append(fault)
        inputs = {"sae_in": sae_in, "top_acts": top_acts, "W_dec": W_dec, "b_dec": b_dec}
        if fault in inputs:
            inputs[fault] = scaled_gradient(inputs[fault], 1.01)
        result = hierarchical_mse_fused(**inputs, top_indices=top_indices, levels=levels, level_weights=level_weights)
        if fault == "loss":
            return result._replace(loss=result.loss * 1.01)
        if fault == "nan":
            return result._replace(loss=result.loss * float("nan"))
        return result

    return loss


def assert_auto_equals_fused(problem: dict[str, torch.Tensor]) -> None:
    """The "auto" loss gives exactly what an independent call of the fused loss gives: values and gradients."""
    auto_loss, auto_grads = gradients(
        problem, lambda p: hierarchical_mse_auto(**p, levels=LEVELS, level_weights=WEIGHTS).loss
    )
    fused_loss, fused_grads = gradients(
        problem, lambda p: hierarchical_mse_fused(**p, levels=LEVELS, level_weights=WEIGHTS).loss
    )
    assert torch.equal(auto_loss, fused_loss)
    for got, expected in zip(auto_grads, fused_grads, strict=True):
        assert torch.equal(got, expected)


def no_self_check_warning(call: Callable[[], Any]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    assert not [w for w in caught if issubclass(w.category, TritonSelfCheckWarning)], [str(w.message) for w in caught]


# --- the check itself -----------------------------------------------------------------------------------------------


def test_the_real_kernels_pass_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    from sae_lens_hierarchical import triton_sparse
    from sae_lens_hierarchical.losses import triton_kernels

    if not (triton_kernels.INTERPRETED and triton_sparse.triton_interpreted()):
        pytest.skip("needs TRITON_INTERPRET=1 before triton kernels are jitted (tests/conftest.py sets it)")
    verdict = check_triton("cpu")
    assert verdict.ok and verdict.cause is None, verdict.cause
    assert set(verdict.max_errors) == COMPARED
    # float32 kernels against the float64 torch path: rounding only, far inside the tolerance.
    assert all(error < 1e-5 for error in verdict.max_errors.values()), verdict.max_errors


def test_correct_stand_ins_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(self_check, "hierarchical_mse_triton", hierarchical_mse_fused)
    monkeypatch.setattr(self_check, "scatter_outer_products_triton", torch_scatter)
    verdict = check_triton(torch.device("cpu"))
    assert verdict == TritonCheck(
        device="cpu", ok=True, max_errors=verdict.max_errors, tolerance=1e-4, seconds=verdict.seconds
    )
    assert set(verdict.max_errors) == COMPARED and max(verdict.max_errors.values()) < 1e-5


def test_a_broken_scatter_kernel_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(self_check, "hierarchical_mse_triton", hierarchical_mse_fused)
    monkeypatch.setattr(self_check, "scatter_outer_products_triton", lambda *args: torch_scatter(*args) * 0.99)
    verdict = check_triton("cpu")
    assert not verdict.ok
    assert verdict.cause is not None and verdict.cause.startswith("sparse encoder backward (scatter of outer products)")
    assert verdict.max_errors["sparse encoder backward (scatter of outer products)"] == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", 1.5])
def test_a_device_that_names_nothing_is_one_clear_error(device: Any) -> None:
    for call in (check_triton, triton_self_check, known_verdict):
        with pytest.raises(ValueError, match=r"device must be a torch.device or a device name .*; got " + repr(device)):
            call(device)


# --- what "auto" does with the verdict ----------------------------------------------------------------------------


@pytest.mark.usefixtures("simulated_gpu")
@pytest.mark.parametrize(
    ("fault", "named"),
    [
        ("top_acts", r"gradient of top_acts differs from the torch path by 1\.00e-02"),
        ("W_dec", r"gradient of W_dec differs from the torch path by 1\.00e-02"),
        ("sae_in", r"gradient of sae_in differs from the torch path by 1\.00e-02"),
        ("b_dec", r"gradient of b_dec differs from the torch path by 1\.00e-02"),
        ("loss", r"\bloss differs from the torch path by 1\.00e-02"),
        ("nan", r"\bloss differs from the torch path by nan"),
    ],
    ids=["grad-top_acts", "grad-W_dec", "grad-sae_in", "grad-b_dec", "loss", "nan-loss"],
)
def test_a_wrong_kernel_warns_once_and_auto_falls_back_to_fused(monkeypatch, fault: str, named: str) -> None:
    calls: list[str] = []
    monkeypatch.setattr(self_check, "hierarchical_mse_triton", broken_loss(fault, calls))
    monkeypatch.setitem(HIERARCHICAL_LOSSES, "triton", forbidden)
    problem = random_problem((4, 5), 12, 40, 7, torch.float32, seed=3)
    assert auto_loss_implementation("cpu", torch.float32) == "triton"  # not checked yet: the kernels are expected
    with pytest.warns(TritonSelfCheckWarning, match=rf"self-check on cpu: .*{named}.*uses the torch paths") as w:
        assert_auto_equals_fused(problem)
    assert len(w) == 1
    assert calls == [fault], "the check runs the Triton implementation exactly once"
    no_self_check_warning(lambda: assert_auto_equals_fused(problem))
    assert calls == [fault], "the verdict is cached: no second check"
    assert auto_loss_implementation("cpu", torch.float32) == "fused"
    assert auto_loss_implementation("cpu", torch.bfloat16) == "fused", "the verdict is per device, not per dtype"


class CompilationError(Exception):
    """Stands in for triton.compiler.errors.CompilationError."""


@pytest.mark.usefixtures("simulated_gpu")
def test_a_compile_error_warns_once_and_auto_falls_back_to_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    def does_not_compile(*args: Any, **kwargs: Any) -> HierarchicalMSE:
        raise CompilationError("at 12:8: unsupported layout conversion")

    monkeypatch.setattr(self_check, "hierarchical_mse_triton", does_not_compile)
    monkeypatch.setitem(HIERARCHICAL_LOSSES, "triton", forbidden)
    problem = random_problem((9,), 10, 30, 7, torch.bfloat16, seed=8)
    expected = r"self-check on cpu: the Triton loss kernels raised CompilationError: at 12:8: unsupported layout"
    with pytest.warns(TritonSelfCheckWarning, match=expected) as w:
        assert_auto_equals_fused(problem)
    assert len(w) == 1
    no_self_check_warning(lambda: assert_auto_equals_fused(problem))
    verdict = known_verdict("cpu")
    assert verdict is not None and not verdict.ok and "CompilationError" in (verdict.cause or "")


def test_the_warning_comes_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[torch.device] = []

    def failing(device: torch.device) -> TritonCheck:
        checked.append(device)
        return TritonCheck(device=str(device), ok=False, cause="grad mismatch")

    monkeypatch.setattr(self_check, "check_triton", failing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "cuda" alone then means cuda:0
    with pytest.warns(TritonSelfCheckWarning, match=r"on cuda:0: grad mismatch"):
        assert not triton_self_check("cuda:0").ok
    no_self_check_warning(lambda: triton_self_check("cuda"))
    no_self_check_warning(lambda: triton_self_check(torch.device("cuda", 0)))
    with pytest.warns(TritonSelfCheckWarning, match=r"on cuda:1: grad mismatch"):
        triton_self_check("cuda:1")
    assert checked == [torch.device("cuda:0"), torch.device("cuda:1")]


@pytest.mark.usefixtures("simulated_gpu")
def test_correct_kernels_keep_auto_on_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> HierarchicalMSE:
        ran.append("triton")
        return hierarchical_mse_fused(*args, **kwargs)

    monkeypatch.setattr(self_check, "hierarchical_mse_triton", hierarchical_mse_fused)
    monkeypatch.setitem(HIERARCHICAL_LOSSES, "triton", spy)
    problem = random_problem((6,), 8, 30, 7, torch.float32, seed=2)
    no_self_check_warning(lambda: hierarchical_mse_auto(**problem, levels=LEVELS, level_weights=WEIGHTS))
    assert ran == ["triton"]
    assert auto_loss_implementation("cpu", torch.float16) == "triton"


@pytest.mark.usefixtures("simulated_gpu")
def test_the_first_auto_loss_under_inference_mode_still_checks_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(self_check, "hierarchical_mse_triton", hierarchical_mse_fused)
    monkeypatch.setitem(HIERARCHICAL_LOSSES, "triton", hierarchical_mse_fused)
    problem = random_problem((6,), 8, 30, 7, torch.float32, seed=2)
    with torch.inference_mode():
        no_self_check_warning(lambda: hierarchical_mse_auto(**problem, levels=LEVELS, level_weights=WEIGHTS))
    verdict = known_verdict("cpu")
    assert verdict is not None and verdict.ok, verdict


@pytest.mark.usefixtures("simulated_gpu")
def test_a_call_from_inside_the_check_cannot_start_it_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton implementation that itself asks "auto" gets the torch path, not a second check (no recursion)."""
    calls: list[str] = []

    def delegates_to_auto(*args: Any, **kwargs: Any) -> HierarchicalMSE:
        calls.append("triton")
        assert not auto_uses_triton("cpu", torch.float32), "the check's own device reads as failed while it runs"
        return hierarchical_mse_auto(*args, **kwargs)

    monkeypatch.setattr(self_check, "hierarchical_mse_triton", delegates_to_auto)
    no_self_check_warning(lambda: triton_self_check("cpu"))
    assert calls == ["triton"]
    verdict = known_verdict("cpu")
    assert verdict is not None and verdict.ok, verdict.cause


def test_explicit_triton_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from sae_lens_hierarchical.losses import triton_kernels

    if not triton_kernels.INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before triton kernels are jitted (tests/conftest.py sets it)")

    def never(device: Any) -> TritonCheck:
        raise AssertionError("an explicit loss_implementation='triton' must not run the self-check")

    monkeypatch.setattr(losses, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(self_check, "check_triton", never)
    problem = random_problem((5,), 6, 20, 7, torch.float32, seed=1)
    result = HIERARCHICAL_LOSSES["triton"](**problem, levels=LEVELS, level_weights=WEIGHTS)
    expected = hierarchical_mse_fused(**problem, levels=LEVELS, level_weights=WEIGHTS)
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=0)
    assert known_verdict("cpu") is None


def test_cpu_and_float64_never_run_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(device: Any) -> TritonCheck:
        raise AssertionError("no Triton kernels on CPU or for float64: nothing to check")

    monkeypatch.setattr(self_check, "check_triton", never)
    monkeypatch.setattr(losses, "triton_available", lambda: True)
    assert not auto_uses_triton("cpu", torch.float32)
    assert not auto_uses_triton("cuda:0", torch.float64)
    assert known_verdict("cpu") is None and known_verdict("cuda:0") is None


@pytest.mark.usefixtures("simulated_gpu")
@pytest.mark.parametrize("passes", [True, False])
def test_the_sparse_encoder_backward_follows_the_verdict(monkeypatch: pytest.MonkeyPatch, passes: bool) -> None:
    """With "auto", the training step's encoder backward may use its Triton kernel only where the check passed;
    "triton" always may, "fused" never does."""
    from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig

    # Stand-ins for the loss kernels (the simulated GPU is the CPU, where compiled kernels cannot run): correct or not.
    correct_or_broken = hierarchical_mse_fused if passes else broken_loss("W_dec", [])
    monkeypatch.setattr(self_check, "hierarchical_mse_triton", correct_or_broken)
    centered = torch.randn(3, 8)
    allowed = {}
    for implementation in ("auto", "triton", "fused"):
        cfg = HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=16, k=4, loss_implementation=implementation)
        sae = HierarchicalTopKTrainingSAE(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TritonSelfCheckWarning)
            allowed[implementation] = sae._sparse_backward_may_use_triton(centered)
    assert allowed == {"auto": passes, "triton": True, "fused": False}
    assert known_verdict("cpu") is not None and known_verdict("cpu").ok is passes
