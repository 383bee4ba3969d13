"""Dispatch (Foundation's layered limiter) and its Permit."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import inspect
from dataclasses import dataclass
from typing import (Any, AsyncIterator, Awaitable, Callable, Iterator, Optional, TypeVar, Union,
                    cast)

from . import _lib
from ._common import (NS, check, key_bytes, lib, now_ns, out_int, segment_handle, to_ns, u64,
                      wait_queued)
from ._errors import InvalidArgument
from ._handle import Handle
from ._segment import Segment
from ._semaphore import BackoffWindow

F = TypeVar("F", bound=Callable[..., Any])
_c_try_acquire = lib.lim_dispatch_try_acquire
# C permits that hold nothing, for reuse (list.append/pop are atomic under the GIL).
_FREE: list = []
_FREE_MAX = 64
_c_permit_release = lib.lim_permit_release


@dataclass(frozen=True)
class DispatchSnapshot:
    """Every layer and the backoff, as ``Dispatch.snapshot()`` reads them (times in seconds;
    ``bytes_in_flight`` as charged, penalty included)."""

    backoff_active: bool
    backoff_remaining: float
    throttle_remaining: float
    in_flight: int
    concurrency: int
    throttled_in_flight: int
    throttled_concurrency: int
    bytes_in_flight: int
    byte_budget: int
    waiters: int
    concurrency_waiters: int
    throttled_waiters: int
    bytes_waiters: int


class Permit:
    """What one request holds from a Dispatch: a concurrency slot, a throttled slot if it started
    under backoff, and its bytes as charged. ``release()`` (or leaving ``with permit:``, or the
    object being collected) gives everything back; release is idempotent. A permit stays with the
    process that acquired it: a forked child's copy releases nothing."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        if _FREE:  # reuse a C permit: saves two foreign calls per request
            self._h: Optional[ctypes.c_void_p] = _FREE.pop()
            return
        h = ctypes.c_void_p()
        check(lib.lim_permit_create(ctypes.byref(h)))
        self._h = h

    def release(self) -> None:
        if self._h:
            rc = _c_permit_release(self._h)
            if rc:
                check(rc)

    @property
    def held(self) -> bool:
        return bool(self._h) and bool(lib.lim_permit_held(self._h))

    @property
    def bytes(self) -> int:
        """Bytes charged against the budget (penalised and clamped as it was)."""
        return int(lib.lim_permit_bytes(self._h)) if self._h else 0

    @property
    def throttled(self) -> bool:
        """Whether it started under backoff (and so holds a throttled slot)."""
        return bool(self._h) and bool(lib.lim_permit_throttled(self._h))

    def __bool__(self) -> bool:
        return self.held

    # A copy is the same permit: two owners of one C permit would each release it (the second
    # time, the permit of whichever request reused it from the pool).
    def __copy__(self) -> "Permit":
        return self

    def __deepcopy__(self, memo: Any) -> "Permit":
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("cannot pickle a lim.Permit: it stays with the process that acquired it "
                        "(hand units to another process with hand_off and receive)")

    def __enter__(self) -> "Permit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        h, self._h = self._h, None
        if h:
            try:
                _c_permit_release(h)
                # Pool it only if it holds nothing now (a fork child's copy of a parent's permit
                # still holds: release leaves it alone).
                if len(_FREE) < _FREE_MAX and not lib.lim_permit_held(h):
                    _FREE.append(h)
                else:
                    lib.lim_permit_destroy(h)
            except Exception:  # interpreter shutdown
                pass

    def __repr__(self) -> str:
        return f"lim.Permit(held={self.held}, bytes={self.bytes}, throttled={self.throttled})"


