"""Train with SAELens's runner, save, reload elsewhere (fresh process, offline HF cache), run in hooks."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from safetensors.torch import save_file
from transformer_lens import HookedTransformer

from sae_lens_hierarchical import HierarchicalTopKSAE, load_sae, presets
from sae_lens_hierarchical.evaluation import evaluate_over_k
from tests.conftest import TRAINED_K, TRAINED_LEVELS, TRAINED_WEIGHTS

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKED_BUDGETS = [1, 2, 5, 16]


def run_python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def outputs_at_budgets(sae: HierarchicalTopKSAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = {}
    for k in CHECKED_BUDGETS:
        with sae.use_k(k):
            outputs[f"acts_{k}"] = sae.encode(x).contiguous()
            outputs[f"out_{k}"] = sae(x).contiguous()
    return outputs


def test_runner_output_is_a_loadable_hierarchical_sae(trained_sae_dir: Path) -> None:
    assert {SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME} <= {p.name for p in trained_sae_dir.iterdir()}
    cfg = json.loads((trained_sae_dir / SAE_CFG_FILENAME).read_text())
    assert cfg["architecture"] == "hierarchical_topk"
    assert cfg["k"] == TRAINED_K
    assert cfg["metadata"]["training_architecture_details"]["hierarchy_levels"] == TRAINED_LEVELS
    assert cfg["metadata"]["training_architecture_details"]["hierarchy_weights"] == TRAINED_WEIGHTS
    sae = SAE.load_from_disk(trained_sae_dir)
    assert isinstance(sae, HierarchicalTopKSAE)
    assert sae.k == TRAINED_K


def test_training_learned_nested_reconstructions(trained_sae_dir: Path, held_out_activations: torch.Tensor) -> None:
    """Trained, the SAE explains most variance at K and every larger budget explains more."""
    sae = load_sae(trained_sae_dir)
    results = evaluate_over_k(sae, held_out_activations, ks=list(range(1, TRAINED_K + 1)), progress=False)
    fvus = [r.fvu for r in results]
    assert all(later < earlier for earlier, later in itertools.pairwise(fvus)), fvus
    assert results[-1].explained_variance > 0.7, results[-1]
    assert [r.l0 for r in results] == pytest.approx(list(range(1, TRAINED_K + 1)))
    # An untrained SAE of the same shape is far worse: the runner really trained it.
    untrained = HierarchicalTopKSAE(sae.cfg)
    untrained_k = evaluate_over_k(untrained, held_out_activations, ks=[TRAINED_K], progress=False)[0]
    assert untrained_k.fvu > 2 * results[-1].fvu


def test_reload_in_fresh_process_gives_identical_outputs(trained_sae_dir: Path, tmp_path: Path) -> None:
    x = torch.randn(64, 32) * 3
    save_file({"x": x}, tmp_path / "inputs.safetensors")
    expected = outputs_at_budgets(load_sae(trained_sae_dir), x)
    run_python(
        f"""
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        import sae_lens_hierarchical  # registers "hierarchical_topk"
        from tests.test_end_to_end import outputs_at_budgets
        sae = SAE.load_from_disk({str(trained_sae_dir)!r})
        assert type(sae).__name__ == "HierarchicalTopKSAE", type(sae)
        x = load_file({str(tmp_path / "inputs.safetensors")!r})["x"]
        save_file(outputs_at_budgets(sae, x), {str(tmp_path / "outputs.safetensors")!r})
        """
    )
    from safetensors.torch import load_file

    got = load_file(tmp_path / "outputs.safetensors")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def build_offline_hub_cache(cache_dir: Path, repo_id: str, sae_id: str, sae_dir: Path) -> None:
    """Lay out a Hugging Face hub cache as ``hf_hub_download`` leaves it, without any network."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit / sae_id
    snapshot.mkdir(parents=True)
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME):
        shutil.copy(sae_dir / name, snapshot / name)


