"""A signal handler that blocks on a Limiter (take) while this thread waits in a queued acquire
(Semaphore, WeightedSemaphore): the thread's process slot records one wait at a time, and the
reaper's recount trusts it. The nested Limiter wait used to register in that slot and clear it on
its way out, so the outer wait, still registered in the word (or queued with a ticket), was no
longer named by its slot: a reap that came later counted it dead (a sleeper count one short, a
ticket dropped from the queue), and its own deregistration then took away a count that was not
there. A nested wait must poll (a try, registering nothing), as a nested queued acquire already
did. Assertions on counts only."""

import multiprocessing
import os
import signal
import threading
import time

import pytest

import lim
from lim import TryTake


def wait_for(cond, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def child_holds(seg_name, kind, ready):
    seg = lim.Segment.open(seg_name)
    if kind == "semaphore":
        h = lim.Semaphore.open(seg, "outer", 1)
        assert h.try_acquire(1)
    else:
        h = lim.WeightedSemaphore.open(seg, "outer", 4)
        assert h.try_acquire(4)
    ready.value = 1
    while True:
        time.sleep(1)  # killed by the test: its units are reaped


@pytest.mark.parametrize("kind", ["semaphore", "weighted"])
def test_limiter_take_in_a_handler_leaves_the_outer_wait_counted(seg, seg_name, kind):
    capacity = 1 if kind == "semaphore" else 4
    cls = lim.Semaphore if kind == "semaphore" else lim.WeightedSemaphore
    outer = cls.open(seg, "outer", capacity)
    limiter = lim.Limiter.open(seg, "inner", bucket_size=1, hopper_to_bucket_rate_per_sec=20)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Value("i", 0)
    child = ctx.Process(target=child_holds, args=(seg_name, kind, ready))
    child.start()
    assert wait_for(lambda: ready.value == 1)
    inner = []

    def handler(signum, frame):
        while limiter.try_take(1) == TryTake.TAKEN:
            pass  # empty: the take below has to wait for the next drip (50 ms)
        inner.append(limiter.take(1, timeout=30))

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    problems = []

    def other():
        try:
            if not wait_for(lambda: outer.waiters == 1):
                problems.append("no waiter")
            signal.pthread_kill(main, signal.SIGUSR1)
            if not wait_for(lambda: bool(inner)):
                problems.append("handler did not finish")
            # The outer wait goes on, still registered; the holder dies: a reap gives its units
            # to the waiter, whose recount must still see it waiting.
            os.kill(child.pid, signal.SIGKILL)
        except BaseException as e:  # pragma: no cover - reported below
            problems.append(repr(e))

    t = threading.Thread(target=other)
    t.start()
    try:
        got = outer.acquire(capacity, timeout=60)
    finally:
        t.join()
        signal.signal(signal.SIGUSR1, old)
        child.join(30)
    assert problems == []
    assert inner == [True]
    assert got
    assert outer.in_use == capacity
    assert outer.waiters == 0
    outer.release(capacity)
    assert outer.in_use == 0 and outer.waiters == 0
