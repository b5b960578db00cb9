#!/usr/bin/env bash
# Issue 23, the recipe that won the search, confirmed at the preset's size: HierarchicalTopK trained at K' = 128
# (d_sae 4,096, 600k tokens), served at every budget <= 64 by k and by threshold, seeds 0, 1, 2 on the batches and
# initial weights of docs/quality/family.sh's runs (same seed: same batch order and initialisation), FVU and CE-loss
# score. One thread per process. Writes results/quality/recipes-preset/seed<S>/train-at-2K/comparison.json.
set -euo pipefail
OUT=${OUT:-results/quality/recipes-preset}
SEEDS=${SEEDS:-"0 1 2"}
CLI=${CLI:-sae-lens-hierarchical}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
for seed in $SEEDS; do
    dir="$OUT/seed$seed/train-at-2K"
    [ -e "$dir/comparison.json" ] || $CLI compare --set sae.k=128 --baselines "" --seed "$seed" --output-dir "$dir"
done
