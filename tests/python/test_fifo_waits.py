"""A blocking Python acquire keeps its place in the byte queue for the whole wait, as a C++ one
does, while signal handlers still run (Ctrl-C raises KeyboardInterrupt, holding nothing and
leaving no registration behind) and closing the handle still ends it.

Before: Python waited in 50 ms slices, each a fresh C call with its own deadline, so a large
request left the FIFO queue at every slice's end and joined it again at the back; behind a stream
of small requests whose holders hold longer than a slice it starved. The assertions are on order
(how many small requests got in while the large one waited), not on time."""

import multiprocessing
import os
import random
import signal
import threading
import time

import pytest

import lim

CAPACITY = 10
WORKERS = 5


def open_budget(seg, kind):
    if kind == "weighted":
        return lim.WeightedSemaphore.open(seg, "budget", capacity=CAPACITY)
    return lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "budget-w"),
                             key="budget", concurrency=100, byte_budget=CAPACITY)


def take(h, kind, n, timeout=None):
    """Blocking acquire of n units (bytes); returns a release function, or None at the timeout."""
    if kind == "weighted":
        return (lambda: h.release(n)) if h.acquire(n, timeout=timeout) else None
    p = h.acquire(n, timeout=timeout)
    return p.release if p is not None else None


def in_use(h, kind):
    return h.in_use if kind == "weighted" else h.snapshot().bytes_in_flight


def waiters(h, kind):
    return h.waiters if kind == "weighted" else h.snapshot().waiters


def small_worker(seg_name, kind, stop, admitted, seed):
    """Takes 1 unit, holds it 60..140 ms (longer than the old 50 ms slice), gives it back, again
    and again; counts every admission."""
    seg = lim.Segment.open(seg_name)
    h = open_budget(seg, kind)
    rng = random.Random(seed)
    while not stop.is_set():
        release = take(h, kind, 1, timeout=0.5)
        if release is None:
            continue
        with admitted.get_lock():
            admitted.value += 1
        time.sleep(rng.uniform(0.06, 0.14))
        release()


def wait_for(cond, limit=30.0):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.parametrize("kind", ["weighted", "dispatch"])
def test_large_request_is_not_starved_by_small_ones(seg, seg_name, kind):
    """Capacity 10; five processes keep taking 1 unit each. A request for all 10 queues: in FIFO
    order every small request made after it waits behind it, so while it waits at most one
    admission per worker can land (the one ahead of it in the queue, or in flight as it queued;
    counted twice for slack: an admission may be counted just after we read the counter). Sliced
    waits let dozens through and time out."""
    h = open_budget(seg, kind)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    admitted = ctx.Value("q", 0)
    procs = [ctx.Process(target=small_worker, args=(seg_name, kind, stop, admitted, i))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        # The stream is running: every worker got in at least twice.
        assert wait_for(lambda: admitted.value >= 2 * WORKERS)
        before = admitted.value
        release = take(h, kind, CAPACITY, timeout=10)  # generous: C++ gets in within ~0.15 s
        during = admitted.value - before
        assert release is not None, f"starved: {during} small admissions passed it in 10 s"
        assert in_use(h, kind) == CAPACITY
        # The small ones are queued behind it now (all of them, once their holds ended).
        assert wait_for(lambda: waiters(h, kind) == WORKERS)
        release()
        assert during <= 2 * WORKERS, f"{during} small admissions passed the large request"
    finally:
        stop.set()
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert in_use(h, kind) == 0 and waiters(h, kind) == 0


def child_takes_one(seg_name, kind, got):
    seg = lim.Segment.open(seg_name)
    h = open_budget(seg, kind)
    release = take(h, kind, 1)
    got.value = 1
    release()


@pytest.mark.parametrize("kind", ["weighted", "dispatch"])
def test_signal_handlers_run_while_the_wait_keeps_its_place(seg, seg_name, kind):
    """Main waits for all 10 units (head of the queue) while a child queues for 1 behind it.
    SIGUSR1s arrive and their (non-raising) handler runs during the wait; then the 5 units held
    here are given back. Main must get in first: the child's request, queued after it, is still
    waiting when main holds all 10. (A sliced wait left the queue at each slice's end, the turn
    passed to the child, whose 1 unit fit beside the 5 held: it got in first.)"""
    h = open_budget(seg, kind)
    ctx = multiprocessing.get_context("fork")
    got = ctx.Value("i", 0)
    child = ctx.Process(target=child_takes_one, args=(seg_name, kind, got))
    handled, problems = [], []
    holding = threading.Event()
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(signum))
    main = threading.get_ident()

    def other():
        held = take(h, kind, 5)  # taken and given back by this thread
        holding.set()
        try:
            if not wait_for(lambda: waiters(h, kind) == 1):  # main is queued
                problems.append("main never queued")
            child.start()
            if not wait_for(lambda: waiters(h, kind) == 2):  # the child is queued behind it
                problems.append("the child never queued")
            for _ in range(3):
                signal.pthread_kill(main, signal.SIGUSR1)
                time.sleep(0.12)  # longer than the old slice: a sliced wait would have left
            if got.value != 0:
                problems.append("the child got in while main waited")
        finally:
            held()

    t = threading.Thread(target=other)
    t.start()
    try:
        holding.wait()
        release = take(h, kind, CAPACITY, timeout=60)
        child_first = got.value
        assert release is not None
        release()
    finally:
        t.join()
        signal.signal(signal.SIGUSR1, old)
        child.join(30)
    assert not problems, problems
    assert handled, "no signal handler ran during the wait"
    assert child_first == 0, "the request queued behind the waiter got in first"
    assert child.exitcode == 0 and got.value == 1
    assert in_use(h, kind) == 0 and waiters(h, kind) == 0


