"""Crashes and bad inputs as a user meets them: SIGKILLed training, saves and caches; concurrent caches; bad tensors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_hierarchical import (
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    load_sae,
    presets,
)
from sae_lens_hierarchical.data.activation_cache import ActivationCacheKey, hook_activations, open_cache
from sae_lens_hierarchical.jobs import CHECKPOINT_MARKER, latest_checkpoint, run_comparison_job

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = presets.get_preset(presets.TINY_MODEL_NAME)


def start_python(script: str, *args: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=environment,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(process: subprocess.Popen[str], ready: object, timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if process.poll() is not None:
            pytest.fail(f"process ended before it could be killed: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting to kill the process")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("sae_class", "cfg_class"),
    [
        (HierarchicalTopKSAE, HierarchicalTopKSAEConfig),
        (HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig),
    ],
)
def test_wrong_inputs_are_refused_with_their_shape_or_dtype(sae_class: type, cfg_class: type) -> None:
    sae = sae_class(cfg_class(d_in=8, d_sae=32, k=4))
    with pytest.raises(ValueError, match=r"last dimension d_in=8; got shape \(5, 7\)"):
        sae.encode(torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"last dimension d_in=8; got shape \(2, 3, 9\)"):
        sae(torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match=r"floating-point tensor .* got torch.int64"):
        sae.encode(torch.zeros(5, 8, dtype=torch.long))
    # float64 input is accepted and computed in the SAE's dtype, as in SAELens.
    assert sae.encode(torch.randn(5, 8, dtype=torch.float64)).dtype == torch.float32


def test_diverged_training_stops_before_the_weights_change() -> None:
    from sae_lens.saes.sae import TrainStepInput

    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with torch.no_grad():
        sae.W_dec.fill_(1e30)  # finite weights whose reconstruction error overflows
    before = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
    step = TrainStepInput(
        sae_in=torch.randn(16, 8), coefficients={}, dead_neuron_mask=None, n_training_steps=7, is_logging_step=False
    )
    with pytest.raises(
        ValueError, match=r"non-finite loss \((inf|nan)\) at training step 7, hook 'blocks.0.hook_resid_post'"
    ):
        sae.training_forward_pass(step)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, before[name]), name


SAVE_AND_HANG = """
import sys, time
import safetensors.torch
import sae_lens.saes.sae as sae_module
import torch
from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig

def half_written(tensors, filename, metadata=None):
    safetensors.torch.save_file(tensors, filename, metadata)
    with open(filename, "r+b") as handle:
        handle.truncate(100)
    print("writing", flush=True)
    time.sleep(120)

sae_module.save_file = half_written
torch.manual_seed(1)
sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
getattr(sae, sys.argv[2])(sys.argv[1])
"""


@pytest.mark.parametrize("method", ["save_inference_model", "save_model"])
def test_save_killed_midway_leaves_the_previous_version_loadable(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    previous = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    getattr(previous, method)(tmp_path)
    before = load_file(tmp_path / "sae_weights.safetensors")
    process = start_python(SAVE_AND_HANG, str(tmp_path), method)
    assert process.stdout is not None
    kill_when(process, lambda: process.stdout.readline().strip() == "writing")  # type: ignore[union-attr]
    after = load_file(tmp_path / "sae_weights.safetensors")
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
    if method == "save_inference_model":
        assert isinstance(load_sae(tmp_path), HierarchicalTopKSAE)


FILL_CACHE = """
import sys, time
from sae_lens_hierarchical import presets
from sae_lens_hierarchical.data import activation_cache
from sae_lens_hierarchical.data.activation_cache import ActivationCacheKey, cache_activations

slow = len(sys.argv) > 2
if slow:  # pause after each shard so a test can kill the process between shards
    original = activation_cache.save_dataset_atomically
    def save_then_pause(dataset, target):
        original(dataset, target)
        print("saved", target.name, flush=True)
        time.sleep(30)
    activation_cache.save_dataset_atomically = save_then_pause
