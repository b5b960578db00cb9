"""Pretrained SAEs to HierarchicalTopK: the conversion equals each source kind at k = K before any training, a real
sparsify SAE (written by sparsify's own trainer) goes through, and the fine-tune runs from the CLI.

References: the source SAE's own forward (SAELens's classes, sparsify's ``SparseCoder``), never the converted SAE.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_hierarchical import HierarchicalTopKSAE, HierarchicalTopKTrainingSAE, load_sae, presets
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.conversion import load_sparsify_directory

TINY = presets.get_preset(presets.TINY_MODEL_NAME)
D_IN, D_SAE, K = TINY.d_in, 64, 8


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


def randomised(sae: Any, seed: int = 0) -> Any:
    """Decoder rows of norm 0.3..3 (an unfolded rescaling would decode wrongly), biases off zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=generator) * 2.7 + 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=generator) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=generator) * 0.5)
    return sae


def inputs(n: int = 200, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def assert_equal_at_k(source: Any, converted: HierarchicalTopKTrainingSAE, x: torch.Tensor, **budget: Any) -> None:
    """Source and converted SAE at k = K: the same latents, activations and reconstructions (<= 1e-6 relative)."""
    with torch.no_grad():
        theirs_acts, theirs_out = source.encode(x), source(x)
        ours_acts, ours_out = (
            converted.encode(x, k=converted.cfg.k, **budget),
            converted(x, k=converted.cfg.k, **budget),
        )
    assert torch.equal(ours_acts != 0, theirs_acts != 0)
    assert relative_error(ours_acts, theirs_acts) <= 1e-6
    assert relative_error(ours_out, theirs_out) <= 1e-6


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind", ["inference", "training"])
def test_a_topk_sae_converts_exactly(kind: str, rescale: bool) -> None:
    torch.manual_seed(0)
    if kind == "inference":
        source: Any = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale))
    else:
        source = TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale)
        )
    source = randomised(source)
    source.cfg.metadata.hook_name = TINY.hook_name
    converted = HierarchicalTopKTrainingSAE.from_sae(source, hierarchy_levels=[2, 4, K])
    assert (converted.cfg.k, converted.cfg.levels, converted.threshold) == (K, [2, 4, K], None)
    assert converted.cfg.metadata.hook_name == TINY.hook_name
    record = converted.cfg.metadata.hierarchicalized_from
    assert record["architecture"] == "topk" and record["K"] == K and record["K_from"] == "the source's k"
    assert_equal_at_k(source, converted, inputs())
    with pytest.raises(ValueError, match=rf"a topk SAE's K is its k={K}; got k=4"):
        HierarchicalTopKTrainingSAE.from_sae(source, k=4)


def test_a_saved_sae_lens_directory_with_a_normalisation_converts_exactly(tmp_path: Path) -> None:
    """SAELens's own training of a TopK SAE with ``expected_average_only_in`` (the factor folded into the weights at
    the end, as SAELens saves it); the directory loaded back converts to an SAE that takes raw activations."""
    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations="expected_average_only_in")
    )
    data = (inputs(4000, seed=2) * 30 + 5).split(256)
    trainer_cfg = presets.tiny_runner_config(None, training_tokens=2560).to_sae_trainer_config()
    from dataclasses import replace

    SAETrainer(cfg=replace(trainer_cfg, n_batches_for_norm_estimate=3), sae=sae, data_provider=iter(data)).fit()
    sae.save_inference_model(tmp_path / "saved")
    saved_cfg = json.loads((tmp_path / "saved" / "cfg.json").read_text())
    source = SAE.load_from_disk(tmp_path / "saved")
    converted = HierarchicalTopKTrainingSAE.from_sae(source)
    assert converted.cfg.normalize_activations == "none"
    x = inputs(300, seed=3) * 30 + 5  # raw activations, in the units the source was trained on
    assert_equal_at_k(source, converted, x)
    assert saved_cfg["normalize_activations"] in ("none", "expected_average_only_in")


def test_a_saved_hierarchical_sae_converts_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = randomised(HierarchicalTopKTrainingSAE.from_sae(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))))
    trained.save_inference_model(tmp_path / "htopk")
    source = load_sae(tmp_path / "htopk")
    assert isinstance(source, HierarchicalTopKSAE)
    assert_equal_at_k(source, HierarchicalTopKTrainingSAE.from_sae(source), inputs())


def batchtopk_source(tmp_path: Path) -> JumpReLUSAE:
    """A BatchTopK SAE trained a few steps by SAELens's own trainer, saved as SAELens saves it (JumpReLU)."""
    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, topk_threshold_lr=0.5))
    trainer_cfg = presets.tiny_runner_config(None, training_tokens=2560).to_sae_trainer_config()
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(inputs(4000, seed=4).split(256))).fit()
    sae.save_inference_model(tmp_path / "batchtopk")
    source = SAE.load_from_disk(tmp_path / "batchtopk")
    assert isinstance(source, JumpReLUSAE) and float(source.threshold.min()) == float(source.threshold.max()) > 0
    return source


