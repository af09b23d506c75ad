# Sourced by scripts/run.sh and scripts/test.sh: enter .venv, creating and filling it on first use.
#
# A torch that the invoking python3 can import (the GPU machines ship one, with CUDA) is used as it is:
# the venv sees that interpreter's packages. Only where no torch is importable is torch==2.13.0 installed,
# pinned, so pip never pulls an unpinned torch with gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    parent_site=$("$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))')
    "$PYTHON" -m venv .venv
    # Appended after the venv's own site-packages: the venv's installs win, the parent's fill the gaps.
    echo "$parent_site" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_parent_site.pth"
fi
. .venv/bin/activate
if ! python -c 'import torch' 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
# --no-build-isolation: an isolated build environment would resolve its own, unpinned, torch.
# The client stacks of tests/test_clients.py are only looked for: importing Lightning alone takes ~10 s.
if ! python -c 'import l2l_fused, pytest, hypothesis, matplotlib, tqdm, triton, sklearn, mlxtend' 2>/dev/null ||
   ! python -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("pytorch_lightning", "transformers", "accelerate")))'; then
    python -m pip install -q --no-build-isolation -e ".[test]"
elif [ -z "$(ls l2l_fused/_C*.so 2>/dev/null)" ] || [ -n "$(find csrc CMakeLists.txt setup.py -newer "$(ls l2l_fused/_C*.so | head -1)" 2>/dev/null)" ]; then
    # the native extension is missing or older than its sources: rebuild it (incremental, seconds)
    python -m pip install -q --no-build-isolation --no-deps -e .
fi
