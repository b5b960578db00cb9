#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step functions run through run_step, which shellcheck cannot follow
# benchmarks/gpu.sh: the checks and measurements to run on the first machine with an NVIDIA GPU.
#
# Install (repo root, on the GPU machine): the README's install without the CPU torch pin, so that pip picks a CUDA
# build of torch; [dev] brings triton (through [gpu]) and pytest, [bench] brings sparsify for its TopK row:
#
#     python3 -m venv .venv && .venv/bin/pip install -e ".[dev,bench]"
#
# Run (from anywhere; it changes to the repo root):
#
#     bash benchmarks/gpu.sh
#
# Steps. Each writes <results>/<step>.log; a failed step is recorded and the next one runs:
#   env              nvidia-smi (full, -L, topo -m), Python/torch/CUDA/cuDNN/NCCL/triton/... versions, git commit,
#                    pip freeze.
#   triton_tests     tests/test_triton_kernels.py and tests/test_triton_sparse.py (and tests/test_self_check.py where
#                    it exists) with the kernels COMPILED on CUDA tensors: TRITON_INTERPRET=0. tests/conftest.py sets
#                    TRITON_INTERPRET=1 unless it is already set, so leaving it unset would run the interpreter; with 0
#                    the tests' `device` fixture picks "cuda". A skipped test counts as a failure here (except the ones
#                    that only run in the interpreter, whose reason names TRITON_INTERPRET=1): it means a kernel
#                    did not run on the GPU.
#   doctor           `sae-lens-hierarchical doctor` (with --device cuda where it takes one), where the subcommand exists;
#                    doctor_json: the same with --json into doctor.json, where it takes --json.
#   bench_step       benchmarks/bench_step.py --device cuda: its CUDA sizes are the paper's, d_in 2304, d_sae 65,536,
#                    4096 tokens (checked in its JSON afterwards); K 16, 32, 64, 128 (16 added to its CUDA default so
#                    that the "K=128 / K=16" target is measured); rows SAELens TopK, sparsify TopK, HTopK reference,
#                    HTopK fused, HTopK triton and the one-matmul floor. If that run fails (e.g. the reference loss
#                    runs out of memory), bench_step_without_reference runs the other rows.
#   bench_inference  benchmarks/bench_inference.py on CUDA, where it takes --device (skipped otherwise).
#   gemma_2_2b_full_width  benchmarks/gemma_2_2b_full_width.py --device cuda, where it exists and takes --device.
#   compare_tiny     `compare --preset tiny-random --device cuda` on one GPU: an end-to-end smoke run, and the
#                    one-process time for ddp_tiny.
#   ddp_nccl_one_gpu benchmarks/ddp_nccl_check.py: the data-parallel trainer in a one-process NCCL group against
#                    SAELens's trainer (float64), so NCCL's own rules (GPU tensors only) are exercised on one GPU.
#   ddp_tiny         with 2 or more GPUs (nvidia-smi -L): the same under `torchrun --nproc-per-node 2` (data-parallel).
# Then summary.md: every step, its status, wall-clock seconds and log.
#
# Results: benchmarks/results/gpu-<gpu name>-<date>/ (another run the same day gets a time suffix).
# Environment: PYTHON (default .venv/bin/python), STEP_TIMEOUT (seconds a step may run, default 3600),
# BENCH_REPEATS (timed steps per row of bench_step, default 20), GPU_RESULTS_DIR (overrides the results folder).
# Exit status: 0 when every step that ran passed, 1 when one failed, 2 when there is no usable GPU or Python.
# Needs bash >= 4.4, GNU coreutils (timeout, date +%N).

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
STEP_TIMEOUT=${STEP_TIMEOUT:-3600}
BENCH_REPEATS=${BENCH_REPEATS:-20}
# Compiled kernels everywhere: an inherited TRITON_INTERPRET=1 would run every Triton kernel in the CPU interpreter.
export TRITON_INTERPRET=0

die() {
    printf 'benchmarks/gpu.sh: %s\n' "$*" >&2
    exit 2
}

# --- preflight: a GPU, its driver and a CUDA build of torch, or stop here -------------------------------------------

[[ -x $PYTHON ]] || die "no Python at $PYTHON: install first (see the header of this script) or set PYTHON=..."
command -v nvidia-smi >/dev/null 2>&1 ||
    die "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver installed"
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi -L failed: no NVIDIA GPU is usable (driver not loaded?)"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    torch_build=$("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -n 1)
    die "torch.cuda.is_available() is False for $PYTHON (torch $torch_build): install a CUDA build of torch, i.e. \
the install line in this script's header, without the README's torch==<version> pin (a CPU wheel)"
fi

