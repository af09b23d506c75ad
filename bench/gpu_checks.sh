#!/usr/bin/env bash
# Every GPU check in one command that fits a short loan of a GPU machine (bench/README.md, "GPU checks").
# A machine is lent for 15 minutes in all, its start included, and one command may run 10, so one run takes
# at most 7 minutes: each stage runs under its own budget (a hard timeout), and the budgets of a run sum
# to at most MAX_TOTAL = 420 s, checked before anything runs. That leaves time for a second, shorter run
# of what failed.
#
#   bench/gpu_checks.sh                       every stage (the plan and the budgets are printed first)
#   bench/gpu_checks.sh tests ncu             named stages only
#   bench/gpu_checks.sh --rerun-failed FILE   the stages that were not ok in FILE, the stages.tsv of an earlier
#                                             run copied into the tree ($OUT is emptied between device calls);
#                                             a stage that ran out of time gets the spare budget, up to twice its own
#   bench/gpu_checks.sh --dry-run [...]       print the plan and each stage's commands; run nothing
#   --no-build: never add the build stage; --no-pack: leave $OUT/logs/ as a folder
#
# probe always runs (it finds the GPU; without one the GPU stages skip), and build runs whenever a chosen
# stage uses the native extension: on a fresh machine it is not there, on a warm one ninja rebuilds only what
# changed. A stage that fails does not stop the others.
#
# Output in $OUT (default gpu-out): stages.tsv (stage, result, rc, seconds, budget, note), summary.json,
# step.json, meta.json, ncu.json and logs.tar.gz (a log per stage, pytest's junit XML, ncu's report): at
# most 8 files, as many as the device tool brings back.
#
# Environment: BUDGET_<stage> (seconds; bench-step is BUDGET_bench_step), PYTHON (default python3), TESTS_K,
# TESTS_M, SANITIZE_K, STEP_ARGS, META_ARGS, NCU_N, TEST_WORKERS, GIT_COMMIT (the commit, where the tree
# has no .git).
set -uo pipefail
LC_NUMERIC=C  # a decimal point in EPOCHREALTIME and awk, whatever the locale

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SCRIPT")")
cd "$ROOT" || exit 2

# ------------------------------------------------------------------------------------------ the plan
MAX_TOTAL=420
STAGES=(probe build tests bench-step bench-meta sanitize ncu)
# Budgets, seconds. build: nvcc alone took 95 s on csrc/l2l_cuda_kernels.cu for sm_90 on one busy core of
# the 2-core CPU machine; CMake's configure and the torch-header C++ files (in parallel) come on top.
declare -A BUDGET=([probe]=20 [build]=120 [tests]=100 [bench-step]=40 [bench-meta]=60 [sanitize]=45 [ncu]=35)
declare -A WHAT=(
    [probe]="GPU, driver, python/torch/triton, nvcc"
    [build]="native extension with its CUDA kernel (sm_90), in place"
    [tests]="CUDA tests of every kernel: Triton, native CUDA, capture"
    [bench-step]="forward step at 1M and 10M coordinates, copy bandwidth"
    [bench-meta]="meta-training step (forward + backward, T = 20) at 1M"
    [sanitize]="compute-sanitizer memcheck over a few kernel tests"
    [ncu]="ncu: instructions by pipe and DRAM bytes, one launch per kernel"
)
NEEDS_NATIVE=" tests bench-step bench-meta sanitize ncu "  # stages with native-backend results
SKIP=77       # a stage's exit status for "could not run here" (no GPU, no working tool)
KILL_GRACE=3  # a stage gets SIGTERM at budget - KILL_GRACE, SIGKILL at its budget

