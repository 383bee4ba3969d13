"""Unit tests of every class and error of the lim package, one process."""

import asyncio
import math
import os
import signal
import threading
import time

import pytest

import lim


def test_segment_open_info_remove(seg_name):
    with pytest.raises(lim.NotFound) as e:
        lim.Segment.open(seg_name)
    assert e.value.code is lim.Errc.NOT_FOUND
    s = lim.Segment.open_or_create(seg_name, max_limiters=8, max_processes=16)
    info = s.info()
    assert (info.name, info.max_limiters, info.max_processes) == (seg_name, 8, 16)
    assert info.processes == 1 and info.limiters == 0 and info.layout_version >= 1
    assert abs(info.created - time.time()) < 60
    again = lim.Segment.open(seg_name, reap_after=0.5)
    assert again.info().max_limiters == 8
    assert s.is_creator and not again.is_creator
    assert lim.Segment.remove(seg_name) is True
    assert lim.Segment.remove(seg_name) is False


def test_every_errc_has_its_class():
    assert [c.value for c in lim.Errc] == list(range(1, 13))
    names = {
        lim.InvalidName, lim.InvalidArgument, lim.NotFound, lim.AlreadyExists,
        lim.CorruptSegment, lim.VersionMismatch, lim.ConfigMismatch, lim.TableFull,
        lim.PermissionDenied, lim.OverRelease, lim.SystemError, lim.Busy}
    assert {cls.code for cls in names} == set(lim.Errc)
    for cls in names:
        assert issubclass(cls, lim.Error)
    # error_for maps every status of the C ABI to its class.
    from lim._errors import error_for
    for code in lim.Errc:
        err = error_for(int(code), "m")
        assert err.code is code and type(err).code is code


def test_errors_from_the_library(seg, seg_name, tmp_path):
    with pytest.raises(lim.InvalidName):
        lim.Segment.open_or_create("bad/name")
    with pytest.raises(lim.InvalidName):
        lim.Semaphore.open(seg, "bad key", capacity=1)
    with pytest.raises(lim.InvalidArgument):
        lim.Semaphore.open(seg, "zero", capacity=0)
    with pytest.raises(lim.InvalidArgument):
        lim.Semaphore.open(seg, "neg", capacity=-1)  # checked before it reaches C
    lim.Semaphore.open(seg, "db", capacity=2)
    with pytest.raises(lim.ConfigMismatch) as e:
        lim.Semaphore.open(seg, "db", capacity=3)
    assert "db" in str(e.value)
    assert lim.Semaphore.open(seg, "db", capacity=3, adopt_existing=True).capacity == 2
    with pytest.raises(lim.OverRelease):
        lim.Semaphore.open(seg, "db", capacity=2).release(1)
    with pytest.raises(lim.TableFull):
        small = lim.Segment.open_or_create(seg_name + "-small", max_limiters=1)
        try:
            lim.Semaphore.open(small, "a", capacity=1)
            lim.Semaphore.open(small, "b", capacity=1)
        finally:
            lim.Segment.remove(seg_name + "-small")
    with pytest.raises(lim.Busy):
        child = os.fork()
        if child == 0:  # stays attached while the parent tries to reset
            try:
                attached = lim.Segment.open(seg_name)  # registers while the handle lives
                attached.info()
                time.sleep(600)  # until killed below: attached whenever the reset runs
            finally:
                os._exit(0)
        try:
            deadline = time.monotonic() + 30  # far: a loaded machine forks slowly
            while seg.info().processes < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert seg.info().processes == 2
            seg.reset()
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    garbage = f"/dev/shm/lim.{seg_name}-corrupt"
    with open(garbage, "wb") as f:
        f.write(b"\x00" * 4096)
    try:
        with pytest.raises(lim.CorruptSegment):
            lim.Segment.open(seg_name + "-corrupt")
    finally:
        os.unlink(garbage)
    with pytest.raises(lim.NotFound):
        seg.reset("no-such-key")


def test_permission_denied_and_errc_of_every_status(seg_name):
    if os.geteuid() == 0:
        pytest.skip("root may open anything")
    path = f"/dev/shm/lim.{seg_name}-ro"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o000)
    os.close(fd)
    try:
        with pytest.raises(lim.PermissionDenied):
            lim.Segment.open(seg_name + "-ro")
    finally:
        os.unlink(path)


