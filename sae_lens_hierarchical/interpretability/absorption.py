"""Feature absorption at every budget k: the first-letter task of Chanin et al. (2024), as SAEBench measures it.

"A is for Absorption" (Chanin et al., 2024) shows that a latent which seems to mean "starts with S" fails to fire on
some S-words, because a more specific latent (a token latent for " short", say) has absorbed the letter direction.
SAEBench's ``absorption_first_letter`` eval turns this into two scores. ``sae-bench`` cannot be installed beside
sae-lens 6.54, so its published definition is implemented here (no code copied) and applied to any TopK-family SAE
at each budget k (:func:`sae_lens_hierarchical.evaluation.latent_activations`). This module scores an SAE against a
first-letter probe. Elsewhere: the words, prompts, cached activations and the probe itself, which need no SAE
(:mod:`sae_lens_hierarchical.interpretability.first_letter`); the records it returns
(:mod:`~sae_lens_hierarchical.interpretability.absorption_results`); their tables and plots
(:mod:`~sae_lens_hierarchical.interpretability.absorption_report`).

The definition implemented
--------------------------
Steps 1 (words and prompts) and 2 (the ground-truth probe, with its held-out top-1 accuracy and per-letter F1) are in
:mod:`~sae_lens_hierarchical.interpretability.first_letter`. A letter is scored only when its probe F1 exceeds
``min_probe_f1`` (0.6), and absorption is measured only when at least ``min_letters`` (20) letters pass (SAEBench's
``min_GT_probe_f1`` and ``min_feats_for_eval``); otherwise the probe is too weak and :func:`absorption_over_k`
raises, naming the number.

3. **Main latents (k-sparse probing).** Per letter, an L1-regularised logistic regression on the SAE's latent
   activations of the training words ranks latents by weight; for n = 1, 2, ... ``max_main_latents`` (10) a
   logistic regression on the top-n latents is fit and its held-out F1 (``score > 0``) measured. The main latents
   are the top-n of the longest prefix in which every n raised F1 by more than ``f1_jump_threshold`` (0.03) over
   the previous accepted n (n = 1 always accepted); their count is SAEBench's "number of split features".
4. **Per held-out word of the letter that the probe calls that letter** (a probe true positive), with p the unit
   probe direction, P = x . p the activation's projection on it, and each latent's probe projection
   ``a_i (d_i . p)``, where ``a_i d_i`` is what the latent adds to the reconstruction (``d_i`` its decoder row,
   divided by its norm when the SAE rescales activations by decoder norms):

   - **full absorption** (``mean_full_absorption_score``): no main latent fires (``|a| < 1e-8``), P > 0, and the
     latent with the largest probe projection has decoder cosine with p of at least 0.025 and a projection of at
     least 0.4 P;
   - **absorption fraction** (``mean_absorption_fraction_score``): with M the main latents' summed projection and
     T the sum of the (up to 3) largest positive projections among the other latents whose decoder cosine with p
     is at least 0.1: 0 when M >= P or T < 0.4 P; else 1 when M <= 0; else ``a / (a + M)`` with
     ``a = min(T, P - M)``. It captures partial absorption (the main latent fires, but weakly).

   Per letter the rate is the count (or sum) over the probe true positives divided by their number; the score at k
   is the mean over scored letters (those with probe F1 > ``min_probe_f1`` and at least one true positive).

**Per k.** At each budget k the SAE's activations are its budget-k activations (a HierarchicalTopK SAE's nested
ranking, any other TopK SAE truncated to its k largest), and by default the main latents are chosen again at each k
(``main_latents="per_k"``): at small k only a token's top-ranked latents fire, so the latents that best track a
letter at k need not be K's. ``main_latents="max_k"`` chooses them once at K and keeps them, asking instead whether
K's letter latents give way at budget k. ``AbsorptionAtK.mean_main_f1`` says how well the main latents track their
letter at each k: where it is low, no latent carries the letter at that budget, absorption is nearly undefined, and a
low rate does not mean the letter is well represented.

Deviations from SAEBench, and why
---------------------------------
The first-letter task's own (sizes, tokens, seeding, one set of prompts, the probe's solver) are listed in
:mod:`~sae_lens_hierarchical.interpretability.first_letter`; those of the scoring:

- **Solvers.** scikit-learn instead of SAEBench's Adam loops: the L1 probe is liblinear with
  ``C = 1 / (l1_penalty * n_train)``, SAEBench's L1 decay of 0.01 on the mean loss, on latent activations divided by
  their mean non-zero value so the penalty does not depend on the SAE's activation scale (a tenth of it chose main
  latents of the same F1). Latents are ranked by L1 weight, ties by index (when every weight is zero, latent 0 comes
  first, as in SAEBench's ``topk``); the k-sparse probes are SAEBench's (balanced, L2, 500 iterations) on the same
  scaled activations.
- **Decoder norms.** SAEBench weighs activations by the decoder cosine, which assumes unit-norm decoder rows; here the
  latent's actual contribution to the reconstruction is projected (the same value when rows are unit-norm or the SAE
  rescales activations by decoder norms, as both of this package's saved SAEs do).
- **An option, off by default.** P is SAEBench's projection of the input x, part of which the decoder bias supplies
  and no latent can; ``AbsorptionConfig(subtract_b_dec=True)`` measures P on ``x - b_dec`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse
import torch
from sae_lens import SAE
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from sae_lens_hierarchical.evaluation.budgets import latent_activations, resolve_budgets
from sae_lens_hierarchical.interpretability.absorption_report import (
    aggregate_absorption,
    format_absorption_table,
    plot_absorption,
)
from sae_lens_hierarchical.interpretability.absorption_results import (
    AbsorptionAtK,
    AbsorptionResults,
    LetterAbsorption,
)
from sae_lens_hierarchical.interpretability.first_letter import (
    LETTERS,
    FirstLetterProbe,
    check_range,
    f1,
)

FIRING_EPS = 1e-8  # SAEBench's EPS: a latent with |activation| below this does not fire
# scikit-learn >= 1.8 asks for l1_ratio=1 where older versions take penalty="l1".
_L1: dict[str, Any] = (
    {"l1_ratio": 1.0} if LogisticRegression().get_params().get("penalty") == "deprecated" else {"penalty": "l1"}
)


@dataclass(frozen=True)
class AbsorptionConfig:
    """SAEBench's thresholds (its defaults), and how main latents are chosen per k.

    Attributes:
        main_latents: ``"per_k"`` chooses each letter's main latents at every budget; ``"max_k"`` once at K.
        max_main_latents: the largest k-sparse probe tried (SAEBench ``max_k_value``).
        f1_jump_threshold: held-out F1 gain that admits one more main latent.
        l1_penalty: L1 strength of the probe that ranks latents, per training word (SAEBench's L1 decay).
        min_probe_f1: a letter is scored only if the ground-truth probe's held-out F1 exceeds this.
        min_letters: fewest letters passing ``min_probe_f1`` for absorption to be measured at all.
        full_absorption_cos: least decoder cosine with the probe of the top-projecting latent (full absorption).
        fraction_cos: least decoder cosine with the probe of an absorbing latent (absorption fraction).
        projection_proportion: least share of the probe projection the absorbing latent(s) must carry.
        max_absorbing_latents: most latents that may together absorb (absorption fraction).
        subtract_b_dec: measure the probe projection P on ``x - b_dec`` (what the latents must explain) instead of
            SAEBench's ``x``; with a large decoder bias SAEBench's share thresholds mix the bias in (at Gemma-3-270M's
            block 6 the mean word activation projects between -149 and +196 on the 26 letter directions, against
            a mean P of 113).
    """

    main_latents: Literal["per_k", "max_k"] = "per_k"
    max_main_latents: int = 10
    f1_jump_threshold: float = 0.03
    l1_penalty: float = 0.01
    min_probe_f1: float = 0.6
    min_letters: int = 20
    full_absorption_cos: float = 0.025
    fraction_cos: float = 0.1
    projection_proportion: float = 0.4
    max_absorbing_latents: int = 3
    subtract_b_dec: bool = False

    def __post_init__(self) -> None:
        if self.main_latents not in ("per_k", "max_k"):
            raise ValueError(f"main_latents must be 'per_k' or 'max_k'; got {self.main_latents!r}")
        check_range("max_main_latents", self.max_main_latents, 1, 1000, integer=True)
        check_range("f1_jump_threshold", self.f1_jump_threshold, 0.0, 1.0)
        check_range("l1_penalty", self.l1_penalty, 0.0, 1e6, open_low=True)
        check_range("min_probe_f1", self.min_probe_f1, 0.0, 1.0)
        check_range("min_letters", self.min_letters, 1, len(LETTERS), integer=True)
        check_range("full_absorption_cos", self.full_absorption_cos, -1.0, 1.0)
        check_range("fraction_cos", self.fraction_cos, -1.0, 1.0)
        check_range("projection_proportion", self.projection_proportion, 0.0, 1.0)
        check_range("max_absorbing_latents", self.max_absorbing_latents, 1, 1000, integer=True)
        if not isinstance(self.subtract_b_dec, bool):
            raise ValueError(f"subtract_b_dec must be True or False; got {self.subtract_b_dec!r}")


def latent_probe_projections(sae: SAE[Any], directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([d_sae, n] projection per unit activation, [d_sae, n] decoder cosine)`` with ``[n, d_in]`` unit directions.

    A latent with activation a adds ``a * W_dec[i]`` to the reconstruction (``a * W_dec[i] / |W_dec[i]|`` when the
    SAE rescales activations by decoder norms), so its probe projection is a times the first tensor.
    """
    w_dec = sae.W_dec.detach().float().cpu()
    norms = w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = (w_dec / norms) @ directions.T
    per_unit = cosine if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else w_dec @ directions.T
    return per_unit, cosine


def _scaled_sparse(acts: torch.Tensor, scale: float) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix((acts / scale).numpy().astype(np.float64))


def select_main_latents(
    train_acts: torch.Tensor,
    train_letters: torch.Tensor,
    test_acts: torch.Tensor,
    test_letters: torch.Tensor,
    letters: Sequence[int],
    config: AbsorptionConfig,
) -> dict[int, tuple[list[int], float]]:
    """``{letter: (main latents, their k-sparse probe's held-out F1)}`` by SAEBench's k-sparse probing.

    ``train_acts`` ``[n_train, d_sae]`` and ``test_acts`` ``[n_test, d_sae]`` are the SAE's latent activations.
    """
    nonzero = train_acts[train_acts != 0].abs()
    scale = float(nonzero.mean()) if nonzero.numel() else 1.0
    train_sparse = _scaled_sparse(train_acts, scale)
    test_scaled = (test_acts / scale).numpy().astype(np.float64)
    c = 1.0 / (config.l1_penalty * train_acts.shape[0])
    with threadpool_limits(1):  # BLAS threads only add overhead at these sizes (and on a shared CPU)
        return {
            letter: _main_latents_of_letter(
                train_sparse,
                (train_letters == letter).numpy(),
                test_scaled,
                (test_letters == letter).numpy(),
                c,
                config,
            )
            for letter in letters
        }


def _main_latents_of_letter(
    train_sparse: scipy.sparse.csr_matrix,
    y_train: np.ndarray,
    test_scaled: np.ndarray,
    y_test: np.ndarray,
    c: float,
    config: AbsorptionConfig,
) -> tuple[list[int], float]:
    """One letter's main latents and their k-sparse probe's held-out F1 (see :func:`select_main_latents`)."""
    ranking = np.arange(train_sparse.shape[1])
    if y_train.any() and not y_train.all():
        l1 = LogisticRegression(solver="liblinear", C=c, class_weight="balanced", **_L1).fit(train_sparse, y_train)
        ranking = np.argsort(-l1.coef_[0], kind="stable")
    best_f1, best_latents = -math.inf, [int(ranking[0])]
    for n in range(1, min(config.max_main_latents, len(ranking)) + 1):
        latents = ranking[:n]
        score = _sparse_probe_f1(train_sparse[:, latents].toarray(), y_train, test_scaled[:, latents], y_test)
        if score <= best_f1 + config.f1_jump_threshold:
            break
        best_f1, best_latents = score, [int(latent) for latent in latents]
    return best_latents, float(best_f1)


def _sparse_probe_f1(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Held-out F1 (``score > 0``) of a balanced logistic regression on a few latents' activations."""
    if not y_train.any() or y_train.all() or not x_train.any():
        return 0.0
    probe = LogisticRegression(class_weight="balanced", max_iter=500).fit(x_train, y_train)
    return f1(y_test, probe.decision_function(x_test) > 0)


def word_absorption(
    acts: torch.Tensor,
    probe_projection: torch.Tensor,
    per_unit: torch.Tensor,
    cosine: torch.Tensor,
    main: Sequence[int],
    config: AbsorptionConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([words] full absorption flags, [words] absorption fractions)`` for one letter.

    Args:
        acts: ``[words, d_sae]`` latent activations of the letter's probe true positives.
        probe_projection: ``[words]`` each activation's projection on the letter's unit probe direction (P).
        per_unit: ``[d_sae]`` each latent's probe projection per unit activation.
        cosine: ``[d_sae]`` each latent's decoder cosine with the probe direction.
        main: the letter's main latents.
    """
    projections = acts.float() * per_unit  # [words, d_sae]
    is_main = torch.zeros(acts.shape[1], dtype=torch.bool)
    is_main[list(main)] = True
    total = probe_projection.float()
    main_projection = projections[:, is_main].sum(dim=1)
    main_silent = (acts[:, is_main].abs() < FIRING_EPS).all(dim=1)
    top_projection, top_latent = projections.max(dim=1)
    positive_total = total > 0
    safe_total = torch.where(positive_total, total, torch.ones_like(total))
    full = (
        main_silent
        & positive_total
        & (cosine[top_latent] >= config.full_absorption_cos)
        & (top_projection / safe_total >= config.projection_proportion)
    )
    candidates = (~is_main & (cosine >= config.fraction_cos)).expand_as(projections) & (projections > 0)
    absorber_projections = torch.where(candidates, projections, torch.zeros_like(projections))
    n_absorbers = min(config.max_absorbing_latents, acts.shape[1])
    absorbed_total = absorber_projections.topk(n_absorbers, dim=1).values.sum(dim=1)
    absorbed = torch.minimum(absorbed_total, total - main_projection)
    partial = (absorbed / (absorbed + main_projection)).clamp(0.0, 1.0)
    fraction = torch.where(main_projection <= 0, torch.ones_like(total), partial)
    no_absorption = (
        ~positive_total | (main_projection >= total) | (absorbed_total / safe_total < config.projection_proportion)
    )
    fraction = torch.where(no_absorption, torch.zeros_like(fraction), fraction)
    return full, fraction


@torch.no_grad()
def absorption_over_k(
    sae: SAE[Any],
    probe: FirstLetterProbe,
    ks: list[int] | None = None,
    config: AbsorptionConfig | None = None,
    progress: bool = True,
) -> AbsorptionResults:
    """Feature absorption of ``sae`` at each budget in ``ks`` (default: powers of two below K, and K).

    ``probe`` (``first_letter.first_letter_probe``) carries the activations at the SAE's hook. Raises ``ValueError``
    when fewer than ``config.min_letters`` letters have a held-out probe F1 above ``config.min_probe_f1``: the
    model's residual stream does not carry first-letter information well enough to score absorption.
    """
    config = config or AbsorptionConfig()
    data = probe.data
    if sae.cfg.d_in != data.d_in:
        raise ValueError(f"the SAE's d_in must equal the probe activations' width {data.d_in}; got {sae.cfg.d_in}")
    sae_hook = getattr(sae.cfg.metadata, "hook_name", None)
    if data.hook_name and sae_hook and sae_hook != data.hook_name:
        raise ValueError(f"the SAE's hook {sae_hook!r} must be the probe's hook {data.hook_name!r}")
    if sae.cfg.normalize_activations not in ("none", "expected_average_only_in"):
        raise ValueError(
            f"normalize_activations must be 'none' (or a folded 'expected_average_only_in'); got "
            f"{sae.cfg.normalize_activations!r}"
        )
    ks = resolve_budgets(sae, ks)
    letters = probe.reliable_letters(config.min_probe_f1)
    if len(letters) < config.min_letters:
        raise ValueError(
            f"the probe is too weak to score absorption: {len(letters)} letters have held-out F1 > "
            f"{config.min_probe_f1} (need min_letters={config.min_letters}, at most 26); accuracy {probe.accuracy:.3f}"
        )
    directions = probe.directions
    per_unit, cosine = latent_probe_projections(sae, directions)
    x_train, train_letters = data.train
    x_test, test_letters = data.test
    predicted = probe.scores(x_test) > 0  # [n_test, 26]
    inputs = x_test.float() - (sae.b_dec.detach().float().cpu() if config.subtract_b_dec else 0.0)
    probe_projection = inputs @ directions.T  # [n_test, 26]: P
    device, dtype = sae.W_dec.device, sae.W_dec.dtype

    def activations_at(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n_train, d_sae], [n_test, d_sae])`` latent activations at budget k."""
        train, test = (latent_activations(sae, x.to(device, dtype), k).float().cpu() for x in (x_train, x_test))
        return train, test

    def main_latents_of(acts: tuple[torch.Tensor, torch.Tensor]) -> dict[int, tuple[list[int], float]]:
        return select_main_latents(acts[0], train_letters, acts[1], test_letters, letters, config)

    fixed_main = main_latents_of(activations_at(ks[-1])) if config.main_latents == "max_k" else None
    per_k = []
    for k in tqdm(ks, desc="Absorption over k", disable=not progress):
        train_acts, test_acts = activations_at(k)
        main = fixed_main if fixed_main is not None else main_latents_of((train_acts, test_acts))
        scored = []
        for letter in letters:
            positives = (test_letters == letter) & predicted[:, letter]
            n_positive = int(positives.sum())
            if n_positive == 0:
                continue
            full, fraction = word_absorption(
                test_acts[positives], probe_projection[positives, letter], per_unit[:, letter], cosine[:, letter],
                main[letter][0], config,
            )  # fmt: skip
            scored.append(
                LetterAbsorption(
                    letter=LETTERS[letter],
                    main_latents=main[letter][0],
                    main_f1=main[letter][1],
                    n_probe_true_positives=n_positive,
                    n_full_absorption=int(full.sum()),
                    full_absorption_rate=float(full.sum()) / n_positive,
                    mean_absorption_fraction=float(fraction.sum()) / n_positive,
                )
            )
        per_k.append(
            AbsorptionAtK(
                k=k,
                full_absorption_rate=_mean([row.full_absorption_rate for row in scored]),
                absorption_fraction=_mean([row.mean_absorption_fraction for row in scored]),
                mean_split_features=_mean([len(row.main_latents) for row in scored]),
                mean_main_f1=_mean([row.main_f1 for row in scored]),
                n_letters_scored=len(scored),
                letters=scored,
            )
        )
    return AbsorptionResults(
        model_name=data.model_name,
        hook_name=data.hook_name,
        probe_accuracy=probe.accuracy,
        probe_letter_f1=list(probe.letter_f1),
        n_train_words=data.n_train,
        n_test_words=len(data.words) - data.n_train,
        main_latents=config.main_latents,
        subtract_b_dec=config.subtract_b_dec,
        per_k=per_k,
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def absorption_for_saes(
    saes: Mapping[str, tuple[SAE[Any], list[int] | None]],
    probe: FirstLetterProbe,
    config: AbsorptionConfig | None = None,
    progress: bool = True,
) -> dict[str, AbsorptionResults]:
    """:func:`absorption_over_k` for each ``name: (sae, ks)``, all against one probe (activations computed once)."""
    return {
        name: absorption_over_k(sae, probe, ks, config, progress)
        for name, (sae, ks) in tqdm(saes.items(), desc="SAEs", disable=not progress)
    }


__all__ = [
    "AbsorptionAtK",
    "AbsorptionConfig",
    "AbsorptionResults",
    "LetterAbsorption",
    "absorption_for_saes",
    "absorption_over_k",
    "aggregate_absorption",
    "format_absorption_table",
    "latent_probe_projections",
    "plot_absorption",
    "select_main_latents",
    "word_absorption",
]
