"""parse_retry_after: how long a server asked us to wait."""

from __future__ import annotations

import ctypes
from typing import Iterable, Mapping, Optional, Tuple, Union

from ._common import check, lib, out_int, to_ns

Headers = Union[str, bytes, Mapping[str, str], Iterable[Tuple[str, str]]]


def parse_retry_after(value: Optional[Headers], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After value (``"120"`` -> 120.0, or an HTTP-date: IMF-fixdate,
    RFC 850, asctime; a past date gives 0.0), or None for garbage, a negative number or absence.

    ``value`` may also be the response's headers (a mapping such as ``http.client``'s or
    ``requests``' headers, or (name, value) pairs): then ``retry-after-ms`` wins over
    ``retry-after``, names are matched ignoring case. ``now`` is the wall clock as Unix seconds
    (default: the current time), for HTTP-dates.
    """
    found, ms = out_int(), ctypes.c_int64()
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
        if b"\0" in raw:  # the C string would end there ("1\0 2" read as "1"): garbage
            return None
        if now is None:
            check(lib.lim_parse_retry_after(raw, ctypes.byref(found), ctypes.byref(ms)))
        else:
            check(lib.lim_parse_retry_after_at(raw, to_ns(now, "now"), ctypes.byref(found),
                                               ctypes.byref(ms)))
        return ms.value / 1000.0 if found.value else None
    items = value.items() if isinstance(value, Mapping) else value
    # Raw headers (h11, httpx's .raw, ASGI scopes) are (bytes, bytes) pairs.
    text = [(k.decode("latin-1") if isinstance(k, bytes) else str(k),
             v.decode("latin-1") if isinstance(v, bytes) else str(v)) for k, v in items]
    pairs = [(k, v) for k, v in text if k.strip().lower() in ("retry-after", "retry-after-ms")]
    ms_value = next((v for k, v in pairs if k.strip().lower() == "retry-after-ms"), None)
    if ms_value is not None and "\0" not in ms_value:  # with a NUL: garbage, as above
        names = (ctypes.c_char_p * 1)(b"retry-after-ms")
        values = (ctypes.c_char_p * 1)(ms_value.encode("latin-1", "replace"))
        check(lib.lim_parse_retry_after_headers(names, values, 1, ctypes.byref(found),
                                                ctypes.byref(ms)))
        if found.value:
            return ms.value / 1000.0
    plain = next((v for k, v in pairs if k.strip().lower() == "retry-after"), None)
    return None if plain is None else parse_retry_after(plain, now)
