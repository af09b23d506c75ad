"""The native CPU forward step against the CPU's matrix-multiply rate, in one process.

The step's useful work is the net's multiply-adds (docs/spec.md §4: 4,980 per coordinate for the paper's
net, 9,960 flops); its rate is reported as a fraction of what a 4096² float32 ``torch.mm`` reaches in the
same process, measured in rounds interleaved with the step so that both see the same machine load.
Cases at N coordinates (the paper's net, float32 and bfloat16 state): the optimizer's in-place group step
(skipped counter on), the out-of-place forward (which allocates its outputs, as the op does), and the eager
reference's group step for context. Results go to bench/results/cpu-step-DATE-COMMIT.json unless --out.

    python bench/cpu_step.py [--n 1e6] [--rounds 3] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import Case, paper_net  # noqa: E402
from common import device_info, median_ms, write_results  # noqa: E402

from l2l_fused.ops import interface, native  # noqa: E402
from l2l_fused.ops.layout import NetShape  # noqa: E402

MM_SIZE = 4096


def flops_per_coordinate(shape: NetShape) -> int:
    """2 × the multiply-adds of docs/spec.md §4: 4H·(n_x + H) per layer (the bias is an add), H for the head."""
    macs = sum(4 * shape.hidden * (shape.inputs(l) + shape.hidden) for l in range(shape.layers)) + shape.hidden
    return 2 * macs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=float, default=1e6)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of mm and step; medians over them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: bench/results/cpu-step-DATE-COMMIT.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, n = torch.device("cpu"), int(args.n)
    net, info = paper_net(device), device_info(device)
    shape, weights = NetShape.of(net), net.kernel_weights(device)
    flops = flops_per_coordinate(shape)
    case = Case(f"flat {n:.0e}", [(n,)], device)
    skipped = torch.zeros((), dtype=torch.int64)
    native_step = interface.resolve("native", device, net).group_step
    a, b = torch.randn(MM_SIZE, MM_SIZE), torch.randn(MM_SIZE, MM_SIZE)
    timed = {"mm": lambda: torch.mm(a, b)}
    for dtype in (torch.float32, torch.bfloat16):
        (h,), (c,) = case.state(net, dtype)
        name = "float32" if dtype == torch.float32 else "bfloat16"
        timed[f"group step, {name} state"] = lambda h=h, c=c: native_step(net, case.params, case.grads, [h], [c], skipped)
        timed[f"forward, {name} state"] = lambda h=h, c=c: native.forward(case.params[0], case.grads[0], h, c,
                                                                           weights, shape)
    times = {name: [] for name in timed}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in timed.items():
                times[name].append(median_ms(fn, device, rep_ms=1000)["median_ms"])
        (h,), (c,) = case.state(net, torch.float32)
        reference = interface.resolve("reference", device).group_step
        reference_ms = median_ms(lambda: reference(net, case.params, case.grads, [h], [c], skipped), device,
                                 rep_ms=0)["median_ms"]
    mm_samples = times.pop("mm")
    mm_ms = statistics.median(mm_samples)
    mm_gflops = 2 * MM_SIZE**3 / (mm_ms * 1e-3) / 1e9
    print(f"{info['device']}, {torch.get_num_threads()} threads: {MM_SIZE}² float32 mm {mm_ms:.1f} ms = "
          f"{mm_gflops:.1f} GFLOP/s; step at N = {n:,}, {flops} flops per coordinate")
    rows = []
    for name, samples in times.items():
        ms = statistics.median(samples)
        gflops = flops * n / (ms * 1e-3) / 1e9
        in_round = [flops * n / step / (2 * MM_SIZE**3 / mm) for mm, step in zip(mm_samples, samples)]
        rows.append({"impl": f"native {name}", "median_ms": ms, "round_ms": samples, "gflops": gflops,
                     "fraction_of_mm": gflops / mm_gflops, "round_fractions": in_round})
        print(f"  native {name:>26}: {ms:8.1f} ms  {gflops:6.1f} GFLOP/s  {gflops / mm_gflops:6.1%} of mm "
              f"(rounds: {', '.join(f'{f:.1%}' for f in in_round)})")
    rows.append({"impl": "reference (eager) group step, float32 state", "median_ms": reference_ms})
    print(f"  reference (eager) group step, float32 state: {reference_ms:8.1f} ms")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"cpu-step-{info['date'][:10]}-{info['commit']}.json")
    write_results(out, {**info, "threads": torch.get_num_threads(), "coordinates": n,
                        "flops_per_coordinate": flops, "mm_size": MM_SIZE, "mm_ms": mm_ms, "mm_round_ms": mm_samples,
                        "mm_gflops": mm_gflops, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
