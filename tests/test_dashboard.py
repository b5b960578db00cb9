"""Latent dashboards: their numbers against a brute-force float64 reading of the weights, the site's self-containment,
bad inputs, crashes mid-write, the CLI, and what a reader sees in a real browser (headless Chromium).

The reference ranks every token's latents with ``float64_ranking`` (``torch.topk`` on ``W_enc``/``b_enc``), builds the
dense activations at each budget by a loop over ranks, and finds each latent's top sequences by sorting them: nothing
in it calls the SAE's encoder or the dashboard's code.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import load_sae, presets, testing
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.data import hook_activations
from sae_lens_hierarchical.interpretability import dashboard as dashboard_module
from sae_lens_hierarchical.interpretability.dashboard import LatentDashboard, latent_dashboard, visible_token
from sae_lens_hierarchical.interpretability.dashboard_site import DashboardSite
from sae_lens_hierarchical.jobs import prepare_embedded_activations
from tests.conftest import TRAINED_K
from tests.test_cli import assert_png_shows_a_plot
from tests.test_evaluation import float64_ranking, random_topk_sae

KS = [1, 4, TRAINED_K]
N_CONTEXTS = 5
WINDOW = (6, 3)
SPECIAL = [0, 1, 2]  # the tiny tokenizer's BOS, EOS, PAD


def percent(fraction: float) -> str:
    """A frequency as the pages print it."""
    return f"{100 * fraction:.3g}%"


@dataclass(frozen=True)
class Inputs:
    """What a dashboard is made of: the tiny model, the trained SAE's directory, held-out tokens and activations."""

    model: HookedTransformer
    sae_dir: Path
    tokens: torch.Tensor
    """``[64, 32]`` held-out token ids, BOS first."""
    activations: torch.Tensor
    """``[64, 32, 32]`` float64 activations at the model's hook (float64: no near-ties against the reference)."""


@pytest.fixture(scope="module")
def inputs(tiny_model: HookedTransformer, trained_sae_dir: Path) -> Inputs:
    tokens = torch.tensor(testing.tiny_token_dataset(64, 32, seed=123)["input_ids"])
    activations = hook_activations(tiny_model, tokens, testing.TINY_HOOK_NAME).double()
    return Inputs(tiny_model, trained_sae_dir, tokens, activations)


def float64_sae(kind: str, trained_sae_dir: Path) -> SAE:
    if kind == "hierarchical":
        return load_sae(trained_sae_dir).to(torch.float64)
    sae = random_topk_sae(d_in=32, d_sae=96, k=12, rescale_acts_by_decoder_norm=True)
    sae.cfg.metadata.hook_name = testing.TINY_HOOK_NAME
    return sae.to(torch.float64)


@torch.no_grad()
def brute_force(sae: SAE, model: HookedTransformer, tokens: torch.Tensor, acts: torch.Tensor) -> dict[str, Any]:
    """Every number a page shows, in float64 from the weights: per latent its ranks when it fires, its activations at
    each budget on every position, its top sequences, and its direct logit effects."""
    K, d_sae = sae.cfg.k, sae.cfg.d_sae
    keep = ~torch.isin(tokens, torch.tensor(SPECIAL))  # [S, C]
    values, indices, _ = float64_ranking(sae, acts.reshape(-1, sae.cfg.d_in)[keep.reshape(-1)], K)  # [T, K]
    rows = keep.reshape(-1).nonzero().squeeze(1)
    dense = {}
    for k in range(1, K + 1):
        at_k = torch.zeros(tokens.numel(), d_sae, dtype=torch.float64)
        for rank in range(k):
            fired = values[:, rank] > 0
            at_k[rows[fired], indices[fired, rank]] = values[fired, rank]
        dense[k] = at_k.reshape(*tokens.shape, d_sae)
    ranks = [((indices == latent) & (values > 0)).nonzero()[:, 1] + 1 for latent in range(d_sae)]
    direction = sae.W_dec.double()
    if sae.cfg.rescale_acts_by_decoder_norm:  # an activation then multiplies the unit-norm row
        direction = direction / direction.norm(dim=-1, keepdim=True)
    direction = (direction - direction.mean(dim=-1, keepdim=True)) * model.ln_final.w.double()  # LayerNorm model
    return {"n_tokens": int(keep.sum()), "ranks": ranks, "dense": dense, "logits": direction @ model.W_U.double()}