class Dispatch(Handle):
    """Foundation's layered limiter for API clients, shared by every process on the segment:
    ``concurrency`` requests at once; ``throttled_concurrency`` of those that start under backoff;
    ``byte_budget`` bytes in flight (FIFO), each request's bytes multiplied by
    ``byte_penalty_multiplier`` under backoff.

    ::

        window = lim.BackoffWindow.for_key(seg, "my_api")
        api = lim.Dispatch.open(seg, limiter=window, key="my_api", concurrency=100)
        with api.permit(len(body)):
            response = post(url, body)
        if response.status == 429:
            api.set_backoff(lim.parse_retry_after(response.headers) or 1.0)
    """

    _close = staticmethod(lib.lim_dispatch_close)

    def __init__(self, handle: ctypes.c_void_p, segment: Segment, key: str,
                 limiter: BackoffWindow) -> None:
        super().__init__(handle, segment, key)
        self._limiter = limiter

    @classmethod
    def open(cls, segment: Segment, *, limiter: BackoffWindow, key: str = "default",
             concurrency: int = 400, throttled_concurrency: int = 10,
             byte_budget: int = 5_000_000, backoff_window: float = 10.0,
             byte_penalty_multiplier: int = 20, acquire_backoff_base: float = 0.002,
             acquire_backoff_max: float = 0.050, acquire_backoff_jitter: float = 0.25,
             adopt_existing: bool = False) -> "Dispatch":
        """Opens (creating if absent) the Dispatch ``key``. Raises ConfigMismatch if it exists
        with other options (unless ``adopt_existing``), InvalidArgument, InvalidName, TableFull.
        """
        seg_h = segment_handle(segment)
        if not isinstance(limiter, BackoffWindow):  # C cannot tell one handle from another
            raise InvalidArgument(f"limiter must be a lim.BackoffWindow, not {limiter!r}")
        o = _lib.DispatchOptions()
        lib.lim_dispatch_options_init(ctypes.byref(o))
        o.limiter = limiter.handle
        o.key = key_bytes(key)
        o.concurrency = u64(concurrency, "concurrency")
        o.throttled_concurrency = u64(throttled_concurrency, "throttled_concurrency")
        o.byte_budget = u64(byte_budget, "byte_budget")
        o.backoff_window_ns = to_ns(backoff_window, "backoff_window")
        o.byte_penalty_multiplier = u64(byte_penalty_multiplier, "byte_penalty_multiplier")
        o.acquire_backoff_base_ns = to_ns(acquire_backoff_base, "acquire_backoff_base")
        o.acquire_backoff_max_ns = to_ns(acquire_backoff_max, "acquire_backoff_max")
        if isinstance(acquire_backoff_jitter, bool) or not isinstance(acquire_backoff_jitter,
                                                                      (int, float)):
            raise InvalidArgument(f"acquire_backoff_jitter must be a number in [0, 1], not "
                                  f"{acquire_backoff_jitter!r}")
        o.acquire_backoff_jitter = float(acquire_backoff_jitter)  # the library checks the range
        h = ctypes.c_void_p()
        check(lib.lim_dispatch_open(seg_h, ctypes.byref(o), 1 if adopt_existing else 0,
                                    ctypes.byref(h)))
        return cls(h, segment, key, limiter)

    @property
    def limiter(self) -> BackoffWindow:
        return self._limiter

    def _try_into(self, permit: Permit, nbytes: int) -> bool:
        ok = out_int()
        rc = _c_try_acquire(self._h, nbytes, permit._h, ctypes.byref(ok))
        if rc:
            check(rc)
        return bool(ok.value)

    def try_acquire(self, nbytes: int = 0) -> Optional[Permit]:
        """A Permit if every layer has room now (and no one is queued for bytes), else None.
        Never blocks."""
        nbytes = u64(nbytes, "nbytes")
        permit = Permit()
        return permit if self._try_into(permit, nbytes) else None

    def acquire(self, nbytes: int = 0, timeout: Optional[float] = None) -> Optional[Permit]:
        """Takes a concurrency slot, a throttled slot under backoff, and ``nbytes`` (x the penalty
        under backoff, clamped to the budget), blocking as long as it takes (None) or until
        ``timeout`` seconds pass (then None, holding nothing). Keeps its place in the byte queue
        for the whole wait while signal handlers run every 50 ms: Ctrl-C raises
        KeyboardInterrupt, holding nothing."""
        nbytes = u64(nbytes, "nbytes")
        if timeout is not None:
            to_ns(timeout, "timeout")  # refuse NaN and the like before anything is taken
        permit = Permit()  # owns what the C call takes, even if a signal interrupts us
        if self._try_into(permit, nbytes):  # uncontended: no clock reads, no waiting
            return permit

        try:
            got = wait_queued(self, lib.lim_dispatch_acquire_until_interruptible, (nbytes,),
                              (permit._h,), timeout, lambda: self._try_into(permit, nbytes))
        except BaseException:  # KeyboardInterrupt as the call returned: hold nothing
            permit.release()
            raise
        return permit if got else None

    @contextlib.contextmanager
    def permit(self, nbytes: int = 0, timeout: Optional[float] = None) -> Iterator[Permit]:
        """``with api.permit(nbytes):`` blocks for a permit and releases it on exit, also on
        exceptions. Raises TimeoutError if ``timeout`` seconds pass first."""
        p = self.acquire(nbytes, timeout)
        if p is None:
            raise TimeoutError(f"{self!r}: no permit for {nbytes} bytes within {timeout} s")
        try:
            yield p
        finally:
            p.release()

    async def acquire_async(self, nbytes: int = 0,
                            timeout: Optional[float] = None) -> Optional[Permit]:
        """As acquire, without blocking the event loop: tries, then sleeps asynchronously (0.5 ms
        doubling to 20 ms) and tries again. Cancelling it holds nothing. Polling does not queue, so
        under contention blocking acquirers of the byte budget go first."""
        nbytes = u64(nbytes, "nbytes")
        deadline = None if timeout is None else now_ns() + max(0, to_ns(timeout, "timeout"))
        permit = Permit()
        delay = 0.0005
        try:
            while not self._try_into(permit, nbytes):
                t = now_ns()
                if deadline is not None and t >= deadline:
                    return None
                pause = delay if deadline is None else min(delay, (deadline - t) / NS)
                await asyncio.sleep(pause)
                delay = min(delay * 2, 0.02)
        except BaseException:  # cancelled: hold nothing
            permit.release()
            raise
        return permit

    @contextlib.asynccontextmanager
    async def permit_async(self, nbytes: int = 0,
                           timeout: Optional[float] = None) -> AsyncIterator[Permit]:
        """``async with api.permit_async(nbytes):`` as permit(), without blocking the loop."""
        p = await self.acquire_async(nbytes, timeout)
        if p is None:
            raise TimeoutError(f"{self!r}: no permit for {nbytes} bytes within {timeout} s")
        try:
            yield p
        finally:
            p.release()

    def rate_limited(self, nbytes: Union[int, Callable[..., int]] = 0) -> Callable[[F], F]:
        """A decorator: every call of the function runs holding a permit for ``nbytes`` (or for
        ``nbytes(*args, **kwargs)`` when it is callable). Works on ``async def`` functions too
        (with permit_async), and on generators (sync or async): the permit is held while the
        generator runs, from its first step until it ends or is closed."""

        def cost(args: Any, kwargs: Any) -> int:
            return nbytes(*args, **kwargs) if callable(nbytes) else nbytes

        def decorate(fn: F) -> F:
            # A generator's body runs as it is iterated, not when it is called: hold the permit
            # from the first step until it ends or is closed.
            if inspect.isasyncgenfunction(fn):
                @functools.wraps(fn)
                async def async_gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                    async with self.permit_async(cost(args, kwargs)):
                        async for item in fn(*args, **kwargs):
                            yield item
                return cast(F, async_gen_wrapper)

            if inspect.isgeneratorfunction(fn):
                @functools.wraps(fn)
                def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                    with self.permit(cost(args, kwargs)):
                        return (yield from fn(*args, **kwargs))
                return cast(F, gen_wrapper)

            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    async with self.permit_async(cost(args, kwargs)):
                        return await cast(Callable[..., Awaitable[Any]], fn)(*args, **kwargs)
                return cast(F, async_wrapper)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with self.permit(cost(args, kwargs)):
                    return fn(*args, **kwargs)
            return cast(F, wrapper)

        return decorate

    def set_backoff(self, seconds: float) -> None:
        """Sets the shared backoff deadline to now + ``seconds`` unless it is later already.
        Requests that start from now on, in every process, are throttled and penalised until
        ``backoff_window`` after the deadline. Sleeps no one. Raises InvalidArgument if
        negative."""
        check(lib.lim_dispatch_set_backoff(self.handle, to_ns(seconds, "seconds")))

    @property
    def backoff_active(self) -> bool:
        """Whether a request starting now would run under backoff."""
        v = out_int()
        check(lib.lim_dispatch_backoff_active(self.handle, ctypes.byref(v)))
        return bool(v.value)

    def snapshot(self) -> DispatchSnapshot:
        """Every layer's use, read without stopping anyone."""
        s = _lib.DispatchSnapshot()
        check(lib.lim_dispatch_snapshot_get(self.handle, ctypes.byref(s)))
        return DispatchSnapshot(bool(s.backoff_active), s.backoff_remaining_ns / NS,
                                s.throttle_remaining_ns / NS, s.in_flight, s.concurrency,
                                s.throttled_in_flight, s.throttled_concurrency, s.bytes_in_flight,
                                s.byte_budget, s.waiters, s.concurrency_waiters,
                                s.throttled_waiters, s.bytes_waiters)
