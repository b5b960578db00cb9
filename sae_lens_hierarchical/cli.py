"""Command-line interface (thin: argument parsing, then library calls).

``sae-lens-hierarchical demo`` trains a HierarchicalTopK SAE with SAELens's runner on a tiny random
model (offline, about a minute on 2 CPU cores), reloads it from disk and prints its quality at every
budget k.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from sae_lens import LanguageModelSAETrainingRunner

from sae_lens_hierarchical import presets
from sae_lens_hierarchical.evaluation import evaluate_over_k, format_markdown_table, plot_over_k
from sae_lens_hierarchical.loading import load_sae

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-lens-hierarchical", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train + per-k evaluation on a tiny random model (offline)")
    demo.add_argument("--output-dir", type=Path, default=Path("results/demo"), help="where results go")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    demo.add_argument("--training-tokens", type=_positive_int, default=200_000)
    demo.add_argument("--d-sae", type=_positive_int, default=256)
    demo.add_argument("--k", type=_positive_int, default=16, help="K, the largest budget trained")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def run_demo(args: argparse.Namespace) -> None:
    output_dir: Path = args.output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {output_dir} exists and is not empty; pass --overwrite or another --output-dir")
    started = time.perf_counter()
    torch.manual_seed(args.seed)  # SAELens does not seed torch from cfg.seed
    model = presets.tiny_random_model(seed=args.seed)
    context_size = 32
    n_train_sequences = max(64, args.training_tokens // (context_size - 1) // 4)
    train_tokens = presets.tiny_token_dataset(n_train_sequences, context_size, seed=args.seed)
    held_out = presets.tiny_token_dataset(256, context_size, seed=args.seed + 1)

    # Train into a scratch directory and move it into place only when everything succeeded.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        sae_dir = scratch / "sae"
        cfg = presets.tiny_runner_config(
            str(sae_dir), training_tokens=args.training_tokens, d_sae=args.d_sae, k=args.k, seed=args.seed
        )
        LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=train_tokens).run()
        sae = load_sae(sae_dir)
        activations = presets.collect_activations(model, torch.tensor(held_out["input_ids"]), presets.TINY_HOOK_NAME)
        results = evaluate_over_k(sae, activations)  # type: ignore[arg-type]
        table = format_markdown_table(results)
        (scratch / "per_k.md").write_text(table + "\n")
        (scratch / "per_k.json").write_text(json.dumps([r.to_dict() for r in results], indent=2))
        plot_over_k(results, scratch / "per_k.png", title=f"HierarchicalTopK on {presets.TINY_MODEL_NAME}")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(scratch, output_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(f"\nHeld-out reconstruction at every budget k ({activations.shape[0]} tokens, BOS excluded):\n")
    print(table)
    print(f"\nSAE saved to {output_dir / 'sae'}; table, JSON and plot in {output_dir}. Took {elapsed:.0f} s.")


def main(argv: Sequence[str] | None = None) -> None:
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args)
    except (ValueError, FileNotFoundError) as error:  # bad settings: one clear line, no traceback
        raise SystemExit(f"error: {error}") from error
