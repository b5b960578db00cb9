"""Export at one budget k as SAELens's "topk", and publishing on the Hub (dry run, offline hub cache).

The reference is SAELens alone: one fresh process that never imports this package loads every export (from disk and,
through a local Hugging Face cache, with ``SAE.from_pretrained``) and writes its outputs for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.hf_api
import pytest
import torch
from huggingface_hub import HfApi
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE
from safetensors.torch import load_file, save_file

from sae_lens_hierarchical import (
    HierarchicalTopKSAE,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    load_sae,
    sharing,
)
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.sharing import save_as_topk, save_as_topk_variants, to_topk, upload

D_IN, D_SAE, K = 16, 64, 8
LEVELS, WEIGHTS = [2, 4, 8], [0.5, 0.3, 0.2]
HOOK, MODEL = "blocks.0.hook_resid_post", "tiny-model"
REPO = "owner/name"
TIED = slice(0, 16)  # latents whose encoder is zero: pre-activation exactly 0 for every token
NEGATIVE = slice(16, 48)  # latents with a large negative bias: usually below zero
PER_K_TABLE = "| k | L0 | FVU |\n|---:|---:|---:|\n| 8 | 8.00 | 0.1234 |"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_sae(seed: int, rescale: bool = True) -> HierarchicalTopKTrainingSAE:
    """A tiny training SAE with decoder norms far from 1 and many exact ties at zero."""
    torch.manual_seed(seed)
    sae = HierarchicalTopKTrainingSAE(
        HierarchicalTopKTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=K,
            hierarchy_levels=LEVELS,
            hierarchy_weights=WEIGHTS,
            rescale_acts_by_decoder_norm=rescale,
        )
    )
    sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = HOOK, MODEL
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 30 + 2)  # norms 0.2..3.2: an unfolded export would decode wrongly
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(-0.2, 0.05)  # tokens at b_dec: every pre-activation <= 0
        sae.W_enc[:, TIED] = 0
        sae.b_enc[TIED] = 0
        sae.b_enc[NEGATIVE] = -2.0
    return sae


def inputs_with_ties(sae: HierarchicalTopKTrainingSAE) -> torch.Tensor:
    """``[64, d_in]``: random tokens, and tokens at b_dec (every pre-activation is then b_enc: ties at 0, negatives)."""
    generator = torch.Generator().manual_seed(1)
    random = torch.randn(40, D_IN, generator=generator) * 3
    at_b_dec = sae.b_dec.detach().expand(4, D_IN).clone()
    near_b_dec = sae.b_dec.detach() + torch.randn(20, D_IN, generator=generator) * 0.1
    return torch.cat([random, at_b_dec, near_b_dec])


def ours_at(sae: HierarchicalTopKSAE | HierarchicalTopKTrainingSAE, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    with torch.no_grad(), sae.use_k(k):
        acts = sae.encode(x)
        return {"encode": acts, "decode": sae.decode(acts), "forward": sae(x)}


SAE_LENS_ALONE = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE

jobs = json.loads(sys.argv[1])
x = load_file(sys.argv[2])["x"]
outputs, loaded = {}, {}
with torch.no_grad():
    for name, job in jobs.items():
        if "dir" in job:
            sae = SAE.load_from_disk(job["dir"])
        else:
            sae = SAE.from_pretrained(job["repo"], job["sae_id"])
        loaded[name] = [type(sae).__name__, sae.cfg.architecture(), getattr(sae.cfg, "k", None)]
        acts = sae.encode(x)
        outputs[f"{name}.encode"] = acts
        outputs[f"{name}.decode"] = sae.decode(acts)
        outputs[f"{name}.forward"] = sae(x)
save_file(outputs, sys.argv[3])
assert "sae_lens_hierarchical" not in sys.modules, "the reference must run on SAELens alone"
print(json.dumps(loaded))
"""


