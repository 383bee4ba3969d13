"""lim: rate, concurrency and byte limits shared by every process on a host.

A ctypes binding of liblim (the C++ library; see docs/python.md). Every limit lives in a named
POSIX shared-memory segment; any process that opens the same segment and key shares it: forked
workers, unrelated Python processes, and C++ programs alike.

    import lim
    seg = lim.Segment.open_or_create("myapp")
    window = lim.BackoffWindow.for_key(seg, "my_api")
    api = lim.Dispatch.open(seg, limiter=window, key="my_api", concurrency=100,
                            throttled_concurrency=5, byte_budget=5_000_000)
    with api.permit(len(body)):
        ...

Times are seconds as float (``now=`` arguments and returned times are on CLOCK_MONOTONIC, the
clock of ``time.monotonic()``). Errors are ``lim.Error`` subclasses, one per ``lim.Errc``.
liblim is found through ``LIM_LIBRARY`` (a path), else beside this package's installed prefix,
else by the dynamic loader.
"""

from ._common import now
from ._dispatch import Dispatch, DispatchSnapshot, Permit
from ._errors import (AlreadyExists, Busy, ConfigMismatch, CorruptSegment, Errc, Error,
                      InvalidArgument, InvalidName, NotFound, OverRelease, PermissionDenied,
                      SystemError, TableFull, VersionMismatch)
from ._hand_off import HandOff
from ._lib import library_path
from ._limiter import (Availability, AvailabilityKind, Limiter, LimiterState, StartJob,
                       StartJobKind, Throttle, ThrottledRateLimiter, TokenBucket, TryTake)
from ._retry_after import parse_retry_after
from ._segment import ReapedProcess, ReapReport, ReturnedHolding, Segment, SegmentInfo
from ._semaphore import BackoffWindow, Semaphore, WeightedSemaphore
from ._version import __version__

__all__ = [
    "AlreadyExists", "Availability", "AvailabilityKind", "BackoffWindow", "Busy",
    "ConfigMismatch", "CorruptSegment", "Dispatch", "DispatchSnapshot", "Errc", "Error",
    "HandOff", "InvalidArgument", "InvalidName", "Limiter", "LimiterState", "NotFound",
    "OverRelease", "Permit", "PermissionDenied", "ReapReport", "ReapedProcess",
    "ReturnedHolding", "Segment", "SegmentInfo", "Semaphore", "StartJob", "StartJobKind",
    "SystemError", "TableFull", "Throttle", "ThrottledRateLimiter", "TokenBucket", "TryTake",
    "VersionMismatch", "WeightedSemaphore", "__version__", "library_path", "now",
    "parse_retry_after",
]
