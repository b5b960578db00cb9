"""The gemma-2-2b preset at its real width on this machine: LM forward to the hook, SAE training step, peak memory.

The model is TransformerLens's Gemma-2 2B architecture with random weights, its first 13 blocks (all that the preset's
hook ``blocks.12.hook_resid_post`` reads; ``gemma_2_2b_random_weights``); the SAE is the preset's own training SAE
(d_in 2,304, d_sae 65,536, K = 128, its normalisation and b_dec init, fp32) with Adam at the preset's learning rate.
What ``tests/test_gemma_2_2b_full_width.py`` runs end to end, timed in parts:

- build: constructing the model (empty matrices, then drawn once);
- LM forward: ``run_with_cache`` of ``[4, 128]`` token ids stopping after block 12, as SAELens's activation store
  calls it (``hook_activations``), per token;
- SAE step: ``benchmarks/bench_step_rows.py``'s body of SAELens's ``_train_step`` (``training_forward_pass``, firing
  statistics, backward, gradient clipping, Adam, ``zero_grad``) on a ``[tokens, 2304]`` batch at the
  activation-normalised scale, at 512 tokens (the test's batch) and 4,096 (the preset's), with no dead latents
  (SAELens marks none in a run's first 1,000 steps) and with 10% dead (AuxK running);
- peak RSS (``ru_maxrss``): each phase (the model; the SAE at 512 tokens; the SAE at 4,096 tokens) runs in a fresh
  process, so that its peak is its own, and also reports the process's resident size after imports. Model and SAE
  together, as in the test, are estimated as that size plus both phases' growths over it: apart, the benchmark never
  needs both in memory at once (on a shared 24 GiB machine, an earlier version that held both was OOM-killed).

    python benchmarks/gemma_2_2b_full_width.py [--repeats 2] [--output-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_step_rows import SAELensStep, Sizes, Step
from tqdm import tqdm

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE
from sae_lens_hierarchical.data import hook_activations
from sae_lens_hierarchical.data.models import gemma_2_2b_random_weights
from sae_lens_hierarchical.presets import Preset, get_preset
from sae_lens_hierarchical.testing import tiny_token_dataset

PRESET = "gemma-2-2b"
CONTEXT, PROMPTS = 128, 4  # one LM forward of the test: 4 sequences of 128 tokens
DEAD_FRACTIONS = (0.0, 0.1)


def peak_rss_gib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def seconds_of(fn: Callable[[], Any], warmup: int, repeats: int, bar: tqdm) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    times = []
    for call in range(warmup + repeats):
        started = time.perf_counter()
        fn()
        if call >= warmup:
            times.append(time.perf_counter() - started)
        bar.update()
    return times


class PresetStep(SAELensStep):
    """bench_step_rows's SAELens step body on the preset's own training SAE and Adam learning rate."""

    def __init__(self, preset: Preset, tokens: int, dead_fraction: float):
        Step.__init__(self, Sizes(preset.d_in, preset.d_sae, tokens, (preset.k,)), "cpu", dead_fraction)
        torch.manual_seed(0)
        self.sae = HierarchicalTopKTrainingSAE(preset.sae_config())
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=preset.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(preset.d_sae)
        self.act_freq = torch.zeros(preset.d_sae)


def sae_steps(preset: Preset, tokens: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median step seconds at ``tokens`` for each dead-latent fraction (one SAE at a time, so memory stays one's)."""
    rows = []
    for dead_fraction in DEAD_FRACTIONS:
        with tqdm(total=1 + args.repeats, desc=f"SAE step, {tokens} tokens, {dead_fraction:.0%} dead") as bar:
            step = PresetStep(preset, tokens, dead_fraction)
            times = seconds_of(step, warmup=1, repeats=args.repeats, bar=bar)
        del step
        rows.append({"tokens": tokens, "dead_fraction": dead_fraction, "step_s": statistics.median(times)})
    return rows


def model_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and time its forward to the hook."""
    preset = get_preset(PRESET)
    baseline = peak_rss_gib()
    started = time.perf_counter()
    model = gemma_2_2b_random_weights()
    build_s = time.perf_counter() - started
    storages = {p.untyped_storage().data_ptr(): p.numel() for p in model.parameters()}  # W_U shares W_E's
    rss_built = peak_rss_gib()
    tokens = torch.tensor(
        tiny_token_dataset(PROMPTS * (1 + args.repeats), CONTEXT, vocab_size=model.cfg.d_vocab)["input_ids"]
    )
    batches = iter(tokens.split(PROMPTS))
    with tqdm(total=1 + args.repeats, desc=f"LM forward to {preset.hook_name}, [{PROMPTS}, {CONTEXT}]") as bar:
        times = seconds_of(lambda: hook_activations(model, next(batches), preset.hook_name), 1, args.repeats, bar)
    forward_s = statistics.median(times)
    return {
        "n_layers": model.cfg.n_layers,
        "d_vocab": model.cfg.d_vocab,
        "model_parameters": sum(storages.values()),
        "model_build_s": build_s,
        "lm_forward_s_per_batch": forward_s,
        "lm_forward_ms_per_token": forward_s / (PROMPTS * CONTEXT) * 1e3,
        "lm_tokens_per_s": PROMPTS * CONTEXT / forward_s,
        "rss_gib_after_imports": baseline,
        "peak_rss_gib_built": rss_built,
        "peak_rss_gib": peak_rss_gib(),
    }


def sae_phase(tokens: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    """The SAE's training steps at ``tokens`` per batch, without the model."""

    def phase(args: argparse.Namespace) -> dict[str, Any]:
        baseline = peak_rss_gib()
        steps = sae_steps(get_preset(PRESET), tokens, args)
        return {"rss_gib_after_imports": baseline, "peak_rss_gib": peak_rss_gib(), "sae_steps": steps}

    return phase


