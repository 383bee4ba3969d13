"""gunicorn's gevent workers (and eventlet's) run every request of a process in one thread, as
greenlets. A blocking lim call that sleeps inside the C library would block them all, including
the greenlet that holds the permit and would release it: the worker deadlocks. Under a
monkey-patched `time`, blocking calls must wait cooperatively (try, then a patched sleep)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("gevent")

SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import sys
import gevent
import lim

seg = lim.Segment.open(sys.argv[1])
sem = lim.Semaphore.open(seg, "g", capacity=1)
api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "g"), key="g", concurrency=1)
t = lim.Throttle.open(seg, "gj", max_concurrent_jobs=1)
w = lim.BackoffWindow.for_key(seg, "gw")
order = []

def holder(name, take, give):
    take()
    order.append("took " + name)
    gevent.sleep(0.05)  # the request, on the hub: others must run meanwhile
    give()

def waiter(name, wait):
    order.append("waiting " + name)
    assert wait()
    order.append("got " + name)

permit = []
cases = [
    ("semaphore", lambda: sem.acquire(1), lambda: sem.release(1),
     lambda: sem.acquire(1, timeout=30) and (sem.release(1) or True)),
    ("dispatch", lambda: permit.append(api.acquire(0)), lambda: permit.pop().release(),
     lambda: api.acquire(0, timeout=30) is not None),
    ("throttle", lambda: t.start_job(), lambda: t.finish_job(),
     lambda: t.start_job(timeout=30) and (t.finish_job() or True)),
    ("backoff", lambda: w.set(3600), lambda: w.clear(), lambda: w.wait(timeout=30)),
]
for name, take, give, wait in cases:
    a = gevent.spawn(holder, name, take, give)
    gevent.sleep(0)
    b = gevent.spawn(waiter, name, wait)
    gevent.joinall([a, b], raise_error=True)
assert sem.in_use == 0 and api.snapshot().in_flight == 0, order
print(" | ".join(order))
"""


def test_blocking_calls_yield_to_other_greenlets(seg, seg_name):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(__import__("lim").__file__))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT, seg_name], env=env,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a greenlet blocked in lim blocked the greenlet that would release")
    assert r.returncode == 0, r.stderr
    for name in ("semaphore", "dispatch", "throttle", "backoff"):
        assert f"got {name}" in r.stdout
