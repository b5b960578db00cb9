"""The ``interpret`` job over compare runs: every SAE scored on the same documents, the suite's lines assembled per
seed (TopK trained at k: each SAE at its own k), and the report's seed means recomputed by hand from its JSON."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sae_lens_hierarchical import presets
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.interpretability.probing import SparseProbingResults
from sae_lens_hierarchical.jobs import run_comparison_job
from sae_lens_hierarchical.jobs.interpret import run_interpret_job
from tests.test_cli import assert_png_shows_a_plot

TINY = presets.get_preset(presets.TINY_MODEL_NAME)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Two seeds of a small tiny-random comparison (HTopK K = 8, TopK at 2 and 8) sharing one cache root."""
    root = tmp_path_factory.mktemp("interpret")
    dirs = []
    for seed in (0, 1):
        output = root / f"seed{seed}"
        run_comparison_job(
            TINY,
            output,
            budgets=[2, 8],
            baselines=("topk",),
            overrides={"sae.d_sae": 64, "sae.k": 8},
            training_tokens=6400,
            eval_tokens=2000,
            downstream_tokens=0,
            cache_root=root / "cache",
            seed=seed,
            progress=False,
        )
        dirs.append(output)
    return dirs, root / "cache"


def cell_mean(table: str, line: str, k: int, column: int) -> float:
    """The mean in ``column`` (0: n = first) of the row ``| line | k | ...`` of a markdown table."""
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if cells[:2] == [line, str(k)]:
            return float(re.match(r"[0-9.]+", cells[2 + column])[0])  # type: ignore[index]
    raise AssertionError(f"no row {line!r}, k={k} in\n{table}")


def test_interpret_scores_every_sae_and_averages_each_line_over_seeds(
    two_seeds: tuple[list[Path], Path], tmp_path: Path
) -> None:
    dirs, cache = two_seeds
    output = tmp_path / "interp"
    payload = run_interpret_job(dirs, output, measures=("probing", "coarse_to_fine"), ns=[1, 5], cache_root=cache)
    assert {p.name for p in output.iterdir()} == {
        "interpret.md",
        "interpret.json",
        "job.json",
        "probing.png",
        "coarse_to_fine.png",
    }
    assert json.loads((output / "interpret.json").read_text()) == payload
    for png in ("probing.png", "coarse_to_fine.png"):
        assert_png_shows_a_plot(output / png)
    assert sorted(payload) == sorted(str(d) for d in dirs)
    for seed in payload.values():
        assert sorted(seed) == ["htopk-k8", "topk-k2", "topk-k8"]
        assert "coarse_to_fine" in seed["htopk-k8"] and "coarse_to_fine" not in seed["topk-k2"]
    probing = {
        (seed, name): SparseProbingResults.from_dict(entry["probing"])
        for seed, saes in payload.items()
        for name, entry in saes.items()
    }
    assert probing[(str(dirs[0]), "topk-k2")].ks == [2]
    assert probing[(str(dirs[0]), "htopk-k8")].ks == [1, 2, 4, 8]
    report = (output / "interpret.md").read_text()
    topic = report.split("## Sparse probing, topic")[1].split("##")[0]

    def by_hand(name: str, k: int, n: int) -> float:
        values = [probing[(str(d), name)].accuracy("topic", k, n) for d in dirs]
        return sum(values) / len(values)

    # every line's mean over the two seeds, recomputed from the per-SAE JSON
    assert cell_mean(topic, "HierarchicalTopK (one SAE, any k)", 2, 0) == pytest.approx(
        by_hand("htopk-k8", 2, 1), abs=6e-4
    )
    assert cell_mean(topic, "TopK trained at K, truncated to k", 2, 1) == pytest.approx(
        by_hand("topk-k8", 2, 5), abs=6e-4
    )
    # "TopK trained at k": the SAE trained at 2 at k = 2, the one trained at 8 at k = 8, and nothing else
    fixed = "TopK trained at k (one SAE per k)"
    assert cell_mean(topic, fixed, 2, 0) == pytest.approx(by_hand("topk-k2", 2, 1), abs=6e-4)
    assert cell_mean(topic, fixed, 8, 1) == pytest.approx(by_hand("topk-k8", 8, 5), abs=6e-4)
    assert f"| {fixed} | 1 |" not in topic and f"| {fixed} | 4 |" not in topic
    assert "mean ± half the range over 2 seed(s)" in report


def test_interpret_refuses_bad_inputs_before_writing(two_seeds: tuple[list[Path], Path], tmp_path: Path) -> None:
    dirs, cache = two_seeds
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"measures must be a non-empty subset of \['probing', 'absorption', "):
        run_interpret_job(dirs, output, measures=("probing", "autointerp"), cache_root=cache)
    with pytest.raises(ValueError, match="is not a finished compare run"):
        run_interpret_job([tmp_path], output, cache_root=cache)
    with pytest.raises(SystemExit, match="is not a finished compare run"):
        main(["interpret", str(tmp_path), "--output-dir", str(output), "--cache-dir", str(cache)])
    with pytest.raises(SystemExit):
        main(["interpret", str(dirs[0]), "--output-dir", str(output), "--measures", "bogus"])
    with pytest.raises(ValueError, match="must have distinct directories"):
        run_interpret_job([dirs[0], dirs[0]], output, cache_root=cache)
    other = tmp_path / "longer"  # seed 1's run, as if trained on more tokens: not a seed of the same suite
    shutil.copytree(dirs[1], other)
    job = json.loads((other / "job.json").read_text())
    (other / "job.json").write_text(json.dumps(job | {"training_tokens": 12_800}))
    with pytest.raises(ValueError, match=r"differ in training_tokens .*only the seed may differ"):
        run_interpret_job([dirs[0], other], output, cache_root=cache)
    (other / "job.json").write_text(json.dumps(job | {"seed": 0}))
    with pytest.raises(ValueError, match=r"distinct seeds .*\[0, 0\]"):
        run_interpret_job([dirs[0], other], output, cache_root=cache)
    (other / "job.json").write_text(json.dumps(job))
    shutil.rmtree(other / "saes" / "topk-k2")
    with pytest.raises(ValueError, match=r"the SAEs \['topk-k2'\] are missing from saes/"):
        run_interpret_job([dirs[0], other], output, cache_root=cache)
    assert not output.exists()


def test_absorption_is_skipped_up_front_for_a_tokenizer_without_words(
    two_seeds: tuple[list[Path], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny model's character tokenizer has no whole-word tokens: absorption is skipped, with the reason, before
    anything is cached or scored (no first-letter cache appears); alone it is refused, naming the reason."""
    dirs, cache = two_seeds
    before = sorted(path.name for path in cache.iterdir())
    payload = run_interpret_job(dirs, tmp_path / "out", measures=("absorption", "coarse_to_fine"), cache_root=cache)
    assert "absorption skipped: the tokenizer has 0 whole-word tokens" in capsys.readouterr().out
    assert all("absorption" not in entry for by in payload.values() for entry in by.values())
    added = [path.name for path in cache.iterdir() if path.name not in before]
    assert not any("first_letter" in name for name in added), added
    with pytest.raises(ValueError, match=r"absorption skipped.*no other measure was asked for"):
        run_interpret_job(dirs, tmp_path / "alone", measures=("absorption",), cache_root=cache)
