"""How every measure reports several runs (seeds, or the SAEs of one family): the mean and half the range.

One rule for all of them (probing, absorption, coarse-to-fine, the family table of ``docs/quality``): a single run is
its value; several are ``mean ± half the range``, which for two or three seeds says more plainly than a standard
deviation how far apart they landed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Several runs of one number: their mean, half their range and how many there were."""

    mean: float
    half_range: float
    runs: int

    def cell(self, digits: int = 3) -> str:
        """The table cell: ``mean`` of one run, ``mean ± half_range`` of several."""
        return format_mean_spread(self.mean, self.half_range, self.runs, digits)


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (at least one)."""
    if not len(values):
        raise ValueError("a spread needs at least one value; got none")
    return Spread(float(np.mean(values)), float(max(values) - min(values)) / 2, len(values))


def format_spread(values: Sequence[float], digits: int = 3) -> str:
    """``mean`` of one value, ``mean ± half the range`` of several (how the README reports seeds), "" of none."""
    return spread(values).cell(digits) if len(values) else ""


def format_mean_spread(mean: float, half_range: float, runs: float, digits: int = 3) -> str:
    """``mean`` of a single run, ``mean ± half_range`` of several: the one cell format of every seed table."""
    return f"{mean:.{digits}f}" if runs < 2 else f"{mean:.{digits}f} ± {half_range:.{digits}f}"
