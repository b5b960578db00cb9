"""The budget as an argument: ``encode/forward/encode_top_k(x, k=)``, ``at_k`` views, per-thread ``use_k``, compile.

Expectations come from an independent float64 computation on the SAE's raw weights (ranking with ``torch.topk``,
decoding by summing rows), never from the SAE's own ``encode_top_k``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch._dynamo
from sae_lens import HookedSAETransformer
from torch._dynamo.testing import CompileCounter

from sae_lens_hierarchical import (
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    presets,
)

D_IN, D_SAE, K = 32, 96, 10


def make_sae(kind: str) -> HierarchicalTopKSAE | HierarchicalTopKTrainingSAE:
    torch.manual_seed(0)
    if kind == "inference":
        sae: Any = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    else:
        sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 2 + 0.3)
    return sae


def independent(sae: Any, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense activations [..., d_sae], reconstruction [..., d_in])`` at budget k, in float64 from the raw weights."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    x = x.double()
    hidden = (x - b_dec) @ W_enc + b_enc
    norms = W_dec.norm(dim=-1)
    if sae.cfg.rescale_acts_by_decoder_norm:
        hidden = hidden * norms
    values, indices = hidden.topk(k, dim=-1)
    acts = torch.zeros_like(hidden).scatter(-1, indices, values.relu())
    coefficients = acts / norms if sae.cfg.rescale_acts_by_decoder_norm else acts
    return acts, coefficients @ W_dec + b_dec


KINDS = ["inference", "training"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, K])
def test_encode_and_forward_take_the_budget_as_an_argument(kind: str, k: int) -> None:
    sae = make_sae(kind)
    x = torch.randn(4, 7, D_IN)
    expected_acts, expected_out = independent(sae, x, k)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x, k=k).double(), expected_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x, k=k).double(), expected_out, rtol=1e-5, atol=1e-5)
        top_acts, top_indices = sae.encode_top_k(x, k=k)
    assert top_acts.shape == top_indices.shape == (4, 7, k)
    torch.testing.assert_close(
        torch.zeros(4, 7, D_SAE).scatter(-1, top_indices, top_acts).double(), expected_acts, rtol=1e-5, atol=1e-5
    )
    assert sae.k == K  # an argument, not a state change


@pytest.mark.parametrize("kind", KINDS)
def test_encode_top_k_keeps_gradients_for_attribution(kind: str) -> None:
    """d(sum of the top-k activations)/d(W_enc, x) equals autograd through the float64 computation."""
    sae = make_sae(kind)
    x = torch.randn(6, D_IN, requires_grad=True)
    top_acts, _ = sae.encode_top_k(x, k=4)
    W_enc_grad, x_grad = torch.autograd.grad(top_acts.sum(), (sae.W_enc, x))
    x64 = x.detach().double().requires_grad_(True)
    W_enc64 = sae.W_enc.detach().double().requires_grad_(True)
    hidden = (x64 - sae.b_dec.detach().double()) @ W_enc64 + sae.b_enc.detach().double()
    if sae.cfg.rescale_acts_by_decoder_norm:
        hidden = hidden * sae.W_dec.detach().double().norm(dim=-1)
    expected = torch.autograd.grad(hidden.topk(4, dim=-1).values.relu().sum(), (W_enc64, x64))
    torch.testing.assert_close(W_enc_grad.double(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad.double(), expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_at_k_is_a_view_sharing_the_parameters(kind: str) -> None:
    sae = make_sae(kind)
    view = sae.at_k(3)
    assert view.k == 3 and sae.k == K
    for name, parameter in sae.named_parameters():
        assert getattr(view, name) is parameter  # the same objects: no copy, one optimiser updates both
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        sae.W_dec.mul_(1.5)  # an edit of the SAE is seen by the view
        torch.testing.assert_close(view(x).double(), independent(sae, x, 3)[1], rtol=1e-5, atol=1e-5)
    fired: list[str] = []
    with view.hooks(fwd_hooks=[("hook_sae_acts_post", lambda value, hook: fired.append("view"))]):
        sae.encode(x)
        assert fired == []  # the view's hooks are its own
        view.encode(x)
    assert fired == ["view"]
    view.set_k(5)
    assert (view.k, sae.k) == (5, K)
    with pytest.raises(ValueError, match=rf"k must be an int in 1..K={K} .*got k=11"):
        sae.at_k(11)


def test_one_sae_at_two_budgets_at_two_hook_sites() -> None:
    """Two views of one SAE in one HookedSAETransformer, each spliced at its own hook with its own budget."""
    tiny = presets.tiny_random_model(seed=0)
    model = HookedSAETransformer(tiny.cfg)
    model.load_state_dict(tiny.state_dict())
    sae = make_sae("inference")
    hooks = {"blocks.0.hook_resid_post": 2, "blocks.1.hook_resid_post": 7}
    views = []
    for hook_name, k in hooks.items():
        view = sae.at_k(k)
        view.cfg.metadata.hook_name = hook_name
        views.append(view)
    assert sae.cfg.metadata.hook_name is None  # the views' configs are their own
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 9))

    def splice(k: int) -> Any:
        return lambda activation, hook: independent(sae, activation, k)[1].to(activation.dtype)

    with torch.no_grad():
        spliced = model.run_with_saes(tokens, saes=views)
        expected = model.run_with_hooks(tokens, fwd_hooks=[(name, splice(k)) for name, k in hooks.items()])
    torch.testing.assert_close(spliced, expected, rtol=1e-4, atol=1e-4)


def test_use_k_is_per_thread() -> None:
    """Two threads in interleaved ``use_k`` blocks each see their own budget; ``set_k`` is the shared default."""
    sae = make_sae("inference")
    x = torch.randn(16, D_IN) + 0.5
    barrier = threading.Barrier(2)
    seen: dict[int, list[int]] = {}

    def work(k: int) -> None:
        with sae.use_k(k):
            barrier.wait()  # both threads are inside their blocks now
            counts = []
            for _ in range(20):
                with torch.no_grad():
                    counts.append(int((sae.encode(x) > 0).sum(dim=-1).max()))
            barrier.wait()
        seen[k] = counts

    threads = [threading.Thread(target=work, args=(k,)) for k in (2, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {2: [2] * 20, 9: [9] * 20}
    assert sae.k == K
    sae.set_k(4)
    seen_default: list[int] = []
    thread = threading.Thread(target=lambda: seen_default.append(sae.k))
    thread.start()
    thread.join()
    assert seen_default == [4]


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_forward_serves_every_budget_without_recompiling_per_k(kind: str) -> None:
    """torch.compile traces k symbolically after one recompile; 10 budgets stay far below dynamo's limit of 8."""
    torch._dynamo.reset()
    sae = make_sae(kind)
    x = torch.randn(12, D_IN)
    counter = CompileCounter()
    compiled = torch.compile(sae.forward, backend=counter)
    with torch.no_grad():
        for k in range(1, K + 1):
            torch.testing.assert_close(compiled(x, k=k).double(), independent(sae, x, k)[1], rtol=1e-5, atol=1e-5)
    assert 1 <= counter.frame_count <= 3, f"compiled {counter.frame_count} graphs for {K} budgets"
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", KINDS)
def test_to_topk_and_save_as_topk_give_a_plain_topk_sae_at_k(kind: str, tmp_path) -> None:
    """The methods: SAELens's ``TopKSAE`` at budget 3 reconstructs as the float64 computation does at 3."""
    from sae_lens import SAE
    from sae_lens.saes.topk_sae import TopKSAE

    sae = make_sae(kind)
    x = torch.randn(8, D_IN)
    saved = SAE.load_from_disk(sae.save_as_topk(tmp_path / "topk_3", 3))
    for topk in (sae.to_topk(3), saved):
        assert type(topk) is TopKSAE and topk.cfg.k == 3
        with torch.no_grad():
            torch.testing.assert_close(topk(x).double(), independent(sae, x, 3)[1], rtol=1e-5, atol=1e-5)


