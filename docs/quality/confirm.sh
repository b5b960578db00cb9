#!/usr/bin/env bash
# Issue 14, the noise at the embedded preset's size: the README's comparison (Gemma-3-270M, d_sae 4,096, K = 64,
# 600k tokens; HierarchicalTopK, TopK trained at 8/16/32/64, Multi-TopK; FVU and CE-loss score) for seeds 0, 1, 2.
# Writes results/quality/preset/seed<S>/baselines/comparison.json; docs/quality/summarize.py reads them.
set -euo pipefail
OUT=${OUT:-results/quality/preset}
SEEDS=${SEEDS:-"0 1 2"}
CLI=${CLI:-sae-lens-hierarchical}
for seed in $SEEDS; do
    [ -e "$OUT/seed$seed/baselines/comparison.json" ] ||
        "$CLI" compare --seed "$seed" --output-dir "$OUT/seed$seed/baselines"
done
