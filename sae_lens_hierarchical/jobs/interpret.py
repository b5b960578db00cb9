"""The ``interpret`` job: every SAE of one or more ``compare`` runs (seeds) scored for interpretability at every k.

The baseline suite's lines (HierarchicalTopK at every k, TopK trained at each k, TopK@K truncated, Multi-TopK) get
sparse probing (Wikipedia topic, language identity), first-letter feature absorption and, for SAEs with a ranking
to read, the coarse-to-fine view, all on identical documents and prompts (cached once per model and hook). Each
comparison directory is one seed; a line's score at k is the mean over seeds with half the range as its spread.
The "TopK trained at k" line is assembled per seed from its SAEs, each at its own k (the TopK SAE trained at K
counts there at k = K only, as in the comparison itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sae_lens_hierarchical._files import scratch_beside, write_json_atomically
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT
from sae_lens_hierarchical.interpretability import (
    AbsorptionConfig,
    AbsorptionResults,
    CoarseToFine,
    SparseProbingResults,
    absorption_over_k,
    coarse_to_fine,
    first_letter_probe,
    format_absorption_table,
    format_coarse_to_fine_table,
    format_probing_table,
    labelled_documents,
    plot_absorption,
    plot_coarse_to_fine,
    plot_sparse_probing,
    residual_probing,
    sparse_probing,
)
from sae_lens_hierarchical.interpretability.first_letter import LETTERS, first_letter_vocabulary
from sae_lens_hierarchical.interpretability.probing import DEFAULT_NS
from sae_lens_hierarchical.jobs.common import check_output_dir, finish_job
from sae_lens_hierarchical.loading import load_sae
from sae_lens_hierarchical.preemption import stop_if_requested
from sae_lens_hierarchical.presets import get_preset
from sae_lens_hierarchical.reporting import family_label

MEASURES = ("probing", "absorption", "coarse_to_fine")
# What a compare run's job.json says about how its SAEs were trained; runs averaged as seeds must agree on all of it.
_TRAINING_FIELDS = ("preset", "overrides", "training_tokens", "budgets", "baselines", "objectives")
# Lines whose SAEs rank latents up to K: the coarse-to-fine view reads their ranks.
_RANKED_FAMILIES = ("hierarchical", "topk_truncated", "multi_topk")


@dataclass(frozen=True)
class SuiteSae:
    """One SAE of a comparison run, as its ``comparison.json`` records it."""

    seed_dir: Path
    name: str
    family: str
    line: str
    ks: list[int]

    @property
    def path(self) -> Path:
        return self.seed_dir / "saes" / self.name


def read_suite(comparison_dir: Path) -> tuple[dict[str, Any], list[SuiteSae]]:
    """The job settings and the SAEs of one ``compare`` output directory, every SAE's files checked up front."""
    report, job = comparison_dir / "comparison.json", comparison_dir / "job.json"
    if not report.is_file() or not job.is_file():
        raise ValueError(f"{comparison_dir} is not a finished compare run (no comparison.json and job.json)")
    saes = []
    try:
        for name, entry in json.loads(report.read_text())["saes"].items():
            objective = entry.get("objective")
            line = entry["family"] if objective is None else f"{entry['family']}:{objective}"
            saes.append(SuiteSae(comparison_dir, name, entry["family"], line, [row["k"] for row in entry["results"]]))
        settings = json.loads(job.read_text())
        settings["preset"]
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{comparison_dir}: comparison.json or job.json is not a compare run's ({error!r})") from error
    missing = [sae.name for sae in saes if not (sae.path / "cfg.json").is_file()]
    if missing:
        raise ValueError(f"{comparison_dir}: the SAEs {missing} are missing from saes/ (was the run's saes/ removed?)")
    return settings, saes


def check_comparable(directories: list[Path], suites: list[tuple[dict[str, Any], list[SuiteSae]]]) -> None:
    """Runs averaged as seeds must be distinct directories with distinct seeds, trained alike in everything else."""
    resolved = [str(Path(directory).resolve()) for directory in directories]
    seeds = [job.get("seed") for job, _ in suites]
    for name, values in (("directories", resolved), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"the compare runs must have distinct {name} (each run is one seed); got {values}")
    for field in _TRAINING_FIELDS:
        values = {directory: job.get(field) for directory, (job, _) in zip(resolved, suites, strict=True)}
        if len({json.dumps(value, sort_keys=True) for value in values.values()}) > 1:
            raise ValueError(f"the compare runs differ in {field} ({values}); only the seed may differ between them")