OUT=${OUT:-gpu-out}
[[ $OUT == /* ]] || OUT=$ROOT/$OUT
LOGS=$OUT/logs  # packed into $OUT/logs.tar.gz at the end
PYTHON=${PYTHON:-python3}
# tests: every test marked cuda or with cuda in its id (-k matches marker names too), and the kernel test
# modules (test_triton*, test_native*, test_capture*, test_precision*, whose tests run on CUDA through
# kernel_device),
# less their CPU variants, the interpreter, and the two compile-only tests (sm_90 compile reports) CI runs.
TESTS_M=${TESTS_M:-not slow}
TESTS_K=${TESTS_K:-(cuda or triton or native or captur or precision) and not (cpu and not cuda) and not interpreted and not hopper and not torch_headers}
TEST_WORKERS=${TEST_WORKERS:-8}  # pytest-xdist processes, where it is installed: Triton compiles in parallel
TEST_TIMEOUT=${TEST_TIMEOUT:-60}  # per test, where pytest-timeout is installed
# sanitize: the Triton forward launched out of place (float32 and bf16 state, at the paper's net and at
# L = 3, H = 64), the group step of both fused backends, and both backends' backward.
SANITIZE_K=${SANITIZE_K:-(launch_matches_reference and (10.0-2-20 or 3.0-3-64)) or (cuda and state_dtype0 and group_step_matches_reference and 10.0-2-20) or (cuda and unrolled_meta_gradient and 10.0-2)}
# torch.compile of the reference costs a compile per size: left out here, add it with STEP_ARGS.
STEP_ARGS=${STEP_ARGS:---sizes 1e6 1e7 --no-compile}
META_ARGS=${META_ARGS:---sizes 1e6 --steps 20}
NCU_N=${NCU_N:-1e6}
DRY_RUN=${DRY_RUN:-0}

export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # the package from this tree, the extension built in place

# --------------------------------------------------------------------------------------------- helpers
die() { echo "gpu_checks.sh: $*" >&2; exit 2; }

# Print a command, quoted to paste into a shell (to stderr, so that `x cmd > file` keeps it out of the
# file), then run it unless this is a dry run.
x() {
    local arg words=()
    for arg; do
        [[ $arg =~ [^A-Za-z0-9_./=:,+@%-] ]] && arg="'${arg//\'/\'\\\'\'}'"
        words+=("$arg")
    done
    echo "+ ${words[*]}" >&2
    [[ $DRY_RUN == 1 ]] || "$@"
}

# The same, showing a short description instead of a long argument (a Python snippet).
x_as() {
    echo "+ $1" >&2
    shift
    [[ $DRY_RUN == 1 ]] || "$@"
}

now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Facts the stages hand on (GPU found, tools working, each stage's result): key=value lines in $WORK/state.
state_set() { printf '%s=%s\n' "$1" "${2//$'\n'/ }" >>"$WORK/state"; }
state_get() { sed -n "s/^$1=//p" "$WORK/state" 2>/dev/null | tail -n 1; }

# A note on the current stage's row of stages.tsv, and in its log.
note() {
    echo "NOTE: $*"
    printf '%s; ' "$*" >>"$WORK/note.${STAGE:-none}"
}

require_cuda() {
    [[ $DRY_RUN == 1 || $(state_get cuda) == yes ]] && return 0
    note "no CUDA device (see probe): skipped"
    return $SKIP
}

# Native results mean nothing after a failed build: then a native test skips (no l2l_fused._C), or runs a
# stale one left by an earlier build on this machine. Say so where it matters.
warn_if_build_failed() {
    local build
    build=$(state_get result_build)
    case $build in
        ok) ;;
        "") echo "(build not run in this run: native results come from the l2l_fused/_C in the tree, if any)" ;;
        *) note "the native build ${build} in this run: native CUDA tests skip or run a stale l2l_fused/_C" ;;
    esac
}

# A tool from PATH, or where CUDA and Nsight Compute install it (a dry run shows the bare name).
find_tool() {
    local found candidate
    if ! found=$(command -v "$1" 2>/dev/null); then
        for candidate in /usr/local/cuda/bin/"$1" /usr/local/cuda/compute-sanitizer/"$1" /opt/nvidia/nsight-compute/*/"$1"; do
            [[ -x $candidate ]] && found=$candidate  # the last: the newest Nsight Compute
        done
    fi
    if [[ -n $found ]]; then
        echo "$found"
    elif [[ $DRY_RUN == 1 ]]; then
        echo "$1"
    else
        return 1
    fi
}

# A tiny CUDA program for the tools' probes: with "oob" it writes 16 KB past its allocation (only ever
# run under memcheck, which must catch it). Without nvcc, a few PyTorch kernels stand in (no planted write).
PY_PROBE='import torch; a = torch.ones(1 << 20, device="cuda"); a.mul_(2); torch.cuda.synchronize(); print("probe ok")'
probe_program() {
    PROBE=("$PYTHON" -c "$PY_PROBE")
    if [[ ! -x $WORK/probe ]] && command -v nvcc >/dev/null; then
        cat >"$WORK/probe.cu" <<'EOF'
#include <cstdio>
#include <cstring>
__global__ void probe_kernel(float* a, int n, int past) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) a[i == n - 1 ? i + past : i] = 2.0f * i;
}
int main(int argc, char** argv) {
  const int n = 1 << 20, past = argc > 1 && !strcmp(argv[1], "oob") ? 4096 : 0;
  float* a = nullptr;
  if (cudaMalloc(&a, n * sizeof(float)) != cudaSuccess) { puts("probe: cudaMalloc failed"); return 1; }
  probe_kernel<<<(n + 255) / 256, 256>>>(a, n, past);
  cudaError_t err = cudaDeviceSynchronize();
  printf("probe: %s\n", cudaGetErrorString(err));
  cudaFree(a);
  return err == cudaSuccess ? 0 : 1;
}
EOF
        timeout 60 nvcc -arch=sm_90 -o "$WORK/probe" "$WORK/probe.cu" || rm -f "$WORK/probe"
    fi
    [[ -x $WORK/probe ]] && PROBE=("$WORK/probe")
}

