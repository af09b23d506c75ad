import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_configuration_compiles_for_hopper_within_its_budgets(tmp_path):
    """The interpreter runs what the compiler may reject: bench/perf_model.py compiles every Triton and
    native configuration for sm_90 (no GPU needed) in a process without TRITON_INTERPRET, and fails on a
    compile error, on more shared memory than an H100 block may have, and on a default configuration that
    spills past its budget. Its table is printed (pytest -s shows it; a failure shows it too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "perf-model.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "perf_model.py"), "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=1500)
    report = result.stdout + result.stderr
    print(report)
    assert not [line for line in result.stdout.splitlines() if line.startswith("FAIL")], report
    assert result.returncode == 0, report
    rows = json.loads(out.read_text())["rows"]
    backends = {"triton", "native"} if shutil.which("nvcc") else {"triton"}
    kernels = {(row["backend"], row["kernel"]) for row in rows}
    assert kernels == {(b, k) for b in backends for k in ("forward", "backward", "meta-step")}, kernels
    # a meta-training step is its forward and backward kernels and more: never less than their sum
    for row in rows:
        if row["kernel"] == "meta-step":
            assert row["predicted_ms"] > row["forward_ms"] + row["backward_ms"] > 0, row
    coordinates = {}
    for row in rows:
        if row["kernel"] != "meta-step":
            coordinates.setdefault(row["configuration"], set()).add(row["coordinates"])
    assert all(n == {1_000_000, 10_000_000} for n in coordinates.values()), coordinates
