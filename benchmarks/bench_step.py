"""One SAE training step, side by side: SAELens TopK, EleutherAI sparsify's TopK, HierarchicalTopK, and the floor.

The command line of the step benchmark; its parts lie beside it in ``benchmarks/``:

- ``bench_step_rows``: the rows (``--implementations``, default all of them: ``topk``, ``sparsify``,
  ``sparsify_clipped``, ``htopk_reference``, ``htopk_fused``, ``htopk_fused_dense``, ``htopk_triton`` on CUDA only,
  ``floor`` and ``floor_linear``): what each one's step runs, and what they all share;
- ``bench_step_timing``: the timing runs, ``--breakdown`` and ``--profile``;
- ``bench_step_memory``: peak tensor memory, step transient and peak RSS of one step of a row;
- ``bench_step_targets``: issue 27's targets, in the settings they are checked in;
- ``bench_step_report``: the Markdown tables, written with the JSON to ``--output-dir``.

Precision (``--precision``): fp32 (TF32 off), tf32 (``set_float32_matmul_precision("high")``, CUDA only) or bf16 (the
SAELens rows' forward pass under ``torch.autocast(bfloat16)``, as SAELens's runner does with ``autocast=True``;
backward, clipping and Adam outside it). sparsify runs its own way in every precision (on CUDA its forward is under
its own bf16 autocast). ``--breakdown K`` times the parts of one HTopK step (fused on CPU, Triton on CUDA, between CUDA
events there); ``--profile K`` writes ``torch.profiler``'s top operators (and CUDA kernels) per row.

Threads: ``--threads 1`` gives stable numbers on a shared machine. With several threads every kernel is a
thread-pool barrier; the fused loss runs about a thousand small kernels per step at K=64 (TopK a few dozen large
ones), so when another process holds a core it stalls far more than TopK does.

Usage::

    python benchmarks/bench_step.py            # CPU sizes: d_in 640, d_sae 8192, 2048 tokens, K in 16..128
    python benchmarks/bench_step.py --quick    # small smoke run
    python benchmarks/bench_step.py --implementations htopk_fused sparsify floor
    python benchmarks/bench_step.py --device cuda --precision bf16  # d_in 2304, d_sae 65536, 4096 tokens
    python benchmarks/bench_step.py --breakdown 64 --threads 1       # where one HTopK step's time goes
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from bench_step_memory import measure_memory
from bench_step_report import breakdown_report, format_ms, markdown_report
from bench_step_rows import (
    CUDA_ONLY,
    IMPLEMENTATIONS,
    LABELS,
    PRECISIONS,
    SIZES,
    SPARSIFY_AUXK_ALPHA,
    Sizes,
    implementations,
    import_sparsify,
    set_precision,
)
from bench_step_timing import breakdown_implementation, profile_report, step_parts, time_steps


def memory_in_subprocess(implementation: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`~bench_step_memory.measure_memory` in a fresh run of this script (``--child``): on CPU the peak RSS and
    the allocator's history must be the row's own."""
    command = [sys.executable, __file__, "--child", implementation, str(k), *args.forwarded]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory run {implementation} K={k} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    """The CPU's model name for the report's header (timings mean little without it)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked (tf32 and Triton on CUDA only), plus ``forwarded``: those a ``--child`` run repeats."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--ks", type=int, nargs="+", help="override the budgets K")
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS,
        metavar="NAME",
        help=f"rows to run, of {', '.join(IMPLEMENTATIONS)} (default: all; htopk_triton on cuda only)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--dead-fraction", type=float, default=0.1, help="latents marked dead, so that AuxK runs (default: 0.1)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory runs")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--breakdown", type=int, metavar="K", help="only time the parts of one HTopK fused step at this K, each alone"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (TF32 off), tf32 (TF32 matmuls) or bf16 (forward under bf16 autocast, as SAELens's autocast=True)",
    )
    parser.add_argument("--profile", type=int, metavar="K", help="only write torch.profiler's top operators at this K")
    parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.implementations is None:
        args.implementations = implementations(args.device)
    else:
        wrong = [name for name in args.implementations if name in CUDA_ONLY and args.device != "cuda"]
        if wrong:
            parser.error(f"{', '.join(wrong)} runs with --device cuda only")
        args.implementations = tuple(name for name in IMPLEMENTATIONS if name in args.implementations)
    if args.precision == "tf32" and args.device != "cuda":
        parser.error("--precision tf32 runs with --device cuda only (TF32 is a GPU matmul mode)")
    args.forwarded = [
        "--device",
        args.device,
        "--dead-fraction",
        str(args.dead_fraction),
        "--precision",
        args.precision,
    ]
    args.forwarded += ["--quick"] if args.quick else []
    args.forwarded += ["--threads", str(args.threads)] if args.threads else []
    args.forwarded += ["--ks", *map(str, args.ks)] if args.ks else []
    return args


def available(names: tuple[str, ...], device: str) -> tuple[str, ...]:
    """``names`` without sparsify where it cannot be imported (one line on stderr says how to install it)."""
    if "sparsify" not in names:
        return names
    try:
        import_sparsify(device)
    except ImportError as error:
        print(f'skipping {LABELS["sparsify"]} ({error}): pip install -e ".[bench]"', file=sys.stderr)
        return tuple(name for name in names if name != "sparsify")
    return names


def run_header(args: argparse.Namespace, sizes: Sizes, names: tuple[str, ...]) -> dict[str, Any]:
    """What a report states about its run: device, threads, sizes, repeats, dead fraction, versions."""
    header = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        **asdict(sizes),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "dead_fraction": args.dead_fraction,
        "implementations": list(names),
        "torch": torch.__version__,
        "quick": args.quick,
    }
    if "sparsify" in names:
        header["sparsify"] = import_sparsify(args.device).__version__
        header["sparsify_auxk_alpha"] = SPARSIFY_AUXK_ALPHA
    return header


def main(argv: list[str] | None = None) -> None:
    """Time every row at each K, measure their memory, and write the report; or only ``--profile``, ``--breakdown``,
    or (``--child``) one row's memory, printed as JSON for the parent."""
    args = parse_args(argv)
    set_precision(args.precision)
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

    suffix = f"{args.device}{'' if args.precision == 'fp32' else '_' + args.precision}{'_quick' if args.quick else ''}"
    if args.profile:
        report = profile_report(available(args.implementations, args.device), sizes, args.profile, args)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        path = args.output_dir / f"bench_step_profile_{suffix}_k{args.profile}.md"
        path.write_text(report)
        print(report)
        print(f"wrote {path}", file=sys.stderr)
        return
    if args.breakdown:
        parts = step_parts(sizes, args.breakdown, args)
        header = run_header(args, sizes, (breakdown_implementation(args.device),))
        report = breakdown_report(args.breakdown, parts, header)
        print(report)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        path = args.output_dir / f"bench_step_breakdown_{suffix}_k{args.breakdown}"
        path.with_suffix(".md").write_text(report)
        path.with_suffix(".json").write_text(json.dumps({"k": args.breakdown, "seconds": parts}, indent=2) + "\n")
        print(f"wrote {path}.md and .json", file=sys.stderr)
        return

    names = available(args.implementations, args.device)
    rows: list[dict[str, Any]] = []
    for k in sizes.ks:
        seconds = time_steps(names, sizes, k, args)
        for name in names:
            rows.append(
                {"k": k, "implementation": name, "median_s": statistics.median(seconds[name]), "seconds": seconds[name]}
            )
            print(f"K={k:4d} {LABELS[name]:17s} {format_ms(rows[-1]['median_s']):>8s} ms", file=sys.stderr, flush=True)
        gc.collect()
        if args.device == "cuda":  # give the cached blocks back: each memory run is a subprocess on the same GPU
            torch.cuda.empty_cache()
    if not args.no_memory:
        for row in rows:
            if args.device == "cuda":  # allocated bytes only: no other row's cached blocks count
                row.update(measure_memory(row["implementation"], sizes, row["k"], args))
                gc.collect()
                torch.cuda.empty_cache()
            else:  # the CPU figures need a fresh process (peak RSS, the allocator's history)
                row.update(memory_in_subprocess(row["implementation"], row["k"], args))
            print(f"K={row['k']:4d} {LABELS[row['implementation']]:17s} memory done", file=sys.stderr, flush=True)

    header = run_header(args, sizes, names)
    report = markdown_report(rows, header)
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_step_{suffix}"
    (args.output_dir / f"{stem}.md").write_text(report)
    (args.output_dir / f"{stem}.json").write_text(json.dumps({"config": header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output_dir / stem}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
