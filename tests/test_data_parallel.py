"""Data-parallel training on torch.distributed (gloo, CPU): exactness against one process, the torchrun CLI, faults.

The reference for exactness is SAELens's own ``SAETrainer`` in one process on the whole batch; the data-parallel
trainer runs as two real torchrun processes on halves of the same batches (tests/data_parallel_worker.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from sae_lens_hierarchical.distributed import SINGLE_PROCESS, DataParallel

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "data_parallel_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# A dead rank must end the whole job within this many seconds (torchrun's agent notices a dead worker within about
# a second and stops the others; the rest is process teardown on a busy 2-core machine).
FAULT_DEADLINE_S = 90


def _environment() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    """Final states of the same 12 steps: one process on batches of 32, and each of two ranks on 16 rows of them."""
    root = tmp_path_factory.mktemp("data_parallel")
    _run([sys.executable, str(WORKER), str(root / "one")])
    _run([*TORCHRUN, "--nproc-per-node", "2", str(WORKER), str(root / "two")])
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    return load(root / "one" / "rank0.pt"), load(root / "two" / "rank0.pt"), load(root / "two" / "rank1.pt")


def test_two_ranks_of_half_batches_train_the_weights_one_process_trains_on_whole_batches(one_and_two_processes):
    """Weights, after b_dec's mean initialisation, the scaling estimate, 12 Adam steps with AuxK on dead latents.

    Tolerance: the SAE is float64, and the only differences allowed are the order of floating-point sums (a
    gradient summed over 32 tokens vs two sums over 16 averaged by the all-reduce; b_dec's mean and the mean norm
    likewise): ~1e-16 relative per operation, ~1e-13 after 12 steps. A missing reduction (a rank's own dead mask,
    its own mean, its own gradient) moves weights by 1e-4 or more.
    """
    one, rank0, _ = one_and_two_processes
    assert int(rank0["world_size"]) == 2 and int(one["world_size"]) == 1
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert one[name].dtype == torch.float64
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(one["b_dec"], torch.zeros_like(one["b_dec"]))


def test_replicas_stay_bitwise_identical(one_and_two_processes):
    """Every rank applies the same averaged gradients to the same (rank 0's, broadcast) initial weights; the worker
    seeds each rank differently, so equal weights also prove the broadcast."""
    _, rank0, rank1 = one_and_two_processes
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "act_freq_scores", "n_forward_passes_since_fired"):
        assert torch.equal(rank0[name], rank1[name]), name


def test_firing_statistics_count_every_ranks_tokens(one_and_two_processes):
    """Dead-latent counters and firing counts equal one process's exactly, and AuxK did work on dead latents."""
    one, rank0, _ = one_and_two_processes
    assert torch.equal(rank0["n_forward_passes_since_fired"], one["n_forward_passes_since_fired"])
    assert torch.equal(rank0["act_freq_scores"], one["act_freq_scores"])
    assert int(rank0["n_frac_active_samples"]) == int(one["n_frac_active_samples"])
    assert (one["aux_losses"][:4] == 0).all() and (one["aux_losses"][4:] > 0).all()  # latents die after 3 steps
    assert (rank0["aux_losses"][4:] > 0).all()


def test_data_parallel_shares_batches_and_corpus_evenly():
    """Each rank's share of a batch, the same number of steps, disjoint contiguous shares of a corpus."""
    from datasets import Dataset

    from sae_lens_hierarchical.presets import tiny_runner_config

    for training_tokens in (10_000, 10_240):  # 39 whole batches of 256 and a part of one; exactly 40
        cfg = tiny_runner_config(None, training_tokens=training_tokens, train_batch_size_tokens=256)
        rank_cfg = DataParallel(rank=1, world_size=4, local_rank=1).runner_config(cfg)
        assert rank_cfg.train_batch_size_tokens == 64
        one, rank = cfg.to_sae_trainer_config(), rank_cfg.to_sae_trainer_config()
        # SAELens's loop steps until training_tokens samples were seen; its schedules count total_training_steps.
        loop_steps = [math.ceil(c.total_training_samples / c.train_batch_size_samples) for c in (one, rank)]
        assert loop_steps[0] == loop_steps[1] == 40
        assert one.total_training_steps == rank.total_training_steps
    assert SINGLE_PROCESS.runner_config(cfg) is cfg
    with pytest.raises(ValueError, match="train_batch_size_tokens=256 must be divisible by the 3"):
        DataParallel(rank=0, world_size=3, local_rank=0).runner_config(cfg)
    corpus = Dataset.from_dict({"input_ids": list(range(10))})
    shares = [list(DataParallel(rank, 3, rank).shard(corpus)["input_ids"]) for rank in range(3)]
    assert [token for share in shares for token in share] == list(range(10))  # contiguous, in order, disjoint
    assert [len(share) for share in shares] == [4, 3, 3]
    assert DataParallel(0, 2, 1).device("cuda") == "cuda:1" and DataParallel(0, 2, 1).device("cpu") == "cpu"


def _cli(output: Path, cache: Path, *extra: str) -> list[str]:
    return [
        *TORCHRUN,
        "--nproc-per-node",
        "2",
        "-m",
        "sae_lens_hierarchical",
        *extra,
        "--preset",
        "tiny-random",
        "--output-dir",
        str(output),
        "--cache-dir",
        str(cache),
        "--downstream-tokens",
        "0",
    ]


def test_torchrun_train_writes_one_sae_from_every_ranks_share(tmp_path: Path):
    """`torchrun -m sae_lens_hierarchical train`: each rank caches its own share (the LM runs on every rank), rank 0
    alone writes the results directory, and the SAE loads and reports every k."""
    output, cache = tmp_path / "run", tmp_path / "cache"
    result = _run([*_cli(output, cache, "train", "--wandb", "disabled"), "--training-tokens", "20000"])
    assert "Held-out reconstruction at every budget k" in result.stdout
    assert result.stdout.count("SAE saved to") == 1  # only rank 0 reports
    job = json.loads((output / "job.json").read_text())
    assert job["data_parallel_processes"] == 2 and job["training_tokens"] == 20_000
    shares = sorted(re.search(r"-train\d+-(rank\dof2)-", path.name).group(1) for path in cache.glob("*-train*"))
    assert shares == ["rank0of2", "rank1of2"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "run"]  # no scratch directory left
    from sae_lens_hierarchical.loading import load_sae

    sae = load_sae(output / "sae")
    assert torch.isfinite(sae.W_enc).all() and len(json.loads((output / "per_k.json").read_text())["per_k"]) > 1


def _rank_process(torchrun_pid: int, rank: int) -> psutil.Process:
    """The worker process of ``rank`` under a torchrun (children that exit while being read are passed over)."""
    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "sae_lens_hierarchical" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


def _compare_command(output: Path, cache: Path) -> list[str]:
    settings = ["--training-tokens", "150000", "--budgets", "16", "--baselines", "topk", "--checkpoints", "3"]
    return [*_cli(output, cache, "compare"), *settings]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {
        f"{sae.name}/{name}": value for sae in (run / "saes").iterdir() for name, value in _safetensors(sae).items()
    }


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "sae_weights.safetensors")


