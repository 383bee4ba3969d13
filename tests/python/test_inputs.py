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


def test_rate_limited_generators_hold_the_permit_while_they_run(seg):
    """A decorated generator (a streamed response, say) runs its body when iterated, not when
    called: the permit must be held then, and given back when it ends or is closed."""
    import asyncio

    api = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "gen"), key="gen",
                            concurrency=1)

    @api.rate_limited(10)
    def chunks(n):
        for i in range(n):
            yield api.snapshot().in_flight

    assert list(chunks(3)) == [1, 1, 1]
    assert api.snapshot().in_flight == 0
    g = chunks(5)
    assert next(g) == 1 and api.snapshot().bytes_in_flight == 10
    g.close()
    assert api.snapshot().in_flight == 0

    @api.rate_limited(lambda n: n)
    async def achunks(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield api.snapshot().bytes_in_flight

    async def main():
        seen = [b async for b in achunks(7)]
        assert seen == [7] * 7
        assert api.snapshot().in_flight == 0
        # Two at once with concurrency 1: never both inside.
        async def drain():
            return [b async for b in achunks(3)]
        both = await asyncio.gather(drain(), drain())
        assert both == [[3] * 3, [3] * 3]

    asyncio.run(main())
    assert api.snapshot().in_flight == 0
