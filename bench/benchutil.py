"""Timing helpers for the benchmark scripts: every figure a script prints is a ratio of two
timings taken in the same process, interleaved, so machine load affects both alike."""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_many(fns, device="cpu", warmup=2, reps=7):
    """Median seconds per call of each of ``fns`` ({name: fn}); the calls are interleaved
    (a, b, c, a, b, c, ...) so slow drift of the machine hits all of them equally."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def verdict(ok, what):
    print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return ok


def machine():
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus"
