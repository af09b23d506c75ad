#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (see README): the test suite on CUDA, compute-sanitizer
# over the kernel tests, then the benchmarks. Logs and JSON go to $OUT (or ./gpu-out). Stages:
#   bench/gpu_checks.sh [tests] [sanitize] [bench-step] ...    (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from this tree, no install needed
stages=${*:-build tests sanitize bench-step bench-meta}
status=0
for stage in $stages; do
    echo "=== $stage"
    case $stage in
        build)
            # the native extension, CUDA kernel included, next to the sources (the tree is on PYTHONPATH)
            L2L_BUILD_NATIVE=1 L2L_CUDA=1 timeout 300 python setup.py -q build_ext --inplace 2>&1 | tail -20 ;;
        tests)
            timeout 330 python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15 ;;
        sanitize)
            # Without the caching allocator every tensor is its own allocation, so memcheck sees an
            # out-of-bounds access instead of a read of a neighbour inside the pool.
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
                python -m pytest tests/test_triton_step.py tests/test_fused_backends.py tests/test_capture.py -q -x \
                -p no:cacheprovider -k "launch or group_step or optimizer or unrolled or repeated or captured" \
                2>&1 | tee "$OUT/sanitizer.log" | tail -8 ;;
        bench-step)
            timeout 330 python bench/bench_step.py --sizes 1e6 1e7 1e8 --model ${STEP_OPTIONS:-} --out "$OUT/step.json" \
                2>&1 | tee "$OUT/bench_step.log" | tail -40 ;;
        diagnose)
            timeout 120 python bench/diagnose_forward.py 2>&1 | tee "$OUT/diagnose.log" | tail -20 ;;
        bench-meta)
            timeout 300 python bench/bench_meta.py --sizes 1e6 1e7 --steps 20 --out "$OUT/meta.json" \
                2>&1 | tee "$OUT/bench_meta.log" | tail -12 ;;
        *) echo "unknown stage $stage"; false ;;
    esac
    rc=$?
    echo "=== $stage exit $rc"
    [ $rc -eq 0 ] || status=$rc
done
exit $status