# memcheck works where it runs the probe clean and catches the planted write. On gVisor it refuses the
# device ("Device not supported", error 999): seconds, not the stage's budget.
sanitizer_works() {
    local tool=$1 log=$LOGS/sanitize-probe.log
    echo "+ (first: $tool on a tiny CUDA program, clean and with a planted out-of-bounds write)" >&2
    [[ $DRY_RUN == 1 ]] && return 0
    probe_program
    if ! timeout 30 "$tool" --tool memcheck --error-exitcode 9 "${PROBE[@]}" >"$log" 2>&1 ||
        ! grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        state_set compute_sanitizer fails
        tail -n 5 "$log"
        return 1
    fi
    if [[ ${PROBE[0]} == "$WORK/probe" ]]; then
        timeout 30 "$tool" --tool memcheck --error-exitcode 9 "$WORK/probe" oob >>"$log" 2>&1
        if (($? != 9)); then
            state_set compute_sanitizer "misses a planted out-of-bounds write"
            tail -n 5 "$log"
            return 1
        fi
    fi
    state_set compute_sanitizer works
}

# ncu works where it reads a hardware counter of the probe. On gVisor: "Failed to initialize the profiler".
ncu_works() {
    local tool=$1 log=$LOGS/ncu-probe.log
    echo "+ (first: $tool reads one counter of a tiny CUDA program)" >&2
    [[ $DRY_RUN == 1 ]] && return 0
    probe_program
    if timeout 30 "$tool" --clock-control none --launch-count 1 --metrics sm__cycles_elapsed.sum "${PROBE[@]}" \
        >"$log" 2>&1 && grep -q "sm__cycles_elapsed.sum" "$log" && ! grep -q "==ERROR==" "$log"; then
        state_set ncu works
        return 0
    fi
    state_set ncu fails
    tail -n 5 "$log"
    return 1
}

# ---------------------------------------------------------------------------------------------- stages
# One function per stage. Each runs in its own process under its budget (run_stage), its output in
# $LOGS/<stage>.log; it returns 0 (ok), $SKIP (could not run here) or anything else (failed).

PY_VERSIONS='
import platform, torch
print("python=" + platform.python_version())
print("torch=" + torch.__version__)
print("torch_cuda=" + str(torch.version.cuda))
try:
    import triton
    print("triton=" + triton.__version__)
except ImportError:
    print("triton=none")
cuda = torch.cuda.is_available()
print("cuda=" + ("yes" if cuda else "no"))
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f"torch_device={p.name}")
    print(f"capability={p.major}.{p.minor}")
    print(f"sm_count={p.multi_processor_count}")'

