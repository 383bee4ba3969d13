"""SPEC.md's Python block, run as written, and the words around it that test_api.py does not
check yet: a reap's report of a dead child, a Dispatch's defaults as its snapshot tells them,
the throttled rate limiter's starting split, errors as lim.Error with a lim.Errc code."""

import os
import time

import pytest

import lim


def test_spec_python_block_as_written(seg):
    # SPEC's lines, in order (the segment is the fixture's instead of "myapp").
    sem = lim.Semaphore.open(seg, "db", capacity=8)
    assert sem.try_acquire(1) is True
    assert sem.acquire(1, timeout=None) is True
    sem.release(1)
    sem.release(1)
    assert (sem.in_use, sem.capacity) == (0, 8)
    with sem.hold(1):
        assert sem.in_use == 1
    window = lim.BackoffWindow.for_key(seg, "my_api")
    api = lim.Dispatch.open(seg, limiter=window, key="my_api", concurrency=100,
                            throttled_concurrency=5, byte_budget=5_000_000)
    nbytes = 1000
    with api.permit(nbytes):
        assert api.snapshot().bytes_in_flight == nbytes
    p = api.try_acquire(nbytes)
    assert isinstance(p, lim.Permit)
    p.release()
    p = api.acquire(nbytes, timeout=None)
    assert isinstance(p, lim.Permit) and p.held
    p.release()
    api.set_backoff(0.5)
    s = api.snapshot()
    assert s.backoff_active and 0 < s.backoff_remaining <= 0.5
    tb = lim.TokenBucket.open(seg, "emails", burst_size=10, sustained_rate_per_sec=2,
                              initial_bucket_level=0)
    assert isinstance(tb.try_take(1), lim.TryTake)
    r = lim.parse_retry_after("120")
    assert r == 120.0 and isinstance(r, float)
    assert isinstance(seg.reap(), lim.ReapReport)


def test_dispatch_defaults_and_snapshot_fields(seg):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "d"))
    assert api.key == "default"
    s = api.snapshot()
    assert (s.concurrency, s.throttled_concurrency, s.byte_budget) == (400, 10, 5_000_000)
    assert (s.in_flight, s.throttled_in_flight, s.bytes_in_flight, s.waiters) == (0, 0, 0, 0)
    assert s.backoff_active is False and s.backoff_remaining == 0.0


def test_recent_backoff_counts_for_backoff_window_after_the_deadline(seg):
    # Foundation's rule: active while now < until, or now - until < backoff_window.
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "r"), key="r",
                            backoff_window=60.0)
    api.set_backoff(0.0)  # "backoff was asked for now": a recent backoff
    assert api.backoff_active
    with api.permit(10) as p:
        assert p.throttled and p.bytes == 200
    short = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "s"), key="s",
                              backoff_window=0.0)
    short.set_backoff(0.0)
    time.sleep(0.002)
    assert not short.backoff_active
    with short.permit(10) as p:
        assert not p.throttled and p.bytes == 10


def test_byte_cost_above_the_budget_is_clamped(seg):
    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "c"), key="c",
                            byte_budget=1000)
    p = api.acquire(10**9, timeout=5)
    assert p is not None and p.bytes == 1000
    assert api.try_acquire(1) is None
    p.release()


def test_throttled_rate_limiter_starts_with_min_burst_jobs_in_the_bucket(seg):
    t0 = 100.0
    trl = lim.ThrottledRateLimiter.open(seg, "trl", burst_size=2, sustained_rate_per_sec=1,
                                        max_concurrent_jobs=3, now=t0)
    st = trl.state(now=t0)
    assert (st.in_bucket, st.in_hopper, st.in_flight) == (2, 1, 0)


def test_reap_reports_a_dead_child_with_its_pid_and_holdings(seg):
    sem = lim.Semaphore.open(seg, "db", capacity=4)
    pid = os.fork()
    if pid == 0:
        try:
            sem.acquire(3)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert sem.in_use == 3
    report = seg.reap()
    assert [p.pid for p in report.reaped] == [pid]
    held = report.reaped[0].returned
    assert [(h.kind, h.key, h.amount) for h in held] == [("semaphore", "db", 3.0)]
    assert sem.in_use == 0
    assert seg.reap().reaped == []