@pytest.mark.parametrize("kind", ["semaphore", "weighted", "dispatch"])
@pytest.mark.parametrize("sender", ["thread", "child"])
def test_ctrl_c_ends_a_long_wait_holding_nothing(seg, kind, sender):
    """Ctrl-C (SIGINT to the process, from a timer thread or from another process) ends a wait
    with no timeout by KeyboardInterrupt; afterwards nothing is held or queued by the waiter:
    waiters back to 0, units in use exactly what this test holds."""
    if kind == "semaphore":
        h = lim.Semaphore.open(seg, "c", capacity=3)
        assert h.try_acquire(3)
        blocked, used, queued = (lambda: h.acquire(1)), (lambda: h.in_use), (lambda: h.waiters)
        full = 3
    else:
        h = open_budget(seg, kind)
        release = take(h, kind, CAPACITY)
        blocked = lambda: take(h, kind, 4)  # noqa: E731
        used, queued = (lambda: in_use(h, kind)), (lambda: waiters(h, kind))
        full = CAPACITY
    me = os.getpid()

    def send():
        assert wait_for(lambda: queued() == 1)
        time.sleep(0.1)  # well inside the wait (a slice and more)
        if sender == "thread":
            os.kill(me, signal.SIGINT)
        else:
            pid = os.fork()
            if pid == 0:
                os.kill(me, signal.SIGINT)
                os._exit(0)
            os.waitpid(pid, 0)

    t = threading.Thread(target=send)
    t.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        blocked()
    elapsed = time.monotonic() - start
    t.join()
    assert elapsed < 10  # bounded (about 0.1 s + one 50 ms check on an idle machine)
    assert queued() == 0
    assert used() == full
    if kind == "semaphore":
        h.release(3)
    else:
        release()
    assert used() == 0


@pytest.mark.parametrize("kind", ["weighted", "dispatch"])
def test_timeout_is_one_deadline(seg, kind):
    """A timeout still ends the wait, holding nothing and leaving the queue."""
    h = open_budget(seg, kind)
    release = take(h, kind, CAPACITY)
    start = time.monotonic()
    assert take(h, kind, 1, timeout=0.3) is None
    assert time.monotonic() - start >= 0.3
    assert waiters(h, kind) == 0 and in_use(h, kind) == CAPACITY
    release()


