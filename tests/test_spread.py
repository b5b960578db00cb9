"""The one seed-aggregation rule every measure reports with: mean and half the range (probing, absorption,
coarse-to-fine), checked against values worked out by hand."""

from __future__ import annotations

import pytest

from sae_lens_hierarchical.interpretability.absorption import AbsorptionAtK, AbsorptionResults, aggregate_absorption
from sae_lens_hierarchical.interpretability.spread import Spread, format_spread, spread


def test_spread_is_the_mean_and_half_the_range() -> None:
    assert spread([0.5, 0.7, 0.6]) == Spread(pytest.approx(0.6), pytest.approx(0.1), 3)
    assert spread([0.25]).cell() == "0.250"
    assert format_spread([0.5, 0.7]) == "0.600 ± 0.100" and format_spread([]) == ""
    with pytest.raises(ValueError, match="at least one value"):
        spread([])


def absorption_run(rate: float, fraction: float, f1: float) -> AbsorptionResults:
    at_k = AbsorptionAtK(
        k=4,
        full_absorption_rate=rate,
        absorption_fraction=fraction,
        mean_split_features=1.0,
        mean_main_f1=f1,
        n_letters_scored=10,
    )
    return AbsorptionResults(
        model_name="m",
        hook_name="h",
        probe_accuracy=0.9,
        probe_letter_f1=[],
        n_train_words=1,
        n_test_words=1,
        main_latents="k-sparse probe",
        subtract_b_dec=True,
        per_k=[at_k],
    )


def test_absorption_aggregates_seeds_by_the_same_rule() -> None:
    (row,) = aggregate_absorption([absorption_run(0.1, 0.2, 0.9), absorption_run(0.3, 0.4, 0.7)])
    assert row["full_absorption_rate"] == pytest.approx(0.2)
    assert row["full_absorption_rate_half_range"] == pytest.approx(0.1)
    assert row["absorption_fraction"] == pytest.approx(0.3) and row["mean_main_f1"] == pytest.approx(0.8)
    assert row["n_runs"] == 2 and row["n_letters_scored"] == 10
