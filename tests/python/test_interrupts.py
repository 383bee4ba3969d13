"""A signal handler that raises (Ctrl-C's KeyboardInterrupt, Celery's soft time limit, a
SystemExit from a worker's SIGQUIT handler) in the instant a C call has just taken units: the
caller never learns that it holds them, so the call must give them back before the exception
leaves it. Python runs the handler right after the foreign call returns, so these interleavings
are forced, not timed: the signal is sent to the blocked main thread before the unit is freed,
hence before the C call can take it and return."""

import math
import signal
import threading
import time

import pytest

import lim
from lim import _lib


def interrupt_while_blocked(blocked, waiters, free_one):
    """Runs blocked() in the main thread; another thread waits until it is blocked, sends it
    SIGINT and then frees a unit (which the blocked C call takes). Returns whether blocked()
    raised KeyboardInterrupt (it must: the signal is pending when the C call returns)."""
    main = threading.get_ident()

    def other():
        deadline = time.monotonic() + 30
        while waiters() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.002)
        signal.pthread_kill(main, signal.SIGINT)
        free_one()

    t = threading.Thread(target=other)
    t.start()
    try:
        blocked()
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    t.join()
    return interrupted


@pytest.mark.parametrize("kind", [lim.Semaphore, lim.WeightedSemaphore])
def test_interrupted_semaphore_acquire_holds_nothing(seg, kind):
    sem = kind.open(seg, "sig", capacity=1)
    for blocked in (lambda: sem.acquire(1), lambda: sem.acquire(1, timeout=60),
                    lambda: sem.hold(1).__enter__()):
        assert sem.try_acquire(1)
        assert interrupt_while_blocked(blocked, lambda: sem.waiters, lambda: sem.release(1))
        assert sem.in_use == 0  # the unit the C call took was given back


@pytest.mark.parametrize("kind", ["throttle", "throttled_rate_limiter"])
def test_interrupted_start_job_holds_nothing(seg, kind):
    if kind == "throttle":
        t = lim.Throttle.open(seg, "sig-jobs", max_concurrent_jobs=1)
    else:
        t = lim.ThrottledRateLimiter.open(seg, "sig-trl", burst_size=5,
                                          sustained_rate_per_sec=1000, max_concurrent_jobs=1)
    for blocked in (lambda: t.start_job(), lambda: t.job().__enter__()):
        assert t.start_job(timeout=30)  # a returned token drips back at the rate
        assert interrupt_while_blocked(blocked, lambda: t.state().waiters, t.finish_job)
        assert t.state().in_flight == 0


def test_interrupted_limiter_take_leaves_nothing_in_flight(seg):
    lm = lim.Limiter.open(seg, "sig-limiter", bucket_size=1, initial_bucket_level=1,
                          initial_hopper_level=0)
    assert lm.try_take(1) is lim.TryTake.TAKEN
    assert interrupt_while_blocked(lambda: lm.take(1), lambda: lm.state().waiters,
                                   lambda: lm.return_to_hopper(1))
    s = lm.state()
    assert s.in_flight == 0 and s.in_bucket + s.in_hopper == 1


def test_interrupted_dispatch_acquire_holds_nothing(seg):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "sig-d"), key="sig-d",
                            concurrency=1)
    held = [api.try_acquire(0)]
    assert interrupt_while_blocked(lambda: api.acquire(0), lambda: api.snapshot().waiters,
                                   lambda: held.pop().release())
    assert api.snapshot().in_flight == 0


