"""The Jane Street family: Limiter (expert), TokenBucket, Throttle, ThrottledRateLimiter."""

from __future__ import annotations

import contextlib
import ctypes
import enum
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from . import _lib
from ._common import (NS, at_ns, check, i64, key_bytes, lib, out_int, segment_handle,
                      undo_if_taken, wait_call)
from ._errors import InvalidArgument
from ._hand_off import HandOff, hand_off_call, receive_call
from ._handle import Handle
from ._segment import Segment


_c_tb_try_take = lib.lim_token_bucket_try_take
_JOB = 10_000  # a job's token in the ledger's fixed point (a HandOff's amount)


class TryTake(enum.IntEnum):
    """What try_take did: TAKEN (the tokens are in flight), UNABLE (not enough now),
    ASKED_FOR_MORE_THAN_BUCKET_SIZE (no amount of waiting helps)."""

    TAKEN = 0
    UNABLE = 1
    ASKED_FOR_MORE_THAN_BUCKET_SIZE = 2
    # C++'s spellings (lim::TryTake::taken), as aliases.
    taken = 0
    unable = 1
    asked_for_more_than_bucket_size = 2


_TRY_TAKE = tuple(TryTake)


class AvailabilityKind(enum.IntEnum):
    AT = 0
    NEVER_BECAUSE_GREATER_THAN_BUCKET_SIZE = 1
    WHEN_RETURN_TO_HOPPER_IS_CALLED = 2


class StartJobKind(enum.IntEnum):
    START = 0
    MAX_CONCURRENT_JOBS_RUNNING = 1
    UNABLE_UNTIL_AT_LEAST = 2


@dataclass(frozen=True)
class Availability:
    """When ``n`` tokens may be in the bucket: ``time`` (monotonic seconds, a lower bound) when
    ``kind`` is AT, else None."""

    kind: AvailabilityKind
    time: Optional[float]


@dataclass(frozen=True)
class StartJob:
    """What try_start_job did; ``time`` (monotonic seconds) for UNABLE_UNTIL_AT_LEAST."""

    kind: StartJobKind
    time: Optional[float]

    def __bool__(self) -> bool:
        return self.kind == StartJobKind.START


@dataclass(frozen=True)
class LimiterState:
    """Every read of a limiter at one instant (``math.inf`` where infinite)."""

    bucket_size: float
    in_bucket: float
    in_hopper: float
    in_flight: float
    in_limiter: float
    in_system: float
    hopper_to_bucket_rate_per_sec: float
    token_target_level: float
    waiters: int


def _state(s: _lib.LimiterState) -> LimiterState:
    return LimiterState(s.bucket_size, s.in_bucket, s.in_hopper, s.in_flight, s.in_limiter,
                        s.in_system, s.hopper_to_bucket_rate_per_sec, s.token_target_level,
                        s.waiters)


def _tokens(n: float, what: str = "n") -> float:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or math.isnan(n):
        raise InvalidArgument(f"{what} must be a number of tokens, not {n!r}")
    return float(n)


def _availability(a: _lib.Availability) -> Availability:
    kind = AvailabilityKind(a.kind)
    return Availability(kind, a.time_ns / NS if kind == AvailabilityKind.AT else None)


def _start_job(s: _lib.StartJob) -> StartJob:
    kind = StartJobKind(s.kind)
    return StartJob(kind, s.time_ns / NS if kind == StartJobKind.UNABLE_UNTIL_AT_LEAST else None)


class _LimiterBase(Handle):
    _prefix = ""

    def state(self, *, now: Optional[float] = None) -> LimiterState:
        """Bucket, hopper, in-flight and total tokens at ``now`` (default: the clock)."""
        s = _lib.LimiterState()
        check(getattr(lib, self._prefix + "_state_get_at")(self.handle, at_ns(now),
                                                            ctypes.byref(s)))
        return _state(s)

    @property
    def bucket_size(self) -> float:
        return self.state().bucket_size

    @property
    def in_bucket(self) -> float:
        return self.state().in_bucket

    @property
    def in_flight(self) -> float:
        return self.state().in_flight

    @property
    def hopper_to_bucket_rate_per_sec(self) -> float:
        return self.state().hopper_to_bucket_rate_per_sec