def top_sequences(dense: torch.Tensor, latent: int, n: int) -> list[tuple[int, int, float]]:
    """``(sequence, position, activation)`` of the ``n`` sequences with the largest activation of ``latent``."""
    best, position = dense[..., latent].max(dim=1)
    order = sorted(range(len(best)), key=lambda s: -float(best[s]))
    return [(s, int(position[s]), float(best[s])) for s in order[:n] if best[s] > 0]


def assert_page_matches(
    page: dict[str, Any], reference: dict[str, Any], tokens: torch.Tensor, model: HookedTransformer
) -> None:
    latent, n_tokens = page["latent"], reference["n_tokens"]
    ranks = reference["ranks"][latent]
    K = len(page["frequency_by_k"])
    assert page["n_tokens"] == n_tokens
    assert page["fires"] == len(ranks)
    assert page["frequency_by_k"] == pytest.approx([float((ranks <= k).sum()) / n_tokens for k in range(1, K + 1)])
    assert page["first_rank"] == (int(ranks.min()) if len(ranks) else 0)
    assert page["median_rank"] == (int(ranks.median()) if len(ranks) else 0)  # torch: the lower middle one
    values = reference["dense"][K][..., latent]
    values = values[values > 0]
    assert page["max_activation"] == pytest.approx(float(values.max()) if len(values) else 0.0, rel=1e-12)
    width = page["histogram"]["bin_width"]
    expected = torch.bincount((values / width).floor().long().clamp(max=39), minlength=40).tolist()
    assert page["histogram"]["counts"] == expected[: len(page["histogram"]["counts"])]
    assert sum(page["histogram"]["counts"]) == len(values), "every activation is counted"
    if len(values):
        assert values.max() >= 20 * width, "the largest activation lies in the upper half of the bins"
    for entry in page["per_k"]:
        k, dense = entry["k"], reference["dense"][entry["k"]]
        assert entry["frequency"] == pytest.approx(float((ranks <= k).sum()) / n_tokens)
        expected_contexts = top_sequences(dense, latent, N_CONTEXTS)
        got = [(c["sequence"], c["position"], c["activation"]) for c in entry["contexts"]]
        assert [g[:2] for g in got] == [e[:2] for e in expected_contexts], f"latent {latent} at k={k}"
        assert [g[2] for g in got] == pytest.approx([e[2] for e in expected_contexts], rel=1e-12)
        for context in entry["contexts"]:
            sequence, position = context["sequence"], context["position"]
            start, stop = max(0, position - WINDOW[0]), min(tokens.shape[1], position + WINDOW[1] + 1)
            assert context["token_ids"] == tokens[sequence, start:stop].tolist()
            assert context["tokens"] == [model.tokenizer.decode([t]) for t in context["token_ids"]]
            assert context["activations"] == pytest.approx(dense[sequence, start:stop, latent].tolist(), rel=1e-12)
            assert context["max_index"] == position - start
    logits = reference["logits"][latent]
    promoted, suppressed = logits.topk(len(page["promoted"])), logits.topk(len(page["suppressed"]), largest=False)
    assert [p["token_id"] for p in page["promoted"]] == promoted.indices.tolist()
    assert [p["logit"] for p in page["promoted"]] == pytest.approx(promoted.values.tolist(), rel=1e-5)
    assert [s["token_id"] for s in page["suppressed"]] == suppressed.indices.tolist()
    assert [s["logit"] for s in page["suppressed"]] == pytest.approx(suppressed.values.tolist(), rel=1e-5)
    assert [p["token"] for p in page["promoted"]] == [model.tokenizer.decode([p["token_id"]]) for p in page["promoted"]]


def dashboard_of(inputs: Inputs, sae: SAE, output: Path, ks: list[int]) -> LatentDashboard:
    """The dashboard of ``sae`` on the float64 activations, default latents."""
    return latent_dashboard(
        inputs.model,
        sae,
        inputs.tokens,
        output,
        activations=inputs.activations,
        ks=ks,
        n_contexts=N_CONTEXTS,
        window=WINDOW,
        progress=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, inputs: Inputs) -> LatentDashboard:
    """The dashboard of the trained HierarchicalTopK SAE (float64) with its default latents."""
    return dashboard_of(inputs, float64_sae("hierarchical", inputs.sae_dir), tmp_path_factory.mktemp("site") / "d", KS)


