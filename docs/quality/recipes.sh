#!/usr/bin/env bash
# Issue 23, recipes not tried yet against the price at K, at the search size (d_sae 2,048, 600k tokens, seeds 0 and 1;
# the TopK baselines at K = 32 are docs/quality/search.sh's, same seeds and batches):
#   - train-at-2K: HierarchicalTopK trained at K' = 64, served at every budget <= 32 (by k and by threshold);
#   - sampled-N: each step N levels below K = 32 drawn at random, and K (Matryoshka-style), N = 3 and 7.
# One thread per process. Writes results/quality/recipes/seed<S>/<recipe>/comparison.json.
set -euo pipefail
OUT=${OUT:-results/quality/recipes}
SEEDS=${SEEDS:-"0 1"}
CLI=${CLI:-sae-lens-hierarchical}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
SIZE=(--set sae.d_sae=2048 --downstream-tokens 0 --baselines "")
for seed in $SEEDS; do
    dir="$OUT/seed$seed"
    [ -e "$dir/train-at-2K/comparison.json" ] ||
        $CLI compare "${SIZE[@]}" --set sae.k=64 --seed "$seed" --output-dir "$dir/train-at-2K"
    [ -e "$dir/sampled/comparison.json" ] ||
        $CLI compare "${SIZE[@]}" --set sae.k=32 --seed "$seed" --objectives sampled-3,sampled-7 --output-dir "$dir/sampled"
done
