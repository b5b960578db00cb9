"""The sparse training step: one dense encoder product, every other piece over the selected entries only.

Expectations come from outside the code under test: a float64 loop, ``torch.autograd.gradcheck`` (numerical
derivatives of the dense product), SAELens's own ``TopKTrainingSAE`` (``hierarchy_levels=[K]``, float64, AuxK with
every dead-latent regime) and the package's dense path through SAELens's ``decode`` and ``calculate_aux_loss``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig
from sae_lens_hierarchical.sparse_training import PreActivationsAt, scatter_outer_products
from tests.test_sae_paths import assert_same_step, train_step

D_IN, D_SAE, K, TOKENS = 16, 64, 6, 48  # k_aux = D_IN // 2 = 8


def naive_scatter_outer_products(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int):
    out = torch.zeros(n_out, rows.shape[1], dtype=torch.float64)
    for token in range(indices.shape[0]):
        for slot in range(indices.shape[1]):
            out[indices[token, slot]] += weights[token, slot].double() * rows[token].double()
    return out


@pytest.mark.parametrize(("n_tokens", "n_kept", "n_out"), [(1, 1, 1), (7, 3, 5), (33, 8, 40), (20, 6, 6)])
def test_scatter_outer_products_equals_a_loop(n_tokens: int, n_kept: int, n_out: int) -> None:
    generator = torch.Generator().manual_seed(n_tokens)
    indices = torch.randint(0, n_out, (n_tokens, n_kept), generator=generator)  # repeats within and across tokens
    weights, rows = torch.randn(n_tokens, n_kept, generator=generator), torch.randn(n_tokens, 9, generator=generator)
    result = scatter_outer_products(indices, weights, rows, n_out)
    assert result.dtype == torch.float32 and result.shape == (n_out, 9)
    expected = naive_scatter_outer_products(indices, weights, rows, n_out)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_b_dec", [True, False])
@pytest.mark.parametrize("n_columns", [0, 5])
@pytest.mark.parametrize("leading", [(9,), (3, 3)], ids=["tokens", "batch-by-position"])
def test_pre_activations_at_has_the_gradient_of_the_dense_product(
    with_b_dec: bool, n_columns: int, leading: tuple[int, ...]
) -> None:
    """gradcheck differentiates the dense ``(x - b_dec) @ W_enc + b_enc`` numerically; the backward is sparse."""
    generator = torch.Generator().manual_seed(n_columns)
    x = torch.randn(*leading, 5, dtype=torch.float64, generator=generator)
    indices = torch.stack([torch.randperm(12, generator=generator)[:4] for _ in range(9)]).reshape(*leading, 4)
    columns = torch.randperm(12, generator=generator)[:n_columns]

    def entries(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        centered = (x - b_dec).detach() if with_b_dec else x
        hidden_pre = (centered @ W_enc + b_enc).detach()
        b_dec_input = b_dec if with_b_dec else None
        return PreActivationsAt.apply(centered, W_enc, b_enc, b_dec_input, hidden_pre, indices, columns)

    parameters = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in ((5, 12), (12,), (5,))]
    assert torch.autograd.gradcheck(entries, parameters)


def topk_pair(dtype: torch.dtype = torch.float64, **cfg: Any) -> tuple[HierarchicalTopKTrainingSAE, TopKTrainingSAE]:
    settings = {"d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": str(dtype).removeprefix("torch."), **cfg}
    torch.manual_seed(0)
    ours = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(hierarchy_levels=[K], **settings))
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.1)
        ours.b_dec.normal_(0, 0.5)
        ours.W_dec.mul_(torch.rand(D_SAE, 1, dtype=dtype) * 2 + 0.3)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(**settings))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def assert_same(ours: dict, theirs: dict) -> None:
    """Equal to float64 rounding."""
    assert_same_step(ours, theirs, rtol=1e-10, atol=1e-12)


def dead_mask(n_dead: int) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    return mask


# n_dead below, at and above k_aux = 8: the AuxK scale min(n_dead / k_aux, 1) and k_aux = min(k_aux, n_dead) both move.
DEAD_COUNTS = [0, 3, 8, 40, D_SAE]


@pytest.mark.parametrize("n_dead", DEAD_COUNTS)
@pytest.mark.parametrize(
    "cfg",
    [{}, {"rescale_acts_by_decoder_norm": False}, {"apply_b_dec_to_input": False}],
    ids=["default", "no-rescale", "no-b_dec-on-input"],
)
def test_sparse_step_equals_saelens_topk_in_float64(n_dead: int, cfg: dict) -> None:
    """Losses (MSE and AuxK), outputs and every gradient of SAELens's dense TopK step, to float64 rounding."""
    ours, theirs = topk_pair(**cfg)
    sae_in = torch.randn(TOKENS, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 + 1
    assert not ours._needs_dense_step(sae_in)
    assert_same(train_step(ours, sae_in, dead_mask(n_dead)), train_step(theirs, sae_in, dead_mask(n_dead)))


def test_a_missing_dead_mask_gives_no_aux_loss_like_saelens() -> None:
    ours, theirs = topk_pair()
    sae_in = torch.randn(TOKENS, D_IN, dtype=torch.float64)
    assert_same(train_step(ours, sae_in, None), train_step(theirs, sae_in, None))


@pytest.mark.parametrize("n_dead", [3, 40])
@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_and_dense_steps_agree_at_every_level(n_dead: int, rescale: bool) -> None:
    """All levels 1..K with uneven weights: the sparse step against the dense path (one SAELens ``decode`` per level,
    SAELens's own ``calculate_aux_loss``), selected by a hook that watches without editing."""
    torch.manual_seed(0)
    sae = HierarchicalTopKTrainingSAE(
        HierarchicalTopKTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=K,
            dtype="float64",
            rescale_acts_by_decoder_norm=rescale,
            hierarchy_weights=[0.3, 0.1, 0.1, 0.1, 0.2, 0.2],
        )
    )
    sae_in = torch.randn(TOKENS, D_IN, dtype=torch.float64) + 1
    sparse = train_step(sae, sae_in, dead_mask(n_dead))
    with sae.hooks(fwd_hooks=[("hook_sae_acts_pre", lambda value, hook: None)]):
        assert sae._needs_dense_step(sae_in)
        dense = train_step(sae, sae_in, dead_mask(n_dead))
    assert_same(sparse, dense)