class RaiseOnReturn:
    """A C function that does its work, then raises as a signal handler would on its return."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        self.fn(*args)
        raise KeyboardInterrupt


def test_interrupted_try_calls_hold_nothing(seg, monkeypatch):
    sem = lim.Semaphore.open(seg, "sig-try", capacity=2)
    monkeypatch.setattr(lim.Semaphore, "_c_try", staticmethod(RaiseOnReturn(sem._c_try)))
    with pytest.raises(KeyboardInterrupt):
        sem.try_acquire(2)
    with pytest.raises(KeyboardInterrupt):
        sem.acquire(1)  # its first, non-blocking try
    assert sem.in_use == 0
    monkeypatch.undo()

    th = lim.Throttle.open(seg, "sig-try-jobs", max_concurrent_jobs=1)
    monkeypatch.setattr(_lib.lib, "lim_throttle_try_start_job",
                        RaiseOnReturn(_lib.lib.lim_throttle_try_start_job))
    with pytest.raises(KeyboardInterrupt):
        th.try_start_job()
    monkeypatch.undo()
    assert th.state().in_flight == 0 and th.try_start_job()
    th.finish_job()

    lm = lim.Limiter.open(seg, "sig-try-limiter", bucket_size=2, initial_bucket_level=2,
                          initial_hopper_level=0)
    monkeypatch.setattr(_lib.lib, "lim_limiter_try_take",
                        RaiseOnReturn(_lib.lib.lim_limiter_try_take))
    with pytest.raises(KeyboardInterrupt):
        lm.try_take(2)
    monkeypatch.undo()
    assert lm.state().in_flight == 0 and lm.state().in_bucket == 2


def test_keyboard_interrupt_arrives_within_a_slice(seg):
    """Ctrl-C while blocked with no timeout: KeyboardInterrupt within one 50 ms slice (plus
    scheduling), on every blocking call, holding nothing."""
    sem = lim.Semaphore.open(seg, "sig-bound", capacity=1)
    assert sem.try_acquire(1)
    t = lim.Throttle.open(seg, "sig-bound-jobs", max_concurrent_jobs=1)
    assert t.try_start_job()
    w = lim.BackoffWindow.for_key(seg, "sig-bound-window")
    w.set(3600)
    main = threading.get_ident()
    for blocked in (lambda: sem.acquire(1), lambda: t.start_job(), lambda: w.wait()):
        timer = threading.Timer(0.05, lambda: signal.pthread_kill(main, signal.SIGINT))
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            blocked()
        assert time.monotonic() - start < 5  # bounded; 50 ms + scheduling on an idle machine
        timer.join()
    assert sem.in_use == 1 and t.state().in_flight == 1
    sem.release(1)
    t.finish_job()


def test_timeouts(seg):
    sem = lim.Semaphore.open(seg, "sig-timeouts", capacity=1)
    assert sem.try_acquire(1)
    for bad in (math.nan, math.inf, -math.inf, 1e300, True, "1"):
        with pytest.raises(lim.InvalidArgument):
            sem.acquire(1, timeout=bad)
        with pytest.raises(ValueError):  # InvalidArgument is a ValueError too
            sem.acquire(1, timeout=bad)
    assert sem.acquire(1, timeout=-5) is False  # negative: one try, as threading's acquire
    assert sem.acquire(1, timeout=0) is False
    sem.release(1)
    assert sem.in_use == 0


@pytest.mark.parametrize("kind", ["semaphore", "weighted", "throttle"])
def test_interrupted_receive_holds_nothing(seg, monkeypatch, kind):
    if kind == "throttle":
        h = lim.Throttle.open(seg, "sig-recv-jobs", max_concurrent_jobs=3)
        assert h.try_start_job() and h.try_start_job()
        ticket, name = h.hand_off_jobs(2), "lim_throttle_receive"
        held = lambda: h.state().in_flight  # noqa: E731
    else:
        cls = lim.Semaphore if kind == "semaphore" else lim.WeightedSemaphore
        h = cls.open(seg, "sig-recv-" + kind, capacity=3)
        assert h.try_acquire(2)
        ticket, name = h.hand_off(2), cls._prefix + "_receive"
        held = lambda: h.in_use  # noqa: E731
    assert held() == 2  # in the parcel
    monkeypatch.setattr(_lib.lib, name, RaiseOnReturn(getattr(_lib.lib, name)))
    with pytest.raises(KeyboardInterrupt):
        h.receive(ticket)
    monkeypatch.undo()
    assert held() == 0  # received, then given back
    assert not h.receive(ticket)  # the parcel is gone
