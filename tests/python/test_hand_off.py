"""Handing a holding from one process to another: lim.HandOff, Semaphore.hand_off / receive,
and the job limiters' hand_off_jobs / receive."""

import multiprocessing
import os
import pickle

import pytest

import lim


def _wait_ok(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_semaphore_hand_off_through_a_pipe(seg):
    sem = lim.Semaphore.open(seg, "db", capacity=2)
    assert sem.try_acquire(2)
    ticket = sem.hand_off(2)
    assert sem.in_use == 2  # still in use, now in the parcel
    with pytest.raises(lim.OverRelease):
        sem.release(1)  # no longer this process's
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            os.close(w)
            data = b""
            while len(data) < 32:
                chunk = os.read(r, 32 - len(data))
                if not chunk:
                    break
                data += chunk
            got = lim.HandOff.from_bytes(data)
            ok = sem.receive(got) and sem.in_use == 2
            sem.release(2)
            ok = ok and sem.in_use == 0 and not sem.receive(got)
        finally:
            os._exit(0 if ok else 1)
    os.close(r)
    os.write(w, bytes(ticket))
    os.close(w)
    _wait_ok(pid)
    with pytest.raises(lim.OverRelease):
        sem.release(1)
    assert sem.in_use == 0
    assert not sem.receive(ticket)  # received at most once
    assert not sem.receive(bytes(ticket))


def _throttle_worker(seg_name: str, conn) -> None:  # type: ignore[no-untyped-def]
    seg = lim.Segment.open(seg_name)
    t = lim.Throttle.open(seg, "jobs", max_concurrent_jobs=3)
    ticket = conn.recv()  # unpickled lim.HandOff
    ok = isinstance(ticket, lim.HandOff) and t.receive(ticket)
    t.finish_job()
    t.finish_job()
    conn.send(ok and not t.receive(ticket))


def test_throttle_hand_off_jobs_through_multiprocessing(seg, seg_name):
    t = lim.Throttle.open(seg, "jobs", max_concurrent_jobs=3)
    assert t.try_start_job() and t.try_start_job()
    assert t.state().in_flight == 2
    ticket = t.hand_off_jobs(2)
    with pytest.raises(lim.OverRelease):
        t.finish_job()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_throttle_worker, args=(seg_name, child))
    p.start()
    parent.send(ticket)
    assert parent.recv() is True
    p.join(60)  # far: a loaded machine can be slow to run the exit
    assert p.exitcode == 0
    assert t.state().in_flight == 0


def test_weighted_and_throttled_rate_limiter_in_process(seg):
    ws = lim.WeightedSemaphore.open(seg, "bytes", capacity=100)
    assert ws.try_acquire(60)
    ticket = ws.hand_off(40)
    ws.release(20)
    with pytest.raises(lim.OverRelease):
        ws.release(1)
    assert ws.in_use == 40
    assert ws.receive(ticket)  # the giver may take its own parcel back
    ws.release(40)
    assert ws.in_use == 0

    trl = lim.ThrottledRateLimiter.open(seg, "trl", burst_size=5, sustained_rate_per_sec=1,
                                        max_concurrent_jobs=2)
    assert trl.try_start_job()
    ticket = trl.hand_off_jobs(1)
    assert trl.receive(ticket) and not trl.receive(ticket)
    trl.finish_job()
    assert trl.state().in_flight == 0


def test_hand_off_errors(seg):
    sem = lim.Semaphore.open(seg, "a", capacity=2)
    other = lim.Semaphore.open(seg, "b", capacity=2)
    with pytest.raises(lim.OverRelease):
        sem.hand_off(1)  # holds nothing
    assert sem.try_acquire(1)
    with pytest.raises(lim.OverRelease):
        sem.hand_off(2)
    with pytest.raises(lim.InvalidArgument):
        sem.hand_off(0)
    with pytest.raises(lim.InvalidArgument):
        sem.hand_off(-1)
    ticket = sem.hand_off(1)
    with pytest.raises(lim.InvalidArgument):
        other.receive(ticket)  # a parcel of another semaphore
    with pytest.raises(lim.InvalidArgument):
        sem.receive(b"short")
    with pytest.raises(lim.InvalidArgument):
        sem.receive(42)  # type: ignore[arg-type]
    assert sem.receive(ticket)
    sem.release(1)
    t = lim.Throttle.open(seg, "t", max_concurrent_jobs=1)
    with pytest.raises(lim.OverRelease):
        t.hand_off_jobs(1)
    with pytest.raises(lim.InvalidArgument):
        t.hand_off_jobs(-1)


def test_hand_off_round_trips(seg):
    sem = lim.Semaphore.open(seg, "rt", capacity=3)
    assert sem.try_acquire(3)
    ticket = sem.hand_off(3)
    data = bytes(ticket)
    assert len(data) == 32 and ticket.to_bytes() == data
    again = lim.HandOff.from_bytes(data)
    assert again == ticket and hash(again) == hash(ticket)
    assert lim.HandOff.from_bytes(bytearray(data)) == ticket
    unpickled = pickle.loads(pickle.dumps(ticket))
    assert isinstance(unpickled, lim.HandOff) and unpickled == ticket
    assert unpickled.amount == ticket.amount and unpickled.record == ticket.record
    assert "HandOff(" in repr(ticket)
    assert sem.receive(unpickled)
    sem.release(3)
    assert sem.in_use == 0
