#!/usr/bin/env bash
# The README's dashboard screenshot: the latent dashboard of the preset suite's seed-1 HierarchicalTopK SAE
# (docs/quality/confirm.sh), latent 930's page rendered by headless Chromium.
set -euo pipefail
CLI=${CLI:-sae-lens-hierarchical}
SAE=${SAE:-results/quality/preset/seed1/baselines/saes/htopk-k64}
OUT=${OUT:-results/interpret/dashboard-seed1}
[ -e "$OUT/index.html" ] || "$CLI" inspect "$SAE" --output-dir "$OUT"
chromium --headless --no-sandbox --hide-scrollbars --window-size=1280,1500 \
    --screenshot="$PWD/docs/interpretability/dashboard_latent.png" "file://$(realpath "$OUT")/latents/930.html"