def test_views_follow_the_sae_through_to_and_folds() -> None:
    """``to`` and the folds change weights shared with every view, so they change the views' config/dtype too."""
    sae = make_sae("inference")
    sae.cfg.rescale_acts_by_decoder_norm = True
    view = sae.at_k(4)
    x = torch.randn(8, D_IN, dtype=torch.float64)
    view.to(torch.float64)  # on the view: the SAE converts, and both know it
    assert sae.dtype == view.dtype == torch.float64 and sae.W_dec.dtype == torch.float64
    with torch.no_grad():
        before = {k: view(x, k=k) for k in (4, K)}
        mean, whitening = torch.randn(D_IN, dtype=torch.float64), torch.randn(D_IN, D_IN, dtype=torch.float64) * 0.2
        whitening += torch.eye(D_IN, dtype=torch.float64)
        unwhitening = torch.linalg.inv(whitening)
        sae.fold_activation_whitening(mean, whitening, unwhitening)  # on the SAE: the view must follow
        assert view.cfg.rescale_acts_by_decoder_norm is sae.cfg.rescale_acts_by_decoder_norm is False
        for k, expected in before.items():  # folded: raw x in gives what whitened x gave before
            torch.testing.assert_close(view(x @ unwhitening + mean, k=k), expected @ unwhitening + mean)
            torch.testing.assert_close(sae(x @ unwhitening + mean, k=k), expected @ unwhitening + mean)


