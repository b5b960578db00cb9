#!/usr/bin/env bash
# Issue 23, the width trend: the price at K and the lead below K/2 against the dictionary width, at the preset's K = 64
# and training length (600k tokens of English Wikipedia, the first 60% of the corpus's training sequences: 0.6 pass,
# no token seen twice). HierarchicalTopK and TopK trained at 16, 32 and 64 in lockstep on identical batches, at d_sae
# 2,048, 4,096, 8,192 and 16,384, seeds 0 and 1; FVU on the preset's 30k held-out tokens (no CE-loss scores).
# One thread per process (OMP_NUM_THREADS=1), so that two lanes can share the 2 cores.
# Writes results/quality/width/d<W>/seed<S>/comparison.json; docs/quality/width_table.py reads them.
set -euo pipefail
OUT=${OUT:-results/quality/width}
SEEDS=${SEEDS:-"0 1"}
WIDTHS=${WIDTHS:-"2048 4096 8192 16384"}
CLI=${CLI:-sae-lens-hierarchical}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
for seed in $SEEDS; do
    for width in $WIDTHS; do
        dir="$OUT/d$width/seed$seed"
        [ -e "$dir/comparison.json" ] ||
            $CLI compare --set sae.d_sae="$width" --downstream-tokens 0 --seed "$seed" --budgets 16,32,64 \
                --baselines topk --output-dir "$dir"
    done
done
