"""Helpers shared by the classes: time conversion, argument checks, waiting (queued, or in
slices)."""

from __future__ import annotations

import ctypes
import math
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Generator, List, Optional

from ._errors import InvalidArgument, InvalidName
from ._lib import LIM_WAIT_ACQUIRED, LIM_WAIT_STOPPED, SHOULD_STOP, check, lib

if TYPE_CHECKING:
    from ._owned import Owned

NS = 1_000_000_000
# A blocking call waits in slices this long, so Python runs signal handlers (Ctrl-C raises
# KeyboardInterrupt) between them; a queued wait (wait_queued) checks for them this often.
SLICE_NS = 50_000_000
U64_MAX = 2**64 - 1
NO_DEADLINE = 2**63 - 1  # INT64_MAX: the _interruptible calls' "no deadline"

# Runs the pending signal handlers of the main thread (a no-op in other threads); raises what a
# handler raised (pythonapi is a PyDLL: the error indicator is checked after the call).
_check_signals = ctypes.pythonapi.PyErr_CheckSignals
_check_signals.restype = ctypes.c_int
_check_signals.argtypes = []
# Whether this thread is inside a queued wait's check (running a signal handler, say).
_in_check = threading.local()


def now() -> float:
    """CLOCK_MONOTONIC now in seconds (the same clock as ``time.monotonic()`` on Linux): the
    clock every ``now=`` argument and every returned time of this package is on."""
    return lib.lim_now_ns() / NS


def now_ns() -> int:
    return int(lib.lim_now_ns())


def to_ns(seconds: float, what: str) -> int:
    """Seconds (float) to integer nanoseconds; NaN, infinities and values beyond int64 are
    refused with InvalidArgument."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InvalidArgument(f"{what} must be a number of seconds, not {seconds!r}")
    if math.isnan(seconds) or math.isinf(seconds) or abs(seconds) > 9.2e9:
        raise InvalidArgument(f"{what} must be a finite number of seconds, not {seconds!r}")
    return int(round(seconds * NS))


def at_ns(now_s: Optional[float]) -> int:
    return now_ns() if now_s is None else to_ns(now_s, "now")


def u64(n: int, what: str) -> int:
    if type(n) is int and 0 <= n <= U64_MAX:  # the common case, first and cheap
        return n
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > U64_MAX:
        raise InvalidArgument(f"{what} must be an integer in 0..2^64-1, not {n!r}")
    return n


U32_MAX = 2**32 - 1
I64_MAX = 2**63 - 1


def u32(n: int, what: str) -> int:
    """An option the C ABI takes as uint32_t: refused (InvalidArgument) unless an int in range,
    so that ctypes never wraps it (2**32 + 8 must not become 8)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= U32_MAX:
        raise InvalidArgument(f"{what} must be an integer in 0..2^32-1, not {n!r}")
    return n


def i64(n: int, what: str) -> int:
    """A count the C ABI takes as int64_t (negative ones are refused there, with the key named):
    refused here unless an int that fits, so that ctypes never wraps or truncates it."""
    if isinstance(n, bool) or not isinstance(n, int) or not -I64_MAX - 1 <= n <= I64_MAX:
        raise InvalidArgument(f"{what} must be an integer in -2^63..2^63-1, not {n!r}")
    return n


def key_bytes(key: str, what: str = "key") -> bytes:
    """A name or key as the C ABI's NUL-terminated string. A NUL inside would silently cut it
    short there ("ab\\0cd" would name "ab"), and a str that is not valid Unicode cannot be
    encoded: both are InvalidName, as any other character outside the alphabet is."""
    if not isinstance(key, str):
        raise InvalidArgument(f"{what} must be a str, not {key!r}")
    if "\0" in key:
        raise InvalidName(f"{what} {key!r} contains a NUL character; allowed are letters, digits "
                          f"and {'._-' if what == 'name' else '._:-'}")
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"{what} {key!r} is not valid Unicode text") from None


def segment_handle(segment: object) -> ctypes.c_void_p:
    """The C handle of a lim.Segment. Anything else is refused here: the C ABI cannot tell one
    opaque pointer from another, so a limiter handle passed as a segment would be misread."""
    from ._segment import Segment  # here: _segment imports this module

    if not isinstance(segment, Segment):
        raise InvalidArgument(f"segment must be a lim.Segment, not {segment!r}")
    return segment.handle


def out_int() -> ctypes.c_int:
    return ctypes.c_int(0)