key = ActivationCacheKey(presets.TINY_MODEL_NAME, presets.TINY_HOOK_NAME, "zipf-concurrent", 32, 48)
sequences = presets.tiny_token_dataset(48, 32, seed=5)
cache = cache_activations(presets.tiny_random_model(), sequences, key, sys.argv[1], shard_sequences=8, progress=False)
print("done", cache.directory, flush=True)
"""


def expected_cache_contents() -> tuple[ActivationCacheKey, torch.Tensor]:
    key = ActivationCacheKey(presets.TINY_MODEL_NAME, presets.TINY_HOOK_NAME, "zipf-concurrent", 32, 48)
    tokens = torch.tensor(presets.tiny_token_dataset(48, 32, seed=5)["input_ids"])
    return key, hook_activations(presets.tiny_random_model(), tokens, key.hook_name)


def test_two_processes_filling_one_cache_agree_and_leave_it_whole(tmp_path: Path) -> None:
    processes = [start_python(FILL_CACHE, str(tmp_path)) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.startswith("done")
    assert outputs[0][0] == outputs[1][0], "both processes must return the same cache"
    key, expected = expected_cache_contents()
    cache = open_cache(tmp_path, key)
    assert cache is not None
    torch.testing.assert_close(cache.load()[:][key.hook_name], expected)


def test_cache_fill_killed_between_shards_resumes_and_is_complete(tmp_path: Path) -> None:
    key, expected = expected_cache_contents()
    process = start_python(FILL_CACHE, str(tmp_path), "slow")
    assert process.stdout is not None
    kill_when(process, lambda: process.stdout.readline().startswith("saved shard_00001"))  # type: ignore[union-attr]
    assert open_cache(tmp_path, key) is None, "a killed fill must not look complete"
    finished = start_python(FILL_CACHE, str(tmp_path))
    _, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr[-3000:]
    cache = open_cache(tmp_path, key)
    assert cache is not None
    torch.testing.assert_close(cache.load()[:][key.hook_name], expected)


COMPARE_SLOWLY = """
import sys, time
from pathlib import Path
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens_hierarchical import presets
from sae_lens_hierarchical.jobs import run_comparison_job

original_step = SAETrainer.step
def slow_step(self, batch):
    time.sleep(0.02)
    return original_step(self, batch)
SAETrainer.step = slow_step
run_comparison_job(presets.get_preset(presets.TINY_MODEL_NAME), Path(sys.argv[1]), budgets=[4], baselines=("topk",),
                   overrides={"sae.d_sae": 64, "sae.k": 8}, training_tokens=25_600, eval_tokens=1000,
                   downstream_tokens=0, cache_root=Path(sys.argv[2]), progress=False, n_checkpoints=4)
