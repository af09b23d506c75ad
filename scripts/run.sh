#!/usr/bin/env bash
# The main job: meta-train the learned optimizer on the paper's quadratics (CPU, a few minutes), then
# evaluate it against tuned SGD, RMSprop, Adam and NAG on held-out functions. Extra arguments go to
# `python -m l2l_fused run` (see --help); outputs land in runs/quadratic/.
source "$(dirname "$0")/venv.sh"
python -m l2l_fused run --task quadratic "$@"