def test_errors_are_lim_error_with_a_lim_errc_code(seg, seg_name):
    with pytest.raises(lim.Error) as e:
        lim.Segment.open(seg_name + "-absent")
    assert isinstance(e.value, lim.NotFound) and isinstance(e.value.code, lim.Errc)
    assert e.value.code == lim.Errc.NOT_FOUND
    with pytest.raises(lim.InvalidName):
        lim.Segment.open_or_create("n" * 201)
    with pytest.raises(lim.InvalidName):
        lim.Segment.open_or_create("a:b")  # ':' is for keys only
    lim.Semaphore.open(seg, "k:" + "x" * 62, capacity=1)  # 64 chars, ':' allowed
    with pytest.raises(lim.InvalidName):
        lim.Semaphore.open(seg, "x" * 65, capacity=1)
    lm = lim.Limiter.open(seg, "l", bucket_size=1, initial_bucket_level=1,
                          initial_hopper_level=0)
    with pytest.raises(lim.OverRelease) as e:
        lm.return_to_hopper(1)
    assert e.value.code == lim.Errc.OVER_RELEASE


def test_explicit_now_stepped_from_the_clock_is_honoured(seg):
    # SPEC: every call that depends on time takes `now`; a test owns the clock by stepping from
    # lim.now(). Steps up to a minute ahead are the caller's time (docs/python.md "Time").
    t0 = lim.now()
    tb = lim.TokenBucket.open(seg, "stepped", burst_size=10, sustained_rate_per_sec=2,
                              initial_bucket_level=0, now=t0)
    assert tb.try_take(1, now=t0) is lim.TryTake.UNABLE
    assert tb.state(now=t0 + 1).in_bucket == pytest.approx(2)
    assert tb.try_take(2, now=t0 + 1) is lim.TryTake.TAKEN
    assert tb.try_take(10, now=t0 + 30) is lim.TryTake.TAKEN
    assert tb.try_take(1, now=t0 + 2) is lim.TryTake.UNABLE  # moved up to t0 + 30
    # A year ahead is a mistake: clamped to the clock, so no year of drip.
    far = lim.TokenBucket.open(seg, "far", burst_size=10, sustained_rate_per_sec=2,
                               initial_bucket_level=0, now=t0)
    assert far.state(now=lim.now() + 365 * 86400).in_bucket < 1


def test_open_or_create_applies_the_kwargs_spec_names(seg_name):
    # SPEC: `lim.Segment.open_or_create("myapp")  # kwargs: max_limiters, max_processes, mode`.
    s = lim.Segment.open_or_create(seg_name, max_limiters=8, max_processes=16, mode=0o640)
    i = s.info()
    assert (i.max_limiters, i.max_processes) == (8, 16)
    assert os.stat(f"/dev/shm/lim.{seg_name}").st_mode & 0o777 == 0o640
    assert lim.Segment.open(seg_name).info().max_limiters == 8  # attach only
    s.close()


def test_permit_async_waits_without_blocking_the_event_loop(seg):
    # SPEC: `async with api.permit_async(nbytes): ...  # does not block the event loop`. The only
    # slot is held; the waiter can get it only if the loop keeps running the task that frees it.
    import asyncio

    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "aio"), key="aio",
                            concurrency=1)
    held = api.try_acquire(10)
    assert held is not None
    ticks = []

    async def waiter():
        async with api.permit_async(10, timeout=30) as p:  # a blocked loop: TimeoutError
            assert p.held and api.snapshot().in_flight == 1
            return len(ticks)

    async def freer():
        for _ in range(3):
            ticks.append(1)
            await asyncio.sleep(0)
        held.release()

    async def main():
        return await asyncio.wait_for(asyncio.gather(waiter(), freer()), timeout=60)

    ticks_when_admitted, _ = asyncio.run(main())
    assert ticks_when_admitted == 3  # the loop ran the freer while the waiter waited
    assert api.snapshot().in_flight == 0  # and the async permit was released on exit