# The first-letter task needs whole-word tokens for most letters (its probe is weak below this many words per letter).
MIN_WORDS_PER_LETTER = 20


def _measures_the_model_allows(measures: Sequence[str], model: Any, progress: bool) -> tuple[str, ...]:
    """``measures`` without absorption when the model's tokenizer has too few whole-word tokens for the first-letter
    task (a character tokenizer has none): decided from the vocabulary, before anything is cached, and said."""
    if "absorption" not in measures:
        return tuple(measures)
    words = first_letter_vocabulary(model.tokenizer)
    per_letter = {letter: sum(word[1].lower() == letter for word, _ in words) for letter in LETTERS}
    enough = sum(count >= MIN_WORDS_PER_LETTER for count in per_letter.values())
    if enough >= AbsorptionConfig().min_letters:
        return tuple(measures)
    kept = tuple(measure for measure in measures if measure != "absorption")
    reason = (
        f"absorption skipped: the tokenizer has {len(words)} whole-word tokens (a space then letters), enough for "
        f"{enough} letters (>= {MIN_WORDS_PER_LETTER} words each); the first-letter task needs "
        f"{AbsorptionConfig().min_letters}"
    )
    if not kept:
        raise ValueError(reason + "; no other measure was asked for")
    if progress:
        print(reason)
    return kept