N_GPUS=$(nvidia-smi -L | grep -c '^GPU')
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | sed -n 1p)
slug=$(printf '%s' "${GPU_NAME:-$(hostname -s)}" | tr -cs 'A-Za-z0-9' '-' | tr '[:upper:]' '[:lower:]')
slug=${slug#-}
slug=${slug%-}
OUT=${GPU_RESULTS_DIR:-benchmarks/results/gpu-${slug:-unknown}-$(date +%Y-%m-%d)}
[[ -e $OUT && -z ${GPU_RESULTS_DIR:-} ]] && OUT=$OUT-$(date +%H%M%S)
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
CACHE_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-sh-cache.XXXXXX") || die "mktemp failed"
trap 'rm -rf -- "$CACHE_ROOT"' EXIT
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
printf 'benchmarks/gpu.sh: %s GPU(s), first %s; results in %s\n' "$N_GPUS" "$GPU_NAME" "$OUT" | tee "$OUT/gpu.log"

# --- step bookkeeping ------------------------------------------------------------------------------------------------

STEPS=()
STATUSES=()
DURATIONS=()
NOTES=()
FAILED=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

record() { # NAME STATUS SECONDS NOTE
    STEPS+=("$1")
    STATUSES+=("$2")
    DURATIONS+=("$3")
    NOTES+=("$4")
    [[ $2 == FAILED* ]] && FAILED=1
    printf '== %s: %s (%s s)%s\n' "$1" "$2" "$3" "${4:+; $4}" | tee -a "$OUT/gpu.log"
}

skip_step() { # NAME REASON
    printf '\n== %s: skipped\n' "$1" | tee -a "$OUT/gpu.log"
    record "$1" skipped - "$2"
}

fail_last() { # NOTE: turn the last recorded step into a failure (a check after its command found something wrong)
    local i=$((${#STEPS[@]} - 1))
    STATUSES[i]="FAILED"
    NOTES[i]="${NOTES[i]:+${NOTES[i]}; }$1"
    FAILED=1
    printf '== %s: FAILED after its check: %s\n' "${STEPS[i]}" "$1" | tee -a "$OUT/gpu.log"
}

# run_step NAME COMMAND...: COMMAND's output goes to NAME.log and the terminal. A shell function runs as it is (it
# applies `timeout` to its own commands); anything else runs under `timeout STEP_TIMEOUT`. Sets RC.
RC=0
run_step() {
    local name=$1 start status
    shift
    printf '\n== %s: %s\n' "$name" "$*" | tee -a "$OUT/gpu.log"
    start=$(now)
    if declare -F "$1" >/dev/null; then
        "$@" 2>&1 | tee "$OUT/$name.log"
    else
        timeout --kill-after=60 "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"
    fi
    RC=${PIPESTATUS[0]}
    case $RC in
        0) status=ok ;;
        124 | 137) status="FAILED (timed out after ${STEP_TIMEOUT} s)" ;;
        *) status="FAILED (exit $RC)" ;;
    esac
    record "$name" "$status" "$(elapsed "$start" "$(now)")" ""
}

# --- 1. environment --------------------------------------------------------------------------------------------------

env_info() {
    echo "date (UTC): $STARTED"
    echo "host: $(hostname)"
    echo "repo: $REPO"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'n/a (not a git checkout)')"
    echo "uncommitted changes (git status --short):"
    git --no-optional-locks -C "$REPO" status --short 2>/dev/null | sed 's/^/    /'
    echo
    nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
    nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi-L.txt"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max,clocks.max.sm,power.limit \
        --format=csv 2>&1 | tee "$OUT/nvidia-smi-query.csv"
    nvidia-smi topo -m 2>&1 | tee "$OUT/nvidia-smi-topo.txt"
    echo
    "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as metadata
import platform
import sys

import torch

print("python", sys.version.split()[0], "|", platform.platform())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
try:
    print("NCCL", torch.cuda.nccl.version())
except Exception as error:  # noqa: BLE001 - informative only
    print("NCCL n/a:", error)
for index in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(index)
    print(f"cuda:{index} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs")
print("TF32 matmuls allowed:", torch.backends.cuda.matmul.allow_tf32,
      "| float32 matmul precision:", torch.get_float32_matmul_precision())
for name in ("sae-lens-hierarchical", "sae-lens", "transformer-lens", "triton", "eai-sparsify", "transformers",
             "datasets", "numpy"):
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = "not installed"
    print(f"{name} {version}")
PY
    "$PYTHON" -m pip freeze >"$OUT/pip-freeze.txt" 2>&1
    echo "pip freeze: $OUT/pip-freeze.txt"
}

run_step env env_info