@pytest.mark.parametrize("kind", ["hierarchical", "topk"])
def test_numbers_match_a_float64_brute_force(kind: str, tmp_path: Path, inputs: Inputs) -> None:
    """HierarchicalTopK budgets are prefixes of its ranking; a SAELens TopK SAE is truncated to its k largest."""
    sae = float64_sae(kind, inputs.sae_dir)
    ks = KS if kind == "hierarchical" else [2, 12]
    dashboard = dashboard_of(inputs, sae, tmp_path / "d", ks)
    reference = brute_force(sae, inputs.model, inputs.tokens, inputs.activations)
    summary = dashboard.summary()
    assert summary["ks"] == ks and summary["n_tokens"] == reference["n_tokens"] == 64 * 31
    first = [int(r.min()) if len(r) else 0 for r in reference["ranks"]]
    assert summary["first_rank"] == first
    assert summary["median_rank"] == [int(r.median()) if len(r) else 0 for r in reference["ranks"]]
    # The default pages: up to 20 latents of each first-rank range 1, 2, 3-4, ..., the most frequent one included.
    pages = [row["latent"] for row in summary["latents"]]
    for low, high in dashboard_module.rank_ranges(sae.cfg.k):
        members = [latent for latent, rank in enumerate(first) if low <= rank <= high]
        chosen = [latent for latent in pages if low <= first[latent] <= high]
        assert len(chosen) == min(20, len(members)), (low, high)
        if members:
            assert max(members, key=lambda m: (len(reference["ranks"][m]), -m)) in chosen
    assert not [latent for latent in pages if first[latent] == 0], "latents that never fire get no default page"
    for row in summary["latents"]:
        page = dashboard.latent(row["latent"])
        assert_page_matches(page, reference, inputs.tokens, inputs.model)
        assert row["frequency"] == [entry["frequency"] for entry in page["per_k"]]
        assert [row[key] for key in ("fires", "first_rank", "median_rank")] == [
            page[key] for key in ("fires", "first_rank", "median_rank")
        ]
    table = dashboard.table()
    assert table["latent"].tolist() == pages
    assert table[f"frequency_k{ks[-1]}"].tolist() == [row["frequency"][-1] for row in summary["latents"]]


def test_chosen_latents_and_a_float32_sae(tmp_path: Path, inputs: Inputs) -> None:
    """The SAE as saved (float32), loaded from its directory, and activations computed by the dashboard itself: the
    same numbers to float32 rounding; only the chosen latents get pages, including one that never fires."""
    model, tokens = inputs.model, inputs.tokens
    sae = load_sae(inputs.sae_dir)
    reference = brute_force(sae, model, tokens, hook_activations(model, tokens, testing.TINY_HOOK_NAME))
    never = next(latent for latent, ranks in enumerate(reference["ranks"]) if len(ranks) == 0)
    frequent = max(range(sae.cfg.d_sae), key=lambda latent: len(reference["ranks"][latent]))
    chosen = [frequent, never, frequent]
    dashboard = latent_dashboard(model, str(inputs.sae_dir), tokens, tmp_path / "d", latents=chosen, progress=False)
    assert [row["latent"] for row in dashboard.summary()["latents"]] == sorted([frequent, never])
    assert dashboard.summary()["ks"] == [1, 4, 16], "K/16, K/4, K by default"
    page = dashboard.latent(frequent)
    assert page["fires"] == pytest.approx(len(reference["ranks"][frequent]), abs=2)
    assert page["per_k"][-1]["contexts"][0]["activation"] == pytest.approx(
        top_sequences(reference["dense"][16], frequent, 1)[0][2], rel=1e-4
    )
    assert dashboard.latent(never)["fires"] == 0
    assert all(not entry["contexts"] for entry in dashboard.latent(never)["per_k"])
    assert "Never fires" in (dashboard.directory / "latents" / f"{never}.html").read_text()


