"""One path from ``--set NAME=VALUE`` to the runner config a job trains with: typed, nested, and truthful.

Every runner field can be set, nested ones too (``sae.k``, ``logger.log_to_wandb``); each value is converted to its
field's type (``sae.hierarchy_levels=8,16`` is a list of ints) or refused with the field's type named. Fields with a
flag of their own (``training_tokens``, ``seed``, ``device``) reach the job exactly as the flag would, and a flag that
says otherwise is refused; ``hook_name`` and ``context_size`` change the preset (its activation cache, d_in, sequences).
Fields that the preset or the job owns (the model, the corpus, where activations and results go) are refused with the
flag to use. Every setting is checked before any model is loaded or activation cached.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from sae_lens import LanguageModelSAERunnerConfig

from sae_lens_hierarchical.budget import is_int
from sae_lens_hierarchical.presets import Preset, mixing_buffer_batches, replace_runner_config

# Runner fields the preset or the job owns: a --set of one would be lost or would make the records lie.
OWNED_FIELDS = {
    "model_name": "choose the model with --preset",
    "model_class_name": "choose the model with --preset",
    "dataset_path": "choose the corpus with --preset",
    "is_dataset_tokenized": "choose the corpus with --preset",
    "streaming": "choose the corpus with --preset",
    "use_cached_activations": "embedded presets always train from their activation cache",
    "cached_activations_path": "the job caches activations itself (--cache-dir)",
    "output_path": "use --output-dir",
    "sae.d_in": "d_in follows the hook: use --hook or --layer",
    "sae.metadata": "the job records the SAE's metadata itself",
}
# Runner fields with a flag of their own: the job takes them from either, and refuses the two disagreeing.
FLAG_FIELDS = {"training_tokens": "--training-tokens", "seed": "--seed", "device": "--device", "hook_name": "--hook"}


@dataclass(frozen=True)
class ResolvedJob:
    """A job's settings after ``--set``, the flags and the preset are reconciled (see :func:`resolve_job`)."""

    preset: Preset
    overrides: dict[str, Any]
    training_tokens: int | None
    seed: int
    device: str


def resolve_job(
    preset: Preset,
    overrides: dict[str, Any] | None = None,
    *,
    training_tokens: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    hook: str | None = None,
    layer: int | None = None,
) -> ResolvedJob:
    """The preset (at its hook and context), the remaining overrides and the job's own settings, with every value
    checked: ``--set training_tokens=`` is the job's token count, ``--set seed=`` its seed, and so on; a flag and a
    ``--set`` of the same field must agree. ``layer`` is a shorthand for ``blocks.<layer>.<the preset's hook>``."""
    remaining = dict(overrides or {})
    flags = {"training_tokens": training_tokens, "seed": seed, "device": device, "hook_name": hook}
    if layer is not None:
        if hook is not None:
            raise ValueError(f"give --layer or --hook, not both; got --layer {layer} and --hook {hook}")
        if not is_int(layer) or layer < 0:
            raise ValueError(f"--layer must be an int >= 0; got {layer!r}")
        flags["hook_name"] = f"blocks.{layer}.{preset.hook_name.split('.', 2)[2]}"
    for name, flag in FLAG_FIELDS.items():
        if name in remaining:
            value = remaining.pop(name)
            if flags[name] is not None and flags[name] != value:
                raise ValueError(f"{name} is set twice: {flag} {flags[name]} and --set {name}={value}; set it once")
            flags[name] = value
    if flags["hook_name"] is not None:
        preset = preset.at_hook(_typed("hook_name", flags["hook_name"], str))
    if "context_size" in remaining:
        preset = preset.with_context(_typed("context_size", remaining.pop("context_size"), int))
    tokens = None if flags["training_tokens"] is None else _typed("training_tokens", flags["training_tokens"], int)
    if tokens is not None and tokens < 1:
        raise ValueError(f"training_tokens must be an int >= 1; got {tokens}")
    chosen_device = check_device("cpu" if flags["device"] is None else _typed("device", flags["device"], str))
    chosen_seed = 0 if flags["seed"] is None else _typed("seed", flags["seed"], int)
    # Every remaining override, against the runner config it will change: unknown names, types and values fail here.
    sized = {} if tokens is None else {"training_tokens": tokens}
    check_runner_config(apply_overrides(preset.runner_config(None, **sized), remaining))
    return ResolvedJob(preset, remaining, tokens, chosen_seed, chosen_device)


