"""Inference forward of a HierarchicalTopK SAE: sparse decoding from the k selected rows vs SAELens's dense path.

SAELens decodes by scattering dense ``[tokens, d_sae]`` activations and multiplying them by the whole decoder;
``HierarchicalTopKSAE.forward`` sums the k selected decoder rows directly when no hook watches the activations.
Both are timed side by side in one run, on the same SAE and inputs, at several budgets k.

    python benchmarks/bench_inference.py [--threads 1] [--output-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sae_lens_hierarchical import HierarchicalTopKSAE, HierarchicalTopKSAEConfig


def median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d_in, n_tokens, max_k = 640, 2048, 64
    rows = []
    for d_sae in (8192, 32768):
        torch.manual_seed(0)
        sae = HierarchicalTopKSAE(HierarchicalTopKSAEConfig(d_in=d_in, d_sae=d_sae, k=max_k))
        x = torch.randn(n_tokens, d_in)
        for k in (8, 32, 64):
            with sae.use_k(k):
                torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-4)
                dense = median_ms(lambda sae=sae, x=x: sae.decode(sae.encode(x)), args.repeats)
                sparse = median_ms(lambda sae=sae, x=x: sae(x), args.repeats)
            rows.append({"d_sae": d_sae, "k": k, "dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse})
    header = (
        f"Inference forward on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads: "
        f"d_in={d_in}, K={max_k}, {n_tokens} tokens, median of {args.repeats}; torch {torch.__version__}."
    )
    lines = [
        header,
        "",
        "| d_sae | k | SAELens dense path ms | sparse forward ms | dense / sparse |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['d_sae']:,} | {r['k']} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    report = "\n".join(lines)
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "bench_inference_cpu.md").write_text(report + "\n")
    (args.output_dir / "bench_inference_cpu.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