def test_from_pretrained_works_offline_from_hub_cache(trained_sae_dir: Path, tmp_path: Path) -> None:
    repo_id, sae_id = "example-org/htopk-tiny", "blocks.1.hook_resid_pre"
    build_offline_hub_cache(tmp_path / "hub", repo_id, sae_id, trained_sae_dir)
    x = torch.randn(32, 32)
    save_file({"x": x}, tmp_path / "inputs.safetensors")
    expected = outputs_at_budgets(load_sae(trained_sae_dir), x)
    run_python(
        f"""
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        import sae_lens_hierarchical
        from tests.test_end_to_end import outputs_at_budgets
        x = load_file({str(tmp_path / "inputs.safetensors")!r})["x"]
        sae = SAE.from_pretrained({repo_id!r}, {sae_id!r})
        assert type(sae).__name__ == "HierarchicalTopKSAE", type(sae)
        save_file(outputs_at_budgets(sae, x), {str(tmp_path / "hub_outputs.safetensors")!r})
        helper = sae_lens_hierarchical.load_sae({repo_id!r}, {sae_id!r}, k=4)
        assert helper.k == 4, helper.k
        """,
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    from safetensors.torch import load_file

    got = load_file(tmp_path / "hub_outputs.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_load_sae_helper_local_paths(trained_sae_dir: Path, tmp_path: Path) -> None:
    sae = load_sae(trained_sae_dir.parent, sae_id=trained_sae_dir.name, k=3)
    assert isinstance(sae, HierarchicalTopKSAE)
    assert sae.k == 3
    with pytest.raises(FileNotFoundError, match=r"no SAE at .*cfg.json does not exist"):
        load_sae(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"k must be an int in 1..K=16 .*got k=17"):
        load_sae(trained_sae_dir, k=17)
    with pytest.raises(ValueError, match="sae_id"):
        load_sae("some-org/some-repo")


@pytest.fixture(scope="module")
def hooked_model(tiny_model: HookedTransformer) -> HookedSAETransformer:
    model = HookedSAETransformer(tiny_model.cfg, tokenizer=tiny_model.tokenizer)
    model.load_state_dict(tiny_model.state_dict())
    return model


def test_hooked_sae_transformer_l0_equals_k_for_every_k(
    trained_sae_dir: Path, hooked_model: HookedSAETransformer
) -> None:
    sae = load_sae(trained_sae_dir)
    tokens = hooked_model.to_tokens(["The cat sat on the mat.", "Sparse autoencoders, at any budget!"])
    acts_name = f"{presets.TINY_HOOK_NAME}.hook_sae_acts_post"
    previous_active = None
    for k in range(1, sae.cfg.k + 1):
        with sae.use_k(k):
            _, cache = hooked_model.run_with_cache_with_saes(tokens, saes=[sae])
        active = cache[acts_name] != 0
        assert (active.sum(-1) == k).all(), f"k={k}: L0 per token {active.sum(-1).tolist()}"
        if previous_active is not None:
            assert (previous_active <= active).all(), f"budget {k - 1} is not nested in budget {k}"
        previous_active = active


def test_run_with_saes_splices_the_level_k_reconstruction(
    trained_sae_dir: Path, hooked_model: HookedSAETransformer
) -> None:
    sae = load_sae(trained_sae_dir)
    tokens = hooked_model.to_tokens(["A hierarchy of budgets."])
    for k in (1, 4, sae.cfg.k):

        def splice(activations: torch.Tensor, hook, k: int = k) -> torch.Tensor:
            return sae.decode(sae.encode(activations, k=k))

        expected = hooked_model.run_with_hooks(tokens, fwd_hooks=[(presets.TINY_HOOK_NAME, splice)])
        with sae.use_k(k):
            logits = hooked_model.run_with_saes(tokens, saes=[sae])
        torch.testing.assert_close(logits, expected)
        with hooked_model.saes(saes=[sae]), sae.use_k(k):
            torch.testing.assert_close(hooked_model(tokens), expected)
    assert not torch.allclose(hooked_model(tokens), expected), "the SAE must be detached after saes()"