def check_device(device: str) -> str:
    """``device`` if torch can run there on this machine; one clear error otherwise (before any model is loaded)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0'; got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch has no CUDA device available (torch {torch.__version__})")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda or mps; got {device!r}")
    return device


def check_runner_config(cfg: LanguageModelSAERunnerConfig[Any]) -> LanguageModelSAERunnerConfig[Any]:
    """The numeric settings SAELens would only trip over after minutes of work, checked now."""
    positive_ints = ("train_batch_size_tokens", "training_tokens", "context_size", "n_batches_in_buffer")
    positive_ints += ("store_batch_size_prompts", "dead_feature_window", "feature_sampling_window")
    for name in positive_ints:
        value = getattr(cfg, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    for name in ("lr_warm_up_steps", "lr_decay_steps", "n_checkpoints", "n_batches_for_norm_estimate"):
        value = getattr(cfg, name)
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    if not (isinstance(cfg.lr, float | int) and math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0; got {cfg.lr!r}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be in [0, 1); got {getattr(cfg, name)!r}")
    if cfg.training_tokens < cfg.train_batch_size_tokens:
        raise ValueError(
            f"training_tokens={cfg.training_tokens} is less than one batch (train_batch_size_tokens="
            f"{cfg.train_batch_size_tokens}): nothing would train"
        )
    return cfg


def apply_overrides(
    cfg: LanguageModelSAERunnerConfig[Any], overrides: dict[str, Any]
) -> LanguageModelSAERunnerConfig[Any]:
    """Set runner fields by (dotted) name: ``lr``, ``sae.k``, ``logger.log_to_wandb``; each value converted to its
    field's type. Unknown names, owned fields and values of the wrong type raise one clear error each."""
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in OWNED_FIELDS:
            raise ValueError(f"{name} cannot be set with --set: {OWNED_FIELDS[name]}")
        changes[name] = value
    result = _replace_nested(cfg, changes, prefix="")
    # SAELens's mixing buffer (n_batches_in_buffer sequences) must hold a training batch; it checks only when the
    # first batch is drawn, after the model is loaded and activations are cached. Resize it with the batch or
    # context, or refuse an explicit size that cannot work.
    if "n_batches_in_buffer" not in overrides and result.n_batches_in_buffer * result.context_size < (
        result.train_batch_size_tokens
    ):
        result = replace_runner_config(
            result, n_batches_in_buffer=mixing_buffer_batches(result.train_batch_size_tokens, result.context_size)
        )
    if result.n_batches_in_buffer * result.context_size < result.train_batch_size_tokens:
        raise ValueError(
            f"n_batches_in_buffer={result.n_batches_in_buffer} sequences of {result.context_size} tokens cannot hold "
            f"one training batch of train_batch_size_tokens={result.train_batch_size_tokens}; use at least "
            f"{-(-result.train_batch_size_tokens // result.context_size)}"
        )
    return result


def _replace_nested(config: Any, changes: dict[str, Any], prefix: str) -> Any:
    """``config`` with ``changes`` (``field`` or ``field.sub``) applied, each value typed by its field."""
    hints = typing.get_type_hints(type(config))
    known = {field.name for field in fields(config)}
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in changes.items():
        head, _, rest = name.partition(".")
        if head not in known:
            where = f"{prefix}<{'|'.join(sorted(known))}>"
            raise ValueError(f"unknown field {prefix + name!r}; the fields here are {where}")
        if rest:
            if not dataclasses.is_dataclass(getattr(config, head)):
                raise ValueError(f"{prefix + head} has no fields; set it as --set {prefix + head}=VALUE")
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(getattr(config, head)):
            raise ValueError(
                f"{prefix + head} is a group of settings; set its fields: --set {prefix + head}.<field>=VALUE"
            )
        else:
            direct[head] = _typed(prefix + name, value, hints.get(head, Any))
    for head, sub in nested.items():
        direct[head] = _replace_nested(getattr(config, head), sub, prefix=f"{prefix}{head}.")
    if not direct:
        return config
    if isinstance(config, LanguageModelSAERunnerConfig):
        return replace_runner_config(config, **direct)
    return replace(config, **direct)