def test_semaphore(seg):
    sem = lim.Semaphore.open(seg, "db", capacity=2)
    assert sem.capacity == 2 and sem.in_use == 0 and sem.key == "db"
    assert sem.try_acquire(2) is True
    assert sem.try_acquire(1) is False
    t0 = time.monotonic()
    assert sem.acquire(1, timeout=0.12) is False  # two slices
    assert time.monotonic() - t0 >= 0.1
    assert sem.in_use == 2 and sem.waiters == 0
    sem.release(2)
    with sem.hold(2):
        assert sem.in_use == 2
    assert sem.in_use == 0
    with pytest.raises(RuntimeError):
        with sem.hold(1):
            raise RuntimeError("released anyway")
    assert sem.in_use == 0
    # A blocked acquire wakes when another thread releases.
    assert sem.acquire(2)
    threading.Timer(0.05, sem.release, args=(1,)).start()
    assert sem.acquire(1, timeout=30)  # far: the timer thread may run late on a loaded machine
    sem.release(2)


def test_weighted_semaphore(seg):
    ws = lim.WeightedSemaphore.open(seg, "bytes", capacity=100)
    assert ws.try_acquire(1000)  # clamped to the capacity
    assert ws.in_use == 100
    assert ws.acquire(1, timeout=0.01) is False
    ws.release(1000)
    assert ws.in_use == 0 and ws.capacity == 100
    with ws.hold(60):
        assert not ws.try_acquire(41)


def test_backoff_window(seg):
    w = lim.BackoffWindow.for_key(seg, "api")
    assert w.until is None and not w.should_backoff() and w.remaining() == 0.0
    before = lim.now()
    w.set(5.0)
    w.set(1.0)  # never shortens
    after = lim.now()
    # Against the clock read around the sets, not "remaining() > 4", which a thread descheduled
    # for a second between set and remaining (a loaded machine) would fail.
    assert before + 5.0 - 1e-6 <= w.until <= after + 5.0 + 1e-6
    assert w.should_backoff() and 0.0 < w.remaining() <= 5.0
    assert w.sets == 2 and w.until is not None
    assert w.wait(timeout=0.06) is False
    w.clear()
    assert not w.should_backoff() and w.wait(timeout=1) is True
    w.set(1.0, now=100.0)
    assert w.should_backoff(now=100.5) and not w.should_backoff(now=101.0)
    assert w.remaining(now=100.25) == pytest.approx(0.75)


def test_dispatch(seg):
    w = lim.BackoffWindow.for_key(seg, "api")
    api = lim.Dispatch.open(seg, limiter=w, key="api", concurrency=2, throttled_concurrency=1,
                            byte_budget=1000)
    assert api.limiter is w and api.key == "api"
    p = api.try_acquire(300)
    assert p and p.held and p.bytes == 300 and not p.throttled
    with api.permit(200) as q:
        s = api.snapshot()
        assert (s.in_flight, s.concurrency, s.bytes_in_flight, s.byte_budget) == (2, 2, 500, 1000)
        assert api.try_acquire(1) is None
        assert api.acquire(1, timeout=0.05) is None
        assert q.held
    assert not q.held
    p.release()
    p.release()  # idempotent
    assert api.snapshot().in_flight == 0
    with pytest.raises(ValueError):
        with api.permit(10):
            raise ValueError("released anyway")
    assert api.snapshot().in_flight == 0
    with pytest.raises(TimeoutError):
        with api.permit(10), api.permit(10), api.permit(10, timeout=0.01):
            pass
    # Backoff: throttled, bytes x20.
    api.set_backoff(2.0)
    assert api.backoff_active
    with api.permit(10) as t:
        assert t.throttled and t.bytes == 200
        s = api.snapshot()
        assert s.backoff_active and s.throttled_in_flight == 1 and 0 < s.backoff_remaining <= 2
        assert api.try_acquire(1) is None  # the one throttled slot is taken
    with pytest.raises(lim.InvalidArgument):
        api.set_backoff(-1)
    with pytest.raises(lim.ConfigMismatch):
        lim.Dispatch.open(seg, limiter=w, key="api", concurrency=3)
    assert lim.Dispatch.open(seg, limiter=w, key="api", concurrency=3,
                             adopt_existing=True).snapshot().concurrency == 2
    # A permit dropped without release is released when collected.
    api2 = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "b"), key="b",
                             concurrency=1)
    api2.try_acquire(1)
    assert api2.snapshot().in_flight == 0


def test_dispatch_decorator_and_byte_cost(seg):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "d"), key="d",
                            concurrency=1, byte_budget=100)
    seen = []

    @api.rate_limited(nbytes=lambda body: len(body))
    def send(body):
        s = api.snapshot()
        seen.append((s.in_flight, s.bytes_in_flight))
        return body.upper()

    assert send("abc") == "ABC" and seen == [(1, 3)]
    assert api.snapshot().in_flight == 0
    assert send.__name__ == "send"