def test_a_killed_rank_stops_the_job_and_the_rerun_resumes_from_the_last_checkpoint(tmp_path: Path):
    """SIGKILL one rank after the first complete checkpoint: torchrun stops the whole job with an error naming the
    signal (no hang), nothing is written as results; the same command then resumes and ends with the weights of an
    uninterrupted run."""
    cache = tmp_path / "cache"
    uninterrupted = tmp_path / "uninterrupted"
    _run(_compare_command(uninterrupted, cache))

    output = tmp_path / "run"
    checkpoints = tmp_path / ".run.checkpoints"
    job = subprocess.Popen(
        _compare_command(output, cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_environment(), cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("*/checkpoint_complete.json")):
            assert job.poll() is None, "the job ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        _rank_process(job.pid, rank=1).send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        log, _ = job.communicate(timeout=FAULT_DEADLINE_S)
        stopped_after = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "SIGKILL" in log, log[-3000:]
    assert stopped_after < FAULT_DEADLINE_S
    assert not output.exists()  # the results directory appears only when a job succeeds

    resumed = _run(_compare_command(output, cache))
    assert not checkpoints.exists()  # removed once the job succeeded
    reference, weights = _weights(uninterrupted), _weights(output)
    assert sorted(weights) == sorted(reference)
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert "Resuming from" in resumed.stdout + resumed.stderr


def test_a_runner_config_is_refused_under_a_multi_process_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A --config of no embedded preset runs SAELens's runner on the config's corpus, which no rank would share out:
    one clear error (an embedded preset's config runs as that preset, data-parallel too)."""
    from sae_lens_hierarchical import cli
    from sae_lens_hierarchical.presets import tiny_runner_config

    config = tmp_path / "runner_cfg.json"
    streamed = {**tiny_runner_config(None).to_dict(), "dataset_path": "someone/some-corpus", "streaming": True}
    config.write_text(json.dumps(streamed, default=str))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"runs presets \(--preset\)"):
        cli.main(["train", "--config", str(config)])


def test_each_share_is_cached_under_its_own_rows(tmp_path: Path):
    """A rank's cached share holds exactly its rows of the training prefix; a longer prefix moves the rows of rank 1
    (10 sequences: 5..9; 11: 6..10), so it must not reuse the other's cache."""
    from sae_lens_hierarchical.jobs.common import prepare_embedded_activations
    from sae_lens_hierarchical.presets import get_preset

    preset = get_preset("tiny-random")
    model = preset.load_model("cpu")
    sequences = preset.load_token_sequences(model.tokenizer, preset.context_size)
    rank1 = DataParallel(rank=1, world_size=2, local_rank=1)
    directories = []
    for n_train, rows in ((10, range(5, 10)), (11, range(6, 11))):
        tokens = n_train * (preset.context_size - 1)
        activations = prepare_embedded_activations(
            preset, model, 500, tokens, cache_root=tmp_path, progress=False, parallel=rank1
        )
        cached = activations.train.load()[:]["token_ids"].long()
        assert torch.equal(cached, torch.tensor(sequences.select(rows)["input_ids"]))
        directories.append(activations.train.directory)
    assert directories[0] != directories[1]


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_the_rerun_resumes(tmp_path: Path):
    """SIGTERM to rank 1 alone (mid-training, after the first checkpoint): every rank agrees at the next step boundary,
    rank 0 writes one checkpoint there, the job exits non-zero with the resume line and no results; the same command
    then resumes and ends with the weights of an uninterrupted two-rank run."""
    cache = tmp_path / "cache"
    uninterrupted = tmp_path / "uninterrupted"
    _run(_compare_command(uninterrupted, cache))

    output = tmp_path / "run"
    checkpoints = tmp_path / ".run.checkpoints"
    job = subprocess.Popen(
        _compare_command(output, cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_environment(), cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("*/checkpoint_complete.json")):
            assert job.poll() is None, "the job ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        _rank_process(job.pid, rank=1).send_signal(signal.SIGTERM)
        log, _ = job.communicate(timeout=FAULT_DEADLINE_S)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "stopped: stopped by another rank after training step" in log or "stopped by SIGTERM" in log, log[-3000:]
    assert "rerun the same command to resume" in log
    assert not output.exists()
    markers = sorted(
        json.loads(p.read_text())["n_training_steps"] for p in checkpoints.glob("*/checkpoint_complete.json")
    )
    assert len(markers) == 2, markers  # the first periodic checkpoint, and the one at the stop

    resumed = _run(_compare_command(output, cache))
    reference, weights = _weights(uninterrupted), _weights(output)
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert f"step {markers[-1]} of" in resumed.stdout + resumed.stderr
