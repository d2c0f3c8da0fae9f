"""The I/O log: every host write, flush and truncate a workload makes, in order, with the
driver's markers (guest write started, guest flush returned, bitmap created/removed, close).

RecordingHostFile is a HostFile that does its I/O on a working copy and appends each write
(file, offset, bytes, calling qcowfs function), flush and truncate to a shared IOLog;
recording_factory() makes one for the image and for its external data file (Qcow2Image's
file_factory). replay_all() applies a log to the pristine bytes.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

from qcowfs.engine.hostfile import HostFile

if TYPE_CHECKING:
    from typing_extensions import Buffer  # what HostFile.pwrite takes: bytes or any buffer of them

SECTOR = 512

W, F, T, M = "w", "f", "t", "m"  # log entry kinds: write, flush, truncate, marker
#: a log entry: (W, file, offset, bytes, caller) | (F, file, caller) | (T, file, length, caller) | (M, kind, value)
Entry = tuple[Any, ...]

# frames in this package are the harness, not the qcowfs code that asked for the I/O
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class IOLog:
    """The shared, ordered log of every host write, flush and truncate (and driver markers)."""

    def __init__(self, record_flushes: bool = True, record_callers: bool = True):
        #: (W, file, offset, bytes, caller) | (F, file, caller) | (T, file, length, caller) | (M, kind, value)
        self.entries: list[Entry] = []
        self.record_flushes = record_flushes
        self.record_callers = record_callers

    def _caller(self) -> str:
        if not self.record_callers:
            return ""
        # the qcowfs function that asked for the I/O (skip the HostFile layers, an encrypted
        # image's sector cipher wrapper around them, and this package)
        f: Optional[FrameType] = sys._getframe(2)
        while f is not None and (
            f.f_code.co_filename.startswith(_PACKAGE_DIR)
            or f.f_code.co_filename.endswith(("hostfile.py", "encrypted_data.py"))
        ):
            f = f.f_back
        if f is None:
            return "?"
        return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"

    def write(self, name: str, offset: int, data: bytes) -> None:
        self.entries.append((W, name, offset, data, self._caller()))

    def flush(self, name: str) -> None:
        if self.record_flushes:
            self.entries.append((F, name, self._caller()))

    def truncate(self, name: str, length: int) -> None:
        self.entries.append((T, name, length, self._caller()))

    def marker(self, kind: str, value: Any = None) -> None:
        self.entries.append((M, kind, value))

    def counts(self) -> dict[str, int]:
        c = {"writes": 0, "flushes": 0, "truncates": 0, "bytes": 0}
        for e in self.entries:
            if e[0] == W:
                c["writes"] += 1
                c["bytes"] += len(e[3])
            elif e[0] == F:
                c["flushes"] += 1
            elif e[0] == T:
                c["truncates"] += 1
        return c


class RecordingHostFile(HostFile):
    """A HostFile that also logs every write, flush and truncate (the I/O itself happens normally,
    except that fdatasync is skipped: the working copy's own durability does not matter)."""

    def __init__(self, path: str, writable: bool, log: IOLog, name: Optional[str] = None):
        super().__init__(path, writable)
        self.log = log
        self.name = name or os.path.basename(path)

    def pwrite(self, data: Buffer, offset: int) -> None:
        data = bytes(data)
        super().pwrite(data, offset)
        self.log.write(self.name, offset, data)

    def punch_hole(self, offset: int, length: int) -> None:
        # what a crash state can show afterwards: zeros there (or the old bytes, before it lands)
        super().punch_hole(offset, length)
        self.log.write(self.name, offset, bytes(length))

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        self.pwrite(b"".join(bytes(b) for b in buffers), offset)

    def flush(self) -> None:
        self.log.flush(self.name)

    def truncate(self, length: int) -> None:
        super().truncate(length)
        self.log.truncate(self.name, length)


def recording_factory(log: IOLog) -> Callable[[str, bool], HostFile]:
    """file_factory for Qcow2Image: writable files (the image, its external data file) are recorded
    under their base name; read-only ones are plain HostFiles."""

    def factory(path: str, writable: bool) -> HostFile:
        if not writable:
            return HostFile(path, writable=False)
        return RecordingHostFile(path, True, log)

    return factory


def replay_all(pristine: Mapping[str, bytes], log: IOLog) -> dict[str, bytearray]:
    files = {n: bytearray(b) for n, b in pristine.items()}
    for e in log.entries:
        if e[0] == W:
            _apply(files[e[1]], e[2], e[3])
        elif e[0] == T:
            _truncate(files[e[1]], e[2])
    return files


def _apply(buf: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data


def _truncate(buf: bytearray, length: int) -> None:
    if length < len(buf):
        del buf[length:]
    else:
        buf.extend(bytes(length - len(buf)))


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]