def _typed(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` says (JSON or plain text from the command line), or one clear error."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in arguments:
            return None
        options = [argument for argument in arguments if argument is not type(None)]
        errors = []
        for option in options:
            try:
                return _typed(name, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {options}")
    if origin is Literal:
        if value not in arguments:
            raise ValueError(f"{name} must be one of {list(arguments)}; got {value!r}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [part for part in str(value).split(",") if part.strip()]
        if not items:
            raise ValueError(f"{name} must be a list (comma-separated or JSON); got {value!r}")
        item_type = arguments[0] if arguments else Any
        return [_typed(f"{name}[{index}]", item, item_type) for index, item in enumerate(items)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a JSON object; got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{name} must be true or false; got {value!r}")
    if annotation is int:
        number = _number(name, value, "an int")
        if float(number).is_integer():
            return int(number)
        raise ValueError(f"{name} must be an int; got {value!r}")
    if annotation is float:
        return float(_number(name, value, "a number"))
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} must be text; got {value!r}")
    return value


def _number(name: str, value: Any, kind: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {kind}; got {value!r}")
    if isinstance(value, int | float):
        return value
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be {kind}; got {value!r}") from None


# Runner fields (dotted below the top level) that differ between runs of the same job without changing what it trains:
# a rerun does not inherit them from a saved config, and a resumed run may differ in them from its checkpoint.
PER_RUN_FIELDS = {
    "device",
    "llm_device",
    "act_store_device",
    "output_path",
    "checkpoint_path",
    "resume_from_checkpoint",
    "logger.run_name",
    "logger.wandb_id",
    "sae.device",
}


def job_from_runner_config(
    config: dict[str, Any], presets: dict[str, Preset]
) -> tuple[Preset, dict[str, Any], int, int] | None:
    """A saved SAELens runner config (this package's ``runner_cfg.json`` included) as ``(preset, overrides,
    training_tokens, seed)`` for the embedded preset whose model and corpus it names, or None when none does.

    The overrides are every field that differs from that preset's runner config at the same hook and context, so
    rerunning them trains what the config describes, with the preset's offline loaders and activation cache.
    """
    cfg = LanguageModelSAERunnerConfig.from_dict(config)
    for preset in presets.values():
        reference = preset.runner_config(None)
        if not preset.embedded or (cfg.model_name, cfg.dataset_path) != (reference.model_name, reference.dataset_path):
            continue
        preset = preset.at_hook(cfg.hook_name).with_context(cfg.context_size)
        reference = preset.runner_config(None, training_tokens=cfg.training_tokens, seed=cfg.seed)
        overrides = {
            name: value
            for name, value in _differences(cfg, reference, prefix="").items()
            if name not in PER_RUN_FIELDS and name not in OWNED_FIELDS and name not in FLAG_FIELDS
        }
        return preset, overrides, cfg.training_tokens, cfg.seed
    return None


def _differences(ours: Any, reference: Any, prefix: str) -> dict[str, Any]:
    """``{dotted field: our value}`` wherever two configs of the same kind differ (nested configs field by field)."""
    changes: dict[str, Any] = {}
    for field in fields(ours):
        if field.name == "metadata":
            continue
        value, other = getattr(ours, field.name), getattr(reference, field.name, None)
        if dataclasses.is_dataclass(value) and type(value) is type(other):
            changes |= _differences(value, other, prefix=f"{prefix}{field.name}.")
        elif value != other:
            changes[prefix + field.name] = value
    return changes
