"""Closing a handle (or its segment) while another thread is blocked in a call on it: the blocked
call stops with ValueError (the handle is closed) and holds nothing; the process never crashes.
Each case runs in a forked child, so that a crash fails the case instead of the whole run."""

import os
import threading
import time

import pytest

import lim


def in_child(fn):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fn() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def blocked_then_closed(open_handle, block, close_segment):
    """In a child: opens a handle on a fresh segment handle, blocks a thread in block(handle),
    closes the handle (and the segment handle), and checks that the thread ends with
    ValueError within a few slices."""

    def scenario():
        seg = lim.Segment.open(os.environ["LIM_TEST_SEGMENT"])
        h = open_handle(seg)
        outcome = []

        def run():
            try:
                outcome.append(block(h))
            except ValueError as e:
                outcome.append(e)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.2)
        h.close()
        if close_segment:
            seg.close()
        t.join(60)  # far: closing wakes it; a loaded machine can be slow to run it
        return not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], ValueError)

    return in_child(scenario)


CASES = {
    "semaphore": (lambda seg: lim.Semaphore.open(seg, "full", capacity=1),
                  lambda s: s.acquire(1)),
    "weighted": (lambda seg: lim.WeightedSemaphore.open(seg, "full-bytes", capacity=10),
                 lambda s: s.acquire(10)),
    "dispatch": (lambda seg: lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "d"),
                                               key="full-d", concurrency=1),
                 lambda d: d.acquire(0)),
    "token_bucket": (lambda seg: lim.TokenBucket.open(seg, "empty-tb", burst_size=1,
                                                      sustained_rate_per_sec=1e-6),
                     lambda tb: tb.take(1)),
    "throttle": (lambda seg: lim.Throttle.open(seg, "full-jobs", max_concurrent_jobs=1),
                 lambda t: t.start_job()),
    "backoff_window": (lambda seg: lim.BackoffWindow.for_key(seg, "long-backoff"),
                       lambda w: w.wait()),
}


@pytest.mark.parametrize("close_segment", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_close_while_another_thread_is_blocked(seg, seg_name, monkeypatch, case, close_segment):
    monkeypatch.setenv("LIM_TEST_SEGMENT", seg_name)
    open_handle, block = CASES[case]
    mine = open_handle(seg)  # fill it from this process, so that the child blocks
    if case in ("semaphore", "weighted"):
        assert mine.try_acquire(mine.capacity)
    elif case == "dispatch":
        held = mine.try_acquire(0)
    elif case == "throttle":
        assert mine.try_start_job()
    elif case == "backoff_window":
        mine.set(3600)
    assert blocked_then_closed(open_handle, block, close_segment) == 0
    if case in ("semaphore", "weighted"):
        assert mine.in_use == mine.capacity  # the child took nothing
        mine.release(mine.capacity)
    elif case == "dispatch":
        assert mine.snapshot().in_flight == 1
        held.release()
    elif case == "throttle":
        assert mine.state().in_flight == 1
        mine.finish_job()


def test_copies_share_the_handle_and_pickling_is_refused(seg):
    """copy.copy of a handle or a Permit used to make a second owner of the same C object: both
    freed it (a crash), and a copied Permit released the permit a later request reused."""
    import copy
    import pickle

    def scenario():
        api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "c"), key="c",
                                concurrency=2)
        handles = [seg, lim.Semaphore.open(seg, "c", capacity=2),
                   lim.WeightedSemaphore.open(seg, "cw", capacity=2),
                   lim.BackoffWindow.for_key(seg, "c"), api,
                   lim.TokenBucket.open(seg, "ct", burst_size=1, sustained_rate_per_sec=1),
                   lim.Limiter.open(seg, "cl", bucket_size=1),
                   lim.Throttle.open(seg, "cj", max_concurrent_jobs=1),
                   lim.ThrottledRateLimiter.open(seg, "cr", burst_size=1,
                                                 sustained_rate_per_sec=1, max_concurrent_jobs=1)]
        for h in handles:
            assert copy.copy(h) is h and copy.deepcopy(h) is h
            assert copy.deepcopy({"limit": h})["limit"] is h
            try:
                pickle.dumps(h)
                return False
            except TypeError:
                pass
        p = api.try_acquire(5)
        assert copy.copy(p) is p and copy.deepcopy(p) is p
        q = api.try_acquire(1)
        del p
        assert api.snapshot().in_flight == 1 and q.held
        q.release()
        ok = api.snapshot().in_flight == 0
        for h in handles[1:]:
            h.close()
        return ok

    assert in_child(scenario) == 0
