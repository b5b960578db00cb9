"""What a feature-absorption measurement gives: per letter and per budget, for one SAE, as JSON.

:func:`~sae_lens_hierarchical.interpretability.absorption.absorption_over_k` measures these (its module docstring
defines every number); :mod:`~sae_lens_hierarchical.interpretability.absorption_report` averages runs and draws them.
Both read these records, and the report needs neither an SAE nor the scoring's solvers, so they stand apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LetterAbsorption:
    """One letter at one budget: its main latents (and their k-sparse probe's held-out F1), the number of held-out
    words of the letter that the probe calls that letter, and the absorption among them."""

    letter: str
    main_latents: list[int]
    main_f1: float
    n_probe_true_positives: int
    n_full_absorption: int
    full_absorption_rate: float
    mean_absorption_fraction: float


@dataclass(frozen=True)
class AbsorptionAtK:
    """Absorption at budget ``k``: means over the ``n_letters_scored`` letters (as
    :mod:`~sae_lens_hierarchical.interpretability.absorption` defines them).

    ``mean_main_f1`` is the main latents' k-sparse probe F1: how well any latents at this budget track letters at
    all (absorption is only meaningful where they do).
    """

    k: int
    full_absorption_rate: float
    absorption_fraction: float
    mean_split_features: float
    mean_main_f1: float
    n_letters_scored: int
    letters: list[LetterAbsorption] = field(default_factory=list)


@dataclass(frozen=True)
class AbsorptionResults:
    """An SAE's absorption at each budget, with the probe it was measured against; JSON via ``to_dict``."""

    model_name: str
    hook_name: str
    probe_accuracy: float
    probe_letter_f1: list[float]
    n_train_words: int
    n_test_words: int
    main_latents: str
    subtract_b_dec: bool
    per_k: list[AbsorptionAtK]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> AbsorptionResults:
        per_k = [
            AbsorptionAtK(**{**row, "letters": [LetterAbsorption(**letter) for letter in row["letters"]]})
            for row in payload["per_k"]
        ]
        return cls(**{**payload, "per_k": per_k})

    def at(self, k: int) -> AbsorptionAtK:
        """The results at budget ``k``."""
        for row in self.per_k:
            if row.k == k:
                return row
        raise ValueError(f"k must be one of the evaluated budgets {[row.k for row in self.per_k]}; got {k!r}")
