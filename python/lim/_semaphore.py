"""Semaphore, WeightedSemaphore and BackoffWindow."""

from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator, Optional, Union

from ._common import (NS, check, key_bytes, lib, now_ns, out_int, segment_handle, to_ns, u64,
                      undo_if_taken, wait_call, wait_queued)
from ._hand_off import HandOff, hand_off_call, receive_call
from ._handle import Handle
from ._segment import Segment


class _SemaphoreBase(Handle):
    _prefix = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Bind the C functions once, not per call (a ctypes call costs ~1 us already).
        cls._c_try = staticmethod(getattr(lib, cls._prefix + "_try_acquire"))
        cls._c_release = staticmethod(getattr(lib, cls._prefix + "_release"))
        cls._c_wait = staticmethod(getattr(lib, cls._prefix + "_acquire_until_interruptible"))

    @classmethod
    def open(cls, segment: Segment, key: str, capacity: int = 1, *,
             adopt_existing: bool = False):  # type: ignore[no-untyped-def]
        """Opens (creating if absent) the semaphore ``key`` in ``segment`` with ``capacity``
        units. Raises ConfigMismatch if it exists with another capacity, unless
        ``adopt_existing`` (then the stored capacity is used); InvalidName, InvalidArgument,
        TableFull."""
        h = ctypes.c_void_p()
        check(getattr(lib, cls._prefix + "_open")(segment_handle(segment), key_bytes(key),
                                                    u64(capacity, "capacity"),
                                                    1 if adopt_existing else 0, ctypes.byref(h)))
        return cls(h, segment, key)

    def try_acquire(self, n: int = 1) -> bool:
        """Takes ``n`` units if they are free now; never blocks."""
        n = u64(n, "n")
        ok = out_int()
        try:
            rc = self._c_try(self._h, n, ctypes.byref(ok))
            if rc:
                check(rc)
            return bool(ok.value)
        except BaseException:  # a signal handler raised as the call returned: hold nothing
            undo_if_taken(ok, lambda h: self._c_release(h, n), self._h)
            raise

    def acquire(self, n: int = 1, timeout: Optional[float] = None) -> bool:
        """Takes ``n`` units, blocking until they are free (None: no limit) or ``timeout`` seconds
        pass (then False, holding nothing). Keeps its place among the waiters for the whole wait
        (FIFO for a WeightedSemaphore) while signal handlers run every 50 ms, so Ctrl-C interrupts
        it, holding nothing."""
        n = u64(n, "n")
        if timeout is not None:
            to_ns(timeout, "timeout")  # refuse NaN and the like before anything is taken
        if self.try_acquire(n):  # uncontended: no clock reads, no callback
            return True
        return wait_queued(self, self._c_wait, (n,), (), timeout, lambda: self.try_acquire(n),
                           lambda h: self._c_release(h, n))

    def release(self, n: int = 1) -> None:
        """Gives back ``n`` units (any thread or process of the holder may). Raises OverRelease if
        fewer are in use."""
        rc = self._c_release(self._h, u64(n, "n"))
        if rc:
            check(rc)

    def hand_off(self, n: int = 1) -> HandOff:
        """Moves ``n`` units this process holds into a parcel for another process (attached to
        the same segment) to ``receive``; send it ``bytes(ticket)`` or the pickled ticket. The
        units stay in use; this process no longer holds them (releasing them here raises
        OverRelease), and if it dies before they are received a reap gives them back. Raises
        OverRelease if this process holds fewer than ``n``, InvalidArgument for 0."""
        return hand_off_call(getattr(lib, self._prefix + "_hand_off"), self.handle, u64(n, "n"))

    def receive(self, ticket: Union[HandOff, bytes]) -> bool:
        """Makes the units of ``ticket`` (a HandOff or its bytes) this process's, to release as
        its own: True, or False if the parcel is gone (received already, or its giver died).
        Raises InvalidArgument for a ticket of another semaphore."""
        return receive_call(getattr(lib, self._prefix + "_receive"), self.handle, ticket,
                            lambda h, amount: self._c_release(h, amount))

    @contextlib.contextmanager
    def hold(self, n: int = 1, timeout: Optional[float] = None) -> Iterator[None]:
        """``with sem.hold(n):`` acquires ``n`` units (blocking) and releases them on exit, also
        on exceptions. Raises TimeoutError if ``timeout`` passes first."""
        if not self.acquire(n, timeout):
            raise TimeoutError(f"{self!r}: {n} units not free within {timeout} s")
        try:
            yield
        finally:
            self.release(n)

    def _read_u64(self, what: str) -> int:
        v = ctypes.c_uint64()
        check(getattr(lib, f"{self._prefix}_{what}")(self.handle, ctypes.byref(v)))
        return v.value

    @property
    def in_use(self) -> int:
        """Units held now, in all processes."""
        return self._read_u64("in_use")

    @property
    def capacity(self) -> int:
        return self._read_u64("capacity")

    @property
    def waiters(self) -> int:
        """Callers blocked in acquire now, in all processes."""
        v = ctypes.c_uint32()
        check(getattr(lib, self._prefix + "_waiters")(self.handle, ctypes.byref(v)))
        return v.value