def saved_for_backward(sae: HierarchicalTopKTrainingSAE, sae_in: torch.Tensor) -> list[torch.Size]:
    """Shapes of every tensor autograd keeps for the backward of one training forward."""
    shapes: list[torch.Size] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        sae.training_forward_pass(TrainStepInput(sae_in, {}, dead_mask(8), n_training_steps=1, is_logging_step=False))
    return shapes


def test_no_tokens_by_d_sae_tensor_is_kept_for_backward() -> None:
    """The sparse step saves nothing of ``tokens * d_sae`` elements; the dense path (the check's control) does."""
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    sae_in = torch.randn(TOKENS, D_IN)  # TOKENS > D_IN: no weight matrix has tokens * d_sae elements
    dense_size = TOKENS * D_SAE
    assert max(shape.numel() for shape in saved_for_backward(sae, sae_in)) < dense_size
    with sae.hooks(fwd_hooks=[("hook_sae_acts_post", lambda value, hook: None)]):
        assert max(shape.numel() for shape in saved_for_backward(sae, sae_in)) >= dense_size


def test_a_hook_editing_pre_activations_acts_as_on_saelens() -> None:
    """A hook on ``hook_sae_acts_pre`` that silences latents selects the dense path and is honoured like SAELens's."""
    ours, theirs = topk_pair()
    sae_in = torch.randn(TOKENS, D_IN, dtype=torch.float64)

    def silence(pre: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.cat([pre[..., :20] - 100.0, pre[..., 20:]], dim=-1)

    results = []
    for sae in (ours, theirs):
        with sae.hooks(fwd_hooks=[("hook_sae_acts_pre", silence)]):
            results.append(train_step(sae, sae_in, dead_mask(8)))
    assert_same(*results)
    assert not results[0]["feature_acts"][:, :20].any()


def test_an_aux_loss_override_is_used() -> None:
    class NoAux(HierarchicalTopKTrainingSAE):
        def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out):
            return {"auxiliary_reconstruction_loss": hidden_pre.sum() * 0.0}

    torch.manual_seed(0)
    sae = NoAux(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    output = sae.training_forward_pass(
        TrainStepInput(torch.randn(TOKENS, D_IN), {}, dead_mask(40), n_training_steps=1, is_logging_step=False)
    )
    assert float(output.losses["auxiliary_reconstruction_loss"].detach()) == 0.0


def test_an_input_that_requires_grad_gets_saelens_gradient() -> None:
    """Attribution through the training SAE: the input's gradient, which the sparse step never computes."""
    ours, theirs = topk_pair()
    base = torch.randn(TOKENS, D_IN, dtype=torch.float64)
    grads = []
    for sae in (ours, theirs):
        sae_in = base.clone().requires_grad_()
        output = sae.training_forward_pass(TrainStepInput(sae_in, {}, dead_mask(8), 1, False))
        output.loss.backward()
        grads.append(sae_in.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_saelens_trainer_steps_identically_with_the_sparse_feature_acts() -> None:
    """SAELens's own ``SAETrainer.step``, its firing statistics (from our sparse COO ``feature_acts``), its dead-latent
    window (so AuxK starts), clipping, Adam and its log dict: everything equals the same trainer driving its TopK."""
    ours, theirs = topk_pair()
    ours.cfg.use_sparse_activations = True  # as the package's jobs train
    batches = torch.randn(6, TOKENS, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    trainer_cfg = SAETrainerConfig(
        total_training_samples=6 * TOKENS, train_batch_size_samples=TOKENS, lr=1e-2, lr_end=1e-2, dead_feature_window=2
    )
    trainers = [SAETrainer(trainer_cfg, sae, data_provider=iter(())) for sae in (ours, theirs)]
    for batch in batches:
        outputs = [trainer.step(batch) for trainer in trainers]
        assert outputs[0].feature_acts.is_sparse and not outputs[1].feature_acts.is_sparse
        pairs = zip(trainers, outputs, strict=True)
        logs = [trainer.build_train_step_log_dict(output, TOKENS) for trainer, output in pairs]
        for name, value in logs[1].items():
            assert logs[0][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert trainers[1].dead_neurons.any()  # AuxK ran on the later steps
    for statistic in ("n_forward_passes_since_fired", "act_freq_scores"):
        torch.testing.assert_close(getattr(trainers[0], statistic), getattr(trainers[1], statistic))
    for name, parameter in theirs.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[name], parameter, rtol=1e-9, atol=1e-12, msg=name)


def test_a_subclass_adding_a_loss_on_hidden_pre_gets_saelens_gradients() -> None:
    """SAELens's way to add a loss: extend ``training_forward_pass`` and use ``hidden_pre``, which must carry gradients
    as SAELens's does (the sparse step's ``hidden_pre`` does not, so such a subclass takes the dense path)."""

    def with_pre_activation_penalty(base: type) -> type:
        class Penalised(base):  # type: ignore[misc, valid-type]
            def training_forward_pass(self, step_input: TrainStepInput) -> Any:
                output = super().training_forward_pass(step_input)
                penalty = 100 * output.hidden_pre.pow(2).mean()
                output.losses["pre_activation_penalty"] = penalty
                output.loss = output.loss + penalty
                return output

        return Penalised

    ours, theirs = topk_pair()
    ours.__class__ = with_pre_activation_penalty(HierarchicalTopKTrainingSAE)
    theirs.__class__ = with_pre_activation_penalty(TopKTrainingSAE)
    sae_in = torch.randn(TOKENS, D_IN, dtype=torch.float64)
    assert_same(train_step(ours, sae_in, dead_mask(8)), train_step(theirs, sae_in, dead_mask(8)))


@pytest.mark.parametrize(
    "mask",
    [
        torch.zeros(1, D_SAE, dtype=torch.bool),
        torch.zeros(D_SAE - 4, dtype=torch.bool),
        torch.zeros(D_SAE),
        torch.zeros(D_SAE, dtype=torch.long),
    ],
    ids=["2-d", "too-short", "float", "int64"],
)
def test_a_malformed_dead_mask_is_refused_with_its_shape_and_dtype(mask: torch.Tensor) -> None:
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    expected = rf"dead_neuron_mask must be a bool tensor of shape \({D_SAE},\).*{mask.dtype}"
    with pytest.raises(ValueError, match=expected):
        sae.training_forward_pass(TrainStepInput(torch.randn(TOKENS, D_IN), {}, mask, 1, False))


@pytest.mark.parametrize("loss_implementation", ["reference", "fused", "triton"])
def test_the_sparse_step_equals_saelens_topk_with_every_loss_implementation(loss_implementation: str) -> None:
    """float32 (Triton takes no float64; under ``TRITON_INTERPRET=1`` its kernels run on these CPU tensors)."""
    if loss_implementation == "triton":
        pytest.importorskip("triton")
    ours, theirs = topk_pair(torch.float32)
    ours.cfg.loss_implementation = loss_implementation
    sae_in = torch.randn(TOKENS, D_IN, generator=torch.Generator().manual_seed(2)) * 2 + 1
    ours_step, theirs_step = train_step(ours, sae_in, dead_mask(40)), train_step(theirs, sae_in, dead_mask(40))
    assert_same_step(ours_step, theirs_step, rtol=1e-5, atol=1e-6)


def test_saelens_compile_sae_keeps_the_sparse_step() -> None:
    """``compile_sae=True`` sets ``sae.training_forward_pass = torch.compile(sae.training_forward_pass)`` on the
    instance; that wrapper calls our own method, so the step must stay sparse (a subclass override does not)."""
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    original = sae.training_forward_pass
    sae.training_forward_pass = lambda step_input: original(step_input)  # what torch.compile's wrapper does
    assert not sae._needs_dense_step(torch.randn(TOKENS, D_IN))


def firing_loop(sae: Any, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """A training loop as people write it against SAELens's TopK: dense firing statistics on ``feature_acts``."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    fired = []
    for step, batch in enumerate(batches):
        out = sae.training_forward_pass(TrainStepInput(batch, {}, None, step, False))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
        fired.append((acts != 0).any(0))
        assert out.feature_acts.is_sparse == sae.cfg.use_sparse_activations
        if not sae.cfg.use_sparse_activations:
            fired[-1] = (out.feature_acts != 0).any(0)  # the everyday line, on a dense tensor
    return fired


def test_feature_acts_take_the_form_sae_lens_topk_gives() -> None:
    """Dense by default, as SAELens's TopK: the same loop runs on both architectures and (levels = [K]) fires the same
    latents at every step; with ``use_sparse_activations=True`` ours are sparse COO, and fire the same latents again.
    (SAELens 6.54's own TopK fails in backward with that flag on this CPU, so it is not run sparse here.)"""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(step)).double() for step in range(3)]
    runs = []
    for cls, cfg_cls, extra in (
        (TopKTrainingSAE, TopKTrainingSAEConfig, {}),
        (HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig, {"hierarchy_levels": [6]}),
        (
            HierarchicalTopKTrainingSAE,
            HierarchicalTopKTrainingSAEConfig,
            {"hierarchy_levels": [6], "use_sparse_activations": True},
        ),
    ):
        torch.manual_seed(0)
        sae = cls(cfg_cls(d_in=16, d_sae=48, k=6, dtype="float64", **extra))
        runs.append(firing_loop(sae, batches))
    for step in range(len(batches)):
        assert torch.equal(runs[0][step], runs[1][step]) and torch.equal(runs[1][step], runs[2][step])
