"""The base of every Python object that owns one C handle: closes it once, on close(), on
leaving ``with``, or when collected."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any, Callable, Iterator, Optional

# Guards close() against the entry and exit of blocking calls (the rare paths only; the
# non-blocking calls take no lock). Reentrant: a garbage collection that runs while this thread
# holds it may close another handle.
_lock = threading.RLock()


def _reinit_lock_in_child() -> None:
    # A fork() while another thread held the lock would leave the child's copy held forever.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reinit_lock_in_child)


class Owned:
    _close: Callable[[Any], None]  # the C function that frees the handle
    _h: Optional[ctypes.c_void_p]
    _blocked = 0  # blocking calls on this handle now inside the C library, in any thread
    _deferred: Optional[ctypes.c_void_p] = None  # closed while blocked: the last one frees it

    def close(self) -> None:
        """Frees this handle (idempotent). What it opened stays in the segment. A call blocked
        on this handle in another thread keeps the C handle alive until it leaves, which it does
        with ValueError within about 50 ms (its next slice or check); do not close a handle while
        another thread is in one of its non-blocking calls."""
        with _lock:
            h, self._h = self._h, None
            if h and self._blocked:
                self._deferred, h = h, None
        if h:
            type(self)._close(h)

    @contextlib.contextmanager
    def _blocking(self) -> Iterator[ctypes.c_void_p]:
        """The C handle, kept alive for a blocking call even if another thread closes this object
        meanwhile (freeing it under a thread blocked in the library would be a use after free).
        The call checks ``_closed_while_waiting`` between slices, or in its wait's check."""
        with _lock:
            h = self._h
            if not h:
                raise ValueError(f"{self!r} is closed")
            self._blocked += 1
        try:
            yield h
        finally:
            with _lock:
                self._blocked -= 1
                h = None
                if not self._blocked and self._deferred:
                    h, self._deferred = self._deferred, None
            if h:
                type(self)._close(h)

    def _closed_while_waiting(self) -> None:
        if not self._h:
            raise ValueError(f"{self!r} was closed while a call waited on it")

    # A copy is the same handle: two Python owners of one C handle would both free it.
    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: Any) -> Any:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"cannot pickle {self!r}: a lim handle belongs to this process; send "
                        f"its segment name and key and open it in the other process")

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
