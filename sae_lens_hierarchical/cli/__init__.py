"""Command-line interface: argument parsing (:mod:`.parser`) and one handler per command (:mod:`.commands`) on top of
:mod:`sae_lens_hierarchical.jobs`.

sae-lens-hierarchical train                      # the embedded default: Gemma-3-270M on Wikipedia, offline
sae-lens-hierarchical train --preset tiny-random --set sae.k=8 --set lr=1e-3
sae-lens-hierarchical train --config runner_cfg.json   # any SAELens runner config (architecture in it)
sae-lens-hierarchical cache --preset gemma-3-270m      # only cache activations
sae-lens-hierarchical evaluate results/gemma-3-270m/sae --ks 1,4,16,64 --mean-l0 2,8
sae-lens-hierarchical compare                    # HTopK vs TopK, BatchTopK, Matryoshka, Multi-TopK by k and mean L0
torchrun --nproc-per-node 2 -m sae_lens_hierarchical train --preset tiny-random   # data-parallel (also compare)
sae-lens-hierarchical export results/gemma-3-270m/sae --k 16 topk_k16  # a plain SAELens TopK SAE at k=16
sae-lens-hierarchical export results/gemma-3-270m/sae --mean-l0 16 jumprelu_l0_16  # JumpReLU, any mean L0
sae-lens-hierarchical upload results/gemma-3-270m/sae owner/name --topk-ks 8,32 --dry-run repo_preview
sae-lens-hierarchical inspect results/gemma-3-270m/sae --ks 4,16,64   # latent dashboards: a static site
sae-lens-hierarchical interpret results/seed0 results/seed1 --output-dir interp  # probing/absorption per k
sae-lens-hierarchical hierarchicalize results/x/saes/topk-k64 --training-tokens 60000   # TopK SAE -> every k
sae-lens-hierarchical doctor                     # versions, devices, what loss_implementation='auto' runs, self-check
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sae_lens_hierarchical.cli import commands
from sae_lens_hierarchical.cli.parser import build_parser
from sae_lens_hierarchical.preemption import Preempted, stop_on_signals

__all__ = ["UsageError", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handlers = {
        "train": commands.run_train,
        "cache": commands.run_cache,
        "evaluate": commands.run_evaluate,
        "compare": commands.run_compare,
        "interpret": commands.run_interpret,
        "hierarchicalize": commands.run_hierarchicalize,
        "export": commands.run_export,
        "upload": commands.run_upload,
        "inspect": commands.run_inspect,
        "doctor": commands.run_doctor,
    }
    try:
        with stop_on_signals():  # SIGTERM/SIGINT: checkpoint at the next step boundary, say how to resume
            handlers[args.command](args)
    except Preempted as stopped:
        raise SystemExit(f"stopped: {stopped}") from stopped
    except (ValueError, OSError) as error:  # bad settings, missing files, no Hub: one clear line, no traceback
        raise UsageError(f"error: {error}") from error


class UsageError(SystemExit):
    """A bad setting or a missing file: its one line goes to stderr and the exit code is 2, as for argparse's."""

    def __init__(self, message: str):
        super().__init__(message)
        print(message, file=sys.stderr)
        self.code = 2
