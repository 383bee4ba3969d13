"""The base of every Python object that owns one C handle: closes it once, on close(), on
leaving ``with``, or when collected."""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Optional


class Owned:
    _close: Callable[[Any], None]  # the C function that frees the handle
    _h: Optional[ctypes.c_void_p]

    def close(self) -> None:
        """Frees this handle (idempotent). What it opened stays in the segment."""
        h, self._h = self._h, None
        if h:
            type(self)._close(h)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
