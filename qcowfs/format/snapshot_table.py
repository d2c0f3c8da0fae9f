"""The internal snapshot table (qcow2.txt "Snapshots"; QEMU's block/qcow2-snapshot.c): entries,
parsing and building. No I/O.

Entries are packed back to back from snapshots_offset, each padded to a multiple of 8:
    l1_table_offset u64, l1_size u32, id_str_size u16, name_size u16, date_sec u32,
    date_nsec u32, vm_clock_nsec u64, vm_state_size u32, extra_data_size u32,
    extra data, id string, name
Extra data: vm_state_size_large u64, disk_size u64 (both required in v3), icount u64
(optional; -1 = unknown). Unknown extra bytes are kept when the table is rewritten.
"""

from __future__ import annotations

import dataclasses
import struct

from ..errors import FormatError
from .header import MAX_SNAPSHOTS, align_up

_HEAD = struct.Struct(">QIHHIIQII")  # 40 bytes
HEAD_SIZE = _HEAD.size
#: QEMU's limits (QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE)
MAX_EXTRA_DATA = 1024
MAX_TABLE_SIZE = 64 << 20
ICOUNT_UNKNOWN = (1 << 64) - 1


@dataclasses.dataclass
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    icount: int = 0  # what qemu-img snapshot -c records (no record/replay icount)
    #: extra data bytes past the three fields qcowfs knows, kept as they were
    unknown_extra: bytes = b""

    def info(self) -> dict:
        """qemu-img info --output=json's keys for one snapshot."""
        d = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount != ICOUNT_UNKNOWN:
            d["icount"] = self.icount
        return d


def variable_size(head: bytes) -> int:
    """Bytes after an entry's 40 fixed bytes (extra data, id, name); 0 for a short head (the
    parser reports it)."""
    if len(head) < HEAD_SIZE:
        return 0
    f = _HEAD.unpack_from(head, 0)
    return f[8] + f[2] + f[3]


def parse(raw: bytes, count: int, image_size: int, v3: bool) -> list:
    """The snapshots of a table (raw: at least the table's bytes). A snapshot without a
    disk_size in its extra data (v2) has the image's current size, as QEMU assumes."""
    out = []
    pos = 0
    if count > MAX_SNAPSHOTS:
        raise FormatError(f"too many snapshots ({count})")
    for i in range(count):
        pos = align_up(pos, 8)
        if pos + HEAD_SIZE > len(raw):
            raise FormatError(f"snapshot table entry {i} runs past the table")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize, extra_len) = (
            _HEAD.unpack_from(raw, pos)
        )
        pos += HEAD_SIZE
        if extra_len > MAX_EXTRA_DATA:
            raise FormatError(f"snapshot table entry {i}: too much extra data ({extra_len} bytes)")
        end = pos + extra_len + id_len + name_len
        if end > len(raw):
            raise FormatError(f"snapshot table entry {i} runs past the table")
        extra = raw[pos : pos + extra_len]
        pos += extra_len
        sid = raw[pos : pos + id_len].decode("utf-8", "surrogateescape")
        pos += id_len
        name = raw[pos : pos + name_len].decode("utf-8", "surrogateescape")
        pos += name_len
        if v3 and extra_len < 16:
            raise FormatError(f"snapshot {sid!r}: extra data too short for a version 3 image")
        vm_large = struct.unpack_from(">Q", extra, 0)[0] if extra_len >= 8 else vmsize
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_len >= 16 else image_size
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_len >= 24 else ICOUNT_UNKNOWN
        out.append(
            Snapshot(
                id=sid,
                name=name,
                l1_table_offset=l1_off,
                l1_size=l1_size,
                disk_size=disk_size,
                date_sec=dsec,
                date_nsec=dnsec,
                vm_clock_nsec=vmclock,
                vm_state_size=vm_large,
                icount=icount,
                unknown_extra=bytes(extra[24:]),
            )
        )
    if align_up(pos, 8) > MAX_TABLE_SIZE:
        raise FormatError("snapshot table exceeds QEMU's 64 MiB limit")
    return out


def build(snapshots: list) -> bytes:
    """The table for these snapshots, as QEMU's qcow2_write_snapshots lays it out."""
    out = bytearray()
    for s in snapshots:
        sid = s.id.encode("utf-8", "surrogateescape")
        name = s.name.encode("utf-8", "surrogateescape")
        extra = struct.pack(">QQQ", s.vm_state_size, s.disk_size, s.icount) + s.unknown_extra
        out += _HEAD.pack(
            s.l1_table_offset,
            s.l1_size,
            len(sid),
            len(name),
            s.date_sec,
            s.date_nsec,
            s.vm_clock_nsec,
            s.vm_state_size & 0xFFFFFFFF,
            len(extra),
        )
        out += extra + sid + name
        out += bytes(align_up(len(out), 8) - len(out))
    if len(out) > MAX_TABLE_SIZE:
        raise FormatError("snapshot table would exceed QEMU's 64 MiB limit")
    return bytes(out)


def next_id(snapshots: list) -> str:
    """QEMU's find_new_snapshot_id: one more than the largest numeric id."""
    best = 0
    for s in snapshots:
        if s.id.isdigit():
            best = max(best, int(s.id))
    return str(best + 1)
