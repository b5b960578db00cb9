"""Every SAELens path a researcher takes, checked against SAELens's own TopK (``hierarchy_levels=[K]``).

Fine-tuning a saved SAE, hook_z SAEs, each input mode (``apply_b_dec_to_input``, normalisations, float64/bf16
inputs), the runner's bf16 autocast, and training-time hooks / ``decode`` overrides. The expectation is always
computed by SAELens's ``TopKTrainingSAE`` / ``TopKSAE`` with the same weights, never by this package.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAETrainingRunner, TrainingSAE
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import (
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    presets,
)
from sae_lens_hierarchical.evaluation import evaluate_over_k

D_IN, D_SAE, K = 16, 64, 6


def training_pair(**cfg: Any) -> tuple[HierarchicalTopKTrainingSAE, TopKTrainingSAE]:
    """Our training SAE at ``levels=[K]`` and SAELens's TopK with identical, non-trivial weights."""
    settings = {"d_in": D_IN, "d_sae": D_SAE, "k": K, **cfg}
    torch.manual_seed(0)
    ours = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(hierarchy_levels=[K], **settings))
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.1)
        ours.b_dec.normal_(0, 0.5)
        ours.W_dec.mul_(torch.rand(D_SAE, 1) * 2 + 0.3)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(**settings))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def inference_pair(**cfg: Any) -> tuple[HierarchicalTopKSAE, TopKSAE]:
    settings = {"d_in": D_IN, "d_sae": D_SAE, "k": K, **cfg}
    torch.manual_seed(1)
    ours = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(**settings))
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.1)
        ours.b_dec.normal_(0, 0.5)
    theirs = TopKSAE(TopKSAEConfig(**settings))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def train_step(sae: TrainingSAE, sae_in: torch.Tensor, dead: torch.Tensor | None = None, step: int = 1) -> dict:
    """Losses, outputs and every parameter gradient of one training forward + backward."""
    sae.zero_grad()
    output = sae.training_forward_pass(TrainStepInput(sae_in, {}, dead, n_training_steps=step, is_logging_step=False))
    output.loss.backward()
    return {
        "losses": {name: value.detach().clone() for name, value in output.losses.items()},
        "sae_out": output.sae_out.detach().clone(),
        "feature_acts": output.feature_acts.detach().clone(),
        "grads": {name: parameter.grad.clone() for name, parameter in sae.named_parameters()},
    }


def assert_same_step(ours: dict, theirs: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert ours["losses"].keys() == theirs["losses"].keys()
    for name in theirs["losses"]:
        torch.testing.assert_close(ours["losses"][name], theirs["losses"][name], rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(ours["sae_out"], theirs["sae_out"], rtol=rtol, atol=atol)
    torch.testing.assert_close(ours["feature_acts"].to_dense(), theirs["feature_acts"].to_dense(), rtol=rtol, atol=atol)
    for name, grad in theirs["grads"].items():
        torch.testing.assert_close(ours["grads"][name], grad, rtol=rtol, atol=atol, msg=name)


def dead_mask(n_dead: int = 20) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    return mask


# --- fine-tuning keeps what was trained ------------------------------------------------------------


def test_loading_for_training_never_reinitialises_b_dec(tmp_path) -> None:
    """SAELens's ``TrainingSAE.load_from_disk`` (what ``from_pretrained_path`` uses) then a step-0 forward."""
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, b_dec_init="mean"))
    with torch.no_grad():
        sae.b_dec.fill_(5.0)
    sae.b_dec_pending_mean_init = False
    sae.save_inference_model(tmp_path / "saved")
    loaded = TrainingSAE.load_from_disk(tmp_path / "saved")
    assert isinstance(loaded, HierarchicalTopKTrainingSAE) and loaded.cfg.b_dec_init == "mean"
    loaded.training_forward_pass(
        TrainStepInput(torch.randn(32, D_IN), {}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    )
    torch.testing.assert_close(loaded.b_dec, torch.full((D_IN,), 5.0))


def test_resuming_weights_from_a_checkpoint_never_reinitialises_b_dec(tmp_path) -> None:
    """SAELens's resume: a freshly built SAE, then ``load_weights_from_checkpoint``, then the next step."""
    cfg = HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, b_dec_init="mean")
    trained = HierarchicalTopKTrainingSAE(cfg)
    with torch.no_grad():
        trained.b_dec.fill_(-3.0)
    trained.save_model(tmp_path / "checkpoint")
    resumed = HierarchicalTopKTrainingSAE(cfg)
    resumed.load_weights_from_checkpoint(tmp_path / "checkpoint")
    resumed.training_forward_pass(
        TrainStepInput(torch.randn(32, D_IN), {}, None, n_training_steps=0, is_logging_step=False)
    )
    torch.testing.assert_close(resumed.b_dec, torch.full((D_IN,), -3.0))


