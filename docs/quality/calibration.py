"""Does a threshold calibrated on one text give the same mean L0 on another? For saved HierarchicalTopK SAEs of the
embedded preset: θ calibrated on the first CALIBRATION_TOKENS training tokens (special tokens removed), the mean L0 it
gives on the preset's held-out tokens, which the calibration never saw.

Usage: python docs/quality/calibration.py OUTPUT_STEM SAE_DIR [SAE_DIR ...]
Writes OUTPUT_STEM.md and OUTPUT_STEM.json (one row per SAE and target mean L0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sae_lens_hierarchical import load_sae, presets
from sae_lens_hierarchical.evaluation import evaluate_over_mean_l0, serving_mean_l0s
from sae_lens_hierarchical.jobs import prepare_embedded_activations

CALIBRATION_TOKENS = 30_000


def main() -> None:
    stem, sae_dirs = Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]]
    preset = presets.get_preset("gemma-3-270m")
    model = preset.load_model("cpu")
    activations = prepare_embedded_activations(preset, model, preset.eval_tokens, preset.training_tokens)
    assert activations.train is not None
    calibration = activations.train.token_activations(activations.special_token_ids)[:CALIBRATION_TOKENS]
    held_out = activations.held_out_activations()
    rows = []
    for sae_dir in sae_dirs:
        sae = load_sae(sae_dir)
        targets = serving_mean_l0s(sae.cfg.k)
        on_calibration = evaluate_over_mean_l0(sae, calibration, targets, progress=False)
        on_held_out = evaluate_over_mean_l0(sae, held_out, targets, progress=False, calibration_activations=calibration)
        for own, other in zip(on_calibration, on_held_out, strict=True):
            assert own.threshold == other.threshold
            rows.append(
                {
                    "sae": "/".join(sae_dir.parts[-3:]),
                    "mean_l0_target": own.mean_l0_target,
                    "threshold": own.threshold,
                    "l0_calibration": own.l0,
                    "l0_held_out": other.l0,
                    "relative_error": other.l0 / own.mean_l0_target - 1,
                }
            )
    lines = [
        f"θ calibrated on {CALIBRATION_TOKENS:,} training tokens, mean L0 on {held_out.shape[0]:,} held-out tokens:",
        "",
        "| SAE | target mean L0 | θ | mean L0, calibration text | mean L0, held-out text | held-out / target - 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sae']} | {row['mean_l0_target']:g} | {row['threshold']:.4g} | {row['l0_calibration']:.3f} | "
            f"{row['l0_held_out']:.3f} | {100 * row['relative_error']:+.2f}% |"
        )
    worst = max(abs(row["relative_error"]) for row in rows)
    lines += ["", f"Largest deviation from the target on held-out text: {100 * worst:.2f}%."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
