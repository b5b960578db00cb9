"""``scatter_outer_products_triton`` against a float64 loop over every (token, slot) entry.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports triton, so the kernel runs in Triton's
interpreter on CPU tensors; with ``TRITON_INTERPRET=0`` on a machine with a GPU it runs compiled on CUDA tensors.
The interpreter runs every program in Python, so the sizes are tiny; chunk and column tails, and runs of one index
that cross chunks, are exercised with blocks smaller than the tensors.
"""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def sparse() -> ModuleType:
    pytest.importorskip("triton")
    from sae_lens_hierarchical import triton_sparse

    if not triton_sparse.triton_interpreted() and not torch.cuda.is_available():
        pytest.skip("the compiled Triton kernel needs a GPU; set TRITON_INTERPRET=1 before triton is imported")
    return triton_sparse


@pytest.fixture(scope="module")
def device(sparse: ModuleType) -> str:
    """Where the kernel runs: CPU tensors under the interpreter, else CUDA."""
    return "cpu" if sparse.triton_interpreted() else "cuda"


def naive_scatter(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int) -> torch.Tensor:
    """The definition, one entry at a time in float64: ``out[indices[t, i]] += weights[t, i] * rows[t]``."""
    out = torch.zeros(n_out, rows.shape[1], dtype=torch.float64)
    for t in range(indices.shape[0]):
        for i in range(indices.shape[1]):
            out[int(indices[t, i])] += float(weights[t, i]) * rows[t].double()
    return out


def make_indices(pattern: str, n_tokens: int, n_kept: int, n_out: int, generator: torch.Generator) -> torch.Tensor:
    if pattern == "distinct":  # TopK: m different latents a token
        return torch.stack([torch.randperm(n_out, generator=generator)[:n_kept] for _ in range(n_tokens)])
    if pattern == "repeated":  # few values: repeats within tokens and across them
        return torch.randint(0, min(n_out, 3), (n_tokens, n_kept), generator=generator)
    if pattern == "hot":  # one latent in every token (a run over many chunks), most output rows unused
        indices = torch.randint(0, n_out, (n_tokens, n_kept), generator=generator)
        indices[:, 1] = 7
        return indices
    assert pattern == "uniform"
    return torch.randint(0, n_out, (n_tokens, n_kept), generator=generator)