def test_fresh_sae_initialises_b_dec_to_the_first_batch_mean_once() -> None:
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, b_dec_init="mean"))
    first, second = torch.randn(32, D_IN) + 3.0, torch.randn(32, D_IN) - 7.0
    for batch in (first, second):
        with torch.no_grad():
            sae.training_forward_pass(TrainStepInput(batch, {}, None, n_training_steps=0, is_logging_step=False))
    torch.testing.assert_close(sae.b_dec, first.mean(dim=0))


def test_finetuning_through_the_runner_moves_b_dec_by_at_most_one_adam_step(tmp_path, tiny_model) -> None:
    """A saved SAE with b_dec shifted by 5, fine-tuned one step by SAELens's runner (from_pretrained_path)."""
    preset = presets.get_preset(presets.TINY_MODEL_NAME)
    dataset = presets.tiny_token_dataset(200, 32, seed=5)

    def run(output: str, tokens: int, **overrides: Any) -> Any:
        cfg = preset.runner_config(
            output, sae_overrides={"d_sae": 64, "k": 8, "b_dec_init": "mean"}, training_tokens=tokens, **overrides
        )
        return LanguageModelSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=dataset).run()

    torch.manual_seed(0)
    run(str(tmp_path / "trained"), 4 * preset.train_batch_size_tokens)
    saved = SAE.load_from_disk(tmp_path / "trained")
    with torch.no_grad():
        saved.b_dec.add_(5.0)
    saved.save_model(tmp_path / "shifted")
    shifted_b_dec = saved.b_dec.detach().clone()
    lr = 1e-3
    tuned = run(
        str(tmp_path / "tuned"),
        preset.train_batch_size_tokens,
        from_pretrained_path=str(tmp_path / "shifted"),
        lr=lr,
    )
    assert tuned.cfg.b_dec_init == "mean"  # the saved setting came back, and was not applied again
    movement = (tuned.b_dec.detach() - shifted_b_dec).abs().max().item()
    assert movement <= lr * 1.01, f"b_dec moved by {movement}, more than one Adam step of lr={lr}"


# --- hook_z and every input mode, against SAELens's TopK -------------------------------------------


INPUT_MODES = [
    pytest.param({}, torch.float32, id="default"),
    pytest.param({"apply_b_dec_to_input": False}, torch.float32, id="no-b_dec-on-input"),
    pytest.param({"normalize_activations": "expected_average_only_in"}, torch.float32, id="expected-average"),
    pytest.param({"rescale_acts_by_decoder_norm": False}, torch.float32, id="no-rescale"),
    pytest.param({"reshape_activations": "hook_z"}, torch.float32, id="hook_z"),
    pytest.param({}, torch.float64, id="float64-input"),
    pytest.param({}, torch.bfloat16, id="bfloat16-input"),
]


