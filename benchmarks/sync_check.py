"""Host synchronisations in HierarchicalTopK training steps on CUDA, each with where it happened.

A step that waits for the GPU (``.item()``, ``bool(tensor)``, ``nonzero``, a shape that depends on values) stalls the
host's queue of kernels, which costs most where the step is short: TF32 and bf16 steps on an H100. This runs the
SAELens trainer's step body (``training_forward_pass`` with a dead-latent mask so that AuxK runs, ``backward``,
clipping, ``Adam.step``, ``zero_grad``) under ``torch.cuda.set_sync_debug_mode("warn")`` on a non-logging step, for
each precision, and records every synchronisation with the innermost frames of this package and SAELens. Exit status
1 when there is any, so that ``benchmarks/gpu.sh`` marks the step failed.

Usage (a CUDA machine)::

    python benchmarks/sync_check.py --output sync_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig

WATCHED = ("sae_lens_hierarchical", "sae_lens", "torch/optim", "torch/nn/utils")


def training_step(
    sae: HierarchicalTopKTrainingSAE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    dead: torch.Tensor,
    step: int,
    precision: str,
) -> None:
    """SAELens's ``_train_step`` body (statistics aside) on a non-logging step, the forward under bf16 autocast for
    ``bf16``."""
    autocast = torch.autocast("cuda", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        output = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False
            )
        )
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def where(stack: list[traceback.FrameSummary]) -> list[str]:
    """The frames of this package, SAELens and torch's optimiser/clipping code, innermost last."""
    return [
        f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}"
        for frame in stack
        if any(part in frame.filename for part in WATCHED)
    ][-4:]


def syncs_in_steps(args: argparse.Namespace, precision: str) -> list[dict[str, Any]]:
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.manual_seed(0)
    cfg = HierarchicalTopKTrainingSAEConfig(
        d_in=args.d_in, d_sae=args.d_sae, k=args.k, device="cuda", use_sparse_activations=True
    )
    sae = HierarchicalTopKTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4)
    x = torch.randn(args.tokens, args.d_in, device="cuda")
    dead = torch.arange(args.d_sae, device="cuda") < args.d_sae // 10
    for step in range(2):  # warm-up: Adam state, kernels compiled, self-check run
        training_step(sae, optimizer, x, dead, step, precision)
    torch.cuda.synchronize()
    found: list[dict[str, Any]] = []

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        found.append({"message": str(message).splitlines()[0], "where": where(traceback.extract_stack()[:-1])})

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            training_step(sae, optimizer, x, dead, 2, precision)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--output", type=Path, help="JSON with every synchronisation per precision")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_check needs a CUDA GPU (torch.cuda.set_sync_debug_mode is CUDA-only)", file=sys.stderr)
        return 2
    report = {precision: syncs_in_steps(args, precision) for precision in ("fp32", "tf32", "bf16")}
    for precision, syncs in report.items():
        print(f"{precision}: {len(syncs)} host synchronisation(s) in one training step")
        for sync in syncs:
            print(f"  {sync['message']}\n    " + "\n    ".join(sync["where"]))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