stage_probe() {
    # What this run ran on (for summary.json), and whether there is a GPU at all.
    state_set kernel "$(uname -r)"
    state_set cpus "$(nproc)"
    echo "host: $(uname -srm), $(nproc) CPUs"
    if command -v nvidia-smi >/dev/null; then
        x timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
            --format=csv,noheader >"$WORK/gpu.csv"
        cat "$WORK/gpu.csv"
        local name driver memory
        IFS=, read -r name driver memory _ <"$WORK/gpu.csv"
        state_set gpu_name "$name"
        state_set driver "${driver# }"
        state_set gpu_memory "${memory# }"
    else
        note "nvidia-smi not found"
    fi
    x_as "$PYTHON -c \"\$PY_VERSIONS\"  (python, torch, triton, the GPU torch sees)" \
        "$PYTHON" -c "$PY_VERSIONS" >"$WORK/versions"
    cat "$WORK/versions"
    local key value
    while IFS='=' read -r key value; do state_set "$key" "$value"; done <"$WORK/versions"
    if command -v nvcc >/dev/null; then
        state_set nvcc "$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
        echo "nvcc $(state_get nvcc)"
    fi
    if [[ $(state_get cuda) != yes ]]; then
        note "no CUDA device: the GPU stages skip"
        return 1
    fi
}

PY_NATIVE_ON_CUDA='
import sys, torch, l2l_fused
b = l2l_fused.available_backends("cuda") if torch.cuda.is_available() else None
print("backends on CUDA:", b)
sys.exit(0 if b is None or "native" in b else 1)'

stage_build() {
    # L2L_BUILD_NATIVE=1 and L2L_CUDA=1 make a failed or CUDA-less build an error, not a warning; the
    # extension lands in the tree (on PYTHONPATH), CMake's build folder in build/, for an incremental rerun.
    x env L2L_BUILD_NATIVE=1 L2L_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        "$PYTHON" setup.py -q build_ext --inplace || return
    # A build can succeed and still leave CUDA out: ask the package, as the tests will.
    x_as "$PYTHON -c \"\$PY_NATIVE_ON_CUDA\"  (is \"native\" among l2l_fused.available_backends(\"cuda\")?)" \
        "$PYTHON" -c "$PY_NATIVE_ON_CUDA"
}

stage_tests() {
    require_cuda || return
    warn_if_build_failed
    local args=(tests -p no:cacheprovider -m "$TESTS_M" -k "$TESTS_K" -v -rfEs --durations=15
        --junitxml="$LOGS/tests.xml")
    if ((TEST_WORKERS > 0)) && "$PYTHON" -c 'import xdist' 2>/dev/null; then args+=(-n "$TEST_WORKERS"); fi
    if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then args+=(--timeout "$TEST_TIMEOUT"); fi
    x "$PYTHON" -m pytest "${args[@]}"
    local rc=$?
    ((rc == 5)) && note "no test matched TESTS_K: the test names changed, update it"
    return $rc
}

stage_bench_step() {
    require_cuda || return
    warn_if_build_failed
    local args
    read -ra args <<<"$STEP_ARGS"
    # bench_step.py measures the device-to-device copy bandwidth first and reports each step against it.
    x "$PYTHON" bench/bench_step.py "${args[@]}" --out "$OUT/step.json"
}

stage_bench_meta() {
    require_cuda || return
    warn_if_build_failed
    local args
    read -ra args <<<"$META_ARGS"
    x "$PYTHON" bench/bench_meta.py "${args[@]}" --out "$OUT/meta.json"
}

stage_sanitize() {
    require_cuda || return
    local tool
    tool=$(find_tool compute-sanitizer) || { state_set compute_sanitizer missing; note "compute-sanitizer not found"; return $SKIP; }
    sanitizer_works "$tool" || { note "compute-sanitizer does not work on this machine: $(state_get compute_sanitizer)"; return $SKIP; }
    warn_if_build_failed
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an access out of
    # bounds instead of a read of a neighbour inside PyTorch's pool.
    x env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool memcheck --error-exitcode 9 --print-limit 100 \
        "$PYTHON" -m pytest tests -p no:cacheprovider -q -rfE -k "$SANITIZE_K"
    local rc=$?
    ((rc == 9)) && note "memcheck reported errors"
    ((rc == 5)) && note "no test matched SANITIZE_K: the test names changed, update it"
    return $rc
}

