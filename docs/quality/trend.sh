#!/usr/bin/env bash
# Issue 14, the training-length trend at the search size (d_sae 2,048, K = 32): HierarchicalTopK (uniform) and TopK
# trained at 4, 8, 16, 32, on 150k, 300k, 1.2M and 2.4M training tokens, seeds 0 and 1 (the 600k point is
# docs/quality/search.sh's baselines, same seeds). Lengths below the corpus cache their own prefix of the training
# sequences; 1.2M and 2.4M share one cache of every training sequence (~990k tokens, float32, 2.5 GB) and reach
# their length by SAELens-style reuse over epochs (1.2 and 2.4 passes, a fresh shuffle each pass).
set -euo pipefail
OUT=${OUT:-results/quality/trend}
SEEDS=${SEEDS:-"0 1"}
TOKENS=${TOKENS:-"150000 300000 1200000 2400000"}
CLI=${CLI:-sae-lens-hierarchical}
for tokens in $TOKENS; do
    for seed in $SEEDS; do
        dir="$OUT/tokens$tokens/seed$seed/baselines"
        [ -e "$dir/comparison.json" ] ||
            "$CLI" compare --set sae.d_sae=2048 --set sae.k=32 --downstream-tokens 0 --seed "$seed" --budgets 4,8,16,32 \
                --baselines topk --training-tokens "$tokens" --output-dir "$dir"
    done
done
