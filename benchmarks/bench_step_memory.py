"""Peak memory of one step of one row of the step benchmark, measured alone.

Each (row, K) is built alone after the timing runs are freed (on CPU in a fresh subprocess; on CUDA in the
same process, counting allocated bytes only, so no other row's cached blocks count), after warm-up (Adam state
created, steps run):

- ``peak tensor MB``: the most bytes held by live tensors during one step: parameters, Adam state and batch,
  plus everything the step allocates. On CUDA ``torch.cuda.max_memory_allocated``; on CPU the same quantity from the
  PyTorch profiler's allocation records (every tensor allocation and free of the step, in order). The floor's is its
  weight and batch plus the one ``[tokens, d_sae]`` output.
- ``step transient MB``: the part of that peak above what is live between steps (parameters, Adam state, batch).
- ``peak RSS +MB`` (CPU only): growth of the process's peak resident set during the warm-up and measured steps
  over its resident size after setup; includes allocator caching and fragmentation, so it is noisier.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch
from bench_step_rows import Sizes, Step, make_step
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def _status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``): the kernel's view of the resident set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _profiled_peak_bytes(step: Step) -> int:
    """Most bytes allocated and not yet freed at any point of one step, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    tree = profiler.profiler.kineto_results.experimental_event_tree()  # type: ignore[union-attr]
    allocations = sorted(
        (event for event in walk(tree) if event.tag == _EventType.Allocation), key=lambda event: event.start_time_ns
    )
    live = peak = 0
    for event in allocations:
        live += event.extra_fields.alloc_size  # negative for frees
        peak = max(peak, live)
    return peak


def measure_memory(implementation: str, sizes: Sizes, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one step of one configuration; meant to run alone in its own process."""
    step = make_step(implementation, sizes, k, args.device, args.dead_fraction, args.precision)
    result: dict[str, Any] = {}
    if args.device == "cuda":
        step()  # warm-up: Adam state, cuBLAS workspaces
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        transient = torch.cuda.max_memory_allocated() - before
        result["step_transient_bytes"] = transient
        result["peak_tensor_bytes"] = step.resident_bytes() + transient
        return result
    # Adam state exists from the first step on; create it now so that the RSS baseline below already holds it, as the
    # tensor baseline does.
    step.create_optimizer_state()
    resident = step.resident_bytes()
    gc.collect()
    rss_before = _status_kib("VmRSS")
    hwm_reset = _reset_peak_rss()
    step()  # warm-up
    step()
    if hwm_reset:
        result["peak_rss_increase_bytes"] = (_status_kib("VmHWM") - rss_before) * 1024
    transient = _profiled_peak_bytes(step)
    result["step_transient_bytes"] = transient
    result["peak_tensor_bytes"] = resident + transient
    return result