@pytest.mark.parametrize(("cfg", "input_dtype"), INPUT_MODES)
def test_training_step_equals_saelens_topk(cfg: dict, input_dtype: torch.dtype) -> None:
    """Losses (MSE and AuxK with dead latents), outputs and every parameter gradient, for each input mode."""
    ours, theirs = training_pair(**cfg)
    sae_in = (torch.randn(48, D_IN, generator=torch.Generator().manual_seed(2)) * 2 + 1).to(input_dtype)
    assert_same_step(train_step(ours, sae_in, dead_mask()), train_step(theirs, sae_in, dead_mask()))


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"apply_b_dec_to_input": False},
        {"normalize_activations": "constant_norm_rescale"},
        {"normalize_activations": "layer_norm"},
        {"rescale_acts_by_decoder_norm": True},
    ],
    ids=lambda cfg: "-".join(f"{v}" for v in cfg.values()) or "default",
)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inference_outputs_equal_saelens_topk(cfg: dict, input_dtype: torch.dtype) -> None:
    ours, theirs = inference_pair(**cfg)
    x = (torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(4)) * 3).to(input_dtype)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)))


def test_hook_z_inference_takes_heads_like_saelens() -> None:
    """On hook_z, inference SAEs take ``[..., n_heads, d_head]`` and give it back; a flat input is refused."""
    ours, theirs = inference_pair(reshape_activations="hook_z")
    z = torch.randn(3, 5, 4, D_IN // 4)
    torch.testing.assert_close(ours.encode(z), theirs.encode(z))
    torch.testing.assert_close(ours(z), theirs(z), rtol=1e-5, atol=1e-5)
    assert ours(z).shape == z.shape
    with pytest.raises(ValueError, match=r"n_heads \* d_head d_in=16; got shape \(3, 5, 3, 4\)"):
        ours(torch.randn(3, 5, 3, 4))


def test_hook_z_sae_trains_with_the_runner_on_an_attention_model(tmp_path, tiny_model: HookedTransformer) -> None:
    """SAELens's runner, its activation store flattening hook_z: the step that was refused before now trains."""
    preset = presets.get_preset(presets.TINY_MODEL_NAME)
    cfg = preset.runner_config(
        str(tmp_path / "sae"),
        sae_overrides={"d_sae": 64, "k": 8, "reshape_activations": "hook_z"},
        hook_name="blocks.0.attn.hook_z",
        training_tokens=6 * preset.train_batch_size_tokens,
    )
    dataset = presets.tiny_token_dataset(200, 32, seed=6)
    sae = LanguageModelSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=dataset).run()
    assert isinstance(sae, HierarchicalTopKTrainingSAE)
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert isinstance(loaded, HierarchicalTopKSAE) and loaded.cfg.reshape_activations == "hook_z"
    tokens = torch.tensor(dataset["input_ids"][:4])
    _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z = cache["blocks.0.attn.hook_z"]  # [batch, pos, n_heads, d_head]
    with loaded.use_k(3):
        acts = loaded.encode(z)
    assert acts.shape == (*z.shape[:2], 64) and int((acts > 0).sum(dim=-1).max()) <= 3
    # evaluate_over_k on flat rows (as the activation store gives them) against SAELens's TopKSAE at each k on heads
    flat = z.reshape(-1, 32)
    results = evaluate_over_k(loaded, flat, ks=[2, 8], model=tiny_model, tokens=tokens, progress=False)
    assert loaded.hook_z_reshaping_mode  # evaluation left the SAE as it found it
    for row in results:
        topk_cfg = TopKSAEConfig.from_dict({**loaded.cfg.to_dict(), "architecture": "topk", "k": row.k})
        reference = TopKSAE(topk_cfg)
        reference.load_state_dict(loaded.state_dict())
        with torch.no_grad():
            error = (reference(z).reshape(-1, 32) - flat).double().pow(2).sum()
        variance = (flat.double() - flat.double().mean(dim=0)).pow(2).sum()
        assert row.fvu == pytest.approx(float(error / variance), rel=1e-5)
        assert row.ce_loss_score is not None


# --- autocast and hooks as SAELens does them --------------------------------------------------------


