"""The Python block of SPEC.md, checked as an outside user would: names, signatures and defaults,
and arguments that ctypes would otherwise silently wrap, truncate or misread."""

import inspect
import os

import pytest

import lim


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_spec_signatures_and_defaults():
    assert _defaults(lim.Segment.open_or_create).items() >= {
        "max_limiters": 256, "max_processes": 1024, "mode": 0o600}.items()
    assert _defaults(lim.Semaphore.acquire) == {"n": 1, "timeout": None}
    assert _defaults(lim.Semaphore.try_acquire) == {"n": 1}
    assert _defaults(lim.Semaphore.release) == {"n": 1}
    d = _defaults(lim.Dispatch.open)
    assert {k: d[k] for k in ("key", "concurrency", "throttled_concurrency", "byte_budget",
                              "backoff_window", "byte_penalty_multiplier")} == {
        "key": "default", "concurrency": 400, "throttled_concurrency": 10,
        "byte_budget": 5_000_000, "backoff_window": 10.0, "byte_penalty_multiplier": 20}
    assert "limiter" not in d  # required
    assert _defaults(lim.TokenBucket.open)["initial_bucket_level"] == 0
    assert _defaults(lim.Dispatch.acquire)["timeout"] is None
    assert [t.name for t in lim.TryTake] == ["TAKEN", "UNABLE", "ASKED_FOR_MORE_THAN_BUCKET_SIZE"]


def test_cpp_spellings_of_errc_and_try_take_are_aliases(seg):
    # SPEC names lim::Errc::not_found etc.; in Python both spellings name the same member.
    assert lim.Errc.not_found is lim.Errc.NOT_FOUND and lim.Errc.busy is lim.Errc.BUSY
    assert len(lim.Errc) == 12  # aliases are not extra members
    assert lim.TryTake.taken is lim.TryTake.TAKEN
    assert lim.TryTake.asked_for_more_than_bucket_size is \
        lim.TryTake.ASKED_FOR_MORE_THAN_BUCKET_SIZE
    with pytest.raises(lim.NotFound) as e:
        lim.Segment.open(seg.name + "-absent")
    assert e.value.code == lim.Errc.not_found
    tb = lim.TokenBucket.open(seg, "tb", burst_size=2, sustained_rate_per_sec=1)
    assert tb.try_take(3) is lim.TryTake.asked_for_more_than_bucket_size


@pytest.mark.parametrize("suffix", ["-cut\0cd", "-cut\0", "-cut\udc80"])
def test_nul_or_unencodable_names_and_keys_are_invalid_names(seg, seg_name, suffix):
    # A NUL would cut the C string short: "<name>-cut\0cd" must not open "<name>-cut".
    bad = seg_name + suffix
    with pytest.raises(lim.InvalidName):
        lim.Segment.open_or_create(bad)
    with pytest.raises(lim.InvalidName):
        lim.Segment.open(bad)
    with pytest.raises(lim.InvalidName):
        lim.Segment.remove(bad)
    with pytest.raises(lim.InvalidName):
        lim.Semaphore.open(seg, bad, capacity=1)
    with pytest.raises(lim.InvalidName):
        lim.BackoffWindow.for_key(seg, bad)
    with pytest.raises(lim.InvalidName):
        lim.TokenBucket.open(seg, bad, burst_size=1, sustained_rate_per_sec=1)
    assert not os.path.exists(f"/dev/shm/lim.{seg_name}-cut")
    assert seg.info().limiters == 0


@pytest.mark.parametrize("kw", [{"max_limiters": 2**32 + 8}, {"max_processes": 2**32 + 16},
                                {"mode": 2**32 + 0o600}, {"max_limiters": -1},
                                {"max_processes": 1.5}, {"mode": "600"}])
def test_segment_options_are_never_wrapped(seg_name, kw):
    # ctypes' uint32 would turn 2**32 + 8 into 8 and create a segment nobody asked for.
    with pytest.raises(lim.InvalidArgument):
        lim.Segment.open_or_create(seg_name, **kw)
    with pytest.raises(lim.NotFound):
        lim.Segment.open(seg_name)


@pytest.mark.parametrize("jobs", [2**64 + 1, 2**63, 1.7, "3"])
def test_max_concurrent_jobs_is_never_wrapped_or_truncated(seg, jobs):
    with pytest.raises(lim.InvalidArgument):
        lim.Throttle.open(seg, "th", max_concurrent_jobs=jobs)
    with pytest.raises(lim.InvalidArgument):
        lim.ThrottledRateLimiter.open(seg, "trl", burst_size=1, sustained_rate_per_sec=1,
                                      max_concurrent_jobs=jobs)
    assert seg.info().limiters == 0


def test_a_handle_of_the_wrong_kind_is_refused_not_misread(seg):
    window = lim.BackoffWindow.for_key(seg, "w")
    sem = lim.Semaphore.open(seg, "s", capacity=1)
    with pytest.raises(lim.InvalidArgument):  # a Segment where a BackoffWindow belongs
        lim.Dispatch.open(seg, limiter=seg, key="d")
    with pytest.raises(lim.InvalidArgument):
        lim.Dispatch.open(seg, limiter=sem, key="d")
    with pytest.raises(lim.InvalidArgument):  # a limiter handle where a Segment belongs
        lim.Semaphore.open(window, "x", capacity=1)
    with pytest.raises(lim.InvalidArgument):
        lim.TokenBucket.open(sem, "x", burst_size=1, sustained_rate_per_sec=1)
    with pytest.raises(lim.InvalidArgument):
        lim.BackoffWindow.for_key("not a segment", "x")
    assert lim.Dispatch.open(seg, limiter=window, key="d").snapshot().concurrency == 400


def test_parse_retry_after_headers_as_raw_byte_pairs():
    # Raw headers from h11 / ASGI are (bytes, bytes) pairs; str(b"x") would be "b'x'".
    assert lim.parse_retry_after([(b"Retry-After", b"7")]) == 7.0
    assert lim.parse_retry_after([(b"retry-after", b"7"), (b"retry-after-ms", b"250")]) == 0.25
    assert lim.parse_retry_after([(b"content-type", b"text/plain")]) is None
