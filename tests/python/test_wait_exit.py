"""A daemon thread still blocked in a queued wait (Semaphore, WeightedSemaphore, Dispatch) when the
interpreter exits. Its wait calls back into Python every 50 ms; once the interpreter finalizes, the
callback's attempt to take the GIL ends the thread (CPython calls pthread_exit there), which
unwinds the C++ frames of the wait. Every one of them must let that unwind through: a noexcept
frame or a catch (...) that swallows it calls std::terminate, and the program, which exited
normally, dies of SIGABRT instead. The assertion is on the exit status, never on time."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import gc, sys, threading, time
    sys.path.insert(0, {python!r})
    import lim

    name, kind = sys.argv[1], sys.argv[2]
    seg = lim.Segment.open_or_create(name)
    if kind == "dispatch":
        window = lim.BackoffWindow.for_key(seg, "w")
        h = lim.Dispatch.open(seg, limiter=window, key="d", concurrency=1, byte_budget=10)
        held = h.try_acquire(10)
        assert held is not None
        def wait():
            h.acquire(5)
        def count():
            return h.snapshot().waiters
    else:
        cls = lim.Semaphore if kind == "semaphore" else lim.WeightedSemaphore
        h = cls.open(seg, "s", 10)
        assert h.try_acquire(10)
        def wait():
            h.acquire(5)
        def count():
            return h.waiters
    t = threading.Thread(target=wait, daemon=True)
    t.start()
    while count() < 1:
        time.sleep(0.005)

    class SlowExit:
        # Collected by the interpreter's last garbage collection, which runs after it is marked
        # finalizing (module globals are not cleared while a daemon thread runs, so a plain
        # global's __del__ would never run): its sleep lets the daemon's next check (due every
        # 50 ms) try to take the GIL then.
        def __del__(self, sleep=time.sleep, finalizing=sys.is_finalizing):
            if finalizing():
                print("finalizing", flush=True)
            sleep(0.3)

    gc.disable()
    slow_exit = SlowExit()
    slow_exit.cycle = slow_exit
    del slow_exit
    print("ready", flush=True)
""")


@pytest.mark.parametrize("kind", ["semaphore", "weighted", "dispatch"])
def test_daemon_thread_waiting_at_exit_does_not_abort(seg_name, kind):
    script = SCRIPT.format(python=str(REPO / "python"))
    env = dict(os.environ)
    try:
        p = subprocess.run([sys.executable, "-c", script, seg_name, kind], env=env,
                           capture_output=True, text=True, timeout=60)
    finally:
        import lim
        lim.Segment.remove(seg_name)
    assert "ready" in p.stdout, p.stderr
    assert "finalizing" in p.stdout, p.stderr  # the daemon was still waiting then
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "terminate" not in p.stderr
