#!/usr/bin/env bash
# Issues 22 and 23, the full family at the embedded preset's size (Gemma-3-270M block 6, d_sae 4,096, K = 64, 600k
# tokens): HierarchicalTopK, TopK trained at 8/16/32/64 (64 also truncated), BatchTopK trained at 8/16/32/64, Matryoshka
# BatchTopK at 64 and Multi-TopK, in lockstep on identical batches; every SAE evaluated by k and by mean L0 (threshold
# serving), FVU and CE-loss score, for seeds 0, 1, 2. One thread per process; checkpoints, so that a stopped run
# resumes. Writes results/quality/family/seed<S>/comparison.json; docs/quality/family_table.py reads them.
set -euo pipefail
OUT=${OUT:-results/quality/family}
SEEDS=${SEEDS:-"0 1 2"}
CLI=${CLI:-sae-lens-hierarchical}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
for seed in $SEEDS; do
    dir="$OUT/seed$seed"
    [ -e "$dir/comparison.json" ] ||
        $CLI compare --seed "$seed" --baselines topk,batchtopk,matryoshka,multi_topk --checkpoints 10 --output-dir "$dir"
done