"""

COMPARISON = {
    "budgets": [4],
    "baselines": ("topk",),
    "overrides": {"sae.d_sae": 64, "sae.k": 8},
    "training_tokens": 25_600,
    "eval_tokens": 1000,
    "downstream_tokens": 0,
    "progress": False,
}


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    run_comparison_job(TINY, tmp_path / "uninterrupted", cache_root=cache, **COMPARISON)  # type: ignore[arg-type]

    output = tmp_path / "resumed"
    checkpoints = tmp_path / ".resumed.checkpoints"
    process = start_python(COMPARE_SLOWLY, str(output), str(cache))
    kill_when(process, lambda: any(checkpoints.glob(f"*/{CHECKPOINT_MARKER}")))
    assert not output.exists(), "a killed job must not leave a results directory"
    assert list(tmp_path.glob(".resumed.partial-*")), "the killed job's scratch directory is still there"

    from sae_lens.training.sae_trainer import SAETrainer

    steps: list[int] = []
    original_step = SAETrainer.step

    def counting_step(self: SAETrainer, batch: torch.Tensor) -> object:
        steps.append(1)
        return original_step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", counting_step)
    run_comparison_job(TINY, output, cache_root=cache, n_checkpoints=4, **COMPARISON)  # type: ignore[arg-type]
    total_steps = 3 * 25_600 // TINY.train_batch_size_tokens  # three SAEs
    assert 0 < len(steps) < total_steps, "the rerun must resume, not start over"
    for name in ("htopk-k8", "topk-k4", "topk-k8"):
        resumed = load_file(output / "saes" / name / "sae_weights.safetensors")
        reference = load_file(tmp_path / "uninterrupted" / "saes" / name / "sae_weights.safetensors")
        for tensor in reference:
            torch.testing.assert_close(resumed[tensor], reference[tensor], rtol=0, atol=0)
    assert not checkpoints.exists(), "checkpoints are removed once the job has succeeded"
    assert not list(tmp_path.glob(".resumed.partial-*")), "the next job removes a dead job's scratch directory"


def test_checkpoint_of_other_settings_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "1024"
    checkpoint.mkdir()
    (checkpoint / CHECKPOINT_MARKER).write_text('{"n_training_steps": 4, "settings": {"seed": 1}}')
    with pytest.raises(ValueError, match="different settings; delete"):
        latest_checkpoint(tmp_path, {"seed": 2})
    assert latest_checkpoint(tmp_path, {"seed": 1}) == checkpoint
    (tmp_path / "2048").mkdir()  # killed while writing: no marker, ignored
    assert latest_checkpoint(tmp_path, {"seed": 1}) == checkpoint


def test_a_refused_checkpoint_names_what_changed(tmp_path: Path) -> None:
    """A resume refused for different settings says which fields differ, a field the marker lacks included (a config
    field added by a newer version), so the user can tell a real change from an upgrade."""
    checkpoint = tmp_path / "1024"
    checkpoint.mkdir()
    written = {"runner": {"lr": 0.1, "sae": {"k": 8}}, "seed": 1}
    (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps({"n_training_steps": 4, "settings": written}))
    now = {"runner": {"lr": 0.2, "sae": {"k": 8, "served_k": None}}, "seed": 1}
    with pytest.raises(ValueError) as refused:
        latest_checkpoint(tmp_path, now)
    message = str(refused.value)
    assert "runner.lr: 0.1 -> 0.2" in message
    assert "runner.sae.served_k: <absent> -> None" in message
    assert "seed" not in message.split("what differs:", 1)[1]  # only what differs is named


def test_a_checkpoint_differing_only_in_per_run_fields_resumes(tmp_path: Path) -> None:
    """Fields that do not change what is trained (a device, an output path), at any depth, may differ between a run and
    its resumption, including a marker written when such a field was still recorded; any other field is refused."""
    from sae_lens_hierarchical.jobs.overrides import PER_RUN_FIELDS

    checkpoint = tmp_path / "1024"
    checkpoint.mkdir()
    written = {"runner": {"lr": 0.1, "device": "cuda", "output_path": None, "sae": {"device": "cuda", "k": 8}}}
    (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps({"n_training_steps": 4, "settings": written}))
    per_run = [f"runner.{name}" for name in PER_RUN_FIELDS]
    now = {"runner": {"lr": 0.1, "sae": {"device": "cpu", "k": 8}}}
    assert latest_checkpoint(tmp_path, now, per_run) == checkpoint
    with pytest.raises(ValueError, match="different settings; delete"):
        latest_checkpoint(tmp_path, {"runner": {"lr": 0.1, "sae": {"device": "cpu", "k": 16}}}, per_run)
    with pytest.raises(ValueError, match="different settings; delete"):
        latest_checkpoint(tmp_path, now)  # nothing ignored: the devices differ


@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in", "covariance_whitening"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path: Path, normalize: str) -> None:
    """Every normalisation the training accepts: a rerun from the first checkpoint ends bitwise where the run that went
    on did (the batches its statistics were estimated on are skipped as the uninterrupted run consumed them)."""
    import shutil

    from sae_lens_hierarchical.jobs import SuiteMember, prepare_embedded_activations, train_suite

    model = TINY.load_model("cpu")
    overrides = {"d_sae": 64, "k": 8, "normalize_activations": normalize}
    cfg = TINY.runner_config(None, training_tokens=12_800, sae_overrides=overrides, n_batches_for_norm_estimate=4)
    members = [
        SuiteMember("htopk", "hierarchical", {}, [8]),
        SuiteMember("topk", "topk_fixed", {"hierarchy_levels": [8]}, [8]),
    ]
    activations = prepare_embedded_activations(TINY, model, 1000, 12_800, cache_root=tmp_path / "cache", progress=False)
    checkpoints = tmp_path / "checkpoints"
    full = train_suite(
        cfg, members, model, activations, tmp_path / "full", seed=1, checkpoint_dir=checkpoints, n_checkpoints=3
    )
    complete = sorted(checkpoints.glob(f"*/{CHECKPOINT_MARKER}"), key=lambda marker: int(marker.parent.name))
    assert len(complete) >= 2
    for later in complete[1:]:
        shutil.rmtree(later.parent)  # as if the run had died after its first checkpoint
    resumed = train_suite(
        cfg, members, model, activations, tmp_path / "resumed", seed=1, checkpoint_dir=checkpoints, n_checkpoints=3
    )
    for name in ("htopk", "topk"):
        ours, reference = (load_file(paths[name] / "sae_weights.safetensors") for paths in (resumed, full))
        for tensor in reference:
            torch.testing.assert_close(ours[tensor], reference[tensor], rtol=0, atol=0, msg=f"{name}.{tensor}")


# --- preemption: SIGTERM ---------------------------------------------------------------------------------------

COMPARE_CLI_SLOWLY = """
import sys, time
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens_hierarchical.cli import main
from sae_lens_hierarchical.data import activation_cache
from sae_lens_hierarchical.evaluation import metrics