class Semaphore(_SemaphoreBase):
    """A counting semaphore shared by every process attached to the segment.

    ``lim.Semaphore.open(seg, "db", capacity=8)``; ``with sem.hold(): ...``.
    """

    _prefix = "lim_semaphore"
    _close = staticmethod(lib.lim_semaphore_close)


class WeightedSemaphore(_SemaphoreBase):
    """A byte budget: FIFO among waiters, ``try_acquire`` fails while anyone is queued, an amount
    above the capacity is clamped to it (on acquire and on release)."""

    _prefix = "lim_weighted_semaphore"
    _close = staticmethod(lib.lim_weighted_semaphore_close)


class BackoffWindow(Handle):
    """A shared backoff deadline (what a 429 sets), one per key, seen by every process."""

    _close = staticmethod(lib.lim_backoff_window_close)

    @classmethod
    def for_key(cls, segment: Segment, key: str) -> "BackoffWindow":
        """Opens (creating if absent) the window ``key``."""
        h = ctypes.c_void_p()
        check(lib.lim_backoff_window_for_key(segment_handle(segment), key_bytes(key),
                                             ctypes.byref(h)))
        return cls(h, segment, key)

    def set(self, seconds: float, *, now: Optional[float] = None) -> None:
        """Moves the deadline to now + ``seconds`` unless it is later already (never shortens)."""
        d = to_ns(seconds, "seconds")
        if now is None:
            check(lib.lim_backoff_window_set(self.handle, d))
        else:
            check(lib.lim_backoff_window_set_at(self.handle, d, to_ns(now, "now")))

    def should_backoff(self, *, now: Optional[float] = None) -> bool:
        """Whether ``now`` is before the deadline."""
        v = out_int()
        if now is None:
            check(lib.lim_backoff_window_should_backoff(self.handle, ctypes.byref(v)))
        else:
            check(lib.lim_backoff_window_should_backoff_at(self.handle, to_ns(now, "now"),
                                                           ctypes.byref(v)))
        return bool(v.value)

    def remaining(self, *, now: Optional[float] = None) -> float:
        """Seconds until the deadline; 0.0 if none or passed."""
        v = ctypes.c_int64()
        check(lib.lim_backoff_window_remaining_at(self.handle,
                                                  now_ns() if now is None else to_ns(now, "now"),
                                                  ctypes.byref(v)))
        return v.value / NS

    @property
    def until(self) -> Optional[float]:
        """The deadline (monotonic seconds), or None when none was set since the last clear."""
        has, t = out_int(), ctypes.c_int64()
        check(lib.lim_backoff_window_until(self.handle, ctypes.byref(has), ctypes.byref(t)))
        return t.value / NS if has.value else None

    @property
    def sets(self) -> int:
        """How many set() calls there have been, in all processes."""
        v = ctypes.c_uint64()
        check(lib.lim_backoff_window_sets(self.handle, ctypes.byref(v)))
        return v.value

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Sleeps until the backoff is over (True) or ``timeout`` seconds pass (False); honours
        extensions made meanwhile. Waits in slices, so Ctrl-C interrupts it."""
        return wait_call(self, lib.lim_backoff_window_wait_until, (), timeout)

    def clear(self) -> None:
        """Removes the deadline and wakes waiters."""
        check(lib.lim_backoff_window_clear(self.handle))