def test_permit_async_does_not_block_the_loop(seg):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "as"), key="as",
                            concurrency=1)
    held = api.try_acquire(1)
    ticks = []

    async def ticker():
        for i in range(10):
            ticks.append(time.monotonic())
            if i == 3:
                held.release()  # only a loop that keeps running gets here
            await asyncio.sleep(0.01)

    async def waiter():
        async with api.permit_async(1, timeout=30) as p:
            assert p.held
            return len(ticks)

    @api.rate_limited(1)
    async def call():
        return api.snapshot().in_flight

    async def main():
        t = asyncio.ensure_future(ticker())
        n = await waiter()
        assert await call() == 1
        assert await api.acquire_async(1, timeout=0) is not None
        # Cancelled while waiting: holds nothing.
        blocker = api.try_acquire(1)
        task = asyncio.ensure_future(api.acquire_async(1))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        blocker.release()
        await t
        return n

    n = asyncio.run(main())
    assert n >= 4  # the ticker ran (and released) while the waiter waited
    assert api.snapshot().in_flight == 0


def test_token_bucket_explicit_now(seg):
    t0 = 1000.0
    tb = lim.TokenBucket.open(seg, "emails", burst_size=10, sustained_rate_per_sec=2,
                              initial_bucket_level=0, now=t0)
    assert tb.try_take(1, now=t0) is lim.TryTake.UNABLE
    assert tb.try_take(11, now=t0) is lim.TryTake.ASKED_FOR_MORE_THAN_BUCKET_SIZE
    a = tb.tokens_may_be_available_when(1, now=t0)
    assert a.kind is lim.AvailabilityKind.AT and a.time == pytest.approx(t0 + 0.5)
    assert tb.try_take(1, now=t0 + 0.5) is lim.TryTake.TAKEN
    st = tb.state(now=t0 + 0.5)
    assert st.in_bucket == 0 and math.isinf(st.in_hopper) and st.bucket_size == 10
    assert tb.burst_size == 10 and tb.sustained_rate_per_sec == 2
    with pytest.raises(lim.ConfigMismatch):
        lim.TokenBucket.open(seg, "emails", burst_size=5, sustained_rate_per_sec=2)


def test_token_bucket_take_blocks_until_refill(seg):
    tb = lim.TokenBucket.open(seg, "fast", burst_size=1, sustained_rate_per_sec=20)
    t = time.monotonic()  # before the first take: the second waits 50 ms after it, however late
    assert tb.take(1, timeout=30)
    assert tb.take(1, timeout=30)
    assert time.monotonic() - t >= 0.02
    with pytest.raises(lim.InvalidArgument):
        tb.take(2)


def test_throttle_and_throttled_rate_limiter(seg):
    th = lim.Throttle.open(seg, "jobs", max_concurrent_jobs=1, now=5.0)
    assert th.try_start_job()
    r = th.try_start_job()
    assert r.kind is lim.StartJobKind.MAX_CONCURRENT_JOBS_RUNNING and not r
    assert th.start_job(timeout=0.01) is False
    th.finish_job()
    with th.job():
        assert th.in_flight == 1
    assert th.in_flight == 0
    t0 = 50.0
    trl = lim.ThrottledRateLimiter.open(seg, "trl", burst_size=1, sustained_rate_per_sec=1,
                                        max_concurrent_jobs=2, now=t0)
    assert trl.try_start_job(now=t0)
    r = trl.try_start_job(now=t0)
    assert r.kind is lim.StartJobKind.UNABLE_UNTIL_AT_LEAST and r.time == pytest.approx(t0 + 1)
    trl.finish_job(now=t0)
    assert trl.state(now=t0).in_flight == 0


def test_calls_without_now_use_the_library_clock(seg):
    # Without now= the package calls the C functions that read no time (the library reads the
    # clock itself, and only if the rate needs it): the same results as with the clock's time.
    lm = lim.Limiter.open(seg, "no-now", bucket_size=3, initial_bucket_level=3,
                          initial_hopper_level=0)
    assert lm.try_take(2) is lim.TryTake.TAKEN
    assert lm.try_take(2) is lim.TryTake.UNABLE
    assert lm.try_take(4) is lim.TryTake.ASKED_FOR_MORE_THAN_BUCKET_SIZE
    with pytest.raises(lim.OverRelease):
        lm.return_to_hopper(3)
    lm.return_to_hopper(2)
    assert lm.in_flight == 0 and lm.in_bucket == 3
    th = lim.Throttle.open(seg, "no-now-jobs", max_concurrent_jobs=1)
    assert th.try_start_job()
    assert th.try_start_job().kind is lim.StartJobKind.MAX_CONCURRENT_JOBS_RUNNING
    th.finish_job()
    with pytest.raises(lim.OverRelease):
        th.finish_job()
    assert th.in_flight == 0


