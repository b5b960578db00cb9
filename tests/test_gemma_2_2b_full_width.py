"""The ``gemma-2-2b`` preset's own training path at its real width, offline.

TransformerLens's Gemma-2 2B architecture with random weights (its first 13 blocks: all that the preset's hook
``blocks.12.hook_resid_post`` reads) feeds SAELens's runner through ``run_training_job``, which trains the preset's
SAE unchanged (d_in 2,304, d_sae 65,536, K = 128, activation normalisation, b_dec initialised to the mean, fp32).
Only what costs CPU time shrinks: tokens, batch and context sizes, buffers and the norm estimate. Timings and memory
of this path: ``benchmarks/gemma_2_2b_full_width.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from sae_lens_hierarchical import HierarchicalTopKSAE, load_sae
from sae_lens_hierarchical.data.models import GEMMA_2_2B, GEMMA_2_2B_HOOK, gemma_2_2b_random_weights
from sae_lens_hierarchical.jobs import run_training_job
from sae_lens_hierarchical.presets import get_preset
from sae_lens_hierarchical.testing import tiny_token_dataset

CONTEXT = 128
PROMPTS_PER_FORWARD = 4
BATCH_TOKENS = 512
STEPS = 2
# Runner fields shrunk for CPU time only; every SAE field (d_in, d_sae, k, normalisation, b_dec init) and the dtype
# stay the preset's. The mixing buffer (n_batches_in_buffer * context tokens) holds one training batch, so each
# batch costs about one forward of PROMPTS_PER_FORWARD sequences; the activation scale comes from one batch.
CPU_SIZED = {
    "context_size": CONTEXT,
    "train_batch_size_tokens": BATCH_TOKENS,
    "store_batch_size_prompts": PROMPTS_PER_FORWARD,
    "n_batches_in_buffer": BATCH_TOKENS // CONTEXT,
    "n_batches_for_norm_estimate": 1,
}


def test_gemma_2_2b_random_weights_refuses_layer_counts_without_the_hook() -> None:
    for n_layers in (12, 27):
        with pytest.raises(ValueError, match=rf"n_layers must be in 13\.\.26 .*got {n_layers}"):
            gemma_2_2b_random_weights(n_layers)


@pytest.mark.slow
def test_gemma_2_2b_preset_trains_its_full_width_sae_offline(tmp_path: Path) -> None:
    preset = get_preset("gemma-2-2b")
    assert (preset.model_name, preset.hook_name) == (GEMMA_2_2B, GEMMA_2_2B_HOOK)
    model = gemma_2_2b_random_weights()
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (13, 2304, 8, 4, 256)
    assert (cfg.d_mlp, cfg.gated_mlp, cfg.d_vocab, cfg.window_size) == (9216, True, 256_000, 4096)
    assert (cfg.attn_scores_soft_cap, cfg.output_logits_soft_cap) == (50.0, 30.0)

    # What SAELens's activation store reads at the hook, every forward pass of the run.
    seen: list[torch.Tensor] = []

    def record(activations: torch.Tensor, hook: HookPoint) -> None:
        seen.append(activations.detach().clone())

    model.add_perma_hook(preset.hook_name, record)
    sequences = tiny_token_dataset(32, CONTEXT, seed=0, vocab_size=cfg.d_vocab)  # BOS, then Zipf-distributed ids
    result = run_training_job(
        preset,
        tmp_path / "run",
        overrides=CPU_SIZED,
        training_tokens=STEPS * BATCH_TOKENS,
        wandb="disabled",
        progress=False,
        model=model,
        dataset=sequences,
    )
    assert result.results == [], "streamed presets are not evaluated by the training job"

    assert len(seen) >= STEPS + 1, "one forward per training batch, and one for the activation-scale estimate"
    assert all(acts.shape == (PROMPTS_PER_FORWARD, CONTEXT, 2304) for acts in seen), [a.shape for a in seen]
    activations = torch.cat([acts[:, 1:] for acts in seen]).reshape(-1, 2304)  # BOS positions are excluded
    assert torch.isfinite(activations).all()

    sae = load_sae(result.sae_dir)
    assert isinstance(sae, HierarchicalTopKSAE)
    assert sae.W_enc.shape == (2304, 65_536) and sae.W_dec.shape == (65_536, 2304)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (preset.d_in, preset.d_sae, preset.k) == (2304, 65_536, 128)
    assert sae.W_enc.dtype == torch.float32
    assert sae.cfg.metadata.model_name == "gemma-2-2b"
    assert sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    assert sae.cfg.metadata.dataset_path == "a Dataset passed to run_training_job"  # not the preset's FineWeb
    assert sae.cfg.metadata.context_size == CONTEXT
    assert sae.cfg.normalize_activations == "none", "the activation scale must be folded into the weights"
    assert all(torch.isfinite(tensor).all() for tensor in sae.state_dict().values())
    # Only training steps record an L0 (SAELens skips it when none ran): at most K latents fire per token.
    assert sae.cfg.metadata.l0 is not None and 0 < sae.cfg.metadata.l0 <= 128
    # b_dec starts at zero; the first step sets it to the mean of its batch (scaled, folded back on save), a batch
    # drawn from the activations recorded above (measured: cosine 0.98 with their mean, norm ratio 1.03).
    mean = activations.mean(dim=0)
    cosine = torch.nn.functional.cosine_similarity(sae.b_dec, mean, dim=0).item()
    ratio = (sae.b_dec.norm() / mean.norm()).item()
    assert cosine > 0.8 and 0.5 < ratio < 2.0, (cosine, ratio)