def test_a_batchtopk_sae_converts_exactly_at_its_threshold(tmp_path: Path) -> None:
    source = batchtopk_source(tmp_path)
    x = inputs(500, seed=5)
    with torch.no_grad():
        counts = (source.encode(x) > 0).sum(dim=-1)
    converted = HierarchicalTopKTrainingSAE.from_sae(source, k=12)
    record = converted.cfg.metadata.hierarchicalized_from
    assert record["K_from"] == "given" and record["threshold"] == float(source.threshold[0])
    assert converted.threshold is not None and converted.threshold > record["threshold"]  # the next float above θ
    within = counts <= 12
    assert 0 < int(within.sum()) < len(x), "tokens on both sides of the K cap"
    assert_equal_at_k(source, converted, x[within])
    with torch.no_grad():  # over the cap: the K largest of the source's activations
        over = x[~within]
        kept = converted.encode(over, k=12)
        theirs = source.encode(over)
    assert bool(((kept > 0).sum(dim=-1) == 12).all())
    assert torch.allclose(kept.sort(dim=-1, descending=True).values[:, :12], theirs.topk(12).values, atol=1e-6)

    chosen = HierarchicalTopKTrainingSAE.from_sae(source, calibration_activations=x, l0_percentile=90)
    expected_k = int(torch.tensor(counts, dtype=torch.float64).quantile(0.9).ceil())
    assert chosen.cfg.k == expected_k
    assert chosen.cfg.metadata.hierarchicalized_from["K_from"].startswith("L0 percentile 90 of 500 calibration tokens")


@pytest.mark.parametrize(
    ("source", "settings", "message"),
    [
        ("standard", {}, r"cannot convert a 'standard' SAE \(StandardSAE\); convertible: topk"),
        ("per_latent", {"k": 8}, "a threshold per latent"),
        ("jumprelu", {}, "a jumprelu SAE has no K: pass k"),
        ("jumprelu", {"k": 65}, r"K must be an int in 1\.\.d_sae=64; got k=65"),
        ("layer_norm", {}, r"normalize_activations='layer_norm'"),
    ],
)
def test_sources_that_do_not_convert_get_one_clear_error(source: str, settings: dict[str, Any], message: str) -> None:
    if source == "standard":
        sae: Any = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    elif source == "layer_norm":
        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations="layer_norm"))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
        with torch.no_grad():
            sae.threshold.fill_(0.5)
            if source == "per_latent":
                sae.threshold[3] = 0.7
    with pytest.raises(ValueError, match=message):
        HierarchicalTopKTrainingSAE.from_sae(sae, **settings)


@pytest.fixture(scope="module")
def sparsify_sae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TopK SAE trained 8 steps by sparsify's own ``Trainer`` (on a tiny random GPT-2 of width 32: sparsify trains on
    Hugging Face models), saved by it in its own format."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU
    sparsify = pytest.importorskip("sparsify")
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("sparsify")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=D_IN, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    data = Dataset.from_dict({"input_ids": torch.randint(0, 64, (64, 32)).tolist()}).with_format("torch")
    cfg = sparsify.TrainConfig(
        sparsify.SparseCoderConfig(num_latents=D_SAE, k=K),
        batch_size=8,
        layers=[0],
        save_dir=str(root),
        run_name="tiny",
        log_to_wandb=False,
    )
    sparsify.Trainer(cfg, data, model).fit()
    return root / "tiny" / "h.0"


def test_a_sparsify_sae_loads_and_converts_exactly(sparsify_sae: Path) -> None:
    from sparsify import SparseCoder

    reference = SparseCoder.load_from_disk(sparsify_sae)
    x = inputs(300, seed=6)
    with torch.no_grad():
        theirs = reference(x).sae_out
    source = load_sparsify_directory(sparsify_sae)
    assert (source.cfg.k, source.cfg.d_sae, source.cfg.apply_b_dec_to_input) == (K, D_SAE, True)
    converted = HierarchicalTopKTrainingSAE.from_sae(source)
    with torch.no_grad():
        assert relative_error(source(x), theirs) <= 1e-6
        assert relative_error(converted(x, k=K), theirs) <= 1e-6


