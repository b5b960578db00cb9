#!/usr/bin/env bash
# Issue 14, the cheap search: which levels / weights close HierarchicalTopK's gap to TopK at k = K without losing its
# lead below K. d_sae 2,048, K = 32, the embedded preset's 600k training tokens (its existing activation cache),
# FVU on its 30k held-out tokens; seeds 0 and 1 (SEEDS="0 1 2" for more). Each seed trains TopK at 4, 8, 16 and 32 and
# the default HierarchicalTopK (uniform over 1..32) in lockstep, then each variant alone on the same batches. The
# schedule variants start uniform and move linearly, over the whole run (585 steps of 1,024 tokens), towards weight w
# on K = 32 (the other levels sharing 1 - w).
# Writes results/quality/search/seed<S>/<variant>/comparison.json; docs/quality/summarize.py reads them.
set -euo pipefail
OUT=${OUT:-results/quality/search}
SEEDS=${SEEDS:-"0 1"}
CLI=${CLI:-sae-lens-hierarchical}
SIZE=(--set sae.d_sae=2048 --set sae.k=32 --downstream-tokens 0)

weights() {  # weights <n levels> <weight of the last level>: the rest share what is left equally
    python3 -c "import json,sys; n,last=int(sys.argv[1]),float(sys.argv[2]); print(json.dumps([(1-last)/(n-1)]*(n-1)+[last]))" "$@"
}

for seed in $SEEDS; do
    dir="$OUT/seed$seed"
    [ -e "$dir/baselines/comparison.json" ] ||
        "$CLI" compare "${SIZE[@]}" --seed "$seed" --budgets 4,8,16,32 --baselines topk --output-dir "$dir/baselines"
    run() {  # run <variant name> <overrides...>: HierarchicalTopK alone
        local name=$1
        shift
        [ -e "$dir/$name/comparison.json" ] ||
            "$CLI" compare "${SIZE[@]}" --seed "$seed" --baselines "" "$@" --output-dir "$dir/$name"
    }
    run k-weight-0.25 --set "sae.hierarchy_weights=$(weights 32 0.25)"
    run k-weight-0.5 --set "sae.hierarchy_weights=$(weights 32 0.5)"
    run geometric --set 'sae.hierarchy_levels=[1,2,4,8,16,32]'
    run geometric-k-weight-0.5 --set 'sae.hierarchy_levels=[1,2,4,8,16,32]' \
        --set 'sae.hierarchy_weights=[0.1,0.1,0.1,0.1,0.1,0.5]'
    for last in 0.5 0.75; do
        run "schedule-to-k-weight-$last" --set "sae.hierarchy_final_weights=$(weights 32 "$last")" \
            --set sae.hierarchy_schedule_steps=585
    done
done