def test_limiter_expert_calls(seg):
    t0 = 10.0
    lm = lim.Limiter.open(seg, "raw", bucket_size=10, initial_hopper_level=4, now=t0)
    assert lm.try_take(4, now=t0) is lim.TryTake.TAKEN
    a = lm.tokens_may_be_available_when(1, now=t0)
    assert a.kind is lim.AvailabilityKind.WHEN_RETURN_TO_HOPPER_IS_CALLED and a.time is None
    with pytest.raises(lim.OverRelease):
        lm.return_to_hopper(5, now=t0)
    lm.return_to_hopper(4, now=t0)
    lm.set_token_target_level(6, now=t0)
    assert lm.state(now=t0).in_system == 6
    lm.set_bucket_size(3, now=t0)
    lm.set_hopper_to_bucket_rate_per_sec(2, now=t0)
    st = lm.state(now=t0)
    assert st.bucket_size == 3 and st.hopper_to_bucket_rate_per_sec == 2
    lm.set_token_target_level(math.inf, now=t0)
    assert math.isinf(lm.state(now=t0).in_system)
    lm.invariant()
    assert lm.take(1, timeout=30)


def test_parse_retry_after():
    assert lim.parse_retry_after("120") == 120.0
    assert lim.parse_retry_after(" 7 ") == 7.0
    assert lim.parse_retry_after("-1") is None
    assert lim.parse_retry_after("soon") is None
    assert lim.parse_retry_after(None) is None
    assert lim.parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111767.0) == 10.0
    assert lim.parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT") == 0.0  # in the past
    assert lim.parse_retry_after({"Retry-After": "3", "Retry-After-Ms": "250"}) == 0.25
    assert lim.parse_retry_after([("retry-after", "3")]) == 3.0
    assert lim.parse_retry_after([("content-type", "x")]) is None


def test_keyboard_interrupt_while_blocked(seg):
    sem = lim.Semaphore.open(seg, "busy", capacity=1)
    assert sem.try_acquire()
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "k"), key="k",
                            concurrency=1)
    held = api.try_acquire(0)
    for blocked in (lambda: sem.acquire(1), lambda: api.acquire(0)):
        timer = threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            blocked()
        assert time.monotonic() - t < 30  # interrupted; blocked for good otherwise
        timer.join()
    assert api.snapshot().in_flight == 1  # the interrupted acquire holds nothing
    held.release()
    sem.release()


def test_fork_inherited_handles(seg):
    sem = lim.Semaphore.open(seg, "f", capacity=2)
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "f"), key="f",
                            concurrency=2)
    parent_permit = api.try_acquire(5)
    pid = os.fork()
    if pid == 0:
        ok = sem.try_acquire(1) and api.snapshot().in_flight == 1
        p = api.try_acquire(1)
        ok = ok and p is not None and api.snapshot().in_flight == 2
        parent_permit.release()  # the parent's permit: the child's copy releases nothing
        ok = ok and api.snapshot().in_flight == 2
        p.release()
        sem.release(1)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert api.snapshot().in_flight == 1 and sem.in_use == 0
    parent_permit.release()
    assert api.snapshot().in_flight == 0


def test_bad_python_arguments(seg):
    sem = lim.Semaphore.open(seg, "args", capacity=1)
    with pytest.raises(lim.InvalidArgument):
        sem.try_acquire(-1)
    with pytest.raises(lim.InvalidArgument):
        sem.acquire(1, timeout=float("nan"))
    with pytest.raises(lim.InvalidArgument):
        lim.Segment.open_or_create(123)  # type: ignore[arg-type]
    tb = lim.TokenBucket.open(seg, "nan", burst_size=1, sustained_rate_per_sec=1)
    with pytest.raises(lim.InvalidArgument):
        tb.try_take(float("nan"))


def test_reap_in_process(seg):
    assert seg.reap().reaped == []
    # lim.now() is CLOCK_MONOTONIC: between two reads of time.monotonic() around it (a fixed
    # tolerance would fail whenever this thread is descheduled between the two clock reads).
    before = time.monotonic()
    now = lim.now()
    after = time.monotonic()
    assert before - 1e-6 <= now <= after + 1e-6
    assert lim.__version__ and lim.library_path()


def test_permit_outlives_its_dispatch_handle(seg, seg_name):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "o"), key="o",
                            concurrency=2)
    p = api.acquire(10)
    api.close()
    del api
    assert p.held and p.bytes == 10
    p.release()
    # A script that exits holding a permit: the garbage collector may free the Dispatch first.
    import subprocess
    import sys
    script = (
        "import lim\n"
        f"seg = lim.Segment.open({seg_name!r})\n"
        "api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, 'o'), key='o',"
        " concurrency=2)\n"
        "p = api.acquire(5)\n")
    r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(
        os.path.dirname(lim.__path__[0]))), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    again = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "o"), key="o",
                              concurrency=2)
    assert again.snapshot().in_flight == 0  # released at exit