class _TakeMixin(_LimiterBase):
    def _undo_take(self, n: float) -> Optional[Callable[[ctypes.c_void_p], object]]:
        """What gives back ``n`` tokens a take took, when an exception hides it from the caller
        (_common.undo_if_taken); None where taken tokens are simply spent (a token bucket)."""
        return None

    def try_take(self, n: float = 1, *, now: Optional[float] = None) -> TryTake:
        """Takes ``n`` tokens if the bucket holds them at ``now``; never blocks."""
        n = _tokens(n)
        r = ctypes.c_int(-1)  # TAKEN is 0
        try:
            if now is None:  # the library reads the clock itself, and only if the rate needs it
                check(getattr(lib, self._prefix + "_try_take")(self.handle, n, ctypes.byref(r)))
            else:
                check(getattr(lib, self._prefix + "_try_take_at")(self.handle, at_ns(now), n,
                                                                   ctypes.byref(r)))
            return TryTake(r.value)
        except BaseException:  # a signal handler raised as the call returned: hold nothing
            undo_if_taken(ctypes.c_int(r.value == TryTake.TAKEN), self._undo_take(n), self._h)
            raise

    def take(self, n: float = 1, timeout: Optional[float] = None) -> bool:
        """Takes ``n`` tokens, blocking until they are there (None: no limit) or ``timeout``
        seconds pass (False, holding nothing). Raises InvalidArgument if n > bucket_size. Waits
        in 50 ms slices, so Ctrl-C interrupts it."""
        n = _tokens(n)
        return wait_call(self, getattr(lib, self._prefix + "_take_until"), (n,), timeout,
                         self._undo_take(n), lambda: self._take_once(n))

    def _take_once(self, n: float) -> bool:
        """A try for take's polling (registers nothing): raises as take when no wait can help."""
        r = self.try_take(n)
        if r == TryTake.ASKED_FOR_MORE_THAN_BUCKET_SIZE:
            raise InvalidArgument(f"take({n}) could never succeed: more than the bucket holds")
        return r == TryTake.TAKEN

    def tokens_may_be_available_when(self, n: float = 1, *,
                                     now: Optional[float] = None) -> Availability:
        a = _lib.Availability()
        check(getattr(lib, self._prefix + "_tokens_may_be_available_when_at")(
            self.handle, at_ns(now), _tokens(n), ctypes.byref(a)))
        return _availability(a)


class Limiter(_TakeMixin):
    """Jane Street's general limiter: a bucket filled from a hopper at a rate; taken tokens are
    in flight until ``return_to_hopper``. ``math.inf`` stands for infinite."""

    _prefix = "lim_limiter"
    _close = staticmethod(lib.lim_limiter_close)

    def _undo_take(self, n: float) -> Optional[Callable[[ctypes.c_void_p], object]]:
        return lambda h: lib.lim_limiter_return_to_hopper(h, n)  # in flight until returned

    @classmethod
    def open(cls, segment: Segment, key: str, *, bucket_size: float,
             hopper_to_bucket_rate_per_sec: float = math.inf, initial_bucket_level: float = 0,
             initial_hopper_level: float = math.inf, adopt_existing: bool = False,
             now: Optional[float] = None) -> "Limiter":
        """Opens (creating if absent) the limiter ``key``; the fill is counted from ``now``."""
        c = _lib.LimiterConfig(_tokens(hopper_to_bucket_rate_per_sec, "rate"),
                               _tokens(bucket_size, "bucket_size"),
                               _tokens(initial_bucket_level, "initial_bucket_level"),
                               _tokens(initial_hopper_level, "initial_hopper_level"))
        h = ctypes.c_void_p()
        check(lib.lim_limiter_open_at(segment_handle(segment), key_bytes(key), ctypes.byref(c),
                                      1 if adopt_existing else 0, at_ns(now), ctypes.byref(h)))
        return cls(h, segment, key)

    def return_to_hopper(self, n: float, *, now: Optional[float] = None) -> None:
        """Returns ``n`` in-flight tokens to the hopper. Raises OverRelease if more than in
        flight."""
        if now is None:  # the library reads the clock itself, and only if the rate needs it
            check(lib.lim_limiter_return_to_hopper(self.handle, _tokens(n)))
        else:
            check(lib.lim_limiter_return_to_hopper_at(self.handle, at_ns(now), _tokens(n)))

    def set_token_target_level(self, level: float, *, now: Optional[float] = None) -> None:
        check(lib.lim_limiter_set_token_target_level_at(self.handle, at_ns(now),
                                                        _tokens(level, "level")))

    def set_bucket_size(self, size: float, *, now: Optional[float] = None) -> None:
        check(lib.lim_limiter_set_bucket_size_at(self.handle, at_ns(now), _tokens(size, "size")))

    def set_hopper_to_bucket_rate_per_sec(self, rate: float, *,
                                          now: Optional[float] = None) -> None:
        check(lib.lim_limiter_set_hopper_to_bucket_rate_per_sec_at(self.handle, at_ns(now),
                                                                    _tokens(rate, "rate")))

    def invariant(self) -> None:
        """Raises lim.Error if the shared state is inconsistent."""
        check(lib.lim_limiter_invariant(self.handle))


