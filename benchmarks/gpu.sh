#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step functions run through run_step, which shellcheck cannot follow
# benchmarks/gpu.sh: the checks and measurements to run on a lent NVIDIA GPU, in one call that fits the lease
# (about 7 minutes on an H100; GPU_BUDGET_S, default 450, skips the steps that would start too late).
#
# Install. A lent machine has torch with CUDA but no package registry: on a connected machine run
# `bash benchmarks/gpu_wheels.sh` (downloads the wheels of this package's dependencies the image lacks into .whl/,
# ignored by git, about 45 MB) and carry that folder with the working tree; the `wheels` step installs them with
# `pip --no-deps --no-index --target` and puts them and this checkout on PYTHONPATH. Elsewhere:
# `pip install -e ".[dev,bench]"` without the README's CPU torch pin.
#
# Run (from anywhere; it changes to the repo root):
#
#     bash benchmarks/gpu.sh
#
# Steps. Each writes <results>/<step>.log; a failed step is recorded and the next one runs:
#   wheels           .whl/*.whl installed, where the folder exists.
#   env              nvidia-smi, Python/torch/CUDA/cuDNN/NCCL/triton/... versions, git commit, pip freeze.
#   triton_tests     tests/test_triton_kernels.py, tests/test_triton_sparse.py and tests/test_self_check.py with the
#                    kernels COMPILED on CUDA tensors (TRITON_INTERPRET=0; tests/conftest.py would otherwise set 1). A
#                    skipped test counts as a failure (except those that exist for the interpreter).
#   doctor           `sae-lens-hierarchical doctor`: the kernels' self-check on this device.
#   sync_check       benchmarks/sync_check.py: HTopK training steps under torch.cuda.set_sync_debug_mode("warn"); every
#                    host synchronisation is listed with where it happened (sync_check.json); any fails the step.
#   bench_step_<p>   for p = bf16, tf32, fp32: benchmarks/bench_step.py --device cuda --precision p at the paper's sizes
#                    (d_in 2304, d_sae 65,536, 4096 tokens, checked in its JSON), K 16..128, rows SAELens TopK,
#                    sparsify TopK (as its trainer runs it, and clipped), HTopK fused and triton, the two floors, with
#                    peak GPU memory per row; then the Triton step's breakdown at K = 64 between CUDA events.
#   profile_bf16     torch.profiler's top kernels per step at K = 64 in bf16 (SAELens TopK, sparsify, HTopK triton).
#   compare_tiny     `compare --preset tiny-random --device cuda`: an end-to-end run.
#   extras           only with GPU_EXTRA=1: the NCCL data-parallel check, bench_inference, the Gemma-2 2B full-width
#                    benchmark and, with 2 GPUs, a torchrun comparison.
# Then summary.md: every step, its status, wall-clock seconds and log, and each benchmark's targets.
#
# Results: benchmarks/results/gpu-<gpu name>-<date>/ (another run the same day gets a time suffix).
# Environment: PYTHON (default .venv/bin/python, else python3), STEP_TIMEOUT (seconds a step may run, default 300),
# BENCH_REPEATS (timed steps per row, default 10), GPU_BUDGET_S, GPU_EXTRA, GPU_RESULTS_DIR (the results folder).
# Exit status: 0 when every step that ran passed, 1 when one failed, 2 when there is no usable GPU or Python.
# Needs bash >= 4.4, GNU coreutils (timeout, date +%N).

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3 || echo python3)  # a lent machine's own Python, torch included
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
BENCH_REPEATS=${BENCH_REPEATS:-10}
GPU_BUDGET_S=${GPU_BUDGET_S:-450}  # the whole run: steps that would start later than 60 s before it are skipped
SCRIPT_START=$SECONDS
out_of_time() { ((SECONDS - SCRIPT_START > GPU_BUDGET_S - 60)); }
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

# --- 0. wheels the machine lacks (benchmarks/gpu_wheels.sh downloads them into .whl/ on a connected machine) ----------

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # this checkout's package, also for the scripts in benchmarks/
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${TMPDIR:-/tmp}/gpu-sh-site
    install_wheels() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl; }
    run_step wheels install_wheels
    export PYTHONPATH=$PYTHONPATH:$SITE
else
    skip_step wheels "no .whl/ (the machine's own packages are used)"
fi

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
else
    skip_step doctor "this checkout has no 'doctor' subcommand ('sae-lens-hierarchical doctor --help' failed)"
fi

# --- 4. no host synchronisation in the training step ---------------------------------------------------------------

sync_check() {
    timeout --kill-after=30 "$STEP_TIMEOUT" "$PYTHON" benchmarks/sync_check.py --output "$OUT/sync_check.json"
}
run_step sync_check sync_check

# --- 5. step benchmark at the paper's sizes in fp32, tf32 and bf16: times, memory, breakdown, profile -----------------

