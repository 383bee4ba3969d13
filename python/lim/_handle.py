"""The base of every limiter handle: owns one C handle, closes it once."""

from __future__ import annotations

import ctypes

from ._owned import Owned
from ._segment import Segment


class Handle(Owned):
    def __init__(self, handle: ctypes.c_void_p, segment: Segment, key: str) -> None:
        self._h = handle
        self._segment = segment
        self._key = key

    @property
    def key(self) -> str:
        return self._key

    @property
    def segment(self) -> Segment:
        return self._segment

    @property
    def handle(self) -> ctypes.c_void_p:
        if not self._h:
            raise ValueError(f"the handle of {self._key!r} is closed")
        return self._h

    def __repr__(self) -> str:
        return f"lim.{type(self).__name__}({self._segment.name!r}, {self._key!r})"
