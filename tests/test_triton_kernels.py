"""The Triton kernels against the reference loss and the float64 per-level loop.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports triton, so the kernels run in Triton's
interpreter on CPU tensors; with ``TRITON_INTERPRET=0`` on a machine with a GPU they run compiled on CUDA tensors.
The interpreter runs every program in Python, so the sizes are tiny; tails are exercised with blocks smaller than
the tensors.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from sae_lens_hierarchical.losses import (
    HIERARCHICAL_LOSSES,
    HierarchicalMSE,
    auto_loss_implementation,
    hierarchical_mse_auto,
    hierarchical_mse_reference,
)
from tests.test_fused_loss import DIFFERENTIABLE, gradients, resolve
from tests.test_losses import naive_per_level_loss, random_problem


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    pytest.importorskip("triton")
    from sae_lens_hierarchical.losses import triton_kernels

    if not triton_kernels.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a GPU; set TRITON_INTERPRET=1 before triton is imported")
    return triton_kernels


@pytest.fixture(scope="module")
def device(kernels: ModuleType) -> str:
    """Where the kernels run: CPU tensors under the interpreter, else CUDA."""
    return "cpu" if kernels.INTERPRETED else "cuda"


def run_kernels(kernels: ModuleType, device: str, problem: dict[str, torch.Tensor], **options) -> HierarchicalMSE:
    """The Triton loss on ``device``, with results (and, through autograd, gradients) back on CPU."""
    result = kernels.hierarchical_mse_triton(**{name: t.to(device) for name, t in problem.items()}, **options)
    return HierarchicalMSE(*(tensor.cpu() for tensor in result))


CASES = [
    # (leading shape, d_in, d_sae, K, levels or None for all, weights or None for uniform, (block_tokens, block_d))
    ((11,), 13, 40, 1, None, None, (4, 8)),
    ((2, 5), 13, 30, 3, None, None, (4, 8)),
    ((11,), 9, 50, 8, [2, 5, 8], [0.5, 0.0, 1.5], (8, 4)),
    ((7,), 20, 60, 13, None, None, (4, 16)),
    ((3, 3), 6, 16, 13, [1, 4, 13], [1.0, 0.25, 0.125], (2, 4)),  # few latents: rows shared across tokens
    ((5,), 13, 40, 8, [8], [1.0], None),  # TopK's loss, default blocks (one block covers everything)
    ((3, 7), 40, 100, 32, [4, 16, 32], [1.0, 0.5, 0.125], (8, 16)),  # Multi-TopK-style, 3 d_in blocks
]


def _relative_close(got: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-4) -> None:
    """Float32 against float64 (or float32 reference): elementwise, with an absolute floor at rtol * max |expected|."""
    torch.testing.assert_close(
        got.double(), expected.double(), rtol=rtol, atol=rtol * expected.abs().max().item(), msg=name
    )


@pytest.mark.parametrize(("shape", "d_in", "d_sae", "k", "levels", "weights", "blocks"), CASES)
def test_triton_matches_reference_and_float64_loop(
    kernels, device, shape, d_in, d_sae, k, levels, weights, blocks
) -> None:
    levels, weights = resolve(levels, weights, k)
    problem64 = random_problem(shape, d_in, d_sae, k, torch.float64, seed=k + 31)
    problem32 = {name: t.float() if t.is_floating_point() else t for name, t in problem64.items()}
    options = {} if blocks is None else {"block_tokens": blocks[0], "block_d": blocks[1]}

    def triton_loss(problem):
        return run_kernels(kernels, device, problem, levels=levels, level_weights=weights, **options)

    result = triton_loss(problem32)
    reference = hierarchical_mse_reference(**problem32, levels=levels, level_weights=weights)
    expected, expected_levels = naive_per_level_loss(**problem64, levels=levels, weights=weights)
    assert result.loss.dtype == result.level_mse.dtype == result.reconstruction.dtype == torch.float32
    assert result.reconstruction.shape == problem32["sae_in"].shape
    assert not result.level_mse.requires_grad and not result.reconstruction.requires_grad
    torch.testing.assert_close(result.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.level_mse, reference.level_mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.reconstruction, reference.reconstruction, rtol=1e-5, atol=1e-5)
    _relative_close(result.loss, expected, "loss")
    _relative_close(result.level_mse, torch.stack(expected_levels), "level_mse")

    _, ours = gradients(problem32, lambda p: triton_loss(p).loss)
    _, ref = gradients(problem32, lambda p: hierarchical_mse_reference(**p, levels=levels, level_weights=weights).loss)
    _, loop = gradients(problem64, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    for name, got, from_reference, exact in zip(DIFFERENTIABLE, ours, ref, loop, strict=True):
        assert got.dtype == torch.float32 and got.shape == exact.shape, name
        _relative_close(got, from_reference, f"gradient of {name} vs reference")
        _relative_close(got, exact, f"gradient of {name} vs float64 loop")


@pytest.mark.parametrize("wanted", [("W_dec",), ("sae_in", "b_dec"), ("top_acts",)])
def test_triton_computes_only_requested_gradients(kernels, device, wanted) -> None:
    levels, weights = [2, 5], [0.7, 0.3]
    problem = random_problem((6,), 7, 20, 5, torch.float32, seed=4)
    leaves = {name: problem[name].clone().requires_grad_() for name in wanted}
    result = run_kernels(
        kernels, device, {**problem, **leaves}, levels=levels, level_weights=weights, block_tokens=4, block_d=4
    )
    result.loss.backward()
    _, loop = gradients(
        {name: t.double() if t.is_floating_point() else t for name, t in problem.items()},
        lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0],
    )
    exact = dict(zip(DIFFERENTIABLE, loop, strict=True))
    for name, leaf in leaves.items():
        _relative_close(leaf.grad, exact[name], f"gradient of {name}")


def test_triton_bfloat16_inputs_accumulate_in_float32(kernels, device) -> None:
    k = 6
    levels, weights = resolve(None, None, k)
    problem16 = random_problem((9,), 10, 30, k, torch.bfloat16, seed=2)
    problem64 = {name: t.double() if t.is_floating_point() else t for name, t in problem16.items()}
    result = run_kernels(kernels, device, problem16, levels=levels, level_weights=weights, block_d=8)
    assert result.loss.dtype == result.reconstruction.dtype == torch.bfloat16
    expected, _ = naive_per_level_loss(**problem64, levels=levels, weights=weights)
    _relative_close(result.loss, expected, "loss", rtol=1e-2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"levels": [0, 4]}, r"entries must be ints in 1..K=4; got 0"),
        ({"levels": [4, 2]}, r"strictly increasing"),
        ({"block_d": 6}, r"block_d must be a power of two"),
        ({"block_tokens": 0}, r"block_tokens must be a power of two"),
        ({"dtype": torch.float64}, r"float32, bfloat16 or float16"),
    ],
)
def test_triton_rejects_bad_arguments(kernels, device, overrides, message) -> None:
    problem = random_problem((3,), 4, 10, 4, overrides.get("dtype", torch.float32), seed=0)
    options = {"levels": [2, 4], "level_weights": [0.5, 0.5], **overrides}
    options.pop("dtype", None)
    with pytest.raises(ValueError, match=message):
        run_kernels(kernels, device, problem, **options)


def test_triton_tables_first_built_under_inference_mode_still_train(kernels, device) -> None:
    """The rank tables are cached; when an evaluation under ``torch.inference_mode()`` builds them first, training
    must still be able to save the rank weights for backward."""
    levels, weights = [2, 5], [0.7, 0.3]
    problem = random_problem((6,), 7, 20, 5, torch.float32, seed=14)
    options = {"levels": levels, "level_weights": weights, "block_tokens": 4, "block_d": 4}
    kernels._rank_tables.cache_clear()
    with torch.inference_mode():
        run_kernels(kernels, device, problem, **options)
    _, ours = gradients(problem, lambda p: run_kernels(kernels, device, p, **options).loss)
    problem64 = {name: t.double() if t.is_floating_point() else t for name, t in problem.items()}
    _, loop = gradients(problem64, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    for name, got, exact in zip(DIFFERENTIABLE, ours, loop, strict=True):
        _relative_close(got, exact, f"gradient of {name}")


def test_registered_triton_loss_runs_the_kernels(kernels, device, monkeypatch) -> None:
    """``HIERARCHICAL_LOSSES["triton"]`` reaches the kernels' entry point (spied) and gives the float64 loop's loss."""
    levels, weights = [1, 3], [0.5, 0.5]
    problem = random_problem((5,), 6, 20, 3, torch.float32, seed=1)
    ran = []
    original = kernels.hierarchical_mse_triton

    def spy(*args, **kwargs):
        ran.append(kwargs["levels"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "hierarchical_mse_triton", spy)
    registered = HIERARCHICAL_LOSSES["triton"](
        **{name: t.to(device) for name, t in problem.items()}, levels=levels, level_weights=weights
    )
    assert ran == [levels], "the registered loss must call the kernels' entry point once"
    problem64 = {name: t.double() if t.is_floating_point() else t for name, t in problem.items()}
    expected, _ = naive_per_level_loss(**problem64, levels=levels, weights=weights)
    _relative_close(registered.loss.cpu(), expected, "loss")


# --- automatic choice (no triton needed) ------------------------------------------------------------


def test_auto_picks_torch_on_cpu_and_for_float64_and_triton_only_on_cuda(monkeypatch) -> None:
    from sae_lens_hierarchical import losses

    assert auto_loss_implementation("cpu", torch.float32) == "fused"
    assert auto_loss_implementation("cuda", torch.float64) == "fused"
    monkeypatch.setattr(losses, "triton_available", lambda: True)
    assert auto_loss_implementation("cuda:0", torch.bfloat16) == "triton"
    assert auto_loss_implementation(torch.device("cpu"), torch.float32) == "fused"
    monkeypatch.setattr(losses, "triton_available", lambda: False)
    assert auto_loss_implementation("cuda", torch.float32) == "fused"


@pytest.mark.parametrize("W_dec_dtype", [torch.float32, torch.float64])
def test_auto_on_cpu_runs_the_torch_fused_path_and_matches_the_float64_loop(monkeypatch, W_dec_dtype) -> None:
    """Which implementation ``auto`` runs (spied), with what it asked the chooser, and that the result is right."""
    from sae_lens_hierarchical import losses

    ran: list[str] = []
    asked: list[tuple[torch.device, torch.dtype]] = []

    def spy(name: str):
        original = HIERARCHICAL_LOSSES[name]

        def wrapper(*args, **kwargs):
            ran.append(name)
            return original(*args, **kwargs)

        return wrapper

    def chooser(device, dtype):
        asked.append((torch.device(device), dtype))
        return auto_loss_implementation(device, dtype)

    monkeypatch.setattr(losses, "triton_available", lambda: True)  # triton installed does not matter on CPU
    monkeypatch.setattr(losses, "auto_loss_implementation", chooser)
    for name in ("fused", "reference", "triton"):
        monkeypatch.setitem(HIERARCHICAL_LOSSES, name, spy(name))
    levels, weights = [2, 4, 7], [0.5, 0.25, 0.25]
    problem = random_problem((4, 5), 8, 30, 7, torch.float32, seed=6)
    problem["W_dec"] = problem["W_dec"].to(W_dec_dtype)
    loss, auto = gradients(problem, lambda p: hierarchical_mse_auto(**p, levels=levels, level_weights=weights).loss)
    assert ran == ["fused"], ran
    assert asked == [(torch.device("cpu"), W_dec_dtype)], "the choice must see the promoted dtype of the inputs"
    problem64 = {name: t.double() if t.is_floating_point() else t for name, t in problem.items()}
    expected, loop = gradients(problem64, lambda p: naive_per_level_loss(**p, levels=levels, weights=weights)[0])
    _relative_close(loss, expected, "loss")
    for name, got, exact in zip(DIFFERENTIABLE, auto, loop, strict=True):
        assert got.dtype == problem[name].dtype, name
        _relative_close(got, exact, f"gradient of {name}")


def test_triton_loss_without_triton_says_how_to_install_it(monkeypatch) -> None:
    from sae_lens_hierarchical.losses import triton_loader

    monkeypatch.setattr(triton_loader, "triton_available", lambda: False)
    problem = random_problem((2,), 4, 10, 3, torch.float32, seed=0)
    with pytest.raises(ImportError, match=r"pip install 'sae-lens-hierarchical\[gpu\]'"):
        HIERARCHICAL_LOSSES["triton"](**problem, levels=[3], level_weights=[1.0])