# --- 2. the Triton kernels, compiled ---------------------------------------------------------------------------------

TRITON_TEST_FILES=(tests/test_triton_kernels.py tests/test_triton_sparse.py)
[[ -f tests/test_self_check.py ]] && TRITON_TEST_FILES+=(tests/test_self_check.py)

triton_tests() {
    # Both kernel modules must report compiled kernels before the tests mean anything.
    TRITON_INTERPRET=0 "$PYTHON" - <<'PY' || return 3
import sys

from sae_lens_hierarchical import triton_sparse
from sae_lens_hierarchical.losses import triton_kernels

loss_interpreted, scatter_interpreted = triton_kernels.INTERPRETED, triton_sparse.triton_interpreted()
print(f"hierarchical loss kernels interpreted: {loss_interpreted}; scatter kernel interpreted: {scatter_interpreted}")
sys.exit(1 if loss_interpreted or scatter_interpreted else 0)
PY
    TRITON_INTERPRET=0 timeout --kill-after=60 "$STEP_TIMEOUT" \
        "$PYTHON" -m pytest "${TRITON_TEST_FILES[@]}" -v -rs --junitxml="$OUT/triton_tests.xml"
}

run_step triton_tests triton_tests
if [[ -f $OUT/triton_tests.xml ]]; then
    skipped=$("$PYTHON" - "$OUT/triton_tests.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

# Tests that exist to run the kernels in Triton's CPU interpreter skip, by design, when they are compiled.
root = ET.parse(sys.argv[1]).getroot()
skips = [s.get("message", "") for s in root.iter("skipped")]
print(sum("TRITON_INTERPRET=1" not in message for message in skips))
PY
    )
    if [[ ${skipped:-0} != 0 ]]; then
        fail_last "$skipped test(s) skipped: those kernels did not run compiled on the GPU (reasons in triton_tests.log)"
    fi
fi

# --- 3. doctor, where it exists --------------------------------------------------------------------------------------

CLI=("$PYTHON" -m sae_lens_hierarchical)
[[ -x $(dirname "$PYTHON")/sae-lens-hierarchical ]] && CLI=("$(dirname "$PYTHON")/sae-lens-hierarchical")
if doctor_help=$("${CLI[@]}" doctor --help 2>&1); then
    doctor_args=(doctor)
    grep -q -- '--device' <<<"$doctor_help" && doctor_args+=(--device cuda)
    run_step doctor "${CLI[@]}" "${doctor_args[@]}"
    if grep -q -- '--json' <<<"$doctor_help"; then
        doctor_json() { timeout --kill-after=60 "$STEP_TIMEOUT" "${CLI[@]}" "${doctor_args[@]}" --json >"$OUT/doctor.json"; }
        run_step doctor_json doctor_json
    fi
else
    skip_step doctor "this checkout has no 'doctor' subcommand ('sae-lens-hierarchical doctor --help' failed)"
fi

# --- 4. step benchmark at the paper's sizes, and the inference benchmark ---------------------------------------------

ALL_ROWS=(topk sparsify htopk_reference htopk_fused htopk_triton floor)

check_bench_step() { # DIR ROWS...: the JSON has the paper's sizes and every row asked for
    local dir=$1
    shift
    "$PYTHON" - "$dir/bench_step_cuda.json" "$@" <<'PY'
import json
import sys

path, wanted = sys.argv[1], sys.argv[2:]
result = json.load(open(path))
config, rows = result["config"], result["rows"]
problems = [
    f"{name} is {config[name]}, not {expected}"
    for name, expected in (("d_in", 2304), ("d_sae", 65536), ("tokens", 4096))
    if config[name] != expected
]
ran = {row["implementation"] for row in rows}
problems += [f"row {name} missing (see the log for why)" for name in wanted if name not in ran]
print(f"{config['device_name']}: d_in {config['d_in']}, d_sae {config['d_sae']}, {config['tokens']} tokens, "
      f"K {sorted({row['k'] for row in rows})}, rows {sorted(ran)}")
for problem in problems:
    print("PROBLEM:", problem)
sys.exit(1 if problems else 0)
PY
}

bench_step() { # DIR ROWS...
    local dir=$1
    shift
    mkdir -p "$dir" || return 1
    timeout --kill-after=60 "$STEP_TIMEOUT" "$PYTHON" benchmarks/bench_step.py --device cuda --ks 16 32 64 128 \
        --warmup 3 --repeats "$BENCH_REPEATS" --implementations "$@" --output-dir "$dir" || return
    check_bench_step "$dir" "$@"
}

