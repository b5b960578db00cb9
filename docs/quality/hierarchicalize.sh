#!/usr/bin/env bash
# Issue 24, hierarchical fine-tunes of a pretrained TopK SAE at the preset's size: the TopK@64 SAE that
# docs/quality/family.sh trains on 600k tokens (seed S), fine-tuned hierarchically (compare --init-from: same trainer
# and batch order as the suite, at the fine-tune learning rate, a 40th of the preset's) for 5%, 10%, 25% and 50% of its
# tokens (FVU; CE-loss score at 10%); HierarchicalTopK from
# scratch on the same extra tokens (FVU), and on the same total tokens at 10% and 50% (660k and 900k tokens; FVU).
# Seeds whose family run is missing are skipped.
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
    # The 10% pair and its same-total scratch run first: the comparison a stopped session most needs. CE-loss scores
    # (2,048 held-out tokens, about 10 minutes a run on one core) for the 10% fine-tune; FVU for every run.
    for tokens in 60000 30000 150000 300000; do
        downstream=0
        if [ "$tokens" = 60000 ]; then downstream=2048; fi
        run "$OUT/seed$seed/finetune-$tokens" --seed "$seed" --init-from "$source_sae" --training-tokens "$tokens" \
            --downstream-tokens "$downstream"
        run "$OUT/seed$seed/scratch-$tokens" --seed "$seed" --training-tokens "$tokens" --downstream-tokens 0
        if [ "$tokens" = 60000 ]; then
            run "$OUT/seed$seed/scratch-total-660000" --seed "$seed" --training-tokens 660000 --downstream-tokens 0
        fi
    done
    run "$OUT/seed$seed/scratch-total-900000" --seed "$seed" --training-tokens 900000 --downstream-tokens 0
done
