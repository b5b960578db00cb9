"""The suite of a comparison: which SAEs train side by side (HierarchicalTopK and the family it is compared
with), the budgets each is evaluated at, and each member's training SAE, built from the run's config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE

from sae_lens_hierarchical.baselines import baseline_config, initialise_b_dec_with_mean, matryoshka_widths
from sae_lens_hierarchical.conversion import SOURCE_FIELDS, SOURCE_METADATA_KEY, check_convertible, from_sae
from sae_lens_hierarchical.evaluation import default_budgets, serving_mean_l0s
from sae_lens_hierarchical.hierarchical_topk_sae import (
    ARCHITECTURE,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
)

BASELINES = ("topk", "batchtopk", "matryoshka", "multi_topk")


@dataclass(frozen=True)
class SuiteMember:
    """One SAE of a comparison: its training settings and the budgets it is evaluated at.

    ``family`` groups members into one line of the comparison: ``"hierarchical"``, ``"topk_fixed"`` (one TopK
    SAE per budget, each evaluated at its own k), ``"topk_truncated"`` (TopK at K evaluated at every k),
    ``"batchtopk"`` (one BatchTopK SAE per budget), ``"matryoshka"`` and ``"multi_topk"``.
    """

    name: str
    family: str
    sae_overrides: dict[str, Any]
    eval_ks: list[int]
    objective: str | None = None
    """A named HierarchicalTopK objective (:mod:`sae_lens_hierarchical.objectives`); None: the config's own."""
    architecture: str = ARCHITECTURE
    """The SAELens training architecture: ``hierarchical_topk`` (also the TopK baselines, as one level), or one of
    SAELens's own (:data:`sae_lens_hierarchical.baselines.SAE_LENS_BASELINES`), built by ``baseline_config``."""
    mean_l0s: list[int] = field(default_factory=list)
    """Target mean L0s at which the SAE is served by one calibrated global threshold."""
    as_saved: bool = False
    """Also evaluate the SAE as it encodes by itself (a JumpReLU export at its own thresholds)."""

    @property
    def line(self) -> str:
        """The report line this member belongs to: its family, split by objective when several are compared."""
        return self.family if self.objective is None else f"{self.family}:{self.objective}"