def test_hierarchicalize_fine_tunes_a_sparsify_sae_from_the_cli(sparsify_sae: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    main(
        [
            "hierarchicalize",
            str(sparsify_sae),
            "--preset",
            TINY.name,
            "--training-tokens",
            "2560",
            "--eval-tokens",
            "1000",
            "--downstream-tokens",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output-dir",
            str(output),
        ]
    )
    sae = load_sae(output / "sae")
    assert isinstance(sae, HierarchicalTopKSAE) and sae.cfg.k == K
    record = json.loads((output / "sae" / "cfg.json").read_text())["metadata"]["hierarchicalized_from"]
    assert record["source"] == "h.0" and record["format"] == "sparsify" and record["fine_tuning_tokens"] == 2560
    # A fine-tune starts from trained weights: the preset's from-scratch rate (3e-3) would wreck them in a few Adam
    # steps (measured at the preset's size: FVU at K 0.033 -> 2.3 in 58 steps), so it runs at a 40th of it.
    assert record["fine_tuning_lr"] == pytest.approx(3e-3 / 40)
    assert record["files"] == {
        name: hashlib.sha256((sparsify_sae / name).read_bytes()).hexdigest() for name in ("cfg.json", "sae.safetensors")
    }
    assert str(tmp_path) not in (output / "sae" / "cfg.json").read_text(), "no machine path in the record"
    rows = json.loads((output / "per_k.json").read_text())["per_k"]
    assert [row["k"] for row in rows] == [1, 2, 4, 8]


def test_a_fine_tune_at_zero_learning_rate_returns_the_source(tmp_path: Path) -> None:
    """Conversion, the scaling of the weights into the trainer's units and back, b_dec's initialisation and saving
    change nothing: fine-tuned with lr 0 under the preset's ``expected_average_only_in``, the result is the source."""
    torch.manual_seed(0)
    source = randomised(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)))
    source.cfg.metadata.model_name, source.cfg.metadata.hook_name = TINY.model_name, TINY.hook_name
    source.fold_W_dec_norm()
    source.save_model(tmp_path / "source")
    main(
        [
            "hierarchicalize",
            str(tmp_path / "source"),
            "--training-tokens",
            "1024",
            "--set",
            "lr=0",
            "--set",
            "sae.normalize_activations=expected_average_only_in",
            "--set",
            "sae.b_dec_init=mean",
            "--eval-tokens",
            "1000",
            "--downstream-tokens",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    fine_tuned = load_sae(tmp_path / "out" / "sae")
    x = inputs()
    with torch.no_grad():
        assert relative_error(fine_tuned(x, k=K), source(x)) <= 1e-5
        assert relative_error(fine_tuned.encode(x, k=K), source.encode(x)) <= 1e-5


def test_bad_sources_are_refused_before_any_work(tmp_path: Path) -> None:
    wide = TopKSAE(TopKSAEConfig(d_in=D_IN + 1, d_sae=D_SAE, k=K))
    wide.save_model(tmp_path / "wide")
    narrow = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    narrow.save_model(tmp_path / "narrow")
    common = ["--preset", TINY.name, "--training-tokens", "1024", "--cache-dir", str(tmp_path / "cache")]
    for arguments, message in [
        ([str(tmp_path / "wide")], r"d_in=33 does not match preset 'tiny-random'"),
        ([str(tmp_path / "narrow"), "--set", "sae.d_sae=128"], r"the source SAE fixes \['sae.d_sae'\]"),
        ([str(tmp_path / "narrow"), "--k", "4"], r"a topk SAE's K is its k=8; got k=4"),
        ([str(tmp_path / "missing")], "no SAE at"),
    ]:
        with pytest.raises(SystemExit, match=message):
            main(["hierarchicalize", *arguments, *common, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists(), "refused before any work"


def test_compare_init_from_starts_the_hierarchical_sae_from_the_source(tmp_path: Path) -> None:
    """``compare --init-from``: the suite's HierarchicalTopK SAE starts from the converted source, in the units of the
    scaling factor the suite's trainer estimates from the same batches: at lr 0 it ends as the source; the suite
    takes the source's width and K, and job.json names the source without a machine path."""
    torch.manual_seed(0)
    source = randomised(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)))
    source.cfg.metadata.model_name, source.cfg.metadata.hook_name = TINY.model_name, TINY.hook_name
    source.fold_W_dec_norm()
    source.save_model(tmp_path / "source")
    output = tmp_path / "suite"
    main(
        [
            "compare",
            "--preset",
            TINY.name,
            "--init-from",
            str(tmp_path / "source"),
            "--baselines",
            "topk",
            "--budgets",
            "4",
            "--training-tokens",
            "2048",
            "--set",
            "lr=0",
            "--set",
            "sae.normalize_activations=expected_average_only_in",
            "--eval-tokens",
            "1000",
            "--downstream-tokens",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output-dir",
            str(output),
        ]
    )
    assert sorted(p.name for p in (output / "saes").iterdir()) == [f"htopk-k{K}", "topk-k4", f"topk-k{K}"]
    fine_tuned = load_sae(output / "saes" / f"htopk-k{K}")
    assert (fine_tuned.cfg.d_sae, fine_tuned.cfg.k) == (D_SAE, K)
    x = inputs()
    with torch.no_grad():
        assert relative_error(fine_tuned(x, k=K), source(x)) <= 1e-5
    job = json.loads((output / "job.json").read_text())
    assert job["init_from"]["source"] == "source" and str(tmp_path) not in json.dumps(job)
    assert job["init_from"]["fine_tuning_lr"] == 0  # --set lr wins over the fine-tune default
    saved = json.loads((output / "saes" / f"htopk-k{K}" / "cfg.json").read_text())["metadata"]
    assert saved["hierarchicalized_from"]["source"] == "source" and saved["hook_name"] == TINY.hook_name
