"""Tiny fixtures for tests, tutorials and smoke runs: a character tokenizer, a random model and a token corpus.

Built locally in seconds, without any download; the ``tiny-random`` preset is made of them. They are not a
language model of text: use them to exercise code paths, not to judge SAEs.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def tiny_token_sequences(tokenizer: PreTrainedTokenizerBase, context_size: int) -> Dataset:
    """The ``tiny-random`` preset's corpus: 2048 synthetic sequences over ``tokenizer``'s vocabulary."""
    return tiny_token_dataset(2048, context_size, seed=0, vocab_size=len(tokenizer))