where = sys.argv[3]
original_step, original_hook, original_evaluate = SAETrainer.step, activation_cache.hook_activations, metrics._evaluate
def slow_step(self, batch):
    print("step", flush=True); time.sleep(0.03)
    return original_step(self, batch)
def slow_hook(*args, **kwargs):
    print("caching", flush=True); time.sleep(0.3)
    return original_hook(*args, **kwargs)
def slow_evaluate(*args, **kwargs):
    print("evaluating", flush=True); time.sleep(1.0)
    return original_evaluate(*args, **kwargs)
SAETrainer.step = slow_step
if where == "caching":
    activation_cache.hook_activations = slow_hook
if where == "evaluation":
    metrics._evaluate = slow_evaluate
main(["compare", "--preset", "tiny-random", "--budgets", "4", "--baselines", "topk", "--set", "sae.d_sae=64",
      "--set", "sae.k=8", "--training-tokens", "25600", "--eval-tokens", "1000", "--downstream-tokens", "0",
      "--checkpoints", sys.argv[4], "--cache-dir", sys.argv[2], "--output-dir", sys.argv[1]])
"""


def terminate_when(process: subprocess.Popen[str], line: str, count: int = 1, timeout: float = 180) -> str:
    """SIGTERM ``process`` once it has printed ``line`` ``count`` times; return its stderr after it exits."""
    assert process.stdout is not None
    seen, deadline = 0, time.monotonic() + timeout
    while seen < count:
        text = process.stdout.readline()
        if not text and process.poll() is not None:
            pytest.fail(f"process ended before the signal: {process.communicate()[1][-3000:]}")
        seen += text.strip() == line
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {line!r}")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    return stderr


@pytest.mark.parametrize(
    ("where", "line", "count", "n_checkpoints"),
    [
        ("caching", "caching", 1, "0"),
        ("training", "step", 20, "0"),
        ("checkpoint", "step", 33, "2"),  # 3 SAEs a step: mid-run, right after the first checkpoint of 2
        ("evaluation", "evaluating", 1, "0"),
    ],
)
def test_sigterm_stops_cleanly_and_the_rerun_ends_as_the_uninterrupted_run(
    tmp_path: Path, where: str, line: str, count: int, n_checkpoints: str
) -> None:
    """``compare`` gets SIGTERM while caching, mid-training, after a checkpoint write, or while evaluating: it exits
    non-zero with one line saying how to resume, leaves no results directory, and the same command run again ends with
    the uninterrupted run's weights and report, bitwise."""
    cache, output = tmp_path / "cache", tmp_path / "out"
    process = start_python(COMPARE_CLI_SLOWLY, str(output), str(cache), where, n_checkpoints)
    stderr = terminate_when(process, line, count)
    assert process.returncode not in (0, -signal.SIGTERM), stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("stopped:") and "rerun the same command" in last_line, stderr[-2000:]
    assert not output.exists(), "a stopped job leaves no results directory"
    if where in ("training", "checkpoint"):
        assert list((tmp_path / ".out.checkpoints").glob(f"*/{CHECKPOINT_MARKER}")), "a checkpoint at the stop"
    rerun = start_python(COMPARE_CLI_SLOWLY, str(output), str(cache), "none", n_checkpoints)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    reference = tmp_path / "reference"
    run_comparison_job(TINY, reference, cache_root=cache, **COMPARISON)  # type: ignore[arg-type]
    for name in ("htopk-k8", "topk-k4", "topk-k8"):
        ours = load_file(output / "saes" / name / "sae_weights.safetensors")
        theirs = load_file(reference / "saes" / name / "sae_weights.safetensors")
        for tensor in theirs:
            torch.testing.assert_close(ours[tensor], theirs[tensor], rtol=0, atol=0, msg=f"{where}: {name}.{tensor}")
    assert not (tmp_path / ".out.checkpoints").exists()


