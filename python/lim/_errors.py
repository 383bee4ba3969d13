"""lim's exceptions: one base class, one subclass per error code of the C ABI."""

from __future__ import annotations

import builtins
import enum
from typing import Dict, Optional, Type


class Errc(enum.IntEnum):
    """What went wrong; the numbers are lim::Errc's (stable, see lim.h)."""

    INVALID_NAME = 1
    INVALID_ARGUMENT = 2
    NOT_FOUND = 3
    ALREADY_EXISTS = 4
    CORRUPT_SEGMENT = 5
    VERSION_MISMATCH = 6
    CONFIG_MISMATCH = 7
    TABLE_FULL = 8
    PERMISSION_DENIED = 9
    OVER_RELEASE = 10
    SYSTEM_ERROR = 11
    BUSY = 12
    # C++'s spellings (lim::Errc::not_found), as aliases: lim.Errc.not_found is lim.Errc.NOT_FOUND.
    invalid_name = 1
    invalid_argument = 2
    not_found = 3
    already_exists = 4
    corrupt_segment = 5
    version_mismatch = 6
    config_mismatch = 7
    table_full = 8
    permission_denied = 9
    over_release = 10
    system_error = 11
    busy = 12


class Error(Exception):
    """Raised by every lim call that fails; ``code`` tells what went wrong, ``str()`` names the
    segment or key involved."""

    code: Errc = Errc.SYSTEM_ERROR

    def __init__(self, message: str, code: Optional[Errc] = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidName(Error):
    """A segment name or key outside ``[A-Za-z0-9._-]`` (keys also ``:``) or too long."""

    code = Errc.INVALID_NAME


class InvalidArgument(Error, builtins.ValueError):
    """An option or amount out of range (negative, NaN, zero capacity, ...)."""

    code = Errc.INVALID_ARGUMENT


class NotFound(Error):
    """The segment (or key) does not exist."""

    code = Errc.NOT_FOUND


class AlreadyExists(Error):
    """The object exists and a new one was asked for."""

    code = Errc.ALREADY_EXISTS


class CorruptSegment(Error):
    """The segment's header or tables fail validation."""

    code = Errc.CORRUPT_SEGMENT


class VersionMismatch(Error):
    """The segment was written by another layout version of lim."""

    code = Errc.VERSION_MISMATCH


class ConfigMismatch(Error):
    """The key exists with another configuration (pass ``adopt_existing=True`` to attach)."""

    code = Errc.CONFIG_MISMATCH


class TableFull(Error):
    """No free record or process slot in the segment."""

    code = Errc.TABLE_FULL


class PermissionDenied(Error, builtins.PermissionError):
    """The caller may not open or change the segment."""

    code = Errc.PERMISSION_DENIED


class OverRelease(Error):
    """More released or returned than is held."""

    code = Errc.OVER_RELEASE


class SystemError(Error):  # noqa: A001 - lim.SystemError mirrors Errc.SYSTEM_ERROR
    """An operating-system call failed (``/dev/shm`` full, ...)."""

    code = Errc.SYSTEM_ERROR


class Busy(Error):
    """Refused while other processes are attached (``Segment.reset`` without ``force``), or a
    segment lock stayed held by a neighbour that is stopped or slow (try again)."""

    code = Errc.BUSY


ERROR_CLASSES: Dict[Errc, Type[Error]] = {
    cls.code: cls
    for cls in (InvalidName, InvalidArgument, NotFound, AlreadyExists, CorruptSegment,
                VersionMismatch, ConfigMismatch, TableFull, PermissionDenied, OverRelease,
                SystemError, Busy)
}


def error_for(code: int, message: str) -> Error:
    """The exception for status ``code`` of the C ABI."""
    try:
        errc = Errc(code)
    except ValueError:
        return Error(f"{message} (unknown lim status {code})")
    return ERROR_CLASSES[errc](message)
