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
from l2l_fused.ops import constants, interface, native, reference
from l2l_fused.ops.layout import NetShape, pack
from helpers import adversarial_grad, check_group_step, group_inputs, random_net, random_state

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


def _native_group_step(net, thetas, grads, hs, cs):
    """The optimizer's in-place step on copies of the inputs: (θ', h', c') lists and the skipped count."""
    outs = [[t.clone() for t in ts] for ts in (thetas, hs, cs)]
    skipped = torch.zeros((), dtype=torch.int64)
    interface.resolve("native", "cpu", net).group_step(net, outs[0], grads, outs[1], outs[2], skipped)
    return outs, skipped.item()


@built
def test_cpu_step_does_not_depend_on_threads_or_neighbours(seed):
    """The CPU forward steps blocks of coordinates together: a coordinate's result must not depend on the
    thread count, nor on which coordinates share its block (here shifted by skipping every third one)."""
    net = random_net()
    thetas, grads, hs, cs = group_inputs(net, [5000, 37], torch.float32, "cpu")  # chunks of 2048, partial blocks
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, max(2, threads)):
            torch.set_num_threads(n_threads)
            results.append(_native_group_step(net, thetas, grads, hs, cs)[0])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    poisoned = [g.clone() for g in grads]
    for g in poisoned:
        g[::3] = float("nan")
    (theta_p, h_p, c_p), skipped = _native_group_step(net, thetas, poisoned, hs, cs)
    assert skipped == sum(len(range(0, g.numel(), 3)) for g in grads)
    for theta, h, c, g, t_p, hp, cp in zip(*results[0], poisoned, theta_p, h_p, c_p):
        kept = ~torch.isnan(g)
        assert torch.equal(t_p[kept], theta[kept])
        assert torch.equal(hp[:, kept], h[:, kept]) and torch.equal(cp[:, kept], c[:, kept])


@built
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,layers,hidden,scale", [(10.0, 3, 1, 0.3), (None, 2, 5, 1.0), (10.0, 1, 33, 0.2)])
def test_cpu_step_of_hidden_sizes_that_pad_the_weight_tiles(seed, state_dtype, p, layers, hidden, scale):
    """Hidden sizes other than the compiled-in 20 run with 4H gate columns padded to whole register tiles
    (on every vector width: 4H = 4, 20, 132), among zero, non-finite and adversarial gradients."""
    net = random_net(hidden, layers, p, scale)
    thetas, grads, hs, cs = group_inputs(net, [1, 7, 130, 1001], state_dtype, "cpu")
    generator = torch.Generator().manual_seed(seed)
    for g in grads:
        bad = torch.rand(g.numel(), generator=generator) < 0.2
        g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])[torch.randint(4, (int(bad.sum()),),
                                                                                             generator=generator)].to(g.dtype)
    outs, skipped = _native_group_step(net, thetas, grads, hs, cs)
    assert skipped == check_group_step(net, thetas, grads, hs, cs, *outs, state_dtype)


@built
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,layers,hidden,scale", [(10.0, 3, 1, 0.3), (None, 2, 5, 1.0), (10.0, 1, 33, 0.2),
                                                   (3.0, 3, 64, 0.5)])
def test_cpu_backward_of_hidden_sizes_that_pad_the_weight_tiles(seed, state_dtype, p, layers, hidden, scale):
    """The backward's path for hidden sizes other than the compiled-in 20 (gate columns padded to whole
    register tiles, input rows to whole gradient tiles, input adjoints to whole vectors), over two chunks
    of 2048 whose second ends in a partial block, against the float64 reference with the tolerance of
    test_fused_backends.py's backward tests."""
    net = random_net(hidden, layers, p, scale)
    shape = NetShape.of(net)
    generator = torch.Generator().manual_seed(seed)
    n = 2048 + 37
    h, c = (s.to(state_dtype) for s in random_state(net, n))
    inputs = [adversarial_grad(n, p, generator=generator), h, c, torch.randn(n, generator=generator),
              torch.randn(h.shape, generator=generator), torch.randn(h.shape, generator=generator)]
    got = native.backward(*inputs, pack(net).detach(), shape)
    want = reference.backward(*(t.double() for t in inputs), pack(net).detach().double(), shape)
    torch32 = reference.backward(*(t.float() for t in inputs), pack(net).detach(), shape)
    for what, a, b, t in zip(("dh", "dc", "dweights"), got, want, torch32):
        scale_b = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        assert err <= 2 * err_torch + 1e-5 * scale_b, f"{what}: max error {err:.3g}, PyTorch float32 {err_torch:.3g}"


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
