"""Loads liblim and declares the C ABI (lim/lim.h) for ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import sysconfig
from ctypes import (POINTER, Structure, c_char, c_char_p, c_double, c_int, c_int32, c_int64,
                    c_size_t, c_uint32, c_uint64, c_void_p)
from pathlib import Path
from typing import Iterator, List

from ._errors import error_for
from ._version import __version__

_SONAME = "liblim.so." + ".".join(__version__.split(".")[:2])


def _beside_prefix() -> Iterator[Path]:
    """liblim where an install put it: the lib directories of the prefix this package is
    installed under (pip install --prefix, a venv, /usr/local, /usr), then of sys.prefix."""
    here = Path(__file__).resolve().parent
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    prefixes: List[Path] = []
    # .../<prefix>/lib/python3.X/site-packages/lim or .../<prefix>/lib/python3/dist-packages/lim
    for parent in here.parents:
        if parent.name in ("site-packages", "dist-packages") and len(parent.parents) >= 3:
            prefixes.append(parent.parents[2])
            # Debian's pip puts `pip install --prefix P` under P/local/lib/python3.X/dist-packages
            # (its posix_local scheme), while `cmake --install --prefix P` puts liblim in P/lib.
            if parent.parents[2].name == "local" and len(parent.parents) >= 4:
                prefixes.append(parent.parents[3])
            break
    # A source checkout: python/lim next to build trees of the repository.
    repo = here.parent.parent
    if (repo / "lib" / "include" / "lim" / "lim.h").exists():
        for build in ("release", "rel", "debug"):
            yield repo / "build" / build / "lib" / "liblim.so"
    prefixes += [Path(sys.prefix), Path(sys.base_prefix), Path("/usr/local"), Path("/usr")]
    for prefix in prefixes:
        for libdir in ("lib", "lib64", f"lib/{multiarch}" if multiarch else "lib"):
            for name in ("liblim.so", _SONAME):
                yield prefix / libdir / name


def _load() -> ctypes.CDLL:
    env = os.environ.get("LIM_LIBRARY")
    if env:
        try:
            return ctypes.CDLL(env)
        except OSError as e:  # `import lim` fails as an import, naming the variable
            raise ImportError(f"lim: cannot load LIM_LIBRARY={env!r}: {e}") from e
    for candidate in _beside_prefix():
        if candidate.exists():
            return ctypes.CDLL(str(candidate))
    tried = [_SONAME, "liblim.so"]
    found = ctypes.util.find_library("lim")
    if found:
        tried.insert(0, found)
    for name in tried:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    raise ImportError(
        "lim: cannot find liblim; install the library (cmake --install) or set LIM_LIBRARY to the "
        "path of liblim.so")


lib = _load()


# ---- structs (layouts as in lim.h) -------------------------------------------------------------
class SegmentOptions(Structure):
    _fields_ = [("max_limiters", c_uint32), ("max_processes", c_uint32), ("mode", c_uint32),
                ("reap_on_attach", c_int32), ("reap_after_ns", c_int64)]


class SegmentInfo(Structure):
    _fields_ = [("name", c_char * 256), ("size_bytes", c_uint64), ("layout_version", c_uint32),
                ("max_limiters", c_uint32), ("max_processes", c_uint32), ("limiters", c_uint32),
                ("processes", c_uint32), ("created_unix_ns", c_int64)]


class ReturnedHolding(Structure):
    _fields_ = [("kind", c_char_p), ("key", c_char_p), ("layer", c_char_p), ("amount", c_double)]


class DispatchOptions(Structure):
    _fields_ = [("limiter", c_void_p), ("key", c_char_p), ("concurrency", c_uint64),
                ("throttled_concurrency", c_uint64), ("byte_budget", c_uint64),
                ("backoff_window_ns", c_int64), ("byte_penalty_multiplier", c_uint64),
                ("acquire_backoff_base_ns", c_int64), ("acquire_backoff_max_ns", c_int64),
                ("acquire_backoff_jitter", c_double)]


class DispatchSnapshot(Structure):
    _fields_ = [("backoff_active", c_int32), ("backoff_remaining_ns", c_int64),
                ("throttle_remaining_ns", c_int64), ("in_flight", c_uint64),
                ("concurrency", c_uint64), ("throttled_in_flight", c_uint64),
                ("throttled_concurrency", c_uint64), ("bytes_in_flight", c_uint64),
                ("byte_budget", c_uint64), ("waiters", c_uint32),
                ("concurrency_waiters", c_uint32), ("throttled_waiters", c_uint32),
                ("bytes_waiters", c_uint32)]


class Availability(Structure):
    _fields_ = [("kind", c_int32), ("time_ns", c_int64)]


class StartJob(Structure):
    _fields_ = [("kind", c_int32), ("time_ns", c_int64)]


class LimiterState(Structure):
    _fields_ = [("bucket_size", c_double), ("in_bucket", c_double), ("in_hopper", c_double),
                ("in_flight", c_double), ("in_limiter", c_double), ("in_system", c_double),
                ("hopper_to_bucket_rate_per_sec", c_double), ("token_target_level", c_double),
                ("waiters", c_uint32)]


class LimiterConfig(Structure):
    _fields_ = [("hopper_to_bucket_rate_per_sec", c_double), ("bucket_size", c_double),
                ("initial_bucket_level", c_double), ("initial_hopper_level", c_double)]


class TokenBucketOptions(Structure):
    _fields_ = [("burst_size", c_double), ("sustained_rate_per_sec", c_double),
                ("initial_bucket_level", c_double)]


class HandOff(Structure):
    _fields_ = [("slot", c_uint32), ("record", c_uint32), ("owner", c_uint64), ("amount", c_int64),
                ("layer", c_int32), ("reserved", c_uint32)]


class ThrottledRateLimiterOptions(Structure):
    _fields_ = [("burst_size", c_double), ("sustained_rate_per_sec", c_double),
                ("max_concurrent_jobs", c_int64)]


# ---- functions ---------------------------------------------------------------------------------
# lim_should_stop_fn: int (*)(void* context), called on the waiting thread by the _interruptible
# waits (nonzero: stop).
SHOULD_STOP = ctypes.CFUNCTYPE(c_int, c_void_p)
LIM_WAIT_TIMED_OUT, LIM_WAIT_ACQUIRED, LIM_WAIT_STOPPED = 0, 1, 2
H = c_void_p  # every handle
P = POINTER
_I, _U64, _I64, _D = c_int, c_uint64, c_int64, c_double

_SIGNATURES = {
    # name: (restype, argtypes); restype c_int means a status checked by `check`
    "lim_last_error": (c_char_p, []),
    "lim_errc_name": (c_char_p, [_I]),
    "lim_version": (c_char_p, []),
    "lim_now_ns": (_I64, []),
    "lim_segment_options_init": (None, [P(SegmentOptions)]),
    "lim_segment_open_or_create": (_I, [c_char_p, P(SegmentOptions), P(H)]),
    "lim_segment_open": (_I, [c_char_p, P(SegmentOptions), P(H)]),
    "lim_segment_remove": (_I, [c_char_p, P(_I)]),
    "lim_segment_close": (None, [H]),
    "lim_segment_info_get": (_I, [H, P(SegmentInfo)]),
    "lim_segment_is_creator": (_I, [H, P(_I)]),
    "lim_segment_reap": (_I, [H, P(H)]),
    "lim_reap_report_count": (c_size_t, [H]),
    "lim_reap_report_pid": (_I, [H, c_size_t]),
    "lim_reap_report_returned_count": (c_size_t, [H, c_size_t]),
    "lim_reap_report_returned": (_I, [H, c_size_t, c_size_t, P(ReturnedHolding)]),
    "lim_reap_report_deferred_count": (c_size_t, [H]),
    "lim_reap_report_deferred": (c_char_p, [H, c_size_t]),
    "lim_reap_report_free": (None, [H]),
    "lim_segment_reset": (_I, [H, c_char_p, _I]),
    "lim_backoff_window_for_key": (_I, [H, c_char_p, P(H)]),
    "lim_backoff_window_set": (_I, [H, _I64]),
    "lim_backoff_window_set_at": (_I, [H, _I64, _I64]),
    "lim_backoff_window_should_backoff": (_I, [H, P(_I)]),
    "lim_backoff_window_should_backoff_at": (_I, [H, _I64, P(_I)]),
    "lim_backoff_window_remaining": (_I, [H, P(_I64)]),
    "lim_backoff_window_remaining_at": (_I, [H, _I64, P(_I64)]),
    "lim_backoff_window_until": (_I, [H, P(_I), P(_I64)]),
    "lim_backoff_window_sets": (_I, [H, P(_U64)]),
    "lim_backoff_window_wait_until": (_I, [H, _I64, P(_I)]),
    "lim_backoff_window_clear": (_I, [H]),
    "lim_backoff_window_close": (None, [H]),
    "lim_dispatch_options_init": (None, [P(DispatchOptions)]),
    "lim_dispatch_open": (_I, [H, P(DispatchOptions), _I, P(H)]),
    "lim_dispatch_acquire": (_I, [H, _U64, H]),
    "lim_dispatch_try_acquire": (_I, [H, _U64, H, P(_I)]),
    "lim_dispatch_acquire_until": (_I, [H, _U64, _I64, H, P(_I)]),
    "lim_dispatch_acquire_until_interruptible": (_I, [H, _U64, _I64, H, SHOULD_STOP, c_void_p,
                                                      _I64, P(_I)]),
    "lim_dispatch_set_backoff": (_I, [H, _I64]),
    "lim_dispatch_backoff_active": (_I, [H, P(_I)]),
    "lim_dispatch_snapshot_get": (_I, [H, P(DispatchSnapshot)]),
    "lim_dispatch_close": (None, [H]),
    "lim_permit_create": (_I, [P(H)]),
    "lim_permit_release": (_I, [H]),
    "lim_permit_held": (_I, [H]),
    "lim_permit_bytes": (_U64, [H]),
    "lim_permit_throttled": (_I, [H]),
    "lim_permit_destroy": (None, [H]),
    "lim_limiter_open_at": (_I, [H, c_char_p, P(LimiterConfig), _I, _I64, P(H)]),
    "lim_limiter_try_take": (_I, [H, _D, P(_I)]),
    "lim_limiter_try_take_at": (_I, [H, _I64, _D, P(_I)]),
    "lim_limiter_take_until": (_I, [H, _D, _I64, P(_I)]),
    "lim_limiter_return_to_hopper": (_I, [H, _D]),
    "lim_limiter_return_to_hopper_at": (_I, [H, _I64, _D]),
    "lim_limiter_tokens_may_be_available_when_at": (_I, [H, _I64, _D, P(Availability)]),
    "lim_limiter_set_token_target_level_at": (_I, [H, _I64, _D]),
    "lim_limiter_set_bucket_size_at": (_I, [H, _I64, _D]),
    "lim_limiter_set_hopper_to_bucket_rate_per_sec_at": (_I, [H, _I64, _D]),
    "lim_limiter_state_get_at": (_I, [H, _I64, P(LimiterState)]),
    "lim_limiter_invariant": (_I, [H]),
    "lim_limiter_close": (None, [H]),
    "lim_token_bucket_open_at": (_I, [H, c_char_p, P(TokenBucketOptions), _I, _I64, P(H)]),
    "lim_token_bucket_try_take": (_I, [H, _D, P(_I)]),
    "lim_token_bucket_try_take_at": (_I, [H, _I64, _D, P(_I)]),
    "lim_token_bucket_take_until": (_I, [H, _D, _I64, P(_I)]),
    "lim_token_bucket_tokens_may_be_available_when_at": (_I, [H, _I64, _D, P(Availability)]),
    "lim_token_bucket_state_get_at": (_I, [H, _I64, P(LimiterState)]),
    "lim_token_bucket_close": (None, [H]),
    "lim_parse_retry_after": (_I, [c_char_p, P(_I), P(_I64)]),
    "lim_parse_retry_after_at": (_I, [c_char_p, _I64, P(_I), P(_I64)]),
    "lim_parse_retry_after_headers": (_I, [P(c_char_p), P(c_char_p), c_size_t, P(_I), P(_I64)]),
}
for _prefix in ("lim_semaphore", "lim_weighted_semaphore"):
    _SIGNATURES.update({
        f"{_prefix}_open": (_I, [H, c_char_p, _U64, _I, P(H)]),
        f"{_prefix}_try_acquire": (_I, [H, _U64, P(_I)]),
        f"{_prefix}_acquire_until": (_I, [H, _U64, _I64, P(_I)]),
        f"{_prefix}_acquire_until_interruptible": (_I, [H, _U64, _I64, SHOULD_STOP, c_void_p, _I64,
                                                        P(_I)]),
        f"{_prefix}_release": (_I, [H, _U64]),
        f"{_prefix}_in_use": (_I, [H, P(_U64)]),
        f"{_prefix}_capacity": (_I, [H, P(_U64)]),
        f"{_prefix}_waiters": (_I, [H, P(c_uint32)]),
        f"{_prefix}_hand_off": (_I, [H, _U64, P(HandOff)]),
        f"{_prefix}_receive": (_I, [H, P(HandOff), P(_I)]),
        f"{_prefix}_close": (None, [H]),
    })
for _prefix in ("lim_throttle", "lim_throttled_rate_limiter"):
    _SIGNATURES.update({
        f"{_prefix}_try_start_job": (_I, [H, P(StartJob)]),
        f"{_prefix}_try_start_job_at": (_I, [H, _I64, P(StartJob)]),
        f"{_prefix}_start_job_until": (_I, [H, _I64, P(_I)]),
        f"{_prefix}_finish_job": (_I, [H]),
        f"{_prefix}_finish_job_at": (_I, [H, _I64]),
        f"{_prefix}_state_get_at": (_I, [H, _I64, P(LimiterState)]),
        f"{_prefix}_hand_off_jobs": (_I, [H, _I64, P(HandOff)]),
        f"{_prefix}_receive": (_I, [H, P(HandOff), P(_I)]),
        f"{_prefix}_close": (None, [H]),
    })
_SIGNATURES["lim_throttle_open_at"] = (_I, [H, c_char_p, _I64, _I, _I64, P(H)])
_SIGNATURES["lim_throttled_rate_limiter_open_at"] = (
    _I, [H, c_char_p, P(ThrottledRateLimiterOptions), _I, _I64, P(H)])

for _name, (_restype, _argtypes) in _SIGNATURES.items():
    _f = getattr(lib, _name)
    _f.restype = _restype
    _f.argtypes = _argtypes


def check(rc: int) -> None:
    """Raises the lim.Error subclass for a nonzero status of the C ABI."""
    if rc != 0:
        message = (lib.lim_last_error() or b"").decode("utf-8", "replace")
        raise error_for(rc, message)


def library_path() -> str:
    """The path liblim was loaded from (for diagnostics)."""
    return str(getattr(lib, "_name", ""))