TRAIN_CLI_SLOWLY = """
import sys, time
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens_hierarchical.cli import main

original_step = SAETrainer.step
def slow_step(self, batch):
    print("step", flush=True); time.sleep(0.03)
    return original_step(self, batch)
SAETrainer.step = slow_step
main(["train", "--preset", "tiny-random", "--set", "sae.d_sae=64", "--set", "sae.k=8", "--training-tokens", "25600",
      "--eval-tokens", "1000", "--downstream-tokens", "0", "--wandb", "disabled", "--cache-dir", sys.argv[2],
      "--output-dir", sys.argv[1]])
"""


def test_sigterm_during_train_checkpoints_and_the_rerun_resumes(tmp_path: Path) -> None:
    """``train`` (SAELens's runner) gets SIGTERM mid-training: a checkpoint at the step boundary, one line, no results
    directory; the rerun resumes from it (SAELens's resume: weights, optimizer and schedule, trainer state, the
    activation store fast-forwarded) and finishes. Not bitwise: SAELens's store keeps no mixing-buffer state, so the
    batches after the resume are drawn differently (compare's own trainer resumes bitwise)."""
    cache, output = tmp_path / "cache", tmp_path / "out"
    process = start_python(TRAIN_CLI_SLOWLY, str(output), str(cache))
    stderr = terminate_when(process, "step", 40)
    assert process.returncode not in (0, -signal.SIGTERM), stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("stopped:") and "rerun the same command" in stderr
    assert not output.exists()
    markers = list((tmp_path / ".out.checkpoints").glob(f"*/{CHECKPOINT_MARKER}"))
    assert len(markers) == 1
    steps_done = json.loads(markers[0].read_text())["n_training_steps"]
    assert 40 <= steps_done < 100
    rerun = start_python(TRAIN_CLI_SLOWLY, str(output), str(cache))
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert f"Resuming from {markers[0].parent}" in stdout
    assert stdout.count("step") < 100 + 5 - steps_done + 1, "the rerun continued, it did not start over"
    sae = load_sae(output / "sae")
    assert all(bool(torch.isfinite(parameter).all()) for parameter in sae.parameters())
    assert not (tmp_path / ".out.checkpoints").exists()


def test_a_stop_request_ends_a_job_at_its_next_safe_point() -> None:
    """Inside ``stop_on_signals`` a SIGTERM is only a request: the job goes on until it asks, then stops with the
    resume line; the previous handler comes back afterwards."""
    from sae_lens_hierarchical.preemption import Preempted, current_request, stop_if_requested, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped by SIGTERM: rerun to go on"), stop_on_signals() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and current_request() is request  # the process is still here
        stop_if_requested("rerun to go on")
    assert signal.getsignal(signal.SIGTERM) is before
    assert not current_request().requested


def test_a_full_disk_during_a_save_leaves_the_previous_sae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while the weights are written: the OS error reaches the caller, no partial or staging file is left, and
    the SAE saved before still loads with its own weights."""
    import errno

    from sae_lens.saes import sae as sae_module

    torch.manual_seed(0)
    sae = HierarchicalTopKTrainingSAE(HierarchicalTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    sae.save_inference_model(tmp_path / "sae")
    before = {path.name: path.read_bytes() for path in (tmp_path / "sae").iterdir()}
    real_save_file = sae_module.save_file

    def disk_full(tensors: dict, filename: str, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(b"partial")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sae_module, "save_file", disk_full)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    with pytest.raises(OSError, match="No space left"):
        sae.save_inference_model(tmp_path / "sae")
    monkeypatch.setattr(sae_module, "save_file", real_save_file)
    assert {path.name: path.read_bytes() for path in (tmp_path / "sae").iterdir()} == before
    assert isinstance(load_sae(tmp_path / "sae"), HierarchicalTopKSAE)
