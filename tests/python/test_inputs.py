"""Inputs a real caller may pass by mistake or a server may send: refused with the right
lim.Error subclass, never silently misread."""

import math

import pytest

import lim


def test_retry_after_with_a_nul_is_garbage():
    # The C ABI takes NUL-terminated strings: "1\0 2" must not be read as "1".
    for value in ("1\x002", "\x00", "120\x00"):
        assert lim.parse_retry_after(value) is None
        assert lim.parse_retry_after(value.encode()) is None
        assert lim.parse_retry_after({"Retry-After": value}) is None
        assert lim.parse_retry_after({"Retry-After-Ms": value}) is None
    assert lim.parse_retry_after({"Retry-After-Ms": "5\x00", "Retry-After": "2"}) == 2.0
    assert lim.parse_retry_after("120") == 120.0


def test_dispatch_options_of_the_wrong_type_are_invalid_argument(seg):
    window = lim.BackoffWindow.for_key(seg, "opts")
    for bad in ("x", None, True, math.nan, -0.5, 2.0):
        with pytest.raises(lim.InvalidArgument):
            lim.Dispatch.open(seg, limiter=window, key="opts", acquire_backoff_jitter=bad)
    api = lim.Dispatch.open(seg, limiter=window, key="opts", acquire_backoff_jitter=0)
    assert api.snapshot().concurrency == 400
