#!/usr/bin/env bash
# Issue 15: sparse probing, feature absorption and the coarse-to-fine view at every k for every SAE of the preset's
# baseline suite (Gemma-3-270M, d_sae 4,096, K = 64, 600k tokens), seeds 1 and 2 (docs/quality/confirm.sh's runs; seed
# 0's SAEs were not kept). Writes results/interpret/preset/interpret.{md,json} and the PNGs; the committed copy is
# docs/interpretability/ (the JSON gzipped).
set -euo pipefail
CLI=${CLI:-sae-lens-hierarchical}
RUNS=${RUNS:-results/quality/preset}
OUT=${OUT:-results/interpret/preset}
[ -e "$OUT/interpret.json" ] ||
    "$CLI" interpret "$RUNS/seed1/baselines" "$RUNS/seed2/baselines" --output-dir "$OUT"
mkdir -p docs/interpretability
cp "$OUT"/interpret.md "$OUT"/job.json "$OUT"/*.png docs/interpretability/
gzip -9 -c "$OUT"/interpret.json > docs/interpretability/interpret.json.gz  # 27 MB of per-latent numbers, 1.9 MB
