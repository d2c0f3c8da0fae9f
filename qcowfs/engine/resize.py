"""Growing the guest disk (QEMU's qcow2_co_truncate, growing with preallocation off).

A bigger disk needs a bigger L1 table when the new size is past what the current one maps:
the new table is written and flushed (with its refcounts) before one header write switches
l1_table_offset, l1_size and size together; the old table is freed after. A crash before the
switch leaks the new table, after it leaks the old one: never worse. Where a backing file is
longer than the old size, the new area is zeroed (QEMU does the same), so it reads as zeros.
Shrinking is refused: qcowfs never throws guest data away.
"""

from __future__ import annotations

import errno
from array import array
from typing import TYPE_CHECKING

from ..errors import QcowError, TableLimit
from ..format import header as fmt
from ..format.entries import to_be
from ..format.header import div_round_up

if TYPE_CHECKING:
    from .image import Qcow2Image


class ShrinkRefused(QcowError):
    """The disk cannot get smaller through qcowfs."""

    errno = errno.EPERM


def grow(img: Qcow2Image, new_size: int) -> None:
    """Make the image's virtual size new_size (>= the current one), durably."""
    old_size = img.size
    if new_size < old_size:
        raise ShrinkRefused(
            f"the disk cannot shrink ({new_size} < {old_size} bytes): qcowfs only grows it; "
            "use qemu-img resize --shrink on the unmounted image",
            img.path,
        )
    if new_size == old_size:
        return
    if new_size > fmt.INT64_MAX // 2 or new_size % 512:
        raise QcowError(
            f"cannot grow the disk to {new_size} bytes (a multiple of 512 up to 2^62 is needed)",
            img.path,
        )
    need = fmt.l1_entries_needed(new_size, img.geo.cluster_bits, 16 if img.geo.extended else 8)
    if need * 8 > fmt.MAX_L1_SIZE:
        raise TableLimit(
            f"a {new_size}-byte disk needs an L1 table beyond QEMU's {fmt.MAX_L1_SIZE} byte limit",
            img.path,
        )
    if img.backing is not None and img.backing_size > old_size and not img.geo.v3:
        raise QcowError(
            "cannot grow a version 2 image whose backing file is longer than the disk: the new "
            "area would show the backing file (QEMU refuses it too)",
            img.path,
        )
    img.flush()
    h = img.header
    rc = img.refcounts
    cs = img.geo.cluster_size
    old_l1 = img.active.l1
    new_l1 = None
    if need > len(old_l1):
        new_l1 = array("Q", old_l1)
        new_l1.extend(array("Q", bytes(8 * (need - len(old_l1)))))
        raw = to_be(new_l1)
        nclusters = div_round_up(len(raw), cs)
        off = rc.allocate(nclusters)
        img.file.pwrite(raw + bytes(nclusters * cs - len(raw)), off)
        img.flush_metadata()  # the new table's refcounts
        img.file.flush()
        old_off, old_len = h.l1_table_offset, h.l1_size
        h.l1_table_offset, h.l1_size, h.size = off, need, new_size
        img.write_header()  # one write switches table, its size and the disk size; flushed
        img.active.resized(new_size, new_l1)
        if old_len:
            for c in range(old_off // cs, div_round_up(old_off + 8 * old_len, cs)):
                rc.update(c, -1)
            rc.write_dirty()
            img.file.flush()
    else:
        h.size = new_size
        img.write_header()
    img.active.resized(new_size)
    if img.backing is not None and img.backing_size > old_size:
        img.write_zeroes(old_size, min(new_size, img.backing_size) - old_size)
        img.flush()