run_step bench_step bench_step "$OUT/bench_step" "${ALL_ROWS[@]}"
BENCH_MD=$OUT/bench_step/bench_step_cuda.md
if ((RC != 0)); then
    without_reference=()
    for row in "${ALL_ROWS[@]}"; do
        [[ $row != htopk_reference ]] && without_reference+=("$row")
    done
    run_step bench_step_without_reference bench_step "$OUT/bench_step_without_reference" "${without_reference[@]}"
    ((RC == 0)) && BENCH_MD=$OUT/bench_step_without_reference/bench_step_cuda.md
fi

if "$PYTHON" benchmarks/bench_inference.py --help 2>/dev/null | grep -q -- '--device'; then
    run_step bench_inference "$PYTHON" benchmarks/bench_inference.py --device cuda --output-dir "$OUT/bench_inference"
else
    skip_step bench_inference "benchmarks/bench_inference.py takes no --device (it runs on CPU only)"
fi

# The gemma-2-2b preset's training path at full width on random weights (another engineer's benchmark; run where it
# exists and takes --device, with --output-dir where it takes one).
FULL_WIDTH=benchmarks/gemma_2_2b_full_width.py
if [[ ! -f $FULL_WIDTH ]]; then
    skip_step gemma_2_2b_full_width "$FULL_WIDTH does not exist in this checkout"
elif full_width_help=$("$PYTHON" "$FULL_WIDTH" --help 2>&1) && grep -q -- '--device' <<<"$full_width_help"; then
    full_width_args=(--device cuda)
    grep -q -- '--output-dir' <<<"$full_width_help" && full_width_args+=(--output-dir "$OUT/gemma_2_2b_full_width")
    run_step gemma_2_2b_full_width "$PYTHON" "$FULL_WIDTH" "${full_width_args[@]}"
else
    skip_step gemma_2_2b_full_width "$FULL_WIDTH takes no --device (or its --help failed)"
fi

# --- 5. end to end on one GPU, then data-parallel on two -------------------------------------------------------------

run_step compare_tiny "${CLI[@]}" compare --preset tiny-random --device cuda --output-dir "$OUT/compare_tiny" \
    --downstream-tokens 0 --cache-dir "$CACHE_ROOT/one_gpu"
run_step ddp_nccl_one_gpu "$PYTHON" benchmarks/ddp_nccl_check.py  # the data-parallel trainer over NCCL vs SAETrainer
if ((N_GPUS >= 2)); then
    # torchrun is torch.distributed.run; the venv's Python runs it, so no PATH lookup can pick another torch.
    run_step ddp_tiny "$PYTHON" -m torch.distributed.run --nproc-per-node 2 -m sae_lens_hierarchical compare \
        --preset tiny-random --device cuda --output-dir "$OUT/ddp_tiny" --downstream-tokens 0 \
        --cache-dir "$CACHE_ROOT/ddp"
else
    skip_step ddp_tiny "needs 2 GPUs; nvidia-smi -L lists $N_GPUS"
fi

# --- 6. summary ------------------------------------------------------------------------------------------------------

{
    echo "# GPU run of benchmarks/gpu.sh, $STARTED"
    echo
    echo "Host $(hostname); $N_GPUS GPU(s):"
    echo
    nvidia-smi -L 2>/dev/null | sed 's/^/    /'
    echo
    echo "Commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo n/a)" \
        "($(git --no-optional-locks -C "$REPO" status --short 2>/dev/null | wc -l) uncommitted paths); versions in versions.txt," \
        "packages in pip-freeze.txt, driver and topology in nvidia-smi*.txt."
    echo
    echo "| step | status | seconds | log | note |"
    echo "|---|---|---:|---|---|"
    for i in "${!STEPS[@]}"; do
        log="${STEPS[i]}.log"
        [[ -f $OUT/$log ]] || log="-"
        printf '| %s | %s | %s | %s | %s |\n' "${STEPS[i]}" "${STATUSES[i]}" "${DURATIONS[i]}" "$log" \
            "${NOTES[i]//|//}"
    done
    echo
    if [[ -f $BENCH_MD ]]; then
        echo "Step benchmark: ${BENCH_MD#"$OUT"/} (and .json beside it). Its targets:"
        echo
        sed -n '/^Targets/,$p' "$BENCH_MD"
    else
        echo "Step benchmark: no report was written (see bench_step.log)."
    fi
    echo
    if ((FAILED)); then
        echo "Result: at least one step FAILED (exit status 1)."
    else
        echo "Result: every step that ran passed."
    fi
} >"$OUT/summary.md"

printf '\n' | tee -a "$OUT/gpu.log"
cat "$OUT/summary.md"
printf '\nbenchmarks/gpu.sh: wrote %s\n' "$OUT"
exit $((FAILED ? 1 : 0))
