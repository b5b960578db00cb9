#!/usr/bin/env bash
# Issue 14, the schedule variants of the cheap search (same size, tokens and seeds as docs/quality/search.sh): the level
# weights start uniform over 1..32 and move linearly, over the whole run (585 steps of 1,024 tokens), towards weight w
# on K = 32 (the other levels sharing 1 - w).
set -euo pipefail
OUT=${OUT:-results/quality/search}
SEEDS=${SEEDS:-"0 1"}
CLI=${CLI:-sae-lens-hierarchical}
SIZE=(--set sae.d_sae=2048 --set sae.k=32 --downstream-tokens 0)

weights() {  # weights <n levels> <weight of the last level>: the rest share what is left equally
    python3 -c "import json,sys; n,last=int(sys.argv[1]),float(sys.argv[2]); print(json.dumps([(1-last)/(n-1)]*(n-1)+[last]))" "$@"
}

for seed in $SEEDS; do
    for last in 0.5 0.75; do
        dir="$OUT/seed$seed/schedule-to-k-weight-$last"
        [ -e "$dir/comparison.json" ] ||
            "$CLI" compare "${SIZE[@]}" --seed "$seed" --baselines "" --output-dir "$dir" \
                --set "sae.hierarchy_final_weights=$(weights 32 "$last")" --set sae.hierarchy_schedule_steps=585
    done
done