class TokenBucket(_TakeMixin):
    """A token bucket of ``burst_size`` filled at ``sustained_rate_per_sec``; tokens taken are
    gone (an infinite hopper)."""

    _prefix = "lim_token_bucket"
    _close = staticmethod(lib.lim_token_bucket_close)

    @classmethod
    def open(cls, segment: Segment, key: str, *, burst_size: float, sustained_rate_per_sec: float,
             initial_bucket_level: float = 0, adopt_existing: bool = False,
             now: Optional[float] = None) -> "TokenBucket":
        """Opens (creating if absent) the bucket ``key``; the fill is counted from ``now``.
        Raises ConfigMismatch if it exists with other options, unless ``adopt_existing``."""
        o = _lib.TokenBucketOptions(_tokens(burst_size, "burst_size"),
                                    _tokens(sustained_rate_per_sec, "sustained_rate_per_sec"),
                                    _tokens(initial_bucket_level, "initial_bucket_level"))
        h = ctypes.c_void_p()
        check(lib.lim_token_bucket_open_at(segment_handle(segment), key_bytes(key),
                                           ctypes.byref(o), 1 if adopt_existing else 0,
                                           at_ns(now), ctypes.byref(h)))
        return cls(h, segment, key)

    def try_take(self, n: float = 1, *, now: Optional[float] = None) -> TryTake:
        """Takes ``n`` tokens if the bucket holds them now; never blocks."""
        r = out_int()
        if now is None:  # the common call: one C call, no clock read here
            if type(n) is not float:
                n = _tokens(n)
            rc = _c_tb_try_take(self._h, n, ctypes.byref(r))
            if rc:
                check(rc)
            return _TRY_TAKE[r.value]  # a tuple index: calling the enum costs ~1 us
        else:
            check(lib.lim_token_bucket_try_take_at(self.handle, at_ns(now), _tokens(n),
                                                   ctypes.byref(r)))
        return TryTake(r.value)

    @property
    def burst_size(self) -> float:
        return self.state().bucket_size

    @property
    def sustained_rate_per_sec(self) -> float:
        return self.state().hopper_to_bucket_rate_per_sec