stage_ncu() {
    require_cuda || return
    local tool metrics
    tool=$(find_tool ncu) || { state_set ncu missing; note "ncu not found"; return $SKIP; }
    ncu_works "$tool" || { note "ncu cannot read the hardware counters on this machine"; return $SKIP; }
    warn_if_build_failed
    # Ask only for the metrics this ncu knows on this GPU: one unknown name and ncu profiles nothing.
    x timeout 30 "$tool" --query-metrics >"$LOGS/ncu-query.txt"
    metrics=$("$PYTHON" bench/ncu_launches.py --pick-metrics "$LOGS/ncu-query.txt")
    # --clock-control none: the clocks as the card runs them; ncu's default would lock them.
    x "$tool" --clock-control none --metrics "$metrics" -k "regex:$("$PYTHON" bench/ncu_launches.py --kernels)" \
        -f -o "$LOGS/ncu" "$PYTHON" bench/ncu_launches.py --n "$NCU_N" --labels "$LOGS/ncu-labels.json" || return
    x "$tool" --import "$LOGS/ncu.ncu-rep" --csv --page raw --print-units base >"$LOGS/ncu-raw.csv" || return
    x "$PYTHON" bench/ncu_launches.py --summarize "$LOGS/ncu-raw.csv" --labels "$LOGS/ncu-labels.json" \
        --json "$OUT/ncu.json"
}

# ------------------------------------------------------------------------------------------ the runner
# Internal: run one stage in this process (run_stage starts the script again under timeout).
if [[ ${1:-} == --in-stage ]]; then
    STAGE=$2
    "stage_${STAGE//-/_}"
    exit $?
fi

run_stage() {
    local stage=$1 index=$2 count=$3 budget=${BUDGET[$1]} start rc secs result note
    echo "=== [$index/$count] $stage (budget ${budget} s): ${WHAT[$stage]}"
    start=$(now)
    # Its own process group under timeout, so that SIGTERM reaches pytest's workers and the profiled
    # programs too; SIGKILL KILL_GRACE seconds later, at the budget, for whatever ignores SIGTERM.
    STAGE=$stage timeout -k "$KILL_GRACE" "$((budget - KILL_GRACE))" bash "$SCRIPT" --in-stage "$stage" \
        >"$LOGS/$stage.log" 2>&1
    rc=$?
    secs=$(seconds_since "$start")
    case $rc in
        0) result=ok ;;
        "$SKIP") result=skipped ;;
        124 | 137) result=timeout ;;
        *) result=failed ;;
    esac
    note=$(cat "$WORK/note.$stage" 2>/dev/null)
    note=${note%; }
    [[ $result == timeout ]] && note="${note:+$note; }ran out of its ${budget} s"
    state_set "result_$stage" "$result"
    tail -n 12 "$LOGS/$stage.log" | cut -c1-200 | sed 's/^/    /'
    echo "=== $stage: $result (exit $rc) in $secs s of $budget${note:+ -- $note}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$stage" "$result" "$rc" "$secs" "$budget" "${note//$'\t'/ }" >>"$OUT/stages.tsv"
}

print_plan() {
    local stage total=0
    echo "GPU checks: $MODE; each budget is a hard timeout; the budgets sum to at most $MAX_TOTAL s"
    printf '  %-11s %7s  %s\n' stage budget what
    for stage in "${PLAN[@]}"; do
        printf '  %-11s %5s s  %s\n' "$stage" "${BUDGET[$stage]}" "${WHAT[$stage]}"
        total=$((total + BUDGET[$stage]))
    done
    printf '  %-11s %5s s  (limit %s s)\n' total "$total" "$MAX_TOTAL"
    echo "  OUT=$OUT  commit=$COMMIT${DIRTY:+ ($DIRTY tree)}  python=$PYTHON"
}

print_table() {
    echo
    local gpu
    gpu=$(state_get gpu_name)
    echo "GPU checks ($MODE) on ${gpu:-no GPU}, commit $COMMIT:"
    awk -F'\t' '{ printf "  %-11s %-8s %4s %8s %7s  %s\n", $1, $2, $3, $4, $5, $6 }' "$OUT/stages.tsv"
    local files=("$OUT"/*)
    echo "total: $1 s of a $TOTAL s plan (limit $MAX_TOTAL s); in $OUT: ${files[*]##*/}"
}

