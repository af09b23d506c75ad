#!/usr/bin/env bash
# The test suite. Triton kernels run on the CPU through the interpreter; GPU-only tests skip without CUDA.
# Extra arguments go to pytest.
source "$(dirname "$0")/venv.sh"
python -m pytest tests "$@"