class _JobsMixin(_LimiterBase):
    def try_start_job(self, *, now: Optional[float] = None) -> StartJob:
        """START (then call finish_job once), MAX_CONCURRENT_JOBS_RUNNING, or
        UNABLE_UNTIL_AT_LEAST (``time``). Never blocks."""
        s = _lib.StartJob(-1)  # START is 0
        try:
            if now is None:  # the library reads the clock itself, and only if the rate needs it
                check(getattr(lib, self._prefix + "_try_start_job")(self.handle,
                                                                    ctypes.byref(s)))
            else:
                check(getattr(lib, self._prefix + "_try_start_job_at")(self.handle, at_ns(now),
                                                                        ctypes.byref(s)))
            return _start_job(s)
        except BaseException:  # a signal handler raised as the call returned: hold nothing
            undo_if_taken(ctypes.c_int(s.kind == StartJobKind.START), self._undo_start(),
                          self._h)
            raise

    def start_job(self, timeout: Optional[float] = None) -> bool:
        """Blocks until a job may start (True) or ``timeout`` seconds pass (False). Waits in
        50 ms slices, so Ctrl-C interrupts it, holding nothing."""
        return wait_call(self, getattr(lib, self._prefix + "_start_job_until"), (), timeout,
                         self._undo_start(), lambda: bool(self.try_start_job()))

    def _undo_start(self) -> Callable[[ctypes.c_void_p], object]:
        return getattr(lib, self._prefix + "_finish_job")  # finish_job(handle)

    def finish_job(self, *, now: Optional[float] = None) -> None:
        """Returns the job's token to the hopper."""
        if now is None:  # the library reads the clock itself, and only if the rate needs it
            check(getattr(lib, self._prefix + "_finish_job")(self.handle))
        else:
            check(getattr(lib, self._prefix + "_finish_job_at")(self.handle, at_ns(now)))

    def hand_off_jobs(self, n: int = 1) -> HandOff:
        """Moves ``n`` started jobs of this process into a parcel for another process (attached
        to the same segment) to ``receive`` and later ``finish_job``. The jobs stay running; if
        this process dies before they are received a reap finishes them. Raises OverRelease if
        this process runs fewer than ``n``, InvalidArgument for 0."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**63:
            raise InvalidArgument(f"n must be an integer in 0..2^63-1, not {n!r}")
        return hand_off_call(getattr(lib, self._prefix + "_hand_off_jobs"), self.handle, n)

    def receive(self, ticket: Union[HandOff, bytes]) -> bool:
        """Makes the jobs of ``ticket`` (a HandOff or its bytes) this process's, to finish as its
        own: True, or False if the parcel is gone (received already, or its giver died). Raises
        InvalidArgument for a ticket of another limiter."""
        finish = getattr(lib, self._prefix + "_finish_job")

        def undo(h: ctypes.c_void_p, amount: int) -> None:
            for _ in range(amount // _JOB):  # a job is one token: 10,000 in the ledger
                finish(h)

        return receive_call(getattr(lib, self._prefix + "_receive"), self.handle, ticket, undo)

    @contextlib.contextmanager
    def job(self, timeout: Optional[float] = None) -> Iterator[None]:
        """``with throttle.job():`` start_job, then finish_job on exit (also on exceptions)."""
        if not self.start_job(timeout):
            raise TimeoutError(f"{self!r}: no job slot within {timeout} s")
        try:
            yield
        finally:
            self.finish_job()


class Throttle(_JobsMixin):
    """At most ``max_concurrent_jobs`` jobs at once (infinite rate: a counting semaphore)."""

    _prefix = "lim_throttle"
    _close = staticmethod(lib.lim_throttle_close)

    @classmethod
    def open(cls, segment: Segment, key: str, *, max_concurrent_jobs: int,
             adopt_existing: bool = False, now: Optional[float] = None) -> "Throttle":
        h = ctypes.c_void_p()
        check(lib.lim_throttle_open_at(segment_handle(segment), key_bytes(key),
                                       i64(max_concurrent_jobs, "max_concurrent_jobs"),
                                       1 if adopt_existing else 0, at_ns(now), ctypes.byref(h)))
        return cls(h, segment, key)


class ThrottledRateLimiter(_JobsMixin):
    """Jobs started at ``sustained_rate_per_sec`` (bursts of ``burst_size``), at most
    ``max_concurrent_jobs`` at once."""

    _prefix = "lim_throttled_rate_limiter"
    _close = staticmethod(lib.lim_throttled_rate_limiter_close)

    @classmethod
    def open(cls, segment: Segment, key: str, *, burst_size: float,
             sustained_rate_per_sec: float, max_concurrent_jobs: int,
             adopt_existing: bool = False,
             now: Optional[float] = None) -> "ThrottledRateLimiter":
        o = _lib.ThrottledRateLimiterOptions(
            _tokens(burst_size, "burst_size"),
            _tokens(sustained_rate_per_sec, "sustained_rate_per_sec"),
            i64(max_concurrent_jobs, "max_concurrent_jobs"))
        h = ctypes.c_void_p()
        check(lib.lim_throttled_rate_limiter_open_at(segment_handle(segment), key_bytes(key),
                                                     ctypes.byref(o), 1 if adopt_existing else 0,
                                                     at_ns(now), ctypes.byref(h)))
        return cls(h, segment, key)