write_summary() {
    STAGES_TSV=$OUT/stages.tsv STATE=$WORK/state MODE=$MODE COMMIT=$COMMIT DIRTY=$DIRTY STARTED=$STARTED \
        WALL=$1 TOTAL=$TOTAL MAX_TOTAL=$MAX_TOTAL "$PYTHON" - <<'EOF' || echo "summary.json not written"
import csv, json, os

env = os.environ
state = {}
with open(env["STATE"]) as f:
    for line in f:
        key, _, value = line.rstrip("\n").partition("=")
        state[key] = value  # the last value of a key wins
with open(env["STAGES_TSV"], newline="") as f:
    stages = list(csv.DictReader(f, delimiter="\t"))
for row in stages:
    row["rc"], row["seconds"], row["budget"] = int(row["rc"]), float(row["seconds"]), int(row["budget"])
kernel = state.get("kernel", "")
summary = {
    "device": state.get("gpu_name") or state.get("torch_device"),
    "driver": state.get("driver"),
    "gpu_memory": state.get("gpu_memory"),
    "date": env["STARTED"],
    "commit": env["COMMIT"],
    "dirty": {"dirty": True, "clean": False}.get(env["DIRTY"]),  # None: no git to ask (GIT_COMMIT given)
    "host": {"kernel": kernel, "cpus": state.get("cpus"),
             "runtime_guess": "gVisor" if kernel.startswith("4.4.0") else "Firecracker" if "-fc-" in kernel else None},
    "versions": {k: state.get(k) for k in ("python", "torch", "torch_cuda", "triton", "nvcc", "capability", "sm_count")},
    "tools": {"ncu": state.get("ncu", "not probed"), "compute_sanitizer": state.get("compute_sanitizer", "not probed")},
    "mode": env["MODE"],
    "limit_s": int(env["MAX_TOTAL"]), "budget_s": int(env["TOTAL"]), "wall_s": float(env["WALL"]),
    "stages": stages,
    "ok": all(s["result"] in ("ok", "skipped") for s in stages),
}
try:
    with open(os.path.join(env["OUT"], "step.json")) as f:
        summary["copy_bandwidth_gbps"] = json.load(f).get("copy_bandwidth_gbps")
except (OSError, ValueError):
    pass
with open(os.path.join(env["OUT"], "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
EOF
}

usage() { sed -n '2,/^set -uo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'; }

# --------------------------------------------------------------------------------------------- options
RERUN="" NO_BUILD=0 PACK=1 ASKED=()
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --rerun-failed=*) RERUN=${1#*=} ;;
        --rerun-failed)
            RERUN=$OUT/stages.tsv
            [[ $# -gt 1 && $2 != -* && -z ${BUDGET[$2]+x} ]] && { RERUN=$2; shift; } ;;
        --no-build) NO_BUILD=1 ;;
        --no-pack) PACK=0 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -n ${BUDGET[$1]+x} ]] || die "unknown stage $1; stages: ${STAGES[*]}"; ASKED+=("$1") ;;
    esac
    shift
done
command -v timeout >/dev/null || die "needs timeout (coreutils)"