def test_autocast_step_follows_saelens_numerics() -> None:
    """Under the runner's CPU bf16 autocast, our step stays far closer to SAELens's than autocast moves SAELens's.

    Measured at this test's sizes: autocast moves SAELens's own gradients by 0.53% (largest relative norm over the
    parameters); ours differ from SAELens's autocast gradients by 0.16% and its losses by < 1e-4 relative, because
    SAELens also rounds its decoded output to bfloat16, which our fused loss, summing the K ranks in float32, does
    not.
    """
    ours, theirs = training_pair()
    sae_in = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(7)) * 2 + 1
    exact = train_step(theirs, sae_in, dead_mask())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_autocast = train_step(ours, sae_in, dead_mask())
        theirs_autocast = train_step(theirs, sae_in, dead_mask())

    def relative(a: dict, b: dict) -> float:
        return max(float((a["grads"][n] - b["grads"][n]).norm() / b["grads"][n].norm()) for n in b["grads"])

    autocast_effect = relative(theirs_autocast, exact)
    assert autocast_effect > 1e-3  # autocast really is on: SAELens's gradients moved
    assert relative(ours_autocast, theirs_autocast) < 0.4 * autocast_effect
    for name in theirs_autocast["losses"]:
        torch.testing.assert_close(ours_autocast["losses"][name], theirs_autocast["losses"][name], rtol=1e-4, atol=0)


def fired_hooks(sae: TrainingSAE, sae_in: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hook point the training forward fires, with the last value it saw."""
    seen: dict[str, torch.Tensor] = {}

    def record(value: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = value.detach().clone()

    with sae.hooks(fwd_hooks=[(lambda name: True, record)]):
        sae.training_forward_pass(TrainStepInput(sae_in, {}, dead_mask(), n_training_steps=1, is_logging_step=False))
    return seen


def test_training_forward_fires_the_hooks_saelens_fires_with_the_same_values() -> None:
    ours, theirs = training_pair()
    sae_in = torch.randn(32, D_IN)
    ours_seen, theirs_seen = fired_hooks(ours, sae_in), fired_hooks(theirs, sae_in)
    assert ours_seen.keys() == theirs_seen.keys()
    assert {"hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons"} <= ours_seen.keys()
    for name, value in theirs_seen.items():
        torch.testing.assert_close(ours_seen[name], value.to_dense(), rtol=1e-5, atol=1e-6, msg=name)


def test_a_hook_editing_activations_during_training_acts_as_on_saelens() -> None:
    """Zeroing some latents in ``hook_sae_acts_post`` changes our loss and gradients exactly as SAELens's."""
    ours, theirs = training_pair()
    sae_in = torch.randn(40, D_IN)

    def ablate(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        acts = acts.to_dense()
        return torch.cat([torch.zeros_like(acts[..., :16]), acts[..., 16:]], dim=-1)

    plain = train_step(ours, sae_in, dead_mask())
    results = []
    for sae in (ours, theirs):
        with sae.hooks(fwd_hooks=[("hook_sae_acts_post", ablate)]):
            results.append(train_step(sae, sae_in, dead_mask()))
    assert_same_step(*results)
    assert not torch.allclose(results[0]["losses"]["mse_loss"], plain["losses"]["mse_loss"])


def test_a_decode_override_is_used_by_training_as_on_saelens() -> None:
    class HalfDecodeOurs(HierarchicalTopKTrainingSAE):
        def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
            return 0.5 * super().decode(feature_acts)

    class HalfDecodeTheirs(TopKTrainingSAE):
        def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
            return 0.5 * super().decode(feature_acts)

    ours, theirs = training_pair()
    ours_half = HalfDecodeOurs(ours.cfg)
    theirs_half = HalfDecodeTheirs(theirs.cfg)
    ours_half.load_state_dict(ours.state_dict())
    theirs_half.load_state_dict(theirs.state_dict())
    sae_in = torch.randn(40, D_IN)
    assert_same_step(train_step(ours_half, sae_in, dead_mask()), train_step(theirs_half, sae_in, dead_mask()))
    with torch.no_grad():
        torch.testing.assert_close(ours_half(sae_in), theirs_half(sae_in))


def test_instrumented_and_fused_training_paths_agree_at_every_level() -> None:
    """All levels 1..K: a watching hook switches to one SAELens ``decode`` per level; the loss must not change."""
    torch.manual_seed(0)
    sae = HierarchicalTopKTrainingSAE(
        HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, hierarchy_weights=[0.3, 0.1, 0.1, 0.1, 0.2, 0.2])
    )
    sae_in = torch.randn(40, D_IN) + 1
    fused = train_step(sae, sae_in, dead_mask())
    with sae.hooks(fwd_hooks=[("hook_sae_recons", lambda value, hook: None)]):
        instrumented = train_step(sae, sae_in, dead_mask())
    assert_same_step(instrumented, fused)


def test_an_encode_with_hidden_pre_override_is_used_as_on_saelens() -> None:
    class HalfEncodeOurs(HierarchicalTopKTrainingSAE):
        def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            acts, hidden_pre = super().encode_with_hidden_pre(x)
            return 0.5 * acts, hidden_pre

    class HalfEncodeTheirs(TopKTrainingSAE):
        def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            acts, hidden_pre = super().encode_with_hidden_pre(x)
            return 0.5 * acts, hidden_pre

    ours, theirs = training_pair()
    ours_half, theirs_half = HalfEncodeOurs(ours.cfg), HalfEncodeTheirs(theirs.cfg)
    ours_half.load_state_dict(ours.state_dict())
    theirs_half.load_state_dict(theirs.state_dict())
    sae_in = torch.randn(40, D_IN)
    assert_same_step(train_step(ours_half, sae_in, dead_mask()), train_step(theirs_half, sae_in, dead_mask()))
    with torch.no_grad():
        torch.testing.assert_close(ours_half.encode(sae_in), theirs_half.encode(sae_in).to_dense())
        torch.testing.assert_close(ours_half(sae_in), theirs_half(sae_in))


def test_a_decode_patched_on_the_instance_is_respected() -> None:
    ours, _ = inference_pair()
    x = torch.randn(6, D_IN)
    original = ours.decode
    ours.decode = lambda acts: 0.0 * original(acts)  # type: ignore[method-assign]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), torch.zeros(6, D_IN))


def test_inference_under_autocast_equals_saelens_topk() -> None:
    """SAELens rounds ``feature_acts @ W_dec`` to bfloat16 under autocast; our forward takes its path then."""
    ours, theirs = inference_pair(rescale_acts_by_decoder_norm=True)
    x = torch.randn(3, 5, D_IN) * 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ours(x), theirs(x))


