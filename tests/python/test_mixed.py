"""C++ and Python worker processes share one Dispatch and one TokenBucket on one segment; every
limit holds across both languages, checked from the workers' own logs."""

import multiprocessing
import os
import subprocess
import time

import lim
from conftest import tool
from workers import (bucket_worker, dispatch_worker, peaks, read_bucket_logs, read_intervals,
                     run_processes)

CONCURRENCY, THROTTLED, BUDGET = 3, 1, 1000


def test_cpp_and_python_workers_share_one_dispatch_and_one_token_bucket(seg, seg_name,
                                                                        tmp_path):
    worker = tool("LIM_MIXED_WORKER")
    ctx = multiprocessing.get_context("fork")
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "api"), key="api",
                            concurrency=CONCURRENCY, throttled_concurrency=THROTTLED,
                            byte_budget=BUDGET)

    # Dispatch: 3 C++ and 3 Python workers, 20 permits each; 300-byte and 100-byte requests.
    iterations = 20
    cpp_logs = [str(tmp_path / f"cpp{i}.log") for i in range(3)]
    py_logs = [str(tmp_path / f"py{i}.log") for i in range(3)]
    # All six start at once (a barrier): the C++ ones, started first, could otherwise be done
    # before a loaded machine ran the Python ones, and nothing would interleave.
    barrier_dir = tmp_path / "dispatch-barrier"
    barrier_dir.mkdir()
    env = dict(os.environ, LIM_TEST_BARRIER=str(barrier_dir))
    cpp = [subprocess.Popen([worker, "dispatch", seg_name, "api", str(CONCURRENCY),
                             str(THROTTLED), str(BUDGET), str(iterations),
                             "300" if i % 2 else "100", "2000", cpp_logs[i]], env=env)
           for i in range(3)]
    py = [ctx.Process(target=dispatch_worker,
                      args=(seg_name, "api", CONCURRENCY, THROTTLED, BUDGET, iterations,
                            300 if i % 2 == 0 else 100, 0.002, py_logs[i], str(barrier_dir)))
          for i in range(3)]
    run_processes(py, cpp, str(barrier_dir))
    cpp_intervals = read_intervals(cpp_logs)
    py_intervals = read_intervals(py_logs)
    assert len(cpp_intervals) == len(py_intervals) == 3 * iterations
    peak_count, peak_bytes = peaks(cpp_intervals + py_intervals)
    assert peak_count <= CONCURRENCY
    assert peak_bytes <= BUDGET
    assert peak_count >= 2
    # The languages really interleaved: some C++ permit overlapped some Python permit.
    assert any(cs < pe and ps < ce for cs, ce, _ in cpp_intervals
               for ps, pe, _ in py_intervals)
    s = api.snapshot()
    assert (s.in_flight, s.bytes_in_flight, s.waiters) == (0, 0, 0)

    # TokenBucket: burst 20, 100 tokens/s, taken one at a time by 2 C++ and 2 Python workers.
    burst, rate = 20, 100.0
    created_before = time.monotonic_ns()  # the bucket's fill is counted from no earlier
    tb = lim.TokenBucket.open(seg, "tokens", burst_size=burst, sustained_rate_per_sec=rate,
                              initial_bucket_level=burst)
    # Each takes for 1.5 s from the barrier, not until a time fixed before they started (a loaded
    # machine may start one late, which then takes too little for the lower bound below).
    duration_ns = 1_500_000_000
    barrier_dir = tmp_path / "bucket-barrier"
    barrier_dir.mkdir()
    env = dict(os.environ, LIM_TEST_BARRIER=str(barrier_dir))
    cpp_logs = [str(tmp_path / f"tb-cpp{i}.log") for i in range(2)]
    py_logs = [str(tmp_path / f"tb-py{i}.log") for i in range(2)]
    cpp = [subprocess.Popen([worker, "bucket", seg_name, "tokens", str(burst), str(rate),
                             str(duration_ns), log], env=env) for log in cpp_logs]
    py = [ctx.Process(target=bucket_worker,
                      args=(seg_name, "tokens", burst, rate, duration_ns, log, str(barrier_dir)))
          for log in py_logs]
    run_processes(py, cpp, str(barrier_dir))
    cpp_taken, cpp_last = read_bucket_logs(cpp_logs)
    py_taken, py_last = read_bucket_logs(py_logs)
    taken = cpp_taken + py_taken
    elapsed = (max(cpp_last, py_last) - created_before) / 1e9
    bound = burst + int(rate * elapsed)
    # Exact count from the segment: everything taken is in flight (the hopper is infinite and
    # nothing is returned), so the bucket's own ledger agrees with the workers' logs.
    assert tb.in_flight == taken
    assert taken <= bound, (taken, bound, elapsed)
    assert taken >= burst + rate * 1.5 / 4  # the workers kept taking while it refilled
    assert cpp_taken > 0 and py_taken > 0
