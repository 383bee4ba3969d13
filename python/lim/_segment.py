"""Segment: the named shared-memory segment every limiter lives in."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import List, Optional

from . import _lib
from ._common import NS, check, key_bytes, lib, out_int, to_ns, u32
from ._owned import Owned


@dataclass(frozen=True)
class SegmentInfo:
    """What ``Segment.info()`` reports (``created`` is Unix time in seconds)."""

    name: str
    size_bytes: int
    layout_version: int
    max_limiters: int
    max_processes: int
    limiters: int
    processes: int
    created: float


@dataclass(frozen=True)
class ReturnedHolding:
    """What a reap gave back for a dead process in one layer of one record."""

    kind: str
    key: str
    layer: str
    amount: float


@dataclass(frozen=True)
class ReapedProcess:
    pid: int
    returned: List[ReturnedHolding] = field(default_factory=list)


@dataclass(frozen=True)
class ReapReport:
    """One entry per dead process found and cleared; ``deferred`` lists keys that could not be
    recounted now (the next reap tries again)."""

    reaped: List[ReapedProcess]
    deferred: List[str]

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.reaped]


class Segment(Owned):
    """A handle on the shared-memory segment ``/dev/shm/lim.<name>``.

    Usable from any thread and, after ``os.fork()``, from the child without reopening (its first
    use registers the child's own process slot). Closing the handle (or letting it be collected)
    leaves the limiters opened from it working.
    """

    _close = staticmethod(lib.lim_segment_close)

    def __init__(self, handle: ctypes.c_void_p, name: str) -> None:
        self._h = handle
        self._name = name

    @classmethod
    def open_or_create(cls, name: str, *, max_limiters: int = 256, max_processes: int = 1024,
                       mode: int = 0o600, reap_after: float = 1.0,
                       reap_on_attach: bool = True) -> "Segment":
        """Attaches to segment ``name``, creating it with these options if it does not exist
        (safe to race: exactly one creator initialises it). Raises InvalidName, InvalidArgument,
        CorruptSegment, VersionMismatch, PermissionDenied, TableFull, SystemError."""
        opts = _lib.SegmentOptions(u32(max_limiters, "max_limiters"),
                                   u32(max_processes, "max_processes"), u32(mode, "mode"),
                                   1 if reap_on_attach else 0,
                                   to_ns(reap_after, "reap_after"))
        h = ctypes.c_void_p()
        check(lib.lim_segment_open_or_create(key_bytes(name, "name"), ctypes.byref(opts),
                                             ctypes.byref(h)))
        return cls(h, name)

    @classmethod
    def open(cls, name: str, *, reap_after: Optional[float] = None,
             reap_on_attach: Optional[bool] = None) -> "Segment":
        """Attaches to an existing segment; raises NotFound if there is none."""
        h = ctypes.c_void_p()
        opts_p = None
        if reap_after is not None or reap_on_attach is not None:
            opts = _lib.SegmentOptions()
            lib.lim_segment_options_init(ctypes.byref(opts))
            if reap_after is not None:
                opts.reap_after_ns = to_ns(reap_after, "reap_after")
            if reap_on_attach is not None:
                opts.reap_on_attach = 1 if reap_on_attach else 0
            opts_p = ctypes.byref(opts)
        check(lib.lim_segment_open(key_bytes(name, "name"), opts_p, ctypes.byref(h)))
        return cls(h, name)

    @staticmethod
    def remove(name: str) -> bool:
        """Unlinks the segment's name (attached processes keep their memory). False if absent."""
        removed = out_int()
        check(lib.lim_segment_remove(key_bytes(name, "name"), ctypes.byref(removed)))
        return bool(removed.value)

    @property
    def name(self) -> str:
        return self._name

    @property
    def handle(self) -> ctypes.c_void_p:
        if not self._h:
            raise ValueError("the segment handle is closed")
        return self._h

    @property
    def is_creator(self) -> bool:
        """True when this handle's open_or_create created and initialised the segment."""
        v = out_int()
        check(lib.lim_segment_is_creator(self.handle, ctypes.byref(v)))
        return bool(v.value)

    def info(self) -> SegmentInfo:
        """Geometry and counts, read without stopping anyone."""
        i = _lib.SegmentInfo()
        check(lib.lim_segment_info_get(self.handle, ctypes.byref(i)))
        return SegmentInfo(i.name.decode(), i.size_bytes, i.layout_version, i.max_limiters,
                           i.max_processes, i.limiters, i.processes, i.created_unix_ns / NS)

    def reap(self) -> ReapReport:
        """Finds processes in the segment that are dead (pid gone or reused) and gives back
        exactly what each held to every limiter. Blocks while another reap or reset runs."""
        rep = ctypes.c_void_p()
        with self._blocking() as h:  # it may wait for another reap: h stays valid meanwhile
            check(lib.lim_segment_reap(h, ctypes.byref(rep)))
        try:
            reaped = []
            for i in range(lib.lim_reap_report_count(rep)):
                returned = []
                for j in range(lib.lim_reap_report_returned_count(rep, i)):
                    h = _lib.ReturnedHolding()
                    check(lib.lim_reap_report_returned(rep, i, j, ctypes.byref(h)))
                    returned.append(ReturnedHolding(h.kind.decode(), h.key.decode(),
                                                    h.layer.decode(), h.amount))
                reaped.append(ReapedProcess(lib.lim_reap_report_pid(rep, i), returned))
            deferred = [lib.lim_reap_report_deferred(rep, i).decode()
                        for i in range(lib.lim_reap_report_deferred_count(rep))]
            return ReapReport(reaped, deferred)
        finally:
            lib.lim_reap_report_free(rep)

    def reset(self, key: Optional[str] = None, *, force: bool = False) -> None:
        """Re-initialises one record (``key``) or all to their configured state. Raises Busy
        while other live processes are attached unless ``force``, and (even forced) for a record
        a live process stays in the middle of an operation on for over a second (left unchanged,
        the others reset); NotFound for an unknown key."""
        check(lib.lim_segment_reset(self.handle, None if key is None else key_bytes(key),
                                    1 if force else 0))

    def __repr__(self) -> str:
        return f"lim.Segment({self._name!r})"
