"""HandOff: a holding on its way from one process to another (lim/hand_off.hpp)."""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Optional, Tuple, Union

from . import _lib
from ._common import check, out_int
from ._errors import InvalidArgument

SIZE = ctypes.sizeof(_lib.HandOff)  # 32, as lim::HandOff


class HandOff:
    """A ticket for units one process handed off (``sem.hand_off(n)``,
    ``throttle.hand_off_jobs(n)``) for another process to ``receive``.

    It is plain data, free of pointers: send ``bytes(ticket)`` (32 bytes, the layout of
    ``lim::HandOff`` and the C ``lim_hand_off``, so C++ peers read the same bytes) through a pipe
    or socket and rebuild it with ``HandOff.from_bytes``, or pickle it (a ``multiprocessing``
    Pipe or Queue does). The receiver must have opened the same segment and key. Copying a ticket
    does not copy the units: the first ``receive`` wins, later ones return False."""

    __slots__ = ("_c",)

    def __init__(self, c: _lib.HandOff) -> None:
        self._c = c

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview]) -> "HandOff":
        """The ticket whose bytes are ``data`` (what ``bytes(ticket)`` gave). Raises
        InvalidArgument unless it is exactly 32 bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"a HandOff is built from bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) != SIZE:
            raise InvalidArgument(f"a HandOff is {SIZE} bytes, not {len(data)}")
        return cls(_lib.HandOff.from_buffer_copy(data))

    def __bytes__(self) -> bytes:
        return bytes(self._c)

    def to_bytes(self) -> bytes:
        """The ticket's 32 bytes (the same as ``bytes(ticket)``)."""
        return bytes(self._c)

    def __reduce__(self) -> Tuple[Callable[..., "HandOff"], Tuple[bytes]]:
        return (HandOff.from_bytes, (bytes(self._c),))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, HandOff) and bytes(self) == bytes(other)

    def __hash__(self) -> int:
        return hash(bytes(self))

    @property
    def slot(self) -> int:
        """The parcel's slot in the segment's process table."""
        return int(self._c.slot)

    @property
    def record(self) -> int:
        """The limiter's record in the segment (a receive through another limiter is refused)."""
        return int(self._c.record)

    @property
    def amount(self) -> int:
        """The amount as the ledger records it (units or jobs; a limiter's in fixed point)."""
        return int(self._c.amount)

    @property
    def layer(self) -> int:
        """The ledger layer the units belong to."""
        return int(self._c.layer)

    def __repr__(self) -> str:
        c = self._c
        return (f"lim.HandOff(slot={c.slot}, record={c.record}, owner={c.owner:#x}, "
                f"amount={c.amount}, layer={c.layer})")


def _as_c(h: Union[HandOff, bytes, bytearray, memoryview]) -> _lib.HandOff:
    if isinstance(h, HandOff):
        return h._c
    if isinstance(h, (bytes, bytearray, memoryview)):
        return HandOff.from_bytes(h)._c
    raise InvalidArgument(f"receive takes a lim.HandOff (or its bytes), not {type(h).__name__}")


def hand_off_call(fn: Callable[..., int], handle: ctypes.c_void_p, n: int) -> HandOff:
    """``fn(handle, n, lim_hand_off* out)``: a new ticket, or the C call's error raised."""
    out = _lib.HandOff()
    check(fn(handle, n, ctypes.byref(out)))
    return HandOff(out)


def receive_call(fn: Callable[..., int], handle: ctypes.c_void_p,
                 h: Union[HandOff, bytes, bytearray, memoryview],
                 undo: Optional[Callable[[ctypes.c_void_p, int], object]] = None) -> bool:
    """``fn(handle, const lim_hand_off*, int* received)``: whether the parcel was still there.
    ``undo(handle, amount)`` gives back the received units if an exception (a signal handler's)
    leaves before the caller learns it holds them (_common.undo_if_taken)."""
    c = _as_c(h)
    ok = out_int()
    try:
        check(fn(handle, ctypes.byref(c), ctypes.byref(ok)))
        return bool(ok.value)
    except BaseException:
        if ok.value and undo is not None:
            undo(handle, int(c.amount))
        raise
