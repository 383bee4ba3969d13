"""Helpers for the multi-process tests: Python workers that log what they held with
CLOCK_MONOTONIC times, and the sweep that finds the peak across all logs."""

import os
import time
from typing import Iterable, List, Optional, Tuple

import lim

Interval = Tuple[int, int, int]  # start_ns, end_ns, bytes


def barrier(directory: Optional[str]) -> None:
    """Says this worker is ready (creates <directory>/ready.<pid>), then waits for the test's
    <directory>/go (start_together): all workers then run at once, however late a loaded machine
    started each. Nothing when `directory` is None."""
    if directory is None:
        return
    open(os.path.join(directory, f"ready.{os.getpid()}"), "w").close()
    go = os.path.join(directory, "go")
    while not os.path.exists(go):
        time.sleep(0.001)


def start_together(directory: str, n: int) -> None:
    """Waits until `n` workers are ready at the barrier in `directory`, then lets them go."""
    deadline = time.monotonic() + 120
    while sum(1 for f in os.listdir(directory) if f.startswith("ready.")) < n:
        assert time.monotonic() < deadline, "the workers never reached the barrier"
        time.sleep(0.005)
    open(os.path.join(directory, "go"), "w").close()


def dispatch_worker(seg_name: str, key: str, concurrency: int, throttled: int, budget: int,
                    iterations: int, nbytes: int, hold_s: float, log: str,
                    barrier_dir: Optional[str] = None) -> None:
    """Acquires `iterations` permits of `nbytes` and logs each as "<start> <end> <bytes>": the
    interval lies inside the time the permit was held (after acquire returned, before release)."""
    seg = lim.Segment.open(seg_name)
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, key), key=key,
                            concurrency=concurrency, throttled_concurrency=throttled,
                            byte_budget=budget)
    barrier(barrier_dir)
    lines = []
    for _ in range(iterations):
        with api.permit(nbytes) as p:
            start = time.monotonic_ns()
            time.sleep(hold_s)
            end = time.monotonic_ns()
            lines.append(f"{start} {end} {p.bytes}\n")
    with open(log, "w") as f:
        f.writelines(lines)


def bucket_worker(seg_name: str, key: str, burst: float, rate: float, duration_ns: int,
                  log: str, barrier_dir: Optional[str] = None) -> None:
    """Takes one token at a time for duration_ns (from the barrier); logs "<taken> <last_ns>"."""
    seg = lim.Segment.open(seg_name)
    tb = lim.TokenBucket.open(seg, key, burst_size=burst, sustained_rate_per_sec=rate,
                              adopt_existing=True)
    barrier(barrier_dir)
    end_ns = time.monotonic_ns() + duration_ns
    taken = 0
    last = time.monotonic_ns()
    while last < end_ns:
        if tb.try_take(1) is lim.TryTake.TAKEN:
            taken += 1
        last = time.monotonic_ns()
    with open(log, "w") as f:
        f.write(f"{taken} {last}\n")


def read_intervals(paths: Iterable[str]) -> List[Interval]:
    out = []
    for p in paths:
        with open(p) as f:
            for line in f:
                s, e, b = line.split()
                out.append((int(s), int(e), int(b)))
    return out


def peaks(intervals: List[Interval]) -> Tuple[int, int]:
    """The most intervals, and the most bytes, overlapping at any instant (an end at the same
    instant as a start counts first, so touching intervals do not overlap)."""
    events = []
    for s, e, b in intervals:
        events.append((s, 1, 1, b))
        events.append((e, 0, -1, -b))
    events.sort()
    count = bytes_ = peak_count = peak_bytes = 0
    for _, _, dc, db in events:
        count += dc
        bytes_ += db
        peak_count = max(peak_count, count)
        peak_bytes = max(peak_bytes, bytes_)
    return peak_count, peak_bytes


def read_bucket_logs(paths: Iterable[str]) -> Tuple[int, int]:
    """Total tokens taken, and the latest time any worker took one."""
    total = 0
    last = 0
    for p in paths:
        with open(p) as f:
            taken, t = f.read().split()
        total += int(taken)
        last = max(last, int(t))
    return total, last


def wait_all(pids: List[int]) -> None:
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"worker {pid}: {status}"


def run_processes(procs, popens=(), barrier_dir: Optional[str] = None) -> None:
    """Starts the multiprocessing workers (and, with `barrier_dir`, lets all of them and the
    subprocesses go at once: start_together), then waits for them and for the already started
    subprocesses; every one must exit 0."""
    for p in procs:
        p.start()
    if barrier_dir is not None:
        start_together(barrier_dir, len(procs) + len(popens))
    for c in popens:
        assert c.wait(120) == 0, c.args
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, p
