"""The native extension (csrc/): its ops' registration and checks, determinism, the package without it,
and the CUDA sources compiling. What it computes is checked in test_fused_backends.py."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest
import torch

from l2l_fused import L2LOptimizer, available_backends
from l2l_fused.ops import constants, interface, native
from l2l_fused.ops.layout import pack
from helpers import adversarial_grad, random_net, random_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
built = pytest.mark.skipif(native.BUILD_ERROR is not None, reason=f"l2l_fused._C not built: {native.BUILD_ERROR}")


def _op_args(net, n, device="cpu"):
    h, c = random_state(net, n)
    return (torch.randn(n), adversarial_grad(n, net.preprocess_p), h, c, pack(net).detach(),
            net.num_layers, net.hidden_size, net.cells[0].input_size, net.preprocess_p, net.output_scale)


@built
def test_auto_picks_native_on_cpu():
    assert interface.resolve("auto", "cpu").name == "native"


@built
def test_nets_the_kernels_cannot_run_are_refused_when_the_optimizer_is_made():
    """The limits the extension was compiled with are ops/constants.py's (a stale build would differ)."""
    from l2l_fused import _C

    assert (_C.MAX_LAYERS, _C.MAX_HIDDEN) == (constants.MAX_LAYERS, constants.MAX_HIDDEN) == (3, 64)
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="backend 'native': runs hidden_size up to 64, not 65"):
        L2LOptimizer([p], net=random_net(hidden_size=65), backend="native")
    with pytest.raises(ValueError, match="backend 'native': runs 1 to 3 layers, not 4"):
        L2LOptimizer([p], net=random_net(num_layers=4), backend="native")
    assert interface.resolve("auto", "cpu", random_net(num_layers=4)).name == "reference"


@built
def test_ops_pass_opcheck(seed):
    net = random_net()
    theta, grad, h, c, packed, *shape = _op_args(net, 300)
    torch.library.opcheck(torch.ops.l2l_fused.native_forward.default, (theta, grad, h, c, packed, *shape))
    torch.library.opcheck(torch.ops.l2l_fused.native_backward.default,
                          (grad, h, c, torch.randn(300), torch.randn_like(h), torch.randn_like(c), packed, *shape))
    params = [torch.randn(7), torch.randn(3, 5)]
    states = [random_state(net, p.numel()) for p in params]
    torch.library.opcheck(torch.ops.l2l_fused.native_group_step.default,
                          (params, [torch.randn_like(p) for p in params], [s[0] for s in states],
                           [s[1] for s in states], packed, torch.zeros((), dtype=torch.int64), *shape))


@built
def test_optimizer_step_compiles_without_graph_break(seed):
    def make():
        torch.manual_seed(seed)
        model = torch.nn.Linear(6, 3)
        return model, L2LOptimizer(model.parameters(), net=random_net(), backend="native")

    x = torch.randn(8, 6)
    results = []
    for compiled in (False, True):
        model, opt = make()
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@built
@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "h": a["h"][:, :-1]}, ValueError, r"state must be Float \[2, 300, 20\]"),
    (lambda a: {**a, "grad": a["grad"].double()}, ValueError, "share a dtype"),
    (lambda a: {**a, "packed": a["packed"][:-1]}, ValueError, "packed float32 net of 5141 values"),
    (lambda a: {**a, "layers": 4}, ValueError, "1 to 3 layers, not 4"),
    (lambda a: {**a, "theta": a["theta"].int()}, ValueError, "must be float32, bfloat16, float16 or float64"),
    (lambda a: {**a, "h": a["h"].transpose(0, 1).contiguous().transpose(0, 1)}, ValueError, "contiguous"),
])
def test_bad_calls_raise_python_errors(change, error, match):
    net = random_net()
    theta, grad, h, c, packed, layers, hidden, features, p, s = _op_args(net, 300)
    args = change(dict(theta=theta, grad=grad, h=h, c=c, packed=packed, layers=layers))
    with pytest.raises(error, match=match):
        torch.ops.l2l_fused.native_forward(args["theta"], args["grad"], args["h"], c, args["packed"], args["layers"],
                                           hidden, features, p, s)


@built
def test_cpu_weight_gradients_do_not_depend_on_the_thread_count(seed):
    net = random_net()
    theta, grad, h, c, packed, *shape = _op_args(net, 20000)
    adjoints = (torch.randn(20000), torch.randn_like(h), torch.randn_like(c))
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, max(2, threads)):
            torch.set_num_threads(n_threads)
            results.append(torch.ops.l2l_fused.native_backward(grad, h, c, *adjoints, packed, *shape))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_package_works_without_the_extension():
    """With l2l_fused._C hidden, the package imports, the reference runs, and asking for native says how
    to build it."""
    script = """
import sys
sys.modules["l2l_fused._C"] = None  # what an unbuilt or broken extension looks like to the import
import torch, l2l_fused
assert "native" not in l2l_fused.available_backends("cpu"), l2l_fused.available_backends("cpu")
p = torch.nn.Parameter(torch.randn(5)); p.grad = torch.randn(5)
l2l_fused.L2LOptimizer([p], net=l2l_fused.LSTMOptimizerNet()).step()
try:
    l2l_fused.L2LOptimizer([p], net=l2l_fused.LSTMOptimizerNet(), backend="native").step()
except ValueError as error:
    assert "pip install -e . --no-build-isolation" in str(error), error
    print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.stdout.strip() == "ok", result.stdout + result.stderr


nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@nvcc
def test_cuda_kernels_compile_for_hopper_without_warnings(tmp_path):
    for source in [f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cu")]:
        result = subprocess.run(
            ["nvcc", "-std=c++17", "-arch=sm_90", "-O3", "--expt-relaxed-constexpr", "-Xcompiler=-Wall,-Wextra",
             "-Werror=all-warnings", "-c", os.path.join(ROOT, "csrc", source), "-o", str(tmp_path / f"{source}.o")],
            capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@nvcc
def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    """l2l_cuda.cpp and the binding file with L2L_WITH_CUDA, syntax only: this machine's torch may have no
    CUDA, whose build would generate c10/cuda/impl/cuda_cmake_macros.h; the stub stands in for it."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    flags = ["-x", "c++", "-std=c++17", "-DL2L_WITH_CUDA", "-Xcompiler=-fsyntax-only,-Wall,-Wextra,-Werror",
             f"-I{os.path.join(ROOT, 'csrc')}"]
    # torch's and Python's headers as system headers (as CMake includes them): their warnings are not ours
    for path in [str(tmp_path), sysconfig.get_paths()["include"], *include_paths()]:
        flags += ["-isystem", path]
    for source in ("l2l_cuda.cpp", "bindings.cpp"):
        # nvcc drives the host compiler and adds the CUDA toolkit's include path itself
        result = subprocess.run(["nvcc", *flags, "-c", os.path.join(ROOT, "csrc", source), "-o", str(tmp_path / "o")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
