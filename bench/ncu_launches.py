"""One launch of each kernel of the step, for Nsight Compute, and a table of what ncu counted.

Launch mode (run under ncu; bench/gpu_checks.sh does): for each fused backend on CUDA ("triton", "native"),
in this order, one launch each, at N coordinates of the paper's net (H = 20, L = 2, p = 10), random state
and gradients with log-uniform magnitudes (both preprocessing branches):

    1. the optimizer's step (L2LOptimizer.step: the in-place forward),
    2. the differentiable step (LSTMOptimizerNet.__call__: the out-of-place forward),
    3. its backward (autograd through 2).

Only public entry points are used. Nothing is warmed up: a kernel launched twice would be profiled twice.
The labels of the launches, in order, go to --labels.

    ncu --clock-control none --metrics $(python bench/ncu_launches.py --pick-metrics query.txt) \\
        -k "regex:$(python bench/ncu_launches.py --kernels)" -o ncu python bench/ncu_launches.py --labels labels.json
    ncu --import ncu.ncu-rep --csv --page raw --print-units base > raw.csv
    python bench/ncu_launches.py --summarize raw.csv --labels labels.json --json ncu.json

Summarize mode reads that CSV (no torch needed) and prints, per launch, DRAM bytes and warp instructions
per pipe, each per coordinate: the numbers a static performance model of the kernels predicts.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

# Function names of the kernels (ncu's -k regex). Triton names a kernel after its Python function;
# the native CUDA kernels are templates in csrc/l2l_cuda_kernels.cu. Keep in step with those files.
KERNELS = "_l2l_fwd_kernel|_l2l_bwd_kernel|forward_kernel|backward_kernel"

# What to count. Warp instructions per pipe (sm_90 has fma, fmaheavy, alu, xu, lsu, uniform, and the
# tensor pipe's gmma = wgmma and hmma = mma.sync), DRAM bytes, local-memory (spill) bytes, the duration
# under the profiler and the registers. --pick-metrics keeps the ones this ncu knows on this GPU.
METRICS = [
    "sm__inst_executed.sum",
    "sm__inst_executed_pipe_fma.sum",
    "sm__inst_executed_pipe_fmaheavy.sum",
    "sm__inst_executed_pipe_alu.sum",
    "sm__inst_executed_pipe_xu.sum",
    "sm__inst_executed_pipe_lsu.sum",
    "sm__inst_executed_pipe_uniform.sum",
    "sm__inst_executed_pipe_tensor_op_gmma.sum",
    "sm__inst_executed_pipe_tensor_op_hmma.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",
    "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum",
    "gpu__time_duration.sum",
    "launch__registers_per_thread",
]
# Used when the query fails: counters every ncu since Volta has.
CORE = ["sm__inst_executed_pipe_fma.sum", "sm__inst_executed_pipe_alu.sum", "sm__inst_executed_pipe_xu.sum",
        "sm__inst_executed_pipe_lsu.sum", "dram__bytes_read.sum", "dram__bytes_write.sum"]


def pick_metrics(query_file: str) -> list[str]:
    """The METRICS whose base name (before the first '.') `ncu --query-metrics` listed; launch__ metrics
    are kept (not counters, so not always listed); CORE if the query printed no metric names."""
    try:
        with open(query_file, errors="replace") as f:
            known = {line.split()[0] for line in f if line.strip() and "__" in line.split()[0]}
    except OSError:
        known = set()
    if not known:
        return CORE
    return [m for m in METRICS if m.startswith("launch__") or m.split(".")[0] in known]


def launch(n: int, names: list[str], labels_path: str | None, seed: int, device: str) -> int:
    import torch

    from l2l_fused import L2LOptimizer, LSTMOptimizerNet, available_backends

    device = torch.device(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(seed)
    net = LSTMOptimizerNet(hidden_size=20, num_layers=2, preprocess_p=10.0, output_scale=0.1).to(device)
    shape = (net.num_layers, n, net.hidden_size)
    theta0 = torch.randn(n, device=device)
    grad = torch.randn(n, device=device) * torch.exp(torch.empty(n, device=device).uniform_(-20, 5))
    h0, c0 = torch.randn(shape, device=device) * 0.3, torch.randn(shape, device=device)
    available = available_backends(device)
    labels = []
    for name in names:
        if name not in available:
            print(f"{name}: not available on {device} here ({available}); its kernels are not launched", flush=True)
            continue
        # 1. The optimizer's step, from random state (a first step would start from zeros).
        p = torch.nn.Parameter(theta0.clone())
        p.grad = grad.clone()
        opt = L2LOptimizer([p], net=net, backend=name)
        opt.state[p]["h"], opt.state[p]["c"] = h0.clone(), c0.clone()
        synchronize()
        opt.step()
        synchronize()
        labels.append(f"{name} step")
        # 2. The differentiable step and 3. its backward, with random incoming adjoints.
        theta, h, c = (t.clone().requires_grad_() for t in (theta0, h0, c0))
        theta1, (h1, c1) = net(theta, grad, (h, c), backend=name)
        synchronize()
        labels.append(f"{name} fwd")
        torch.autograd.backward([theta1, h1, c1], [torch.randn_like(theta1), torch.randn_like(h1), torch.randn_like(c1)])
        synchronize()
        labels.append(f"{name} bwd")
        del p, opt, theta, h, c, theta1, h1, c1
        net.zero_grad(set_to_none=True)
    print(f"launched, in order: {', '.join(labels) or 'nothing'} (N = {n})", flush=True)
    if labels_path:
        with open(labels_path, "w") as f:
            json.dump({"n": n, "labels": labels, "kernels_regex": KERNELS, "net": net.config()}, f, indent=1)
    return 0 if labels else 1


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_raw_csv(path: str) -> tuple[list[str], dict[str, str], list[dict[str, str]]]:
    """`ncu --import R --csv --page raw`: a header row, a row of units, then one row per profiled launch.
    Lines ncu prints besides the table (==PROF==, warnings) are skipped."""
    with open(path, newline="", errors="replace") as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.reader(lines))
    if not rows or "ID" not in rows[0]:
        return [], {}, []
    header = rows[0]
    units = dict(zip(header, rows[1])) if len(rows) > 1 and not rows[1][header.index("ID")] else {}
    data = [dict(zip(header, r)) for r in rows[1 + bool(units):] if len(r) == len(header)]
    return header, units, data


SHORT = {  # row labels of the table: metric -> (label, per coordinate?)
    "dram__bytes_read.sum": ("DRAM read B/coord", True),
    "dram__bytes_write.sum": ("DRAM write B/coord", True),
    "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum": ("local ld B/coord", True),
    "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum": ("local st B/coord", True),
    "sm__inst_executed.sum": ("warp inst/coord, all", True),
    "gpu__time_duration.sum": ("time under ncu (us)", False),
    "launch__registers_per_thread": ("registers/thread", False),
}


def summarize(raw_csv: str, labels_path: str | None, n_arg: float | None, json_path: str | None) -> int:
    header, units, data = read_raw_csv(raw_csv)
    if not data:
        print(f"{raw_csv}: no profiled launch (did the -k regex {KERNELS!r} match the kernels' names?)")
        return 1
    info = {}
    if labels_path:
        try:
            with open(labels_path) as f:
                info = json.load(f)
        except (OSError, ValueError) as error:
            print(f"labels: {error}")
    labels = info.get("labels", [])
    n = int(n_arg or info.get("n") or 0)
    if len(labels) != len(data):
        print(f"warning: {len(data)} profiled launches, {len(labels)} labels: columns are numbered, not labelled")
        labels = [f"launch {i}" for i in range(len(data))]
    data.sort(key=lambda r: int(_number(r.get("ID", "0")) or 0))
    metrics = [h for h in header if "__" in h]
    launches = []
    for label, row in zip(labels, data):
        values = {m: _number(row.get(m, "")) for m in metrics}
        per = {m: v / n for m, v in values.items() if n and v is not None and SHORT.get(m, ("", True))[1]}
        launches.append({"label": label, "kernel": row.get("Kernel Name", "?"), "grid": row.get("Grid Size"),
                         "block": row.get("Block Size"), "metrics": values, "per_coordinate": per})

    def row_label(m):
        if m in SHORT:
            return SHORT[m][0]
        return m.replace("sm__inst_executed_pipe_", "warp inst/coord, ").replace(".sum", "")

    width = max(12, *(len(l["label"]) for l in launches))
    print(f"ncu: {len(launches)} launches, N = {n} coordinates; per-coordinate columns divide by N")
    print(f"{'':30}" + "".join(f"{l['label']:>{width + 1}}" for l in launches))
    print(f"{'kernel':30}" + "".join(f"{l['kernel'][:width]:>{width + 1}}" for l in launches))
    for m in metrics:
        cells = []
        for l in launches:
            v = l["per_coordinate"].get(m, l["metrics"][m])
            if v is None:
                cells.append("-")
            elif m == "gpu__time_duration.sum":
                cells.append(f"{v / 1e3:.1f}")  # ns -> us (base units)
            else:
                cells.append(f"{v:.4g}")
        print(f"{row_label(m):30}" + "".join(f"{c:>{width + 1}}" for c in cells))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"n": n, "units": {m: units.get(m) for m in metrics}, "net": info.get("net"),
                       "launches": launches}, f, indent=1)
        print(f"wrote {json_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=float, default=None, help="coordinates per launch (default 1e6); summarize: "
                        "N to divide by (default: from --labels)")
    parser.add_argument("--backends", nargs="*", default=["triton", "native"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the launch sequence without a GPU")
    parser.add_argument("--labels", help="launch mode: write the launches' labels here; summarize: read them")
    parser.add_argument("--kernels", action="store_true", help="print the -k regex for ncu and exit")
    parser.add_argument("--pick-metrics", metavar="QUERY", help="print the metrics to ask ncu for, given the "
                        "output of `ncu --query-metrics` in QUERY, and exit")
    parser.add_argument("--summarize", metavar="RAW_CSV", help="print the table of an ncu raw CSV and exit")
    parser.add_argument("--json", help="summarize: also write the table here")
    args = parser.parse_args(argv)
    if args.kernels:
        print(KERNELS)
        return 0
    if args.pick_metrics:
        print(",".join(pick_metrics(args.pick_metrics)))
        return 0
    if args.summarize:
        return summarize(args.summarize, args.labels, args.n, args.json)
    return launch(int(args.n or 1e6), args.backends, args.labels, args.seed, args.device)


if __name__ == "__main__":
    sys.exit(main())
