#!/usr/bin/env bash
# Issue 24, hierarchical fine-tunes of a pretrained TopK SAE at the preset's size: the TopK@64 SAE that
# docs/quality/family.sh trains on 600k tokens (seed S), fine-tuned hierarchically (compare --init-from: same trainer
# and batch order as the suite) for 5%, 10%, 25% and 50% of its tokens (FVU and CE-loss score); HierarchicalTopK from
# scratch on the same extra tokens (FVU), and on the same total tokens at 10% and 50% (660k and 900k tokens: a
# 900k-token cache, whose first rows the 660k run reuses; FVU). Seeds whose family run is missing are skipped.
# One thread per process. Writes results/quality/hierarchicalize/seed<S>/<run>/comparison.json.
set -euo pipefail
OUT=${OUT:-results/quality/hierarchicalize}
FAMILY=${FAMILY:-results/quality/family}
SEEDS=${SEEDS:-"0 1 2"}
CLI=${CLI:-sae-lens-hierarchical}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
run() {  # run <output dir> <compare arguments...>
    local dir=$1
    shift
    [ -e "$dir/comparison.json" ] || $CLI compare --baselines "" "$@" --output-dir "$dir"
}
for seed in $SEEDS; do
    source_sae="$FAMILY/seed$seed/saes/topk-k64"
    [ -e "$FAMILY/seed$seed/comparison.json" ] || { echo "seed $seed: no family run yet, skipped"; continue; }
    for tokens in 60000 300000 30000 150000; do
        run "$OUT/seed$seed/finetune-$tokens" --seed "$seed" --init-from "$source_sae" --training-tokens "$tokens"
        run "$OUT/seed$seed/scratch-$tokens" --seed "$seed" --training-tokens "$tokens" --downstream-tokens 0
    done
    for total in 900000 660000; do
        run "$OUT/seed$seed/scratch-total-$total" --seed "$seed" --training-tokens "$total" --downstream-tokens 0
    done
done
