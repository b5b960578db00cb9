"""One SAE training step, side by side: SAELens TopK vs HierarchicalTopK with the reference and the fused loss.

On CUDA there is a fourth row, ``HTopK triton``: the same fused algorithm as Triton kernels (``loss_implementation=
"triton"``, what the default ``"auto"`` picks on GPU); ``HTopK fused`` is always the torch implementation.

The step is the body of SAELens's ``SAETrainer._train_step``: ``training_forward_pass``, the firing statistics
computed from ``feature_acts``, ``backward``, gradient clipping to norm 1.0, ``Adam.step`` and ``zero_grad``.

Time: median wall-clock seconds per step over ``--repeats`` steps after ``--warmup`` steps; the three
implementations at one K are built together and timed round-robin, so load changes on the machine hit all alike.

Threads: ``--threads 1`` gives stable numbers on a shared machine. With several threads every kernel is a
thread-pool barrier; the fused loss runs about a thousand small kernels per step at K=64 (TopK a few dozen large
ones), so when another process holds a core it stalls far more than TopK does.

Memory: each (implementation, K) runs in a fresh subprocess, after warm-up (Adam state created, steps run):

- ``peak tensor MB``: the most bytes held by live tensors during one step: parameters, Adam state and batch,
  plus everything the step allocates. On CUDA ``torch.cuda.max_memory_allocated``; on CPU the same quantity from the
  PyTorch profiler's allocation records (every tensor allocation and free of the step, in order).
- ``step transient MB``: the part of that peak above what is live between steps (parameters, Adam state, batch).
- ``peak RSS +MB`` (CPU only): growth of the process's peak resident set during the warm-up and measured steps
  over its resident size after setup; includes allocator caching and fragmentation, so it is noisier.

Usage::

    python benchmarks/bench_step.py            # CPU sizes: d_in 640, d_sae 8192, 2048 tokens, K in 16..128
    python benchmarks/bench_step.py --quick    # small smoke run
    python benchmarks/bench_step.py --device cuda   # d_in 2304, d_sae 65536, 4096 tokens, K in 32, 64, 128
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_hierarchical import HierarchicalTopKTrainingSAE, HierarchicalTopKTrainingSAEConfig

IMPLEMENTATIONS = ("topk", "htopk_reference", "htopk_fused")
LABELS = {
    "topk": "SAELens TopK",
    "htopk_reference": "HTopK reference",
    "htopk_fused": "HTopK fused",
    "htopk_triton": "HTopK triton",
}


def implementations(device: str) -> tuple[str, ...]:
    """The rows benchmarked on ``device``: the Triton kernels run on CUDA only."""
    return (*IMPLEMENTATIONS, "htopk_triton") if device == "cuda" else IMPLEMENTATIONS


@dataclass(frozen=True)
class Sizes:
    d_in: int
    d_sae: int
    tokens: int
    ks: tuple[int, ...]


SIZES = {
    ("cpu", False): Sizes(d_in=640, d_sae=8192, tokens=2048, ks=(16, 32, 64, 128)),
    ("cpu", True): Sizes(d_in=64, d_sae=1024, tokens=256, ks=(8, 16, 32)),
    ("cuda", False): Sizes(d_in=2304, d_sae=65536, tokens=4096, ks=(32, 64, 128)),
    ("cuda", True): Sizes(d_in=256, d_sae=4096, tokens=512, ks=(8, 16, 32)),
}


def build_sae(implementation: str, sizes: Sizes, k: int, device: str) -> TrainingSAE:
    """A freshly initialised training SAE; every implementation gets the same seed and SAELens TopK defaults."""
    torch.manual_seed(0)
    common = {"d_in": sizes.d_in, "d_sae": sizes.d_sae, "k": k, "device": device}
    if implementation == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    loss_implementation = implementation.removeprefix("htopk_")
    return HierarchicalTopKTrainingSAE(
        HierarchicalTopKTrainingSAEConfig(**common, loss_implementation=loss_implementation)
    )


class TrainStep:
    """SAELens's ``_train_step`` body on a fixed batch ``[tokens, d_in]``, with Adam as SAELens builds it."""

    def __init__(self, implementation: str, sizes: Sizes, k: int, device: str, dead_fraction: float):
        self.sae = build_sae(implementation, sizes, k, device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
        generator = torch.Generator().manual_seed(1)
        self.batch = torch.randn(sizes.tokens, sizes.d_in, generator=generator).to(device)
        n_dead = round(dead_fraction * sizes.d_sae)
        self.dead = (torch.arange(sizes.d_sae) < n_dead).to(device) if n_dead else None
        self.since_fired = torch.zeros(sizes.d_sae, device=device)
        self.act_freq = torch.zeros(sizes.d_sae, device=device)
        self.device = device

    def __call__(self) -> None:
        output = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=self.batch,
                coefficients={},
                dead_neuron_mask=self.dead,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        with torch.no_grad():  # SAELens's firing statistics, from the dense feature_acts
            firing = output.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            self.since_fired += 1
            self.since_fired[did_fire] = 0
            self.act_freq += firing.sum(0)
        del firing, did_fire
        output.loss.backward()
        del output
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.device == "cuda":
            torch.cuda.synchronize()

    def resident_bytes(self) -> int:
        """Bytes live between steps: parameters, Adam state, batch and statistics (gradients are freed)."""
        tensors = [*self.sae.parameters(), self.batch, self.since_fired, self.act_freq]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


# --- time -------------------------------------------------------------------------------------------


def time_steps(sizes: Sizes, k: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step for each implementation at budget k, measured round-robin."""
    names = implementations(args.device)
    steps = {name: TrainStep(name, sizes, k, args.device, args.dead_fraction) for name in names}
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


# --- memory (run in a fresh subprocess per configuration) -------------------------------------------


def _status_kib(field: str) -> int:
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


def _profiled_peak_bytes(step: TrainStep) -> int:
    """Most bytes allocated and not yet freed at any point of one step, from the profiler's allocation records."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

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
    step = TrainStep(implementation, sizes, k, args.device, args.dead_fraction)
    result: dict[str, Any] = {}
    if args.device == "cuda":
        step()  # warm-up: Adam state, cuBLAS workspaces
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated()
        result["peak_tensor_bytes"] = peak
        result["step_transient_bytes"] = peak - before
        return result
    # Adam state exists from the first step on; create it with zero gradients (a no-op update) so that the RSS
    # baseline below already holds it, as the tensor baseline does.
    for parameter in step.sae.parameters():
        parameter.grad = torch.zeros_like(parameter)
    step.optimizer.step()
    step.optimizer.zero_grad()
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


def memory_in_subprocess(implementation: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", implementation, str(k), *args.forwarded]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory run {implementation} K={k} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- report -----------------------------------------------------------------------------------------


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "n/a" if value is None or not base else f"{value / base:.2f}x"


def markdown_report(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [
        f"Training step on {header['device']} ({header['device_name']}, {header['threads']} threads): "
        f"d_in={header['d_in']}, d_sae={header['d_sae']}, {header['tokens']} tokens, "
        f"median of {header['repeats']} steps after {header['warmup']} warm-up; "
        f"dead-latent fraction {header['dead_fraction']}; torch {header['torch']}.",
        "",
        "| K | implementation | step ms | time / TopK | peak tensor MB | memory / TopK | step transient MB "
        "| peak RSS +MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(row["k"], row["implementation"]): row for row in rows}
    for row in rows:
        topk = by_key[(row["k"], "topk")]
        lines.append(
            f"| {row['k']} | {LABELS[row['implementation']]} | {row['median_s'] * 1e3:,.0f} "
            f"| {_ratio(row['median_s'], topk['median_s'])} | {_mb(row.get('peak_tensor_bytes'))} "
            f"| {_ratio(row.get('peak_tensor_bytes'), topk.get('peak_tensor_bytes'))} "
            f"| {_mb(row.get('step_transient_bytes'))} | {_mb(row.get('peak_rss_increase_bytes'))} |"
        )
    ks = sorted({row["k"] for row in rows})
    lines += ["", "Reference -> fused (same K): step time and peak tensor memory divided by the fused ones.", ""]
    lines += ["| K | time reference / fused | memory reference / fused |", "|---:|---:|---:|"]
    for k in ks:
        reference, fused = by_key[(k, "htopk_reference")], by_key[(k, "htopk_fused")]
        lines.append(
            f"| {k} | {_ratio(reference['median_s'], fused['median_s'])} "
            f"| {_ratio(reference.get('peak_tensor_bytes'), fused.get('peak_tensor_bytes'))} |"
        )
    lines += ["", *target_lines(by_key, ks)]
    return "\n".join(lines) + "\n"


def target_lines(by_key: dict[tuple[int, str], dict[str, Any]], ks: list[int]) -> list[str]:
    """The issue's targets, checked on this run for each memory-flat implementation present (fused; triton on CUDA)."""
    lines = ["Targets:"]
    k_mid = 64 if 64 in ks else ks[len(ks) // 2]
    k_low = 32 if 32 in ks[:-1] else ks[0]
    with_memory = all("peak_tensor_bytes" in row for row in by_key.values())
    for implementation in ("htopk_fused", "htopk_triton"):
        if (k_mid, implementation) not in by_key:
            continue
        name = implementation.removeprefix("htopk_")
        ratio = by_key[(k_mid, implementation)]["median_s"] / by_key[(k_mid, "topk")]["median_s"]
        lines.append(
            f"- {name} time / TopK time at K={k_mid}: {ratio:.2f} "
            f"(target <= 1.00: {'met' if ratio <= 1 else 'NOT met'})"
        )
        if not with_memory:
            continue
        peak = {k: by_key[(k, implementation)]["peak_tensor_bytes"] for k in ks}
        worst = max(peak[k] / by_key[(k, "topk")]["peak_tensor_bytes"] for k in ks)
        verdict = "met" if worst <= 1.05 else "NOT met"
        lines.append(f"- {name} peak memory / TopK, worst K: {worst:.3f} (target <= 1.05: {verdict})")
        flat = peak[ks[-1]] / peak[k_low]
        lines.append(
            f"- {name} peak memory K={ks[-1]} / K={k_low}: {flat:.3f} "
            f"(target <= 1.05: {'met' if flat <= 1.05 else 'NOT met'})"
        )
    return lines


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--ks", type=int, nargs="+", help="override the budgets K")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--dead-fraction", type=float, default=0.0, help="latents marked dead, to run AuxK too")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory runs")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.forwarded = ["--device", args.device, "--dead-fraction", str(args.dead_fraction)]
    args.forwarded += ["--quick"] if args.quick else []
    args.forwarded += ["--threads", str(args.threads)] if args.threads else []
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA build of torch and a GPU")
    sizes = SIZES[(args.device, args.quick)]
    if args.ks:
        sizes = Sizes(sizes.d_in, sizes.d_sae, sizes.tokens, tuple(args.ks))
    if args.child:
        implementation, k = args.child
        print(json.dumps(measure_memory(implementation, sizes, int(k), args)))
        return

    rows: list[dict[str, Any]] = []
    for k in sizes.ks:
        seconds = time_steps(sizes, k, args)
        for name in implementations(args.device):
            rows.append(
                {"k": k, "implementation": name, "median_s": statistics.median(seconds[name]), "seconds": seconds[name]}
            )
            print(f"K={k:4d} {LABELS[name]:16s} {rows[-1]['median_s'] * 1e3:8.0f} ms", file=sys.stderr, flush=True)
        gc.collect()
    if not args.no_memory:
        for row in rows:
            row.update(memory_in_subprocess(row["implementation"], row["k"], args))
            print(f"K={row['k']:4d} {LABELS[row['implementation']]:16s} memory done", file=sys.stderr, flush=True)

    header = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        **asdict(sizes),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "dead_fraction": args.dead_fraction,
        "torch": torch.__version__,
        "quick": args.quick,
    }
    report = markdown_report(rows, header)
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_step_{args.device}{'_quick' if args.quick else ''}"
    (args.output_dir / f"{stem}.md").write_text(report)
    (args.output_dir / f"{stem}.json").write_text(json.dumps({"config": header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output_dir / stem}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
