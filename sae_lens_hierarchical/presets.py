"""Model, corpus and hook wiring in one place.

``tiny-random`` is a randomly initialised two-layer TransformerLens model with a locally built
character tokenizer and a synthetic token corpus: it needs no download at all, so tests and the quick
demo run anywhere in seconds.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sae_lens_hierarchical.activation_cache import hook_activations
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKTrainingSAEConfig

TINY_MODEL_NAME = "tiny-random"
TINY_HOOK_NAME = "blocks.1.hook_resid_pre"
_SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>", "<unk>"]


def tiny_char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer (printable ASCII + BOS/EOS/PAD/UNK) built without any download.

    It is round-tripped through a local directory because TransformerLens re-creates tokenizers with
    ``AutoTokenizer.from_pretrained(name_or_path)``, which must then point at something on disk.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    directory = Path(tempfile.mkdtemp(prefix="tiny-char-tokenizer-"))
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def tiny_random_model(seed: int = 0, d_model: int = 32, n_layers: int = 2) -> HookedTransformer:
    """A randomly initialised TransformerLens model (attention + MLP) over the tiny char tokenizer."""
    tokenizer = tiny_char_tokenizer()
    cfg = HookedTransformerConfig(
        model_name=TINY_MODEL_NAME,
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=128,
        d_head=8,
        n_heads=d_model // 8,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        default_prepend_bos=True,
    )
    return HookedTransformer(cfg, tokenizer=tokenizer)


def tiny_token_dataset(n_sequences: int, context_size: int, seed: int = 0, vocab_size: int = 104) -> Dataset:
    """Pre-tokenized sequences starting with BOS, drawn from a Zipf-like unigram distribution.

    Skewed frequencies give the activations some structure (common vs rare tokens) for the SAE to learn.
    """
    generator = torch.Generator().manual_seed(seed)
    n_special = len(_SPECIAL_TOKENS)
    ranks = torch.arange(1, vocab_size - n_special + 1, dtype=torch.float64)
    probabilities = 1.0 / ranks
    tokens = (
        torch.multinomial(
            probabilities, n_sequences * (context_size - 1), replacement=True, generator=generator
        ).reshape(n_sequences, context_size - 1)
        + n_special
    )
    bos = torch.zeros(n_sequences, 1, dtype=torch.long)
    return Dataset.from_dict({"input_ids": torch.cat([bos, tokens], dim=1).tolist()})


def tiny_runner_config(
    output_path: str | None,
    training_tokens: int = 40_000,
    d_sae: int = 128,
    k: int = 16,
    hierarchy_levels: list[int] | None = None,
    hierarchy_weights: list[float] | None = None,
    seed: int = 0,
    **runner_overrides: Any,
) -> LanguageModelSAERunnerConfig[HierarchicalTopKTrainingSAEConfig]:
    """A SAELens runner config for a small HierarchicalTopK SAE on the tiny random model (CPU, offline)."""
    context_size = 32
    settings: dict[str, Any] = dict(
        model_name=TINY_MODEL_NAME,
        hook_name=TINY_HOOK_NAME,
        dataset_path="in-memory",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=context_size,
        training_tokens=training_tokens,
        train_batch_size_tokens=256,
        # SAELens's mixing buffer holds n_batches_in_buffer * context_size tokens and must hold at least
        # one training batch (its defaults violate this for small contexts).
        n_batches_in_buffer=16,
        store_batch_size_prompts=8,
        lr=3e-3,
        device="cpu",
        seed=seed,
        output_path=output_path,
        checkpoint_path=None,
        n_checkpoints=0,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    settings.update(runner_overrides)
    return LanguageModelSAERunnerConfig(
        sae=HierarchicalTopKTrainingSAEConfig(
            d_in=32, d_sae=d_sae, k=k, hierarchy_levels=hierarchy_levels, hierarchy_weights=hierarchy_weights
        ),
        **settings,
    )


def collect_activations(
    model: HookedTransformer,
    token_sequences: torch.Tensor,
    hook_name: str,
    batch_size: int = 16,
    drop_bos: bool = True,
) -> torch.Tensor:
    """``[tokens, d_model]`` activations at ``hook_name`` for ``[sequences, context]`` token ids.

    BOS positions are dropped by default: their residual norms are orders of magnitude larger than text
    tokens', and SAEs are neither trained nor evaluated on them.
    """
    acts = hook_activations(model, token_sequences, hook_name, batch_size)
    if drop_bos:
        acts = acts[:, 1:]
    return acts.reshape(-1, acts.shape[-1])