def test_site_is_self_contained_and_every_link_resolves(site: LatentDashboard) -> None:
    files = sorted(p for p in site.directory.rglob("*") if p.is_file())
    pages = [row["latent"] for row in site.summary()["latents"]]
    assert {p.relative_to(site.directory).as_posix() for p in files} == {"index.html", "dashboard.json"} | {
        f"latents/{latent}.{ext}" for latent in pages for ext in ("html", "json")
    }
    for path in files:
        text = path.read_text()
        assert not re.search(r"https?:|//[a-z]|<link|<img|<iframe|src=", text), f"{path.name} refers outside itself"
        if path.suffix == ".html":
            targets = re.findall(r'href="([^"]*)"', text)
            assert targets or path.name != "index.html"
            for target in targets:
                assert (path.parent / target).is_file(), f"{path.name} links to missing {target}"
    index = (site.directory / "index.html").read_text()
    assert sorted(int(t) for t in re.findall(r'href="latents/(\d+)\.html"', index)) == pages


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latents": [5, 128]}, r"ints in 0\.\.127 \(d_sae=128\); got latent 128"),
        ({"latents": [-1]}, r"ints in 0\.\.127 \(d_sae=128\); got latent -1"),
        ({"latents": []}, r"non-empty list of ints in 0\.\.127"),
        ({"ks": [4, 17]}, r"1\.\.K=16 .*got k=17"),
        ({"ks": [0]}, r"1\.\.K=16 .*got k=0"),
        ({"n_contexts": 0}, r"n_contexts must be an int >= 1; got 0"),
        ({"n_logit_tokens": 1.5}, r"n_logit_tokens must be an int >= 1; got 1\.5"),
        ({"window": (-1, 2)}, r"window must be two ints >= 0 .*got \(-1, 2\)"),
        ({"tokens": torch.zeros(4, 32)}, r"tokens must be integer ids \[sequences, context\]; got torch\.float32"),
        (
            {"activations": torch.zeros(64, 31, 32)},
            r"\[sequences, context, d_in\] = \[64, 32, 32\] .*got \[64, 31, 32\]",
        ),
        ({"exclude_token_ids": list(range(104))}, r"no token to inspect: all 2048 positions hold excluded tokens"),
    ],
)
def test_bad_inputs_raise_one_value_error_and_write_nothing(
    change: dict[str, Any], message: str, tmp_path: Path, inputs: Inputs
) -> None:
    arguments: dict[str, Any] = {"tokens": inputs.tokens, "activations": inputs.activations.float(), **change}
    with pytest.raises(ValueError, match=message):
        latent_dashboard(inputs.model, load_sae(inputs.sae_dir), output_dir=tmp_path / "d", progress=False, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused_unless_overwrite(
    site: LatentDashboard, tmp_path: Path, inputs: Inputs
) -> None:
    sae, model, tokens = load_sae(inputs.sae_dir), inputs.model, inputs.tokens[:16]
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"output .*mine exists and is not an empty directory"):
        latent_dashboard(model, sae, tokens, existing, progress=False)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    copy = tmp_path / "copy"
    shutil.copytree(site.directory, copy)
    latent_dashboard(model, sae, tokens, copy, latents=[3], overwrite=True, progress=False)
    assert [row["latent"] for row in LatentDashboard(copy).summary()["latents"]] == [3]
    assert sorted(p.name for p in (copy / "latents").iterdir()) == ["3.html", "3.json"], "the old pages are gone"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "mine"], "no scratch directory is left"


def test_a_crash_while_writing_leaves_nothing_or_the_old_site(
    site: LatentDashboard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inputs: Inputs
) -> None:
    written: list[int] = []
    real = DashboardSite.latent_html

    def crash_on_third_page(self: Any, data: dict[str, Any], page: int) -> str:
        written.append(page)
        if len(written) == 3:
            raise OSError("disk full")
        return real(self, data, page)

    monkeypatch.setattr(DashboardSite, "latent_html", crash_on_third_page)
    sae, model, tokens = load_sae(inputs.sae_dir), inputs.model, inputs.tokens[:16]
    with pytest.raises(OSError, match="disk full"):
        latent_dashboard(model, sae, tokens, tmp_path / "new", latents=[1, 2, 3, 4], progress=False)
    assert list(tmp_path.iterdir()) == [], "neither the dashboard nor its scratch directory may remain"
    old = tmp_path / "old"
    shutil.copytree(site.directory, old)
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    written.clear()
    with pytest.raises(OSError, match="disk full"):
        latent_dashboard(model, sae, tokens, old, latents=[1, 2, 3, 4], overwrite=True, progress=False)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


