"""Where the step benchmark's time figures come from: the round-robin timing runs, the parts of one HTopK step
(``--breakdown``) and ``torch.profiler``'s top operators (``--profile``).

A row's time: median wall-clock seconds per step over ``--repeats`` steps after ``--warmup`` steps; the rows at one K
are built together and timed round-robin, so load changes on the machine hit all alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_step_rows import LABELS, Sizes, make_step, precision_context
from torch.profiler import ProfilerActivity, profile

from sae_lens_hierarchical.losses import HIERARCHICAL_LOSSES
from sae_lens_hierarchical.sparse_training import PreActivationsAt, auxk_loss_on_dead_columns, sparse_activations


def time_steps(names: tuple[str, ...], sizes: Sizes, k: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step for each implementation at budget k, measured round-robin."""
    steps = {name: make_step(name, sizes, k, args.device, args.dead_fraction, args.precision) for name in names}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def step_parts(sizes: Sizes, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """The HTopK step's parts (fused loss on CPU, Triton on CUDA), each timed alone on the step's own tensors (closures,
    round-robin, median; on CUDA between CUDA events, warm-up excluded), in the run's precision.

    Profiler attributions inflate the fused loss's many small kernels, so each part is run by itself instead; the
    parts add up to about the whole step (the remainder is Python and glue).
    """

    implementation = breakdown_implementation(args.device)
    loss_fn = HIERARCHICAL_LOSSES[implementation.removeprefix("htopk_")]
    whole = make_step(implementation, sizes, k, args.device, args.dead_fraction, args.precision)
    sae, x = whole.sae, whole.batch
    dead_columns = whole.dead.nonzero().reshape(-1) if whole.dead is not None else torch.empty(0, dtype=torch.long)
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1)
        centered = x - sae.b_dec
        raw = torch.addmm(sae.b_enc, centered, sae.W_enc)
        top_acts, top_indices = (raw * norms).topk(k, dim=-1)
        coefficients = (top_acts.relu() / norms[top_indices]).requires_grad_()
        residual = torch.randn_like(x)

    def sparse_encoder_backward() -> None:
        at_top, at_dead = PreActivationsAt.apply(
            centered, sae.W_enc, sae.b_enc, sae.b_dec, raw, top_indices, dead_columns
        )
        torch.autograd.backward([at_top, at_dead], [torch.ones_like(at_top), torch.ones_like(at_dead)])

    def auxk() -> None:
        pre_at_dead = raw.index_select(-1, dead_columns).requires_grad_()
        loss, _ = auxk_loss_on_dead_columns(pre_at_dead, dead_columns, sae.W_dec, residual, norms.detach())
        loss.backward()

    def hierarchical_loss() -> None:
        levels = sae.levels
        result = loss_fn(x, coefficients, top_indices, sae.W_dec, sae.b_dec, levels, sae.level_weights)
        result.loss.backward()

    def optimizer() -> None:
        for parameter in sae.parameters():
            parameter.grad = torch.ones_like(parameter)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        whole.optimizer.step()
        whole.optimizer.zero_grad()

    parts = {
        "encoder product (the floor)": lambda: torch.addmm(sae.b_enc, centered, sae.W_enc),
        "decoder-norm scaling and top-K": lambda: (raw * norms).topk(k, dim=-1),
        "hierarchical loss, forward + backward": hierarchical_loss,
        "sparse encoder backward": sparse_encoder_backward,
        "AuxK on the dead columns, forward + backward": auxk,
        "feature_acts (COO) and firing statistics": lambda: (
            sparse_activations(top_acts, top_indices, sizes.d_sae).bool().float().sum(-2)
        ),
        "gradient clipping, Adam, zero_grad": optimizer,
        "whole step": whole,
    }
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for repeat in range(args.warmup + args.repeats):
        for name, part in parts.items():
            with precision_context(args.device, args.precision):
                elapsed = timed(part, args.device)
            if repeat >= args.warmup:
                seconds[name].append(elapsed)
        sae.zero_grad()
    return {name: statistics.median(values) for name, values in seconds.items()}


def breakdown_implementation(device: str) -> str:
    """The row a breakdown takes apart: the Triton step on CUDA (what "auto" runs there), the fused one elsewhere."""
    return "htopk_triton" if device == "cuda" else "htopk_fused"


def timed(function: Callable[[], Any], device: str) -> float:
    """Seconds ``function`` takes: between CUDA events on CUDA (the GPU's own time for the work it queued, after
    a synchronisation), wall-clock elsewhere."""
    if device != "cuda":
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    function()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3


def profile_report(names: tuple[str, ...], sizes: Sizes, k: int, args: argparse.Namespace) -> str:
    """``torch.profiler``'s top operators (and kernels on CUDA) per step of each row at K, by self time: three steps
    profiled after the warm-up, times divided by three."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    sections = [f"Top operators per row at K={k} ({args.device}, {args.precision}), sorted by {sort_by} over 3 steps."]
    for name in names:
        step = make_step(name, sizes, k, args.device, args.dead_fraction, args.precision)
        for _ in range(max(args.warmup, 1)):
            step()
        with profile(activities=activities) as profiler:
            for _ in range(3):
                step()
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=15)
        sections += ["", f"## {LABELS[name]}", "", "```", table, "```"]
        del step
        gc.collect()
    return "\n".join(sections) + "\n"