def test_a_view_refuses_to_load_weights_or_train() -> None:
    from sae_lens.saes.sae import TrainStepInput

    sae = make_sae("training")
    view = sae.at_k(2)
    with pytest.raises(ValueError, match=r"at_k\(2\) view and cannot load weights"):
        view.load_state_dict(sae.state_dict())
    with pytest.raises(ValueError, match=r"at_k\(2\) view and cannot train"):
        view.training_forward_pass(TrainStepInput(torch.randn(4, D_IN), {}, None, 0, False))


def test_use_k_is_per_asyncio_task() -> None:
    import asyncio

    sae = make_sae("inference")
    seen: list[tuple[int, int]] = []

    async def task(k: int) -> None:
        with sae.use_k(k):
            await asyncio.sleep(0)
            seen.append((k, sae.k))
            await asyncio.sleep(0.01 if k == 2 else 0)
            seen.append((k, sae.k))

    async def both() -> None:
        await asyncio.gather(task(2), task(5))

    asyncio.run(both())
    assert all(wanted == got for wanted, got in seen) and len(seen) == 4
    assert sae.k == K


def test_compiled_forward_is_shared_by_saes_of_one_shape() -> None:
    """Ten SAEs (one per layer, say) compiled bare: one graph, not one per SAE object (dynamo's limit is 8)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    x = torch.randn(12, D_IN)
    with torch.no_grad():
        for seed in range(10):
            torch.manual_seed(seed)
            sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
            compiled = torch.compile(sae.forward, backend=counter)
            torch.testing.assert_close(compiled(x).double(), independent(sae, x, K)[1], rtol=1e-5, atol=1e-5)
    assert 1 <= counter.frame_count <= 2
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", KINDS)
def test_views_stay_with_their_own_sae_across_deepcopy_pickle_and_load(kind: str) -> None:
    """A deep copy or an unpickled copy of an SAE with live views is independent: changing the copy (weights, dtype)
    leaves the original's views on the original; a copied view follows its copied SAE; loading weights into the SAE
    reaches its views."""
    import copy
    import pickle

    sae = make_sae(kind)
    view = sae.at_k(3)
    x = torch.randn(5, D_IN)
    for copied in (copy.deepcopy(sae), pickle.loads(pickle.dumps(sae))):
        with torch.no_grad():
            copied.W_dec.mul_(2.0)
        copied.to(torch.float64)  # syncs the copy's views, if it had any
        assert view.W_dec is sae.W_dec and view.dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(view(x).double(), independent(sae, x, 3)[1], rtol=1e-5, atol=1e-5)
    copied_view = copy.deepcopy(view)
    root = copied_view._view_root
    assert root is not sae and copied_view.W_dec is root.W_dec and copied_view.k == 3
    root.to(torch.float64)
    assert copied_view.dtype == torch.float64 and view.dtype == torch.float32
    replacement = {name: tensor * 0.5 for name, tensor in sae.state_dict().items()}
    sae.load_state_dict(replacement, assign=True)  # new parameter objects: the view must follow
    assert view.W_dec is sae.W_dec


def test_discarded_views_are_not_remembered() -> None:
    import gc

    sae = make_sae("inference")
    kept = sae.at_k(2)
    for k in range(1, K + 1):
        for _ in range(10):
            sae.at_k(k)
    gc.collect()
    sae.to(torch.float32)
    assert len(sae.__dict__["_view_refs"]) <= 2 and kept.k == 2