STEP_ROWS=(topk sparsify sparsify_clipped htopk_fused htopk_triton floor floor_linear)

check_bench_step() { # JSON ROWS...: the JSON has the paper's sizes and every row asked for
    local json=$1
    shift
    "$PYTHON" - "$json" "$@" <<'PY'
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
problems += [f"{row['implementation']} K={row['k']}: no peak memory" for row in rows if "peak_tensor_bytes" not in row]
print(f"{config['device_name']} {config['precision']}: d_in {config['d_in']}, d_sae {config['d_sae']}, "
      f"{config['tokens']} tokens, K {sorted({row['k'] for row in rows})}, rows {sorted(ran)}")
for problem in problems:
    print("PROBLEM:", problem)
sys.exit(1 if problems else 0)
PY
}

bench_step() { # PRECISION: every row at K 16..128 with in-process memory, then the Triton step's breakdown at K=64
    local precision=$1 dir=$OUT/bench_step suffix=""
    [[ $precision != fp32 ]] && suffix=_$precision
    mkdir -p "$dir" || return 1
    timeout --kill-after=30 "$STEP_TIMEOUT" "$PYTHON" benchmarks/bench_step.py --device cuda --precision "$precision" \
        --ks 16 32 64 128 --warmup 3 --repeats "$BENCH_REPEATS" --implementations "${STEP_ROWS[@]}" \
        --output-dir "$dir" || return
    check_bench_step "$dir/bench_step_cuda$suffix.json" "${STEP_ROWS[@]}" || return
    timeout --kill-after=30 "$STEP_TIMEOUT" "$PYTHON" benchmarks/bench_step.py --device cuda --precision "$precision" \
        --breakdown 64 --warmup 3 --repeats "$BENCH_REPEATS" --output-dir "$dir"
}

for precision in bf16 tf32 fp32; do  # the precisions people train in first, should the lease run out
    if out_of_time; then
        skip_step "bench_step_$precision" "the run's time budget (GPU_BUDGET_S=$GPU_BUDGET_S) is spent"
        continue
    fi
    run_step "bench_step_$precision" bench_step "$precision"
done

profile() {
    timeout --kill-after=30 "$STEP_TIMEOUT" "$PYTHON" benchmarks/bench_step.py --device cuda --precision bf16 \
        --profile 64 --warmup 3 --implementations topk sparsify htopk_triton --output-dir "$OUT/bench_step"
}
if out_of_time; then
    skip_step profile_bf16 "the run's time budget (GPU_BUDGET_S=$GPU_BUDGET_S) is spent"
else
    run_step profile_bf16 profile
fi

# --- 6. end to end on one GPU; the slower extras only with GPU_EXTRA=1 -----------------------------------------------

if out_of_time; then
    skip_step compare_tiny "the run's time budget (GPU_BUDGET_S=$GPU_BUDGET_S) is spent"
else
    run_step compare_tiny "${CLI[@]}" compare --preset tiny-random --device cuda --output-dir "$OUT/compare_tiny" \
        --downstream-tokens 0 --cache-dir "$CACHE_ROOT/one_gpu"
fi
if [[ ${GPU_EXTRA:-0} == 1 ]]; then
    run_step ddp_nccl_one_gpu "$PYTHON" benchmarks/ddp_nccl_check.py  # the data-parallel trainer over NCCL
    if "$PYTHON" benchmarks/bench_inference.py --help 2>/dev/null | grep -q -- '--device'; then
        run_step bench_inference "$PYTHON" benchmarks/bench_inference.py --device cuda \
            --output-dir "$OUT/bench_inference"
    fi
    run_step gemma_2_2b_full_width "$PYTHON" benchmarks/gemma_2_2b_full_width.py --device cuda
    if ((N_GPUS >= 2)); then
        # torchrun is torch.distributed.run; the venv's Python runs it, so no PATH lookup can pick another torch.
        run_step ddp_tiny "$PYTHON" -m torch.distributed.run --nproc-per-node 2 -m sae_lens_hierarchical compare \
            --preset tiny-random --device cuda --output-dir "$OUT/ddp_tiny" --downstream-tokens 0 \
            --cache-dir "$CACHE_ROOT/ddp"
    fi
else
    skip_step extras "ddp_nccl_one_gpu, bench_inference, gemma_2_2b_full_width, ddp_tiny: set GPU_EXTRA=1"
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
    for bench_md in "$OUT"/bench_step/bench_step_cuda*.md; do
        [[ -f $bench_md ]] || continue
        echo "Step benchmark: ${bench_md#"$OUT"/} (and .json beside it). Its targets:"
        echo
        sed -n '/^Targets/,$p' "$bench_md"
        echo
    done
    [[ -f $OUT/sync_check.json ]] && { echo "Host synchronisations in the step:"; cat "$OUT/sync_check.json"; echo; }
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