for stage in "${STAGES[@]}"; do  # BUDGET_<stage> overrides a budget
    var=BUDGET_${stage//-/_}
    [[ -n ${!var:-} ]] && BUDGET[$stage]=${!var}
    if [[ ! ${BUDGET[$stage]} =~ ^[0-9]+$ ]] || ((BUDGET[$stage] <= KILL_GRACE)); then
        die "the budget of $stage must be whole seconds over $KILL_GRACE, not '${BUDGET[$stage]}'"
    fi
done

# ------------------------------------------------------------------------------ which stages, how long
declare -A CHOSEN=() TIMED_OUT=()
if [[ -n $RERUN ]]; then
    [[ -n ${ASKED[*]} ]] && die "--rerun-failed takes no stage names"
    [[ -f $RERUN ]] || die "--rerun-failed: no file $RERUN (copy the earlier run's stages.tsv into the tree)"
    MODE="rerun of what was not ok in $RERUN"
    while IFS=$'\t' read -r stage result _; do
        [[ -n ${BUDGET[$stage]+x} && $result != ok ]] || continue
        CHOSEN[$stage]=1
        [[ $result == timeout ]] && TIMED_OUT[$stage]=1
    done < <(tail -n +2 "$RERUN")
    if [[ -n ${CHOSEN[build]+x} ]]; then  # a failed build leaves every native result unchecked
        for stage in $NEEDS_NATIVE; do CHOSEN[$stage]=1; done
    fi
    if ((${#CHOSEN[@]} == 0)); then
        echo "every stage in $RERUN was ok: nothing to rerun"
        exit 0
    fi
elif ((${#ASKED[@]})); then
    MODE="stages ${ASKED[*]}"
    for stage in "${ASKED[@]}"; do CHOSEN[$stage]=1; done
else
    MODE="every stage"
    for stage in "${STAGES[@]}"; do CHOSEN[$stage]=1; done
fi
CHOSEN[probe]=1
if ((!NO_BUILD)); then
    for stage in "${!CHOSEN[@]}"; do [[ $NEEDS_NATIVE == *" $stage "* ]] && CHOSEN[build]=1; done
fi
PLAN=()
TOTAL=0
for stage in "${STAGES[@]}"; do
    [[ -n ${CHOSEN[$stage]+x} ]] || continue
    PLAN+=("$stage")
    TOTAL=$((TOTAL + BUDGET[$stage]))
done
# A stage that ran out of time gets what the plan leaves of MAX_TOTAL, up to its budget again.
for stage in "${PLAN[@]}"; do
    if [[ -z ${TIMED_OUT[$stage]+x} ]] || ((TOTAL >= MAX_TOTAL)); then continue; fi
    extra=$((MAX_TOTAL - TOTAL < BUDGET[$stage] ? MAX_TOTAL - TOTAL : BUDGET[$stage]))
    BUDGET[$stage]=$((BUDGET[$stage] + extra))
    TOTAL=$((TOTAL + extra))
done
# The invariant: one run fits its 7 minutes, whatever the overrides.
((TOTAL <= MAX_TOTAL)) || die "the budgets sum to $TOTAL s, over the $MAX_TOTAL s a run may take: lower a BUDGET_<stage>"

COMMIT=$(git rev-parse --short HEAD 2>/dev/null) || COMMIT=""
DIRTY=""  # unknown without git
if [[ -n $COMMIT ]]; then
    DIRTY=clean
    [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && DIRTY=dirty
else
    COMMIT=${GIT_COMMIT:-${L2L_COMMIT:-unknown}}  # the device machine's copy of the tree may have no .git
fi
[[ $COMMIT != unknown ]] && export L2L_COMMIT=${L2L_COMMIT:-$COMMIT}  # bench/common.py records it

print_plan
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-checks.XXXXXX") || die "mktemp failed"
trap 'rm -rf "$WORK"' EXIT
export OUT WORK DRY_RUN  # for the stages' processes

if [[ $DRY_RUN == 1 ]]; then  # each stage's commands, with the tool probes and GPU checks assumed to pass
    LOGS=$WORK/logs
    mkdir -p "$LOGS"
    for stage in "${PLAN[@]}"; do
        echo "--- $stage (budget ${BUDGET[$stage]} s)"
        STAGE=$stage "stage_${stage//-/_}" 2>&1 >/dev/null | sed -e "s|$LOGS|\$OUT/logs|g" -e "s|$OUT|\$OUT|g" -e 's/^/  /'
    done
    exit 0
fi

mkdir -p "$LOGS" || die "cannot make $LOGS"
# This run's results only: what an earlier run in the same $OUT left of the planned stages goes.
declare -A RESULT_FILE=([bench-step]=step.json [bench-meta]=meta.json [ncu]=ncu.json)
for stage in "${PLAN[@]}"; do [[ -n ${RESULT_FILE[$stage]+x} ]] && rm -f "$OUT/${RESULT_FILE[$stage]}"; done
rm -f "$OUT/stages.tsv" "$OUT/summary.json" "$OUT/logs.tar.gz"
printf 'stage\tresult\trc\tseconds\tbudget\tnote\n' >"$OUT/stages.tsv"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
t0=$(now)
i=0
for stage in "${PLAN[@]}"; do
    i=$((i + 1))
    run_stage "$stage" "$i" "${#PLAN[@]}"
done
wall=$(seconds_since "$t0")
write_summary "$wall"
if ((PACK)); then  # the device tool brings back at most 8 files: the logs travel as one
    tar -czf "$OUT/logs.tar.gz" -C "$OUT" "$(basename "$LOGS")" && rm -rf "$LOGS"
fi
print_table "$wall"
# Exit 1 if a stage failed or ran out of time; a stage skipped for want of a GPU or a tool is no failure.
awk -F'\t' 'NR > 1 && ($2 == "failed" || $2 == "timeout") { bad = 1 } END { exit bad }' "$OUT/stages.tsv"