def test_a_partial_load_without_b_dec_keeps_the_mean_initialisation_pending() -> None:
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, b_dec_init="mean"))
    state = {name: tensor for name, tensor in sae.state_dict().items() if name != "b_dec"}
    sae.load_state_dict(state, strict=False)
    batch = torch.randn(32, D_IN) + 4.0
    with torch.no_grad():
        sae.training_forward_pass(TrainStepInput(batch, {}, None, n_training_steps=0, is_logging_step=False))
    torch.testing.assert_close(sae.b_dec, batch.mean(dim=0))


# --- a saved SAE is always finite ------------------------------------------------------------------------------


def test_a_non_finite_update_stops_training_and_nothing_is_saved(tmp_path: Any) -> None:
    """An update that makes a weight non-finite is caught at the next step (named: step, parameter, likely cause);
    after the last step, the save refuses it; no output directory is written."""
    from sae_lens.saes.sae import TrainStepInput

    from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    x = torch.randn(16, 8)
    sae.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")  # what a bad optimizer step leaves
    with pytest.raises(ValueError, match=r"non-finite weights.*W_dec.*after the update of training step 6"):
        sae.training_forward_pass(TrainStepInput(x, {}, None, 7, False))
    with pytest.raises(ValueError, match=r"non-finite weights.*W_dec.*not saved"):
        sae.save_inference_model(tmp_path / "sae")
    assert not (tmp_path / "sae").exists() or not any((tmp_path / "sae").iterdir())
