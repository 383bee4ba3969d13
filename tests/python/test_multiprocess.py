"""Many processes on one Dispatch: multiprocessing workers never exceed any layer, and a worker
SIGKILLed while holding is reaped."""

import multiprocessing
import os
import signal
import time

import lim
from workers import dispatch_worker, peaks, read_intervals, run_processes


def test_multiprocessing_workers_share_one_dispatch(seg, seg_name, tmp_path):
    concurrency, throttled, budget = 3, 1, 1000
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "api"), key="api",
                            concurrency=concurrency, throttled_concurrency=throttled,
                            byte_budget=budget)
    ctx = multiprocessing.get_context("fork")
    logs = [str(tmp_path / f"w{i}.log") for i in range(6)]
    # 400-byte requests: the byte budget (1000) admits 2 at once, tighter than concurrency (3);
    # 100-byte requests are bound by concurrency.
    procs = [ctx.Process(target=dispatch_worker,
                         args=(seg_name, "api", concurrency, throttled, budget, 15,
                               400 if i % 2 else 100, 0.003, logs[i]))
             for i in range(6)]
    run_processes(procs)
    intervals = read_intervals(logs)
    assert len(intervals) == 6 * 15
    peak_count, peak_bytes = peaks(intervals)
    assert peak_count <= concurrency
    assert peak_bytes <= budget
    assert peak_count >= 2  # the workers did contend
    s = api.snapshot()
    assert (s.in_flight, s.bytes_in_flight, s.waiters) == (0, 0, 0)


def test_multiprocessing_workers_under_backoff(seg, seg_name, tmp_path):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "b"), key="b",
                            concurrency=4, throttled_concurrency=1, byte_budget=10_000)
    api.set_backoff(30.0)
    ctx = multiprocessing.get_context("fork")
    logs = [str(tmp_path / f"b{i}.log") for i in range(4)]
    procs = [ctx.Process(target=dispatch_worker,
                         args=(seg_name, "b", 4, 1, 10_000, 8, 10, 0.002, logs[i]))
             for i in range(4)]
    run_processes(procs)
    intervals = read_intervals(logs)
    assert all(b == 200 for _, _, b in intervals)  # penalised x20
    assert peaks(intervals)[0] == 1  # one throttled slot


def _hold_and_wait(seg_name, ready_w):
    seg = lim.Segment.open(seg_name)
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "k"), key="k",
                            concurrency=4, byte_budget=1000)
    sem = lim.Semaphore.open(seg, "sem", capacity=5)
    tb = lim.Limiter.open(seg, "lim", bucket_size=10, initial_bucket_level=10,
                          initial_hopper_level=0)
    permit = api.acquire(300)
    assert sem.try_acquire(2)
    assert tb.try_take(4) is lim.TryTake.TAKEN
    os.write(ready_w, b"x")
    time.sleep(120)
    permit.release()


def test_worker_sigkilled_while_holding_is_reaped(seg, seg_name):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "k"), key="k",
                            concurrency=4, byte_budget=1000)
    sem = lim.Semaphore.open(seg, "sem", capacity=5)
    lm = lim.Limiter.open(seg, "lim", bucket_size=10, initial_bucket_level=10,
                          initial_hopper_level=0)
    r, w = os.pipe()
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_hold_and_wait, args=(seg_name, w))
    p.start()
    assert os.read(r, 1) == b"x"
    s = api.snapshot()
    assert (s.in_flight, s.bytes_in_flight, sem.in_use, lm.in_flight) == (1, 300, 2, 4)
    os.kill(p.pid, signal.SIGKILL)
    p.join(60)  # far: a loaded machine can be slow to run the exit
    report = seg.reap()
    assert p.pid in report.pids
    dead = next(x for x in report.reaped if x.pid == p.pid)
    returned = {(h.key, h.layer): h.amount for h in dead.returned}
    assert returned.get(("sem", "units")) == 2
    assert returned.get(("lim", "tokens")) == 4
    assert ("k", "bytes") in returned and returned[("k", "bytes")] == 300
    s = api.snapshot()
    assert (s.in_flight, s.bytes_in_flight, sem.in_use, lm.in_flight) == (0, 0, 0, 0)
    lm.invariant()
    assert seg.reap().reaped == []
    os.close(r)
    os.close(w)