# --- the CLI on the tiny preset ---


def test_cli_inspect_writes_a_dashboard_of_the_presets_held_out_tokens(
    tmp_path: Path, trained_sae_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae_dir = tmp_path / "sae"
    shutil.copytree(trained_sae_dir, sae_dir)
    cache = tmp_path / "cache"
    common = ["--eval-tokens", "2000", "--cache-dir", str(cache)]
    main(["inspect", str(sae_dir), *common, "--latents", "0-4,9", "--ks", "2,16", "--contexts", "3"])
    output = tmp_path / "sae-dashboard"  # the default: beside the SAE directory
    assert f"Dashboard of 6 latents: open {output / 'index.html'}" in capsys.readouterr().out
    dashboard = LatentDashboard(output)
    summary = dashboard.summary()
    assert [row["latent"] for row in summary["latents"]] == [0, 1, 2, 3, 4, 9]
    assert summary["ks"] == [2, 16]
    # The numbers are those of the preset's held-out sequences, the ones `evaluate` scores.
    tiny = presets.get_preset(presets.TINY_MODEL_NAME)
    model = tiny.load_model("cpu")
    held_out = prepare_embedded_activations(tiny, model, 2000, cache_root=cache, progress=False).held_out.load()[:]
    tokens, acts = held_out["token_ids"].long(), held_out[presets.TINY_HOOK_NAME].double()
    reference = brute_force(load_sae(sae_dir).to(torch.float64), model, tokens, acts)
    assert summary["n_tokens"] == reference["n_tokens"] == tokens.numel() - tokens.shape[0]
    for row in summary["latents"]:
        page = dashboard.latent(row["latent"])
        ranks = reference["ranks"][row["latent"]]
        assert page["fires"] == pytest.approx(len(ranks), abs=2), "float32 SAE: equal up to near-ties"
        assert len(page["per_k"][-1]["contexts"]) == min(
            3, len(top_sequences(reference["dense"][16], row["latent"], 3))
        )

    with pytest.raises(SystemExit, match="exists and is not empty; pass overwrite"):
        main(["inspect", str(sae_dir), *common])
    main(["inspect", str(sae_dir), *common, "--overwrite", "--latents", "7"])
    assert [row["latent"] for row in dashboard.summary()["latents"]] == [7]
    bad = [
        (["--latents", "0-128"], r"ints in 0\.\.127 \(d_sae=128\); got latent 128"),
        (["--ks", "4,32"], r"1\.\.K=16 .*got k=32"),
        (["--preset", "gemma-2-2b"], r"preset 'gemma-2-2b' has no embedded held-out corpus"),
    ]
    for extra, message in bad:
        with pytest.raises(SystemExit, match=message):
            main(["inspect", str(sae_dir), *common, "--output-dir", str(tmp_path / "bad"), *extra])
    with pytest.raises(SystemExit, match="2"):  # argparse: a malformed range is refused while parsing
        main(["inspect", str(sae_dir), "--latents", "9-3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "sae", "sae-dashboard"]


# --- a real browser ---


def chromium() -> str:
    """Debian's ``chromium``; CI (``.ci/run``) installs it and sets SAE_LENS_HIERARCHICAL_REQUIRE_BROWSER=1."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("SAE_LENS_HIERARCHICAL_REQUIRE_BROWSER") == "1":
        pytest.fail("headless Chromium is required here (SAE_LENS_HIERARCHICAL_REQUIRE_BROWSER=1) but not installed")
    pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run installs it)")


def run_chromium(tmp_path: Path, *arguments: str) -> str:
    """Headless Chromium's stdout, with a fresh profile and no network."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *arguments,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def reader_text(dom: str) -> str:
    """What a reader sees of a serialised DOM: the text outside tags, scripts and styles."""
    return html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)))


