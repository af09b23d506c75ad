"""What every benchmark shares: device facts, median timing, copy bandwidth, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch


def commit() -> str:
    """The git commit benchmarked: L2L_COMMIT if set (the GPU machine gets a tree without .git), else git's."""
    if os.environ.get("L2L_COMMIT"):
        return os.environ["L2L_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


def median_ms(fn, device: torch.device, warmup_ms: float = 50, rep_ms: float = 300) -> dict:
    """Median and 20/80% quantiles of ``fn``'s time in ms: CUDA events on a GPU (triton's do_bench, which
    also flushes L2 between calls), a synchronised host clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        median, q20, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "q20_ms": q20, "q80_ms": q80}
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "q20_ms": q[1], "q80_ms": q[7]}


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)["median_ms"]
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Memory ``fn`` allocates beyond what is resident when it starts (its temporaries), on CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def write_results(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
