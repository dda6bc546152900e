"""Benchmark CART loss weights: linear two-scan version vs the dense l x l definition.

Run: .venv/bin/python bench/bench_cart.py [--device cpu|cuda] [--reps N] [--threads 1 2]

Every case runs in a fresh subprocess so memory numbers do not leak between cases.
Time: median (and min) wall time of repeated calls after warm-up calls.
Memory on CPU: peak RSS high-water mark (getrusage ru_maxrss) at the end minus the RSS
just before the first timed call, i.e. the extra resident memory the call needed at its
peak, allocator overhead included (resolution: a few MB). On CUDA: the peak of
torch.cuda.max_memory_allocated minus the allocation before the call.
Each case runs with 1 CPU thread and with torch's default thread count: on a shared,
oversubscribed machine multi-threaded small kernels can be far slower than one thread.
Results: a table on stdout and JSON in bench/results/cart.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cart.json"
GEO_P = 0.3
DENSE_LIMIT_GB = 8.0
CASES = [
    (impl, b, length) for length in (4096, 32768) for b in (1, 4) for impl in ("linear", "dense")
]


def dense_cart(masked, p: float):
    """The quadratic definition, built as lean as possible: one fp32 l x l matrix."""
    import torch

    length = masked.shape[1]
    idx = torch.arange(length, dtype=torch.float32, device=masked.device)
    geo = idx[None, :] - idx[:, None]
    geo.abs_().sub_(1.0).mul_(torch.log(torch.tensor(1.0 - p)).item()).exp_()
    geo.fill_diagonal_(0.0).mul_(0.5 * p)
    return ((~masked).float() @ geo) * masked


def dense_bytes(length: int) -> int:
    return 4 * length * length


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_case(impl: str, b: int, length: int, reps: int, device: str, threads: int) -> dict:
    """Measure one case in this process (called in a fresh subprocess)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(ROOT))
    from dllm_plugin.diffusion.cart import cart_weights

    fn = cart_weights if impl == "linear" else dense_cart
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    masked = (torch.rand(b, length, generator=gen) < 0.5).to(device)
    fn(masked[:, :64], GEO_P)  # load kernels / thread pools outside the measurement
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    out = fn(masked, GEO_P)
    sync()
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else _peak_rss_bytes() - base
    times = [first]
    for _ in range(reps - 1):
        start = time.perf_counter()
        fn(masked, GEO_P)
        sync()
        times.append(time.perf_counter() - start)
    result = {
        "impl": impl,
        "batch": b,
        "length": length,
        "device": device,
        "threads": torch.get_num_threads(),
        "reps": len(times),
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "peak_mem_mb": max(peak, 0) / 2**20,
    }
    if impl == "dense":  # sanity: both implementations agree
        ref = out.double()
        lin = cart_weights(masked, GEO_P).double()
        rel = ((lin - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
        result["max_rel_diff_linear_vs_dense"] = rel
    return result


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _skip_reason(impl: str, length: int, device: str) -> str | None:
    if impl != "dense":
        return None
    need = dense_bytes(length) / 2**30
    if device.startswith("cuda"):
        import torch

        have = torch.cuda.mem_get_info()[0] / 2**30
    else:
        have = _available_gb()
    if need >= DENSE_LIMIT_GB or need > 0.7 * have:
        return f"skipped: would need {need:.1f} GB (limit {DENSE_LIMIT_GB} GB, {have:.1f} GB free)"
    return None


def _spawn(impl: str, b: int, length: int, reps: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--case", impl, str(b), str(length), "--reps", str(reps)]
    cmd += ["--device", device, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"impl": impl, "batch": b, "length": length, "error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(r: dict) -> str:
    head = f"{r['impl']:<7}{r.get('threads', ''):>8}{r['batch']:>6}{r['length']:>8}  "
    if "skipped" in r or "error" in r:
        return head + r.get("skipped", "error: " + r.get("error", ""))
    text = f"{r['median_ms']:>11.2f}{r['min_ms']:>10.2f}{r['peak_mem_mb']:>12.1f}"
    if "max_rel_diff_linear_vs_dense" in r:
        text += f"   max rel diff vs linear {r['max_rel_diff_linear_vs_dense']:.1e}"
    return head + text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=15, help="timed calls (dense at 32k: 3)")
    parser.add_argument(
        "--threads", type=int, nargs="*", default=None, help="CPU thread counts (0 = default)"
    )
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "BATCH", "LENGTH"))
    args = parser.parse_args()
    if args.case:
        impl, b, length = args.case[0], int(args.case[1]), int(args.case[2])
        threads = args.threads[0] if args.threads else 0
        print(json.dumps(run_case(impl, b, length, args.reps, args.device, threads)))
        return

    import torch

    thread_counts = args.threads or [1, torch.get_num_threads()]

    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(
        f"{'impl':<7}{'threads':>8}{'batch':>6}{'length':>8}  {'median ms':>11}{'min ms':>10}{'peak MB':>12}"
    )
    for threads, (impl, b, length) in itertools.product(thread_counts, CASES):
        reason = _skip_reason(impl, length, args.device)
        if reason:
            r = {"impl": impl, "batch": b, "length": length, "skipped": reason}
        else:
            reps = 2 if impl == "dense" and length > 8192 else args.reps
            r = _spawn(impl, b, length, reps, args.device, threads)
        results.append(r)
        print(_row(r), flush=True)
    meta = {
        "geo_p": GEO_P,
        "torch": torch.__version__,
        "thread_counts": thread_counts,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "memory_method": "fresh subprocess per case; CPU: ru_maxrss high-water minus RSS "
        "before the first timed call; CUDA: max_memory_allocated minus allocated before",
        "time_method": "median and min wall time of repeated calls after a warm-up call",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