def table_order(dom: str) -> list[int]:
    """The latent ids of the index table's rows, top to bottom, as the browser holds them."""
    return [int(latent) for latent in re.findall(r'<tr><td data-v="\d+"><a href="latents/(\d+)\.html">', dom)]


def test_a_browser_shows_the_numbers_and_contexts(site: LatentDashboard, tmp_path: Path) -> None:
    """``--dump-dom``: the DOM after the page's script ran, as a reader's browser holds it."""
    summary = site.summary()
    dom = run_chromium(tmp_path, "--dump-dom", site.index.as_uri())
    text = reader_text(dom)
    assert f"{len(summary['latents'])} latent pages" in text
    assert f"{summary['n_tokens']:,} held-out tokens" in text
    rows = summary["latents"]
    assert table_order(dom) == [row["latent"] for row in rows]
    for row in rows[:10]:
        cells = re.search(rf'<tr><td data-v="{row["latent"]}">.*?</tr>', dom)
        assert cells, row["latent"]
        shown = reader_text(cells.group(0))
        assert shown.startswith(str(row["latent"]))
        assert "".join(percent(f) for f in row["frequency"]) in shown
    # Sorting by a header, from the address (what a click does, without clicking): the rows move in the DOM.
    sorted_dom = run_chromium(tmp_path, "--dump-dom", site.index.as_uri() + f"#sort=frequency-k{KS[-1]}")
    by_frequency = sorted(rows, key=lambda row: -row["frequency"][-1])  # stable, as the browser's sort
    assert table_order(sorted_dom) == [row["latent"] for row in by_frequency]
    assert 'aria-sort="descending"' in sorted_dom
    ascending = table_order(run_chromium(tmp_path, "--dump-dom", site.index.as_uri() + "#sort=first-rank:asc"))
    assert ascending == [row["latent"] for row in sorted(rows, key=lambda row: row["first_rank"])]

    busiest = max(rows, key=lambda row: row["fires"])["latent"]
    page = site.latent(busiest)
    text = reader_text(run_chromium(tmp_path, "--dump-dom", (site.directory / "latents" / f"{busiest}.html").as_uri()))
    assert f"Latent {busiest}" in text
    assert f"Fires on {percent(page['fires'] / page['n_tokens'])} of {page['n_tokens']:,} held-out tokens" in text
    assert f"first rank {page['first_rank']}, median rank {page['median_rank']}" in text
    for entry in page["per_k"]:
        assert f"Top contexts at k = {entry['k']}" in text
        assert f"Fires on {percent(entry['frequency'])} of tokens at this budget" in text
        for context in entry["contexts"]:
            shown = f"{context['activation']:.4g}" + "".join(visible_token(t) for t in context["tokens"])
            assert shown in text, f"context of sequence {context['sequence']} at k={entry['k']}"
    assert "".join(visible_token(p["token"]) + f"{p['logit']:+.3f}" for p in page["promoted"][:1]) in text


@pytest.mark.slow
def test_a_browser_screenshot_shows_the_pages(site: LatentDashboard, tmp_path: Path) -> None:
    """Rendered pixels: the index is a table, a latent page has its plots and orange token highlights."""
    busiest = max(site.summary()["latents"], key=lambda row: row["fires"])["latent"]
    for name, path in (("index", site.index), ("latent", site.directory / "latents" / f"{busiest}.html")):
        png = tmp_path / f"{name}.png"
        run_chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,1400", path.as_uri())
        assert_png_shows_a_plot(png)
        pixels = torch.from_numpy(matplotlib.image.imread(png)[..., :3].copy()).reshape(-1, 3)
        dark = (pixels.sum(dim=-1) < 1.0).float().mean()
        assert 0.005 < dark < 0.3, f"{name}: text covers {dark:.1%} of the page"
        if name == "latent":
            orange = ((pixels - torch.tensor([1.0, 128 / 255, 0.0])).abs().max(dim=-1).values < 0.03).sum()
            bars = ((pixels - torch.tensor([192 / 255, 80 / 255, 0.0])).abs().max(dim=-1).values < 0.03).sum()
            assert orange > 50, "the largest activations are highlighted in full orange"
            assert bars > 500, "the histogram's bars are drawn"