def test_a_blocking_call_inside_a_signal_handler_during_a_wait(seg):
    """A handler that itself blocks on a lim limiter while this thread waits (this thread's
    process slot records one wait at a time) polls instead of queueing: both complete, nothing
    is left held or queued."""
    a = lim.WeightedSemaphore.open(seg, "outer", capacity=2)
    b = lim.Semaphore.open(seg, "inner", capacity=1)
    assert a.try_acquire(2) and b.try_acquire(1)
    inner = []

    def handler(signum, frame):
        inner.append(b.acquire(1, timeout=10))
        b.release(1)

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()

    def other():
        assert wait_for(lambda: a.waiters == 1)
        signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(0.1)
        b.release(1)  # the handler's acquire gets it
        assert wait_for(lambda: bool(inner))
        a.release(2)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert a.acquire(2, timeout=30)
    finally:
        t.join()
        signal.signal(signal.SIGUSR1, old)
    assert inner == [True]
    a.release(2)
    assert a.in_use == 0 and a.waiters == 0 and b.in_use == 0 and b.waiters == 0


@pytest.mark.parametrize("kind", ["semaphore", "weighted", "dispatch"])
def test_cooperative_waits_poll_and_never_block_in_c(seg, kind, monkeypatch):
    """Under gevent or eventlet (simulated: cooperative() forced true; test_gevent.py runs the
    real thing where gevent is installed) a wait inside the C library would block every greenlet
    of the thread, so blocking acquires poll: the C wait is never entered, a unit freed by
    another thread is taken, a timeout still returns holding nothing."""
    from lim import _common, _lib

    monkeypatch.setattr(_common, "cooperative", lambda: True)

    def boom(*args):
        raise AssertionError("a cooperative wait entered the C wait")

    if kind == "dispatch":
        monkeypatch.setattr(_lib.lib, "lim_dispatch_acquire_until_interruptible", boom)
        h = open_budget(seg, kind)
    else:
        cls = lim.Semaphore if kind == "semaphore" else lim.WeightedSemaphore
        monkeypatch.setattr(cls, "_c_wait", staticmethod(boom))
        h = cls.open(seg, "coop", capacity=CAPACITY)
        kind = "weighted"  # take / in_use / waiters work the same way on both semaphores
    held, go = threading.Event(), threading.Event()

    def holder():  # takes everything, and gives it back (in its own thread) when told
        free = take(h, kind, CAPACITY)
        held.set()
        go.wait()
        time.sleep(0.1)
        free()

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    try:
        assert take(h, kind, 3, timeout=0.05) is None
        go.set()
        release = take(h, kind, 3, timeout=30)
    finally:
        go.set()
        t.join()
    assert release is not None and in_use(h, kind) == 3
    release()
    assert in_use(h, kind) == 0 and waiters(h, kind) == 0


def test_a_signal_handler_that_forks_during_a_wait(seg):
    """A handler may fork while the thread waits (it runs inside the C wait). The child's copy of
    the wait must leave without touching the parent's registration: no second withdrawal of its
    byte ticket, no release of the concurrency slot it took. The child then waits on its own slot
    until the same deadline. Afterwards everything is exact: one permit held (this test's)."""
    api = open_budget(seg, "dispatch")
    held = api.try_acquire(CAPACITY)
    assert held is not None
    me = os.getpid()
    children = []

    def handler(signum, frame):
        pid = os.fork()
        if pid:
            children.append(pid)

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()

    def other():
        assert wait_for(lambda: api.snapshot().waiters == 1)
        signal.pthread_kill(main, signal.SIGUSR1)

    t = threading.Thread(target=other)
    t.start()
    try:
        got = api.acquire(5, timeout=1.0)
        if os.getpid() != me:  # the child, back from its own wait
            os._exit(0 if got is None else 1)
    finally:
        if os.getpid() == me:
            t.join()
            signal.signal(signal.SIGUSR1, old)
    assert got is None and len(children) == 1
    _, status = os.waitpid(children[0], 0)
    assert os.waitstatus_to_exitcode(status) == 0
    s = api.snapshot()
    assert (s.in_flight, s.bytes_in_flight, s.waiters) == (1, CAPACITY, 0)
    held.release()
    assert api.snapshot().in_flight == 0