PHASES = {"model": model_phase, "sae-512": sae_phase(512), "sae-4096": sae_phase(4096)}


def in_subprocess(phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its last stdout line is the phase's JSON (progress goes to stderr)."""
    command = [sys.executable, __file__, "--phase", phase, "--repeats", str(args.repeats)]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"phase {phase!r} failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def growth_gib(phase: dict[str, Any]) -> float:
    """How far a phase's peak RSS rose above the process's size after imports."""
    return phase["peak_rss_gib"] - phase["rss_gib_after_imports"]


def markdown_report(header: dict[str, Any], phases: dict[str, dict[str, Any]]) -> str:
    preset = get_preset(PRESET)
    model, small, large = phases["model"], phases["sae-512"], phases["sae-4096"]
    shared = (
        "other jobs were using the cores, so these times are upper bounds for an idle machine"
        if header["load_before"][0] >= 1.0
        else "otherwise idle"
    )
    embedding = model["d_vocab"] * preset.d_in
    lines = [
        f"# Gemma-2 2B at full width on CPU ({header['machine']})",
        "",
        f"{header['cpu']}, {header['cores']} cores, {header['threads']} torch threads, torch {header['torch']}; "
        f"1-minute load average {header['load_before'][0]:.1f} before the run ({shared}). Median of "
        f"{header['repeats']} timed calls after one warm-up. Made by `benchmarks/gemma_2_2b_full_width.py`.",
        "",
        f"Model: TransformerLens `gemma-2-2b` with random weights, {model['n_layers']} of its 26 blocks (all that "
        f"`{preset.hook_name}` reads), fp32, {model['model_parameters'] / 1e9:.2f}B parameters (of which the "
        f"embedding, shared with the unembedding as in Gemma-2, {embedding / 1e9:.2f}B). SAE: the preset's (d_in "
        f"{preset.d_in:,}, d_sae {preset.d_sae:,}, K = {preset.k}, `{preset.sae_defaults['normalize_activations']}`, "
        f"b_dec init `{preset.sae_defaults['b_dec_init']}`, fp32), Adam at lr {preset.lr:g}.",
        "",
        "| what | measured |",
        "|---|---:|",
        f"| model build | {model['model_build_s']:.1f} s |",
        f"| LM forward to the hook, [{PROMPTS}, {CONTEXT}] tokens | {model['lm_forward_s_per_batch']:.1f} s |",
        f"| LM forward per token | {model['lm_forward_ms_per_token']:.0f} ms ({model['lm_tokens_per_s']:.1f} "
        "tokens/s) |",
        f"| peak RSS: model built, then its forwards | {model['peak_rss_gib_built']:.1f} GiB, "
        f"{model['peak_rss_gib']:.1f} GiB |",
        f"| peak RSS: SAE training at 512 tokens (the test's batch), alone | {small['peak_rss_gib']:.1f} GiB |",
        f"| peak RSS: SAE training at 4,096 tokens (the preset's batch), alone | {large['peak_rss_gib']:.1f} GiB |",
        f"| peak RSS: model + SAE training at 512 tokens (the test's state), estimated | "
        f"{model['rss_gib_after_imports'] + growth_gib(model) + growth_gib(small):.1f} GiB |",
        f"| peak RSS: model + SAE training at 4,096 tokens, estimated | "
        f"{model['rss_gib_after_imports'] + growth_gib(model) + growth_gib(large):.1f} GiB |",
        "",
        "Estimated: the size after imports plus each phase's growth over it. SAE training step (forward, firing "
        "statistics, backward, clipping to norm 1, Adam, zero_grad):",
        "",
        "| tokens | dead latents | step s | ms per token |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['tokens']:,} | {row['dead_fraction']:.0%} | {row['step_s']:.2f} | "
        f"{row['step_s'] / row['tokens'] * 1e3:.1f} |"
        for row in small["sae_steps"] + large["sae_steps"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up (default 2)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # a child process's phase
    args = parser.parse_args()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    header = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "load_before": os.getloadavg(),
    }
    phases = {name: in_subprocess(name, args) for name in PHASES}
    report = markdown_report(header, phases)
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / "gemma_2_2b_full_width_cpu"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "phases": phases}, indent=2) + "\n")


if __name__ == "__main__":
    main()
