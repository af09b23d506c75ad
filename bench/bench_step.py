"""Forward step of the learned optimizer, side by side on the same tensors in one run.

Implementations: the eager reference (``backend="reference"``), ``torch.compile`` of it, the fused
Triton and native steps where available (float32 and bfloat16 state), and ``torch.optim.Adam`` (fused on
a GPU) for scale. Cases: one flat
tensor of N coordinates, and the parameter list of a ~110M-parameter transformer (196 tensors) beside a
flat tensor of the same size. Reports the median time, coordinates/s, effective bandwidth (docs/spec.md §4: 652 B
per coordinate with float32 state, 332 B with bfloat16, 28 B for Adam) as a fraction of the measured
copy bandwidth, and the memory each step allocates beyond the resident tensors.

    python bench/bench_step.py --sizes 1e6 1e7 1e8 --model --sweep --out bench/results/step.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, device_info, median_ms, peak_extra_bytes, write_results  # noqa: E402

from l2l_fused import LSTMOptimizerNet, available_backends, l2l_update_ref  # noqa: E402
from l2l_fused.ops import interface  # noqa: E402
from l2l_fused.ops.layout import NetShape  # noqa: E402

BYTES_PER_COORDINATE = {"float32": 652, "bfloat16": 332}
ADAM_BYTES_PER_COORDINATE = 28


def transformer_shapes(d: int = 768, layers: int = 12, vocab: int = 32000, context: int = 1024) -> list[tuple]:
    """Parameter shapes of a GPT-style decoder (tied output embedding): 196 tensors, ~110M parameters."""
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln1
        for _ in range(4):  # q, k, v, out projections
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln2, mlp
    return shapes + [(d,), (d,)]


def paper_net(device) -> LSTMOptimizerNet:
    torch.manual_seed(0)
    return LSTMOptimizerNet(hidden_size=20, num_layers=2, preprocess_p=10.0, output_scale=0.1).to(device)


class Case:
    """Parameters, gradients (log-uniform magnitudes: both preprocessing branches) and random state."""

    def __init__(self, name: str, shapes: list[tuple], device: torch.device) -> None:
        self.name, self.shapes, self.device = name, shapes, device
        self.params = [torch.randn(s, device=device) for s in shapes]
        self.grads = [torch.randn(s, device=device) * torch.exp(torch.empty(s, device=device).uniform_(-20, 5)) for s in shapes]
        self.n = sum(p.numel() for p in self.params)

    def state(self, net, dtype):
        shapes = [(net.num_layers, p.numel(), net.hidden_size) for p in self.params]
        return ([(torch.randn(s, device=self.device) * 0.3).to(dtype) for s in shapes],
                [torch.randn(s, device=self.device).to(dtype) for s in shapes])


def implementations(case: Case, net, compile_reference: bool):
    """(name, bytes per coordinate, callable) of each implementation on this case."""
    h32, c32 = case.state(net, torch.float32)
    h16, c16 = case.state(net, torch.bfloat16)
    skipped = torch.zeros((), dtype=torch.int64, device=case.device)
    reference = interface.resolve("reference", case.device).group_step
    impls = [("reference (eager)", "exact", BYTES_PER_COORDINATE["float32"],
              lambda: reference(net, case.params, case.grads, h32, c32, skipped))]
    if compile_reference:
        compiled = torch.compile(reference, dynamic=False)
        impls.append(("reference (torch.compile)", "exact", BYTES_PER_COORDINATE["float32"],
                      lambda: compiled(net, case.params, case.grads, h32, c32, skipped)))
    # The native kernels compute exactly in both modes (l2l_fused.ops.precision): one row each.
    for name, precisions in (("triton", ("exact", "fast")), ("native", ("exact",))):
        if name not in available_backends(case.device):
            continue
        group_step = interface.resolve(name, case.device).group_step
        for mode in precisions:
            impls += [
                (f"{name} {mode}", mode, BYTES_PER_COORDINATE["float32"],
                 lambda g=group_step, m=mode: g(net, case.params, case.grads, h32, c32, skipped, precision=m)),
                (f"{name} {mode}, bf16 state", mode, BYTES_PER_COORDINATE["bfloat16"],
                 lambda g=group_step, m=mode: g(net, case.params, case.grads, h16, c16, skipped, precision=m)),
            ]
    adam_params = [torch.nn.Parameter(p.clone()) for p in case.params]
    for p, g in zip(adam_params, case.grads):
        p.grad = g
    adam = torch.optim.Adam(adam_params, lr=1e-3, fused=case.device.type == "cuda", foreach=case.device.type != "cuda")
    impls.append(("Adam (fused)" if case.device.type == "cuda" else "Adam (foreach)", "exact", ADAM_BYTES_PER_COORDINATE,
                  adam.step))
    return impls


def run_case(case: Case, net, bandwidth_gbps: float, compile_reference: bool) -> list[dict]:
    rows = []
    with torch.no_grad():
        for name, mode, bytes_per, fn in implementations(case, net, compile_reference):
            row = {"case": case.name, "impl": name, "precision": mode, "coordinates": case.n,
                   "tensors": len(case.shapes), "bytes_per_coordinate": bytes_per}
            try:
                row.update(median_ms(fn, case.device))
                row["peak_extra_bytes"] = peak_extra_bytes(fn, case.device)
                seconds = row["median_ms"] * 1e-3
                row["coordinates_per_s"] = case.n / seconds
                row["effective_gbps"] = bytes_per * case.n / seconds / 1e9
                row["fraction_of_copy_bandwidth"] = row["effective_gbps"] / bandwidth_gbps
            except torch.OutOfMemoryError:
                row["status"] = "out of memory"
            except Exception as error:  # a compile failure is a result to record, not a reason to stop
                row["status"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(_format(row), flush=True)
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _format(row: dict) -> str:
    if "status" in row:
        return f"{row['case']:>18} {row['impl']:>26}: {row['status']}"
    peak = row["peak_extra_bytes"]
    return (f"{row['case']:>18} {row['impl']:>26}: {row['median_ms']:9.3f} ms  {row['coordinates_per_s'] / 1e9:7.3f} Gcoord/s  "
            f"{row['effective_gbps']:7.0f} GB/s ({row['fraction_of_copy_bandwidth']:5.1%} of copy)"
            + ("" if peak is None else f"  +{peak / 2**20:8.1f} MiB"))


def count_launches(case: Case, net) -> dict:
    """CUDA kernels launched by one warm L2LOptimizer step of the case (state made, tables cached)."""
    from l2l_fused import L2LOptimizer

    params = [torch.nn.Parameter(p) for p in case.params]
    opt = L2LOptimizer(params, net=net, backend="triton")
    for _ in range(2):
        for p, g in zip(params, case.grads):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"case": case.name, "tensors": len(params), "param_groups": 1, "cuda_kernels": len(kernels),
            "kernel_names": sorted(set(kernels))}


# (precision, BLOCK_N, num_warps) of the persistent forward: the default launches (128, 8) and the
# neighbours bench/perf_model.py also models when this sweep is recorded.
SWEEP = [("exact", 128, 8), ("exact", 64, 4), ("exact", 64, 8), ("fast", 128, 8), ("fast", 64, 4), ("fast", 64, 8)]


def sweep(device, net, n: int) -> list[dict]:
    """Block size × warps × precision of the Triton step at n coordinates: time, and error against a
    float64 reference on the first 100k coordinates."""
    case = Case(f"flat {n:.0e}", [(n,)], device)
    h, c = case.state(net, torch.float32)
    from l2l_fused.ops.triton import forward as triton_forward

    weights = net.kernel_weights(device)
    m = 100_000
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        delta64, h64, c64 = l2l_update_ref(case.grads[0][:m].double(), h[0][:, :m].double(), c[0][:, :m].double(),
                                           net64.cell_weights(), net64.head.weight, net64.head.bias,
                                           preprocess_p=net.preprocess_p, output_scale=net.output_scale)
    theta = case.params[0]
    out = [torch.empty_like(theta), torch.empty_like(h[0]), torch.empty_like(c[0])]
    rows = []
    for precision, block_n, warps in SWEEP:
        def fn():
            triton_forward.launch_forward([(theta, out[0], case.grads[0], h[0], out[1], c[0], out[2])], weights,
                                          NetShape.of(net), precision=precision, block_n=block_n, num_warps=warps)
        fn()
        err = max(((out[0][:m].double() - theta[:m].double()) - delta64).abs().max().item(),
                  (out[1][:, :m].double() - h64).abs().max().item(),
                  (out[2][:, :m].double() - c64).abs().max().item())
        row = {"block_n": block_n, "num_warps": warps, "precision": precision, "max_abs_error": err,
               **median_ms(fn, device)}
        rows.append(row)
        print(f"sweep {precision:>7} BLOCK_N={block_n:3d} warps={warps}: {row['median_ms']:8.3f} ms  max|err| {err:.2e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e6, 1e7, 1e8])
    parser.add_argument("--model", action="store_true", help="add the transformer-shaped case and its flat twin")
    parser.add_argument("--sweep", action="store_true", help="sweep the Triton launch configuration at 10M")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    net = paper_net(device)
    info = device_info(device)
    bandwidth = copy_bandwidth(device, 2.0 if device.type == "cuda" else 0.25)
    print(f"{info['device']}: copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    payload = {**info, "copy_bandwidth_gbps": bandwidth, "rows": []}
    if "triton" in available_backends(device):
        from l2l_fused.ops.triton import forward as triton_forward

        payload["config"] = {mode: dict(zip(("block_n", "num_warps", "num_stages"),
                                            triton_forward.launch_config(NetShape.of(net), mode)))
                             for mode in ("exact", "fast")}
    if args.sweep and device.type == "cuda":
        payload["sweep"] = sweep(device, net, 10_000_000)
    # One case alive at a time: at 100M coordinates a case's state alone is 32 GB.
    for n in args.sizes:
        payload["rows"] += run_case(Case(f"flat {n:.0e}", [(int(n),)], device), net, bandwidth,
                                    compile_reference=not args.no_compile and n <= 1e7)
    if args.model:
        shapes = transformer_shapes()
        case = Case("transformer", shapes, device)
        payload["rows"] += run_case(case, net, bandwidth, compile_reference=False)
        if device.type == "cuda":
            payload["launches"] = count_launches(case, net)
            print(f"launches per step: {payload['launches']}", flush=True)
        del case
        flat = Case("flat (same size)", [(sum(torch.Size(s).numel() for s in shapes),)], device)
        payload["rows"] += run_case(flat, net, bandwidth, compile_reference=False)
    if args.out:
        write_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