def random_problem(
    n_tokens: int, n_kept: int, d: int, n_out: int, pattern: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    indices = make_indices(pattern, n_tokens, n_kept, n_out, generator)
    weights = torch.randn(n_tokens, n_kept, generator=generator)
    rows = torch.randn(n_tokens, d, generator=generator)
    return indices, weights, rows


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Against the loop on the same (rounded) inputs: products of float32/bfloat16/float16 values and their float32
    sums are within float32 rounding of it whatever the input dtype, so one tolerance serves every dtype (an
    accumulation in the input's half precision would miss it by orders of magnitude)."""
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    assert got.is_contiguous()
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5 * scale)


CASES = [
    # (N, m, d, n_out, index pattern, (block_entries, block_d) or None for the defaults)
    (7, 1, 5, 4, "distinct", (4, 4)),  # m = 1; entry and column tails
    (9, 3, 11, 6, "distinct", (4, 8)),
    (10, 4, 6, 5, "repeated", (8, 4)),  # repeats within and across tokens
    (13, 3, 9, 40, "hot", (4, 8)),  # a run crossing ten chunks; unused rows stay zero
    (5, 6, 20, 6, "distinct", None),  # m = n_out: every latent in every token; default blocks
    (6, 2, 3, 3, "uniform", (1, 1)),  # one entry and one column a program
    (21, 4, 17, 64, "uniform", (16, 16)),
]


@pytest.mark.parametrize(("n_tokens", "n_kept", "d", "n_out", "pattern", "blocks"), CASES)
def test_matches_the_float64_loop(sparse, device, n_tokens, n_kept, d, n_out, pattern, blocks) -> None:
    indices, weights, rows = random_problem(n_tokens, n_kept, d, n_out, pattern, seed=n_tokens + d)
    options = {} if blocks is None else {"block_entries": blocks[0], "block_d": blocks[1]}
    got = sparse.scatter_outer_products_triton(
        indices.to(device), weights.to(device), rows.to(device), n_out, **options
    )
    assert_matches(got, naive_scatter(indices, weights, rows, n_out))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("weights_dtype", DTYPES)
@pytest.mark.parametrize("rows_dtype", DTYPES)
def test_half_precision_inputs_accumulate_in_float32(sparse, device, weights_dtype, rows_dtype) -> None:
    # Every token sends one entry to latent 7, so that output row sums 24 products.
    indices, weights, rows = random_problem(24, 3, 10, 12, "hot", seed=5)
    weights, rows = weights.to(weights_dtype), (rows * 100).to(rows_dtype)
    got = sparse.scatter_outer_products_triton(
        indices.to(device), weights.to(device), rows.to(device), 12, block_entries=16, block_d=8
    )
    assert_matches(got, naive_scatter(indices, weights, rows, 12))


def test_any_strides(sparse, device) -> None:
    indices, weights, rows = random_problem(6, 3, 5, 8, "uniform", seed=3)
    # indices and weights transposed back from [m, N] buffers, rows every other column of a wider one
    indices_view = indices.t().contiguous().to(device).t()
    weights_view = weights.t().contiguous().to(device).t()
    rows_view = torch.zeros(6, 10, device=device)[:, ::2]
    rows_view.copy_(rows.to(device))
    assert not indices_view.is_contiguous() and not weights_view.is_contiguous() and rows_view.stride(1) == 2
    got = sparse.scatter_outer_products_triton(indices_view, weights_view, rows_view, 8, block_entries=4, block_d=4)
    assert_matches(got, naive_scatter(indices, weights, rows, 8))


@pytest.mark.parametrize(("n_tokens", "n_kept", "d", "n_out"), [(0, 3, 4, 5), (4, 0, 4, 5), (4, 2, 0, 5), (0, 2, 3, 0)])
def test_empty_inputs_give_zeros(sparse, device, n_tokens, n_kept, d, n_out) -> None:
    indices, weights, rows = random_problem(n_tokens, n_kept, d, max(n_out, 1), "uniform")
    got = sparse.scatter_outer_products_triton(indices.to(device), weights.to(device), rows.to(device), n_out)
    assert got.shape == (n_out, d) and got.dtype == torch.float32
    assert not got.any()


BAD_ARGUMENTS = [
    ({"indices": torch.zeros(8, dtype=torch.int64)}, r"indices must be 2-D \[N, m\]; got shape \(8,\)"),
    ({"weights": torch.zeros(4, 3)}, r"weights must have the shape of indices \(4, 2\); got \(4, 3\)"),
    ({"rows": torch.zeros(5, 3)}, r"rows must be 2-D \[N, d\] with N = 4 .*; got shape \(5, 3\)"),
    ({"rows": torch.zeros(4)}, r"rows must be 2-D \[N, d\] with N = 4 .*; got shape \(4,\)"),
    ({"indices": torch.zeros(4, 2, dtype=torch.int32)}, r"indices must be int64; got torch.int32"),
    ({"weights": torch.zeros(4, 2, dtype=torch.float64)}, r"weights must be float32, bfloat16 or float16 .*float64"),
    ({"rows": torch.zeros(4, 3, dtype=torch.int64)}, r"rows must be float32, bfloat16 or float16 .*int64"),
    ({"n_out": -1}, r"n_out must be an int >= 0 .*; got -1"),
    ({"n_out": 5.0}, r"n_out must be an int >= 0 .*; got 5.0"),
    ({"n_out": True}, r"n_out must be an int >= 0 .*; got True"),
    ({"indices": torch.tensor([[0, 1], [2, -1], [4, 4], [0, 0]])}, r"indices must lie in 0..n_out-1 = 0..4; got -1"),
    ({"indices": torch.tensor([[0, 1], [2, 5], [4, 4], [0, 0]])}, r"indices must lie in 0..n_out-1 = 0..4; got 5"),
    ({"n_out": 3}, r"indices must lie in 0..n_out-1 = 0..2; got 4"),
    ({"block_entries": 3}, r"block_entries must be a power of two >= 1; got 3"),
    ({"block_d": 0}, r"block_d must be a power of two >= 1; got 0"),
    ({"indices": torch.zeros(4, 2, dtype=torch.int64, device="meta")}, r"must be on one device; got \[.*'meta'\]"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_ARGUMENTS)
def test_rejects_bad_arguments(sparse, device, overrides, message) -> None:
    arguments = {
        "indices": torch.tensor([[0, 1], [2, 3], [4, 4], [0, 0]]),
        "weights": torch.ones(4, 2),
        "rows": torch.ones(4, 3),
        "n_out": 5,
    }
    arguments.update(overrides)
    arguments = {
        name: value.to(device) if isinstance(value, torch.Tensor) and value.device.type != "meta" else value
        for name, value in arguments.items()
    }
    with pytest.raises(ValueError, match=message):
        sparse.scatter_outer_products_triton(**arguments)


def test_rejects_tensors_on_a_device_it_cannot_run_on(sparse) -> None:
    indices = torch.zeros(4, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"takes .*cuda tensors .*; got meta"):
        sparse.scatter_outer_products_triton(
            indices, torch.ones(4, 2, device="meta"), torch.ones(4, 3, device="meta"), 5
        )


def test_without_triton_the_module_imports_and_the_call_says_what_is_missing() -> None:
    call = "scatter_outer_products_triton(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), torch.ones(2, 3), 1)"
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sae_lens_hierarchical.triton_sparse import scatter_outer_products_triton\n"
        "try:\n"
        f"    {call}\n"
        "except ImportError as error:\n"
        "    print('ImportError:', error)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ImportError: scatter_outer_products_triton needs triton: pip install" in run.stdout