def run_sae_lens_alone(jobs: dict[str, dict[str, str]], x: torch.Tensor, workdir: Path, hub_cache: Path) -> Any:
    """Load each job with SAELens in a fresh process (offline, ``hub_cache`` as the Hub cache); return its outputs."""
    save_file({"x": x.contiguous()}, workdir / "x.safetensors")
    environment = {
        **{name: value for name, value in os.environ.items() if name != "PYTHONPATH"},
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
    }
    result = subprocess.run(
        [sys.executable, "-c", SAE_LENS_ALONE, json.dumps(jobs), str(workdir / "x.safetensors"), str(workdir / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=workdir,  # not the repository root, so nothing of ours is importable by accident
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), load_file(workdir / "out")


def fill_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay out ``files`` as a snapshot of ``repo_id`` at ``main``, where ``hf_hub_download`` looks for it offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for file in files.rglob("*"):
        if file.is_file():
            target = repo / "snapshots" / COMMIT / file.relative_to(files)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())


def tree(root: Path) -> dict[str, bytes]:
    return {file.relative_to(root).as_posix(): file.read_bytes() for file in root.rglob("*") if file.is_file()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Exports of three kinds of source, an upload dry run, a hub cache of it, and SAELens-alone outputs of all."""
    root = tmp_path_factory.mktemp("sharing")
    trained = make_sae(0)  # in memory: rescale_acts_by_decoder_norm and unnormalised decoder rows
    plain = make_sae(1, rescale=False)
    x = inputs_with_ties(trained)

    sae_dir = root / "results" / "x" / "sae"
    make_sae(2).save_inference_model(sae_dir)  # saved: norms folded, levels in metadata
    (sae_dir / "runner_cfg.json").write_text(json.dumps({"lr": 0.001}))
    save_file({"sparsity": torch.linspace(-5, 0, D_SAE)}, sae_dir / "sparsity.safetensors")
    (sae_dir / "notes.txt").write_text("not part of an SAELens upload")
    (sae_dir.parent / "per_k.md").write_text(PER_K_TABLE + "\n")
    saved = load_sae(sae_dir)

    exports = root / "exports"
    save_as_topk(trained, exports / "trained_k3", 3, source="in memory")
    save_as_topk(trained, exports / "trained_k8", 8)
    save_as_topk(plain, exports / "plain_k4", 4)
    main(["export", str(sae_dir), "--k", "5", str(exports / "saved_k5")])

    dry_run = root / "dry_run"
    main(["upload", str(sae_dir), REPO, "--topk-ks", "2,4", "--dry-run", str(dry_run)])
    hub_cache = root / "hub"
    fill_hub_cache(hub_cache, REPO, dry_run)

    jobs: dict[str, dict[str, str]] = {name: {"dir": str(exports / name)} for name in os.listdir(exports)}
    jobs["hub_topk_k4"] = {"repo": REPO, "sae_id": f"{HOOK}/topk_k4"}
    loaded, outputs = run_sae_lens_alone(jobs, x, root, hub_cache)
    sources = {"trained_k3": (trained, 3), "trained_k8": (trained, 8), "plain_k4": (plain, 4)}
    sources |= {"saved_k5": (saved, 5), "hub_topk_k4": (saved, 4)}
    return {
        "x": x,
        "trained": trained,
        "saved": saved,
        "sae_dir": sae_dir,
        "exports": exports,
        "dry_run": dry_run,
        "hub_cache": hub_cache,
        "loaded": loaded,
        "outputs": outputs,
        "sources": sources,
    }


# --- export -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["trained_k3", "trained_k8", "plain_k4", "saved_k5", "hub_topk_k4"])
def test_export_loaded_by_sae_lens_alone_matches_ours_at_k(shared: dict[str, Any], name: str) -> None:
    sae, k = shared["sources"][name]
    assert shared["loaded"][name] == ["TopKSAE", "topk", k]
    ours = ours_at(sae, shared["x"], k)
    theirs = {part: shared["outputs"][f"{name}.{part}"] for part in ("encode", "decode", "forward")}
    # Same latents at every token (a wrong k or an unfolded encoder changes them), at most k of them.
    assert torch.equal(theirs["encode"] != 0, ours["encode"] != 0)
    assert int((theirs["encode"] != 0).sum(-1).max()) <= k
    for part in ("encode", "decode", "forward"):
        torch.testing.assert_close(theirs[part], ours[part], rtol=1e-5, atol=1e-5)


def test_inputs_really_tie_at_the_kth_place(shared: dict[str, Any]) -> None:
    """The comparison above covers ties: many tokens' k-th activation is one of the 16 latents tied at exactly 0."""
    for sae, k in shared["sources"].values():
        values, _ = sae.encode_top_k(shared["x"])
        assert int((values[:, k - 1] == 0).sum()) >= 10


def test_export_files_are_plain_topk_with_folded_norms_and_provenance(shared: dict[str, Any]) -> None:
    cfg = json.loads((shared["exports"] / "trained_k3" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 3, D_IN, D_SAE)
    assert cfg["rescale_acts_by_decoder_norm"] is False, "norms are folded: the weights alone define the SAE"
    assert cfg["metadata"]["hook_name"] == HOOK
    assert cfg["metadata"]["hierarchical_topk_export"] == {
        "source_architecture": "hierarchical_topk",
        "source": "in memory",
        "K": K,
        "k": 3,
        "hierarchy_levels": LEVELS,
        "hierarchy_weights": WEIGHTS,
        "exported_by": cfg["metadata"]["hierarchical_topk_export"]["exported_by"],
    }
    weights = load_file(shared["exports"] / "trained_k3" / "sae_weights.safetensors")
    torch.testing.assert_close(weights["W_dec"].norm(dim=-1), torch.ones(D_SAE))
    saved_cfg = json.loads((shared["exports"] / "saved_k5" / "cfg.json").read_text())
    record = saved_cfg["metadata"]["hierarchical_topk_export"]
    assert (record["source"], record["k"], record["hierarchy_levels"]) == ("sae", 5, LEVELS)  # no machine path


def test_to_topk_copies_and_leaves_the_source_untouched() -> None:
    sae = make_sae(3)
    before = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
    topk = to_topk(sae, 4)
    assert isinstance(topk, TopKSAE) and topk.cfg.k == 4
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert sae.cfg.rescale_acts_by_decoder_norm is True and sae.k == K


@pytest.mark.parametrize("k", [0, K + 1, -1, 2.0, True, "4", None])
def test_bad_k_is_one_value_error_naming_it_and_the_range(tmp_path: Path, k: object) -> None:
    sae = make_sae(0)
    with pytest.raises(ValueError, match=rf"1\.\.K={K}.*got k={k!r}"):
        to_topk(sae, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"1\.\.K={K}"):
        save_as_topk(sae, tmp_path / "out", k)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_other_saes_and_repeated_budgets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got TopKSAE"):
        to_topk(to_topk(make_sae(0), 4), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k=4 is given twice"):
        save_as_topk_variants(make_sae(0), tmp_path / "out", [4, 2, 4])
    assert not (tmp_path / "out").exists()


def test_never_overwrites_and_a_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sae = make_sae(0)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        save_as_topk(sae, existing, 4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        save_as_topk(sae, tmp_path / "file", 4)
    assert (existing / "keep.txt").read_text() == "precious"

    (tmp_path / "empty").mkdir()
    assert save_as_topk(sae, tmp_path / "empty", 4) == tmp_path / "empty"
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["cfg.json", "sae_weights.safetensors"]

    def crash_after_config(self: TopKSAE, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "cfg.json").write_text("{}")
        raise RuntimeError("killed mid-save")

    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(TopKSAE, "save_model", crash_after_config)
    with pytest.raises(RuntimeError, match="mid-save"):
        save_as_topk(sae, tmp_path / "new", 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no half-written SAE, no scratch left"


def test_cli_export_several_budgets_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae_dir = tmp_path / "sae"
    make_sae(0).save_inference_model(sae_dir)
    main(["export", str(sae_dir), "--k", "2,8", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["k_2", "k_8"]
    for k in (2, 8):
        assert json.loads((tmp_path / "out" / f"k_{k}" / "cfg.json").read_text())["k"] == k
    assert "k=8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=rf"1\.\.K={K}.*got k=9"):
        main(["export", str(sae_dir), "--k", "9", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="not an empty directory"):
        main(["export", str(sae_dir), "--k", "4", str(tmp_path / "out")])
    assert not (tmp_path / "bad").exists()


# --- upload -----------------------------------------------------------------------------------------------------


def test_dry_run_lays_out_the_repo_as_sae_lens_uploads_it(shared: dict[str, Any]) -> None:
    files = tree(shared["dry_run"])
    sae_files = ["cfg.json", "runner_cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    topk_files = ["cfg.json", "sae_weights.safetensors"]
    assert sorted(files) == sorted(
        ["README.md"]
        + [f"{HOOK}/{name}" for name in sae_files]
        + [f"{HOOK}/topk_k{k}/{name}" for k in (2, 4) for name in topk_files]
    )
    for name in sae_files:  # the SAE itself goes up unchanged
        assert files[f"{HOOK}/{name}"] == (shared["sae_dir"] / name).read_bytes()
    card = files["README.md"].decode()
    for expected in [
        "library_name: saelens",
        "`hierarchical_topk`",
        f"| K (largest budget; any k ≤ K at inference) | {K} |",
        "| hierarchy levels (budgets trained) | 2, 4, 8 |",
        "| level weights | 0.5, 0.3, 0.2 |",
        f"| d_in | {D_IN} |",
        f"| d_sae | {D_SAE} |",
        f"| hook | `{HOOK}` |",
        f"| model | `{MODEL}` |",
        PER_K_TABLE,
        "import sae_lens_hierarchical",
        f'load_sae("{REPO}", "{HOOK}"',
        f"| 2 | `{HOOK}/topk_k2` |",
        f'SAE.from_pretrained("{REPO}", "{HOOK}/topk_k2")',
        "license: other",
        "pip install sae-lens-hierarchical",
        "| learning rate | 0.001 |",
        "BOS and the other special tokens were excluded",
        "A HierarchicalTopK sparse autoencoder",
    ]:
        assert expected in card, expected
    assert "One TopK SAE" not in card
    for path, content in files.items():  # no path of this machine in anything the upload commits
        assert str(shared["sae_dir"].parents[2]).encode() not in content, path


def test_dry_run_is_what_the_real_upload_commits(shared: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the real path (SAELens's uploader on huggingface_hub's HfApi) with only the network commit replaced."""
    commits: dict[str, bytes] = {}

    class OfflineHub(HfApi):
        def repo_info(self, *args: Any, **kwargs: Any) -> None:
            return None

        def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> None:  # type: ignore[override]
            assert repo_id == REPO
            for operation in operations:
                with operation.as_file() as handle:
                    commits[operation.path_in_repo] = handle.read()

    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # the single-commit path
    monkeypatch.setattr(sharing, "HfApi", OfflineHub)
    upload(shared["sae_dir"], REPO, topk_ks=[2, 4])
    assert commits == tree(shared["dry_run"])


def test_from_pretrained_reads_the_uploaded_hierarchical_sae(
    shared: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SAE.from_pretrained(repo, sae_id)`` resolves the dry run from a local hub cache, offline."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(shared["hub_cache"]))
    sae, _, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity(REPO, HOOK)
    assert isinstance(sae, HierarchicalTopKSAE) and sae.cfg.k == K
    assert log_sparsity is not None and torch.equal(log_sparsity, torch.linspace(-5, 0, D_SAE))
    via_load_sae = load_sae(REPO, HOOK, k=2)
    assert via_load_sae.k == 2
    for k in (1, 4, K):
        for part, value in ours_at(sae, shared["x"], k).items():
            assert torch.equal(value, ours_at(shared["saved"], shared["x"], k)[part]), (k, part)


def test_upload_refuses_bad_inputs(shared: dict[str, Any], tmp_path: Path) -> None:
    sae_dir = shared["sae_dir"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"repo_id": "name-only"}, "'owner/name'.*got 'name-only'"),
        ({"repo_id": "a/b/c"}, "'owner/name'.*got 'a/b/c'"),
        ({"topk_ks": [2, 9]}, rf"1\.\.K={K}.*got k=9"),
        ({"sae_id": "../up"}, "relative folder path.*got '../up'"),
        ({"sae_id": "a//b"}, "relative folder path.*got 'a//b'"),
        ({"dry_run": shared["dry_run"]}, "not an empty directory"),
    ]
    for overrides, message in bad:
        settings = {"repo_id": REPO, "dry_run": tmp_path / "out", **overrides}
        with pytest.raises(ValueError, match=message):
            upload(sae_dir, **settings)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="holds a 'topk' SAE"):
        upload(shared["exports"] / "saved_k5", REPO, dry_run=tmp_path / "out")
    with pytest.raises(SystemExit, match="'owner/name'"):
        main(["upload", str(sae_dir), "name-only", "--dry-run", str(tmp_path / "out")])


def test_model_card_without_per_k_or_recorded_levels(tmp_path: Path) -> None:
    cfg = textwrap.dedent(
        f"""
        {{"architecture": "hierarchical_topk", "d_in": {D_IN}, "d_sae": {D_SAE}, "k": {K},
          "metadata": {{"hook_name": "{HOOK}", "model_name": "{MODEL}"}}}}
        """
    )
    sae = HierarchicalTopKSAE.from_dict(json.loads(cfg))
    card = sharing.model_card(sae, REPO, HOOK)
    assert "| hierarchy levels (budgets trained) | not recorded |" in card
    assert "| level weights | not recorded |" in card
    assert "Quality at every budget k" not in card and "TopK exports" not in card
    assert sharing.find_per_k_table(tmp_path) is None


# --- export by threshold as SAELens's "jumprelu" ----------------------------------------------------------------


def threshold_between_values(sae: Any, x: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two neighbouring activations of ``x``: no activation lies within rounding of it."""
    with torch.no_grad():
        values = sae.encode_top_k(x)[0]
    distinct = values[values > 0].double().unique().sort().values
    position = int(quantile * (len(distinct) - 2))
    return float((distinct[position] + distinct[position + 1]) / 2)


def test_jumprelu_export_loaded_by_sae_lens_alone_matches_threshold_serving(tmp_path: Path) -> None:
    """SAELens alone, in a fresh process, loads each export as a ``JumpReLUSAE``; on every token that keeps at most K
    latents its encode/decode/forward equal ``encode(x, threshold=θ)`` and the reconstruction at θ; on the others it
    keeps more than K (no cap), and ``share_over_k`` counts exactly those."""
    trained, plain = make_sae(0), make_sae(1, rescale=False)
    make_sae(2).save_inference_model(tmp_path / "saved_sae")
    saved = load_sae(tmp_path / "saved_sae")
    x = inputs_with_ties(trained)
    sources = {"trained_low": (trained, 0.0), "trained_high": (trained, 0.8), "plain": (plain, 0.5)}
    sources["saved"] = (saved, 0.4)
    thresholds = {}
    for name, (sae, quantile) in sources.items():
        thresholds[name] = threshold_between_values(sae, x, quantile)
        sharing.save_as_jumprelu(sae, tmp_path / name, threshold=thresholds[name], source="in memory")
    loaded, outputs = run_sae_lens_alone(
        {name: {"dir": str(tmp_path / name)} for name in sources}, x, tmp_path, tmp_path
    )
    over_k_seen = False
    for name, (sae, _) in sources.items():
        assert loaded[name] == ["JumpReLUSAE", "jumprelu", None]
        with torch.no_grad():
            ours = {"encode": sae.encode(x, threshold=thresholds[name]), "forward": sae(x, threshold=thresholds[name])}
        theirs_encode = outputs[f"{name}.encode"]
        counts = (theirs_encode > 0).sum(dim=-1)
        within = counts <= K
        assert int(within.sum()) > 0
        assert torch.equal(theirs_encode[within] > 0, ours["encode"][within] > 0)  # the same latents
        torch.testing.assert_close(theirs_encode[within], ours["encode"][within], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs[f"{name}.forward"][within], ours["forward"][within], rtol=1e-5, atol=1e-5)
        assert bool(((ours["encode"] > 0).sum(dim=-1) <= K).all())
        over_k_seen |= bool((~within).any())
        export = sharing.to_jumprelu(sae, thresholds[name])
        assert sharing.share_over_k(export, x, K) == pytest.approx(float((~within).double().mean()))
    assert over_k_seen, "some token must exceed K at a low threshold, or the cap is never exercised"


def test_jumprelu_threshold_is_the_float_below_theta(tmp_path: Path) -> None:
    """JumpReLU keeps ``> threshold``; serving keeps ``>= θ``: an activation exactly at θ is kept by both."""
    sae = make_sae(1, rescale=False)
    x = inputs_with_ties(sae)
    with torch.no_grad():
        value = float(sae.encode_top_k(x)[0][0, 2])  # an activation that occurs: exactly θ
        export = sharing.to_jumprelu(sae, value)
        assert float(export.threshold.max()) < value and float(export.threshold.min()) == float(export.threshold.max())
        assert torch.equal(export.encode(x[:1]) > 0, sae.encode(x[:1], threshold=value) > 0)
    record = export.cfg.metadata.hierarchical_topk_export
    assert record["threshold"] == value and record["K"] == K and record["source_architecture"] == "hierarchical_topk"


def test_save_as_jumprelu_by_mean_l0_records_its_calibration(tmp_path: Path) -> None:
    sae = make_sae(0)
    x = inputs_with_ties(sae)
    path = sharing.save_as_jumprelu(sae, tmp_path / "l0_2", mean_l0=2, activations=x)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    calibration = cfg["metadata"]["hierarchical_topk_export"]["calibration"]
    assert calibration["mean_l0_target"] == 2 and calibration["tokens"] == len(x)
    loaded = SAE.load_from_disk(path)
    with torch.no_grad():
        counts = (loaded.encode(x) > 0).sum(dim=-1).double()
    assert calibration["mean_l0"] == pytest.approx(float(counts.mean()))
    assert float(counts.mean()) == pytest.approx(2, abs=2 / len(x))  # the nearest count a threshold reaches
    assert calibration["share_of_tokens_over_K"] == pytest.approx(float((counts > K).double().mean()))
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "exactly one of threshold and mean_l0"),
        ({"threshold": 0.5, "mean_l0": 2}, "exactly one of threshold and mean_l0"),
        ({"mean_l0": 2}, "mean_l0 needs activations"),
        ({"threshold": -1.0}, "threshold must be a finite number > 0"),
        ({"mean_l0": 99, "activations": x}, r"mean_l0 must be a number in \(0, "),
    ]
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            sharing.save_as_jumprelu(sae, tmp_path / "bad", **settings)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="not an empty directory"):
        sharing.save_as_jumprelu(sae, path, threshold=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_exports_differ_only_at_near_ties(dtype: torch.dtype) -> None:
    """The documented agreement: float32 exports keep the same latents on every token; half-precision exports differ
    only where the k-th and (k+1)-th activations are within 4 eps of each other (folding rounds them differently)."""
    torch.manual_seed(0)
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=64, d_sae=512, k=32))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(512, 1) + 0.5)
    sae = sae.to(dtype)
    x = torch.randn(2000, 64).to(dtype)
    for k in (4, 16):
        with torch.no_grad():
            differ = ((sae.encode(x, k=k) != 0) != (to_topk(sae, k).encode(x) != 0)).any(dim=-1)
            values = sae.encode_top_k(x)[0].float()
        gap = (values[:, k - 1] - values[:, k]) / values[:, k - 1].abs().clamp_min(1e-12)
        if dtype == torch.float32:
            assert not differ.any()
        else:
            assert differ.any() and bool((gap[differ] <= 4 * torch.finfo(dtype).eps).all())