def baseline_suite(
    max_k: int,
    budgets: list[int],
    baselines: tuple[str, ...] = BASELINES,
    objectives: dict[str, dict[str, Any]] | None = None,
) -> list[SuiteMember]:
    """HierarchicalTopK at K plus the baselines: TopK at each budget (the one at K doubles as truncated TopK),
    BatchTopK at each budget, Matryoshka BatchTopK at K, Multi-TopK.

    ``objectives`` (name -> HierarchicalTopK config fields, from :func:`~sae_lens_hierarchical.objectives.
    objective_overrides`) puts one HierarchicalTopK SAE per objective in the suite, ``htopk-k<K>-<name>``, side by
    side on the same batches; without it there is one, ``htopk-k<K>``, with the config's own objective.

    The TopK baselines are this package's training SAE with a single level (proven equal to SAELens's TopK training
    SAE in tests/test_architecture.py), so they ride the same sparse step; Multi-TopK is ``L(K/4) + L(K)/8`` (Gao et
    al., 2024). BatchTopK and Matryoshka are SAELens's own classes, configured from the same SAE config
    (:func:`~sae_lens_hierarchical.baselines.baseline_config`; Matryoshka's nested widths from
    :func:`~sae_lens_hierarchical.baselines.matryoshka_widths`), so initialisation, b_dec, AuxK and rescaling are
    the same for all of them and only the objective differs.

    Evaluation: every SAE that can serve budgets below its own is also served by threshold at mean L0 = 1, 2, 4, ...,
    K/2; BatchTopK SAEs at their own saved thresholds and re-thresholded to exactly their k; Matryoshka at its own
    thresholds and re-thresholded to each mean L0.
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; allowed: {list(BASELINES)}")
    budgets = sorted(set(budgets))
    if not budgets or budgets[0] < 1 or budgets[-1] > max_k:
        raise ValueError(f"comparison budgets must be in 1..K={max_k}; got {budgets}")
    eval_ks = sorted(set(default_budgets(max_k)) | set(budgets))
    mean_l0s = serving_mean_l0s(max_k)
    if objectives is not None and not objectives:
        raise ValueError("objectives must name at least one objective (or be None for the config's own)")
    if objectives is None:
        members = [SuiteMember(f"htopk-k{max_k}", "hierarchical", {}, eval_ks, mean_l0s=mean_l0s)]
    else:
        members = [
            SuiteMember(
                f"htopk-k{fields.get('k', max_k)}-{name}",
                "hierarchical",
                fields,
                sorted(set(default_budgets(fields.get("k", max_k))) | set(budgets)),
                objective=name,
                mean_l0s=serving_mean_l0s(fields.get("k", max_k)),
            )
            for name, fields in objectives.items()
        ]
    if "topk" in baselines:
        for k in budgets:
            if k < max_k:
                members.append(SuiteMember(f"topk-k{k}", "topk_fixed", _single_level(k), [k]))
        truncated = SuiteMember(f"topk-k{max_k}", "topk_truncated", _single_level(max_k), eval_ks, mean_l0s=mean_l0s)
        members.append(truncated)
    if "batchtopk" in baselines:
        for k in budgets:
            members.append(
                SuiteMember(f"batchtopk-k{k}", "batchtopk", {"k": k}, [], None, "batchtopk", [k], as_saved=True)
            )
    if "matryoshka" in baselines:
        members.append(
            SuiteMember(
                f"matryoshka-k{max_k}",
                "matryoshka",
                {"k": max_k},
                [],
                architecture="matryoshka_batchtopk",
                mean_l0s=mean_l0s,
                as_saved=True,
            )
        )
    if "multi_topk" in baselines and max_k >= 4:
        multi = {"k": max_k, "hierarchy_levels": [max_k // 4, max_k], "hierarchy_weights": [1.0, 0.125], **_NO_SCHEDULE}
        members.append(
            SuiteMember(f"multi-topk-k{max_k // 4}-k{max_k}", "multi_topk", multi, eval_ks, mean_l0s=mean_l0s)
        )
    return members


# A baseline keeps its own fixed objective whatever level-weight schedule the HierarchicalTopK SAE is given.
_NO_SCHEDULE = {
    "hierarchy_final_weights": None,
    "hierarchy_schedule_steps": 0,
    "hierarchy_sampled_levels": 0,
    "served_k": None,
}


def _single_level(k: int) -> dict[str, Any]:
    return {"k": k, "hierarchy_levels": [k], "hierarchy_weights": None, **_NO_SCHEDULE}


def build_member(
    cfg: LanguageModelSAERunnerConfig[Any],
    member: SuiteMember,
    seed: int,
    initial_sae: tuple[Any, dict[str, Any]] | None = None,
) -> TrainingSAE[Any]:
    """The member's training SAE, initialised from ``seed`` (same-shaped members start from identical weights), or a
    HierarchicalTopK member converted from ``initial_sae``.

    SAELens's ``from_sae_runner_config`` records the model, hook, context and BOS in the SAE's metadata; SAELens's own
    families get the run's SAE config translated (:func:`~sae_lens_hierarchical.baselines.baseline_config`) and
    the same ``b_dec_init``.
    """
    sae_cfg = HierarchicalTopKTrainingSAEConfig.from_sae_runner_config(cfg)
    if member.family == "hierarchical" and initial_sae is not None:
        member_cfg = replace(sae_cfg, **member.sae_overrides)
        settings = {
            name: getattr(member_cfg, name)
            for name in member_cfg.__dataclass_fields__
            if name not in (*SOURCE_FIELDS, "metadata")
        }
        source, record = initial_sae
        k = check_convertible(source, None) or member_cfg.k  # a JumpReLU source takes the run's K
        converted = from_sae(HierarchicalTopKTrainingSAE, source, k, source=record, **settings)
        record = converted.cfg.metadata.get(SOURCE_METADATA_KEY)  # the run's metadata, and where the SAE came from
        converted.cfg.metadata = type(sae_cfg.metadata).from_dict(
            {**sae_cfg.metadata.to_dict(), SOURCE_METADATA_KEY: record}
        )
        return converted
    if member.architecture == ARCHITECTURE:
        torch.manual_seed(seed)
        return HierarchicalTopKTrainingSAE(replace(sae_cfg, **member.sae_overrides))
    settings = dict(member.sae_overrides)
    if member.architecture == "matryoshka_batchtopk":
        settings.setdefault("matryoshka_widths", matryoshka_widths(sae_cfg.d_sae))
    baseline_cfg = baseline_config(sae_cfg, member.architecture, **settings)
    torch.manual_seed(seed)
    sae = get_sae_training_class(member.architecture)[0](baseline_cfg)
    if sae_cfg.b_dec_init == "mean":
        initialise_b_dec_with_mean(sae)
    return sae
