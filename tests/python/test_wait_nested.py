"""A signal handler that blocks on a Limiter (take) while this thread waits in a queued acquire
(Semaphore, WeightedSemaphore): the thread's process slot records one wait at a time, and the
reaper's recount trusts it. The nested Limiter wait used to register in that slot and clear it on
its way out, so the outer wait, still registered in the word (or queued with a ticket), was no
longer named by its slot: a reap that came later counted it dead (a sleeper count one short, a
ticket dropped from the queue), and its own deregistration then took away a count that was not
there. A nested wait must poll (a try, registering nothing), as a nested queued acquire already
did. Also: a waiter SIGKILLed while its check runs leaves an exact queue for the reaper.
Assertions on counts only."""

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


def child_waits_then_stalls(seg_name, kind, in_handler):
    """Queues for 4 units; a SIGUSR1 handler (run inside the C wait's check) marks itself and
    never returns: the process is killed there, mid-callback, still registered."""
    seg = lim.Segment.open(seg_name)
    if kind == "weighted":
        h = lim.WeightedSemaphore.open(seg, "bytes", 10)
    else:
        h = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "w"), key="d",
                              concurrency=4, byte_budget=10)

    def handler(signum, frame):
        in_handler.value = 1
        while True:
            time.sleep(1)

    signal.signal(signal.SIGUSR1, handler)
    h.acquire(4)
    os._exit(3)  # never: it is killed first


@pytest.mark.parametrize("kind", ["weighted", "dispatch"])
def test_sigkill_inside_the_check_leaves_an_exact_queue(seg, seg_name, kind):
    """A waiter killed while its check runs (a handler that never returns) is, to the reaper,
    a dead process registered in the queue: the reap drops its ticket (and gives back the
    Dispatch slot it held while queued for bytes), and the request queued behind it gets in."""
    if kind == "weighted":
        h = lim.WeightedSemaphore.open(seg, "bytes", 10)
        assert h.try_acquire(10)

        def waiters():
            return h.waiters

        def in_flight():
            return h.in_use
    else:
        h = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "w"), key="d",
                              concurrency=4, byte_budget=10)
        held = h.try_acquire(10)
        assert held is not None

        def waiters():
            return h.snapshot().waiters

        def in_flight():
            return h.snapshot().in_flight
    ctx = multiprocessing.get_context("fork")
    in_handler = ctx.Value("i", 0)
    child = ctx.Process(target=child_waits_then_stalls, args=(seg_name, kind, in_handler))
    child.start()
    second = []
    try:
        assert wait_for(lambda: waiters() == 1)
        os.kill(child.pid, signal.SIGUSR1)
        assert wait_for(lambda: in_handler.value == 1)
        assert waiters() == 1  # still queued while its check runs
        if kind == "dispatch":
            assert in_flight() == 2  # ours, and the slot the child took before queueing

        def behind():
            if kind == "weighted":
                second.append(h.acquire(1, timeout=60))
            else:
                p = h.acquire(1, timeout=60)
                second.append(p is not None)
                if p is not None:
                    second.append(p)

        t = threading.Thread(target=behind)
        t.start()
        assert wait_for(lambda: waiters() == 2)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        seg.reap()
        assert waiters() == 1  # only the request behind the dead one
        if kind == "weighted":
            h.release(10)
        else:
            held.release()
        t.join(60)
        assert second and second[0] is True
        assert waiters() == 0
        if kind == "weighted":
            assert h.in_use == 1
            h.release(1)
            assert h.in_use == 0
        else:
            assert in_flight() == 1
            second[1].release()
            assert in_flight() == 0 and h.snapshot().bytes_in_flight == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(30)
