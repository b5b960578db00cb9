"""What sparse probing gives: held-out accuracies per (task, k, n) for one SAE and the residual stream, as JSON.

:func:`~sae_lens_hierarchical.interpretability.probing.sparse_probing` measures these;
:mod:`~sae_lens_hierarchical.interpretability.probing_report` averages and draws them. Both read these records,
and the report needs neither an SAE nor the documents, so they stand apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sae_lens_hierarchical.interpretability.spread import Spread


@dataclass(frozen=True)
class ProbeScore:
    """Held-out accuracy of the probes of one task at one budget and one n, averaged over the task's classes.

    Attributes:
        task: the task's name.
        k: the SAE's budget; None for the residual stream.
        n: latents (or residual dimensions) the probes read; None for all of them.
        accuracy: mean over classes of the balanced held-out accuracy.
        class_accuracies: per class.
        selected: per class, the n latents (dimensions) chosen, largest class-mean difference first; empty lists
            when n is None.
        unconverged: classes whose probe stopped at ``max_iter`` before lbfgs converged (SAEBench's probe meets this
            too: unscaled features span ~1 to ~1,000 here); their accuracy is that of the last iterate.
    """

    task: str
    k: int | None
    n: int | None
    accuracy: float
    class_accuracies: dict[str, float]
    selected: dict[str, list[int]]
    unconverged: list[str] = field(default_factory=list)


# One (task, k, n) over several results (seeds, or several SAEs of one family): mean and half the range.
ScoreSummary = Spread


@dataclass(frozen=True)
class SparseProbingResults:
    """Sparse probing of one SAE at its budgets, with the residual-stream ceiling on the same documents.

    JSON-serialisable through :meth:`to_dict` / :meth:`from_dict`;
    :func:`~sae_lens_hierarchical.interpretability.probing_report.summarize_probing` aggregates several
    (seeds, or a family of SAEs each trained at one k).

    Attributes:
        name: what the caller calls this SAE (e.g. ``"htopk-k64/seed1"``).
        ks, ns: budgets and n's probed.
        scores: the SAE's probes, one per (task, k, n).
        ceiling: the residual stream's probes, one per (task, n), n = None for all dimensions.
        settings: documents per class and split, seed, probe, model, hook.
    """

    name: str
    ks: list[int]
    ns: list[int]
    scores: list[ProbeScore]
    ceiling: list[ProbeScore]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(score.task for score in [*self.ceiling, *self.scores]))

    def accuracy(self, task: str, k: int | None, n: int | None) -> float:
        """The accuracy of (task, k, n); k = None reads the residual ceiling."""
        for score in self.ceiling if k is None else self.scores:
            if (score.task, score.k, score.n) == (task, k, n):
                return score.accuracy
        raise ValueError(
            f"no probe for task={task!r}, k={k!r}, n={n!r}; tasks {self.tasks}, ks {self.ks}, ns {self.ns}"
        )

    def at(self, ks: Sequence[int]) -> SparseProbingResults:
        """These results at the budgets ``ks`` only (e.g. a TopK SAE trained at 64 at k = 64 alone, as a member of
        the "TopK trained at k" family, where its truncations belong to another line)."""
        missing = sorted(set(ks) - set(self.ks))
        if missing:
            raise ValueError(f"budgets {missing} were not probed; these results have ks {self.ks}")
        scores = [score for score in self.scores if score.k in ks]
        return replace(self, ks=[k for k in self.ks if k in ks], scores=scores)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> SparseProbingResults:
        return cls(
            name=payload["name"],
            ks=list(payload["ks"]),
            ns=list(payload["ns"]),
            scores=[ProbeScore(**score) for score in payload["scores"]],
            ceiling=[ProbeScore(**score) for score in payload["ceiling"]],
            settings=dict(payload.get("settings", {})),
        )
