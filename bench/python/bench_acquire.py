#!/usr/bin/env python3
"""One uncontended acquire+release, in one run: lim from Python (ctypes), the same through the
C++ API (a small program this script compiles), and multiprocessing.Semaphore.

    LIM_LIBRARY=build/release/lib/liblim.so python3 bench/python/bench_acquire.py \
        [--build build/release] [--iterations 200000]

Prints one line per case: CPU ns per acquire+release (best of --repeat runs). CPU time of the
process, not wall time, so that a loaded machine inflates the numbers less.
"""

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

import lim  # noqa: E402


def best_ns(fn, n, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time_ns()
        fn(n)
        best = min(best, (time.process_time_ns() - t) / n)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(REPO / "build" / "release"))
    ap.add_argument("--iterations", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.iterations
    name = f"bench-py-{os.getpid()}"
    seg = lim.Segment.open_or_create(name)
    try:
        sem = lim.Semaphore.open(seg, "bench-sem", capacity=8)
        api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "bench-api"),
                                key="bench-api", concurrency=8)
        tb = lim.TokenBucket.open(seg, "bench-tb", burst_size=1e9, sustained_rate_per_sec=1e9,
                                  initial_bucket_level=1e9)
        mp_sem = multiprocessing.Semaphore(8)

        def py_sem(k):
            for _ in range(k):
                sem.try_acquire(1)
                sem.release(1)

        def py_dispatch(k):
            for _ in range(k):
                api.try_acquire(100).release()

        def py_dispatch_with(k):
            for _ in range(k):
                with api.permit(100):
                    pass

        def py_token_bucket(k):
            for _ in range(k):
                tb.try_take(1)

        def mp(k):
            for _ in range(k):
                mp_sem.acquire()
                mp_sem.release()

        rows = [
            ("python lim.Semaphore try_acquire+release", best_ns(py_sem, n, args.repeat)),
            ("python lim.Dispatch try_acquire+release", best_ns(py_dispatch, n, args.repeat)),
            ("python lim.Dispatch with permit()", best_ns(py_dispatch_with, n, args.repeat)),
            ("python lim.TokenBucket try_take", best_ns(py_token_bucket, n, args.repeat)),
            ("python multiprocessing.Semaphore acquire+release", best_ns(mp, n, args.repeat)),
        ]
        with tempfile.TemporaryDirectory() as tmp:
            exe = Path(tmp) / "cpp_acquire"
            libdir = Path(args.build) / "lib"
            subprocess.run(["g++", "-O2", "-std=c++20", f"-I{REPO / 'lib' / 'include'}",
                            str(Path(__file__).with_name("cpp_acquire.cpp")), "-o", str(exe),
                            f"-L{libdir}", "-llim", f"-Wl,-rpath,{libdir}"], check=True)
            cpp = {}
            for _ in range(args.repeat):
                out = subprocess.run([str(exe), name, str(n)], check=True, capture_output=True,
                                     text=True).stdout
                for line in out.splitlines():
                    k, v = line.split()
                    cpp[k] = min(cpp.get(k, float("inf")), float(v))
        rows.insert(0, ("C++ lim::Semaphore try_acquire+release", cpp["semaphore"]))
        rows.insert(1, ("C++ lim::Dispatch try_acquire+release", cpp["dispatch"]))
        print(f"{'case':<52} CPU ns/op   (best of {args.repeat} x {n})")
        for label, ns in rows:
            print(f"{label:<52} {ns:7.1f}")
    finally:
        lim.Segment.remove(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