def run_interpret_job(
    comparison_dirs: Sequence[Path],
    output_dir: Path,
    measures: Sequence[str] = MEASURES,
    ns: Sequence[int] = DEFAULT_NS,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every SAE of ``comparison_dirs`` (one per seed) and write ``interpret.md``/``.json`` and a PNG per measure.

    Returns the JSON payload: per seed directory and SAE, each measure's results.
    """
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown or not measures:
        raise ValueError(f"measures must be a non-empty subset of {list(MEASURES)}; got {list(measures)}")
    if not comparison_dirs:
        raise ValueError("give at least one compare output directory (one per seed)")
    check_output_dir(output_dir, overwrite)
    started = time.perf_counter()
    suites = [read_suite(Path(directory)) for directory in comparison_dirs]
    check_comparable(list(comparison_dirs), suites)
    preset = get_preset(suites[0][0]["preset"])
    model = preset.load_model(device)
    measures = _measures_the_model_allows(measures, model, progress)
    documents = probe = ceiling = None
    if "probing" in measures or "coarse_to_fine" in measures:
        documents = labelled_documents(model, preset.hook_name, cache_root=cache_root, progress=progress)
    if "probing" in measures:
        ceiling = residual_probing(documents, ns)
    if "absorption" in measures:
        probe = first_letter_probe(model, preset.hook_name, cache_root=cache_root, progress=progress)
        config = AbsorptionConfig()
        reliable = probe.reliable_letters(config.min_probe_f1)
        if len(reliable) < config.min_letters:  # before any SAE is scored, not after hours of it
            raise ValueError(
                f"the first-letter probe at {preset.hook_name} is too weak to score absorption: {len(reliable)} "
                f"letters have held-out F1 > {config.min_probe_f1}, at least {config.min_letters} are needed; "
                "leave absorption out (measures probing,coarse_to_fine)"
            )
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for _, saes in suites:
        for member in saes:
            stop_if_requested("the documents' activations and probes are cached: rerun the same command to score")
            sae = load_sae(member.path, device=device)
            entry: dict[str, Any] = {}
            if ceiling is not None:
                entry["probing"] = sparse_probing(
                    sae, documents, ks=member.ks, ns=ns, ceiling=ceiling, name=member.name, progress=progress
                )
            if probe is not None:
                entry["absorption"] = absorption_over_k(sae, probe, member.ks, progress=progress)
            if documents is not None and "coarse_to_fine" in measures and member.family in _RANKED_FAMILIES:
                entry["coarse_to_fine"] = coarse_to_fine(sae, documents, name=member.name, progress=progress)
            scores.setdefault(str(member.seed_dir), {})[member.name] = entry
    lines = _lines_by_seed(suites, scores)
    payload = {
        str(seed): {
            name: {measure: result.to_dict() for measure, result in entry.items()} for name, entry in by.items()
        }
        for seed, by in scores.items()
    }
    with scratch_beside(output_dir) as scratch:
        _write_report(scratch, lines, preset.name, len(suites))
        write_json_atomically(scratch / "interpret.json", payload)
        job = {"comparison_dirs": [str(d) for d in comparison_dirs], "measures": list(measures), "ns": list(ns)}
        finish_job(scratch, output_dir, job | {"preset": preset.name}, started)
    return payload


def _lines_by_seed(
    suites: list[tuple[dict[str, Any], list[SuiteSae]]], scores: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, dict[str, list[Any]]]:
    """``{measure: {line label: [one result per seed]}}``; the fixed-k TopK SAEs of a seed merged into one result
    holding each SAE at its own k, joined by the TopK SAE trained at K at k = K."""
    lines: dict[str, dict[str, list[Any]]] = {}
    for _, saes in suites:
        for measure in MEASURES:
            per_line: dict[str, list[Any]] = {}
            for member in saes:
                result = scores[str(member.seed_dir)][member.name].get(measure)
                if result is None:
                    continue
                per_line.setdefault(member.line, []).append(result)
                if member.family == "topk_truncated" and measure != "coarse_to_fine":
                    per_line.setdefault("topk_fixed", []).append(_at_budget(result, member.ks[-1]))
            for line, results in per_line.items():
                merged = results[0] if len(results) == 1 else _merge_budgets(results)
                lines.setdefault(measure, {}).setdefault(family_label(line), []).append(merged)
    return lines


def _at_budget(result: SparseProbingResults | AbsorptionResults, k: int) -> Any:
    if isinstance(result, SparseProbingResults):
        return result.at([k])
    return replace(result, per_k=[row for row in result.per_k if row.k == k])


def _merge_budgets(results: list[Any]) -> Any:
    """One result holding every budget of ``results`` (SAEs of one line, each scored at other budgets)."""
    first = results[0]
    if isinstance(first, SparseProbingResults):
        scores = [score for result in results for score in result.scores]
        ks = sorted({k for result in results for k in result.ks})
        return replace(first, name=first.name, ks=ks, scores=scores)
    rows = sorted((row for result in results for row in result.per_k), key=lambda row: row.k)
    return replace(first, per_k=rows)


def _write_report(directory: Path, lines: dict[str, dict[str, list[Any]]], preset: str, n_seeds: int) -> None:
    """``interpret.md`` (one table per measure and task) and ``probing.png`` / ``absorption.png`` /
    ``coarse_to_fine.png``."""
    spread = f"mean ± half the range over {n_seeds} seed(s)" if n_seeds > 1 else "one seed"
    sections = [f"# Interpretability at every k: {preset} ({spread})"]
    if "probing" in lines:
        probing: dict[str, list[SparseProbingResults]] = lines["probing"]
        tasks = next(iter(probing.values()))[0].tasks
        for task in tasks:
            sections.append(f"## Sparse probing, {task} (held-out accuracy)\n\n{format_probing_table(probing, task)}")
        plot_sparse_probing(probing, directory / "probing.png", title=f"Sparse probing, {preset} ({spread})")
    if "absorption" in lines:
        absorption: dict[str, list[AbsorptionResults]] = lines["absorption"]
        accuracy = next(iter(absorption.values()))[0].probe_accuracy
        sections.append(
            f"## Feature absorption (first letter; ground-truth probe held-out accuracy {accuracy:.3f})\n\n"
            + format_absorption_table(absorption)
        )
        plot_absorption(absorption, directory / "absorption.png", title=f"Feature absorption, {preset} ({spread})")
    if "coarse_to_fine" in lines:
        views: dict[str, list[CoarseToFine]] = lines["coarse_to_fine"]
        sections.append(
            "## Coarse to fine: topic entropy of each latent's top documents, by its typical rank\n\n"
            + format_coarse_to_fine_table(views)
        )
        first = next(iter(views.values()))[0]
        plot_coarse_to_fine(first, directory / "coarse_to_fine.png", title=f"{first.name} ({preset}, first seed)")
    (directory / "interpret.md").write_text("\n\n".join(sections) + "\n")
