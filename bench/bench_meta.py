"""Meta-training cost: one truncation (T unrolled steps, forward and backward) through the optimizer alone.

The optimizee's gradient at each step is random data (log-uniform magnitudes) and the meta-loss is the
sum of θ over the unrolled steps, so what is measured is the optimizer's own cost: autograd through the
eager reference, through ``torch.compile`` of the reference step, and through the fused steps (Triton in
each arithmetic mode, native; saving the state in float32 or bfloat16). Reports the median time per unrolled step (forward +
backward), the peak memory of a truncation, and the memory autograd keeps per coordinate per step.

    python bench/bench_meta.py --sizes 1e6 1e7 --steps 20 --out bench/results/meta.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, median_ms, write_results  # noqa: E402

from l2l_fused import available_backends  # noqa: E402
from l2l_fused.ops import interface  # noqa: E402
from bench_step import paper_net  # noqa: E402


def truncation(net, n: int, steps: int, device, step_fn, grads):
    """Returns a callable running one truncation, and one that reports the bytes kept after its forward."""
    theta0 = torch.randn(n, device=device)
    h0, c0 = net.init_state(n, device=device)

    def forward():
        theta = theta0.clone().requires_grad_()
        h, c = h0.clone().requires_grad_(), c0.clone().requires_grad_()
        x, total = theta, 0
        for g in grads:
            x, h, c = step_fn(net, x, g, h, c)
            total = total + x.sum()  # keeps nothing per coordinate: what remains is the optimizer's
        return total, (theta, h, c)

    def run():
        total, _ = forward()
        total.backward()

    def kept_bytes():
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        total, leaves = forward()
        torch.cuda.synchronize(device)
        kept = torch.cuda.memory_allocated(device) - before
        del total, leaves
        return kept

    return run, kept_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e6, 1e7])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="*", default=["exact", "fast"], choices=["exact", "fast"],
                        help="the Triton step's arithmetic modes to measure (l2l_fused.ops.precision)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    net = paper_net(device)
    for p in net.parameters():
        p.requires_grad_(True)
    info = device_info(device)
    print(f"{info['device']}: T = {args.steps}", flush=True)
    reference = interface.resolve("reference", device).step
    impls = [("reference (eager)", reference, "exact")]  # (name, step, arithmetic mode)
    if device.type == "cuda":
        impls.append(("reference (torch.compile)", torch.compile(reference), "exact"))
    for name in ("triton", "native"):
        if name in available_backends(device):
            step = interface.resolve(name, device).step
            # the native kernels compute in float32 in both modes: one mode is all they have
            for precision in args.precision if name == "triton" else ["exact"]:
                label = f"{name} {precision}" if name == "triton" else name
                impls += [(label, lambda net, x, g, h, c, step=step, p=precision: step(net, x, g, h, c, None, p), precision),
                          (f"{label}, bf16 saved state",
                           lambda net, x, g, h, c, step=step, p=precision: step(net, x, g, h, c, torch.bfloat16, p),
                           precision)]
    rows = []
    for n in (int(s) for s in args.sizes):
        grads = [torch.randn(n, device=device) * torch.exp(torch.empty(n, device=device).uniform_(-20, 5))
                 for _ in range(args.steps)]
        for name, step_fn, precision in impls:
            row = {"impl": name, "precision": precision, "coordinates": n, "steps": args.steps}
            try:
                run, kept_bytes = truncation(net, n, args.steps, device, step_fn, grads)
                timing = median_ms(run, device, warmup_ms=1, rep_ms=1500)
                row.update({k: v / args.steps for k, v in timing.items()})  # per unrolled step
                if device.type == "cuda":
                    row["kept_bytes_per_coordinate_per_step"] = kept_bytes() / (n * args.steps)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    run()
                    row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            except torch.OutOfMemoryError:
                row["status"] = "out of memory"
            except Exception as error:
                row["status"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(_format(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del grads
    if args.out:
        write_results(args.out, {**info, "rows": rows})
    return 0


def _format(row: dict) -> str:
    head = f"N={row['coordinates']:>9} {row['impl']:>26}"
    if "status" in row:
        return f"{head}: {row['status']}"
    extra = ""
    if "kept_bytes_per_coordinate_per_step" in row:
        extra = f"  kept {row['kept_bytes_per_coordinate_per_step']:7.1f} B/coord/step  peak {row['peak_gib']:6.2f} GiB"
    return f"{head}: {row['median_ms']:9.3f} ms per unrolled step (fwd+bwd){extra}"


if __name__ == "__main__":
    sys.exit(main())
