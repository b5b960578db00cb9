#!/usr/bin/env bash
# Issue 14, the training-length trend at the search size (d_sae 2,048, K = 32): HierarchicalTopK (uniform) and TopK
# trained at 4, 8, 16, 32 on the first 150k and 300k training tokens of the embedded preset (the 600k point is
# docs/quality/search.sh's seed 0). Each length caches its own activations once (float32, ~0.4 GB and ~0.8 GB).
set -euo pipefail
OUT=${OUT:-results/quality/trend}
CLI=${CLI:-sae-lens-hierarchical}
for tokens in 150000 300000; do
    dir="$OUT/tokens$tokens/seed0/baselines"
    [ -e "$dir/comparison.json" ] ||
        "$CLI" compare --set sae.d_sae=2048 --set sae.k=32 --downstream-tokens 0 --seed 0 --budgets 4,8,16,32 \
            --baselines topk --training-tokens "$tokens" --output-dir "$dir"
done