def wait_in_slices(until: Callable[[int], bool], timeout: Optional[float]) -> bool:
    """Calls ``until(deadline_ns)`` (a blocking C call that returns True on success, False at the
    deadline) in slices of at most 50 ms until it succeeds or ``timeout`` seconds pass (None:
    forever). Between slices Python handles signals, so Ctrl-C interrupts the wait."""
    if timeout is None:
        deadline = None
    else:
        deadline = now_ns() + max(0, to_ns(timeout, "timeout"))
    if cooperative():
        return _poll(until, deadline)
    while True:
        slice_end = now_ns() + SLICE_NS
        if deadline is not None and deadline <= slice_end:
            return until(deadline)
        if until(slice_end):
            return True



def cooperative() -> bool:
    """Whether gevent or eventlet has monkey-patched ``time`` (gunicorn's gevent and eventlet
    workers, Celery's -P gevent): then every request of the process is a greenlet of one thread,
    and a wait inside the C library would block them all, the holder that would release
    included (a deadlock). Two dictionary lookups when neither is imported."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("time"):
        return True
    patcher = sys.modules.get("eventlet.patcher")
    return patcher is not None and bool(patcher.is_monkey_patched("time"))


def _poll(until: Callable[[int], bool], deadline: Optional[int]) -> bool:
    """wait_in_slices for greenlets: tries (``until(now)``, a deadline already reached, returns
    at once), then sleeps through the patched ``time.sleep``, which runs the other greenlets
    (0.5 ms doubling to 20 ms, as acquire_async). Polling does not queue: under contention for a
    byte budget, blocking acquirers in other processes go first."""
    delay = 0.0005
    while True:
        t = now_ns()
        if until(t):
            return True
        if deadline is not None and t >= deadline:
            return False
        time.sleep(delay if deadline is None else min(delay, (deadline - t) / NS))
        delay = min(delay * 2, 0.02)


def wait_call(owner: "Owned", fn: Callable[..., int], args: tuple, timeout: Optional[float],
              undo: Optional[Callable[[ctypes.c_void_p], object]] = None,
              try_once: Optional[Callable[[], bool]] = None) -> bool:
    """wait_in_slices over a C call ``fn(handle, *args, deadline_ns, int* out)`` that sets *out to
    1 on success and 0 at the deadline (the shape of every lim ``_until`` call but Dispatch's),
    on ``owner``'s handle, kept alive while it waits (``Owned._blocking``): if another thread
    closes ``owner``, the wait ends with ValueError at the next slice. ``undo(handle)`` gives
    back what a successful call took (see ``undo_if_taken``).

    ``try_once()`` (a try that registers nothing) is polled instead when this call runs inside a
    queued wait's check on this thread (a signal handler's blocking take): the C wait (a Limiter's
    take, a Throttle's start_job) registers in the thread's process slot, which names one wait at
    a time, and clears it as it leaves; the outer wait, still registered, would then be counted
    dead by the next reap (a Semaphore's sleeper count went 1 short, and the outer wait's own
    deregistration wrapped it to 65534)."""
    if try_once is not None and getattr(_in_check, "active", False):
        deadline = None
        if timeout is not None:
            deadline = now_ns() + max(0, to_ns(timeout, "timeout"))
        return _poll(lambda t: try_once(), deadline)
    with owner._blocking() as h:

        def until(deadline: int) -> bool:
            owner._closed_while_waiting()
            ok = out_int()
            try:
                rc = fn(h, *args, deadline, ctypes.byref(ok))
                if rc:
                    check(rc)
                return bool(ok.value)
            except BaseException:
                undo_if_taken(ok, undo, h)
                raise

        return wait_in_slices(until, timeout)


def _checks(owner: "Owned",
            caught: List[Optional[BaseException]]) -> Generator[int, object, None]:
    """The should_stop callback of one queued wait, as a generator whose ``send`` ctypes calls
    (a C method: calling it starts no new Python frame). Python runs pending signal handlers
    when a frame starts or resumes; a plain Python callback would run them on entry, before any
    ``try`` of its own, and an exception there would be lost inside ctypes ("Exception ignored on
    calling ctypes callback function"), the wait going on. Here the frame resumes at a ``yield``
    inside the ``try``, so what a handler raises is caught: kept in ``caught[0]``, and 1 (stop)
    is yielded. Yields 0 to go on waiting."""
    try:
        while True:
            yield 0  # resumed by each check: pending handlers run here, inside the try
            _check_signals()  # any that became pending since
            owner._closed_while_waiting()  # ValueError once another thread closed it
    except GeneratorExit:
        return
    except BaseException as e:  # noqa: B036 - re-raised by the waiting call
        # A store, not a call: nothing from here to the yield runs pending handlers (a second
        # signal's exception raised here would escape into ctypes and be lost).
        caught[0] = e
    while True:
        yield 1  # the C wait calls no more after a stop; stay stopped if it did


def wait_queued(owner: "Owned", fn: Callable[..., int], before: tuple, after: tuple,
                timeout: Optional[float], try_once: Callable[[], bool],
                undo: Optional[Callable[[ctypes.c_void_p], object]] = None) -> bool:
    """Waits for units of a FIFO or sleeper-counted wait (Semaphore, WeightedSemaphore, Dispatch)
    in ONE C call, ``fn(handle, *before, deadline_ns, *after, should_stop, NULL, SLICE_NS,
    int* result)`` (a ``_acquire_until_interruptible``), so that it keeps its place in the queue
    for the whole wait: slices of ``_until`` calls (wait_call) each withdraw the registration at
    the slice's end, and a large request re-queued at the back every 50 ms starves behind small
    ones. Instead the C wait calls back into Python every slice (and at once when a signal
    interrupts its sleep): the callback runs the pending signal handlers (Ctrl-C's
    KeyboardInterrupt) and checks that ``owner`` is still open; if either raises, it keeps the
    exception and returns "stop", the C call withdraws the registration exactly once and returns
    LIM_WAIT_STOPPED, and the exception is raised here, holding nothing. True: acquired; False:
    ``timeout`` passed.

    Two cases poll with ``try_once()`` instead (0.5 ms doubling to 20 ms, no queue place): under
    gevent/eventlet (a wait in C would block every greenlet), and a blocking call made by a signal
    handler running inside another queued wait of this thread (its process slot records one wait
    at a time)."""
    if timeout is None:
        deadline = NO_DEADLINE
    else:  # a timeout of 9e9 s on a clock that has run long must not wrap int64
        deadline = min(NO_DEADLINE, now_ns() + max(0, to_ns(timeout, "timeout")))
    if cooperative() or getattr(_in_check, "active", False):
        return _poll(lambda t: try_once(), None if deadline == NO_DEADLINE else deadline)
    with owner._blocking() as h:
        while True:
            caught: List[Optional[BaseException]] = [None]
            checks = _checks(owner, caught)
            next(checks)  # to its first yield (a handler that raises here raises in this frame)
            callback = SHOULD_STOP(checks.send)  # alive until the call returns
            result = ctypes.c_int(0)
            try:
                _in_check.active = True  # Python on this thread now runs inside the wait
                try:
                    rc = fn(h, *before, deadline, *after, callback, None, SLICE_NS,
                            ctypes.byref(result))
                finally:
                    _in_check.active = False
                    checks.close()
                if rc:
                    check(rc)
            except BaseException:
                # A signal handler raised as the call returned (after the callback's last
                # look): give back what the call took (see undo_if_taken).
                if result.value == LIM_WAIT_ACQUIRED and undo is not None:
                    undo(h)
                raise
            if result.value != LIM_WAIT_STOPPED:
                return result.value == LIM_WAIT_ACQUIRED
            exc, caught[0] = caught[0], None
            if exc is not None:
                try:
                    raise exc
                finally:
                    del exc  # no cycle through this frame
            # Stopped with nothing kept: not expected (only the check stops the wait, and it keeps
            # what it caught first), but if an exception ever escaped the generator, ctypes would
            # print it and pass C an undefined value. Nothing is held or queued: wait again.


def undo_if_taken(ok: ctypes.c_int, undo: Optional[Callable[[ctypes.c_void_p], object]],
                  handle: ctypes.c_void_p) -> None:
    """Called from ``except BaseException:`` around a C call that takes units and reports it in
    ``ok``. Python runs signal handlers as a foreign call returns, so a handler that raises
    (Ctrl-C's KeyboardInterrupt, Celery's SoftTimeLimitExceeded, a worker's SystemExit) can do
    so after the C call took its units and before the caller learns it holds them: nobody would
    ever give them back (a long-lived worker that catches the exception keeps them until it
    exits). If the C call succeeded, ``undo(handle)`` gives them back, so the exception leaves
    holding nothing. (An error status leaves ``ok`` at 0: the C ABI writes outputs only on
    success.)"""
    if ok.value and undo is not None:
        undo(handle)


__all__ = ["check", "lib"]
