"""Where the guest disk has data: SEEK_DATA/SEEK_HOLE for disk.raw, as `qemu-img map` sees it.

Data is what some image of the backing chain holds: a data or compressed cluster of the image,
or, where the image leaves a cluster unallocated, whatever the backing file holds there (a
qcow2 backing file by its own mapping, a raw one by the host file's own SEEK_DATA). Zero
clusters are holes, and so is everything past a backing file's end. Regions without an L2
table are skipped an L2 table's span at a time, so an empty 64 GiB disk is walked in
milliseconds.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Optional

from ..format.entries import OFFSET_MASK
from .backing import RawImage
from .cluster_map import COMPRESSED, DATA, UNALLOCATED

if TYPE_CHECKING:
    from .image import Qcow2Image

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def status(img: Qcow2Image | RawImage, pos: int, end: int) -> tuple:
    """(is_data, n): the guest bytes [pos, pos + n) of img, n > 0, pos + n <= end, are all data
    or all hole."""
    if isinstance(img, RawImage):  # a raw backing file
        return _raw_status(img, pos, end)
    if pos >= img.size:
        return False, end - pos
    end = min(end, img.size)
    cb = img.geo.cluster_bits
    span = 1 << (img.geo.l2_bits + cb)  # guest bytes one L2 table maps
    l1i = pos >> (img.geo.l2_bits + cb)
    if l1i >= len(img.active.l1) or not img.active.l1[l1i] & OFFSET_MASK:
        n = min(end, (l1i + 1) * span) - pos
        return _unallocated(img, pos, n)
    kind, _host, n = img.map(pos, end)
    is_data = kind in (DATA, COMPRESSED)
    # extend over the following clusters of the same kind (one map() each, within the table)
    table_end = min(end, (l1i + 1) * span)
    while pos + n < table_end:
        k2, _h2, n2 = img.map(pos + n, table_end)
        if k2 != kind:
            break
        n += n2
    if kind == UNALLOCATED:
        return _unallocated(img, pos, n)
    return is_data, n


def _unallocated(img: Qcow2Image, pos: int, n: int) -> tuple:
    """Unallocated in img: the backing file decides (a hole without one, or past its end)."""
    b = img.backing
    if b is None or pos >= img.backing_size:
        return False, n
    return status(b, pos, min(pos + n, img.backing_size))


def _raw_status(raw: RawImage, pos: int, end: int) -> tuple:
    end = min(end, raw.size) if pos < raw.size else end
    if pos >= raw.size:
        return False, end - pos
    fd = raw.file.fd
    try:
        data = os.lseek(fd, pos, SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:
            return True, end - pos  # the host cannot tell: all data, as qemu-img map says then
        return False, end - pos
    if data > pos:
        return False, min(data, end) - pos
    hole = os.lseek(fd, pos, SEEK_HOLE)
    return True, min(hole, end) - pos


def seek(img: Qcow2Image, offset: int, whence: int) -> Optional[int]:
    """lseek(SEEK_DATA / SEEK_HOLE) on the guest disk; None means ENXIO (past the end, or no
    data after offset). The end of the disk counts as a hole, as for any file."""
    size = img.size
    if offset >= size or offset < 0:
        return None
    pos = offset
    want_data = whence == SEEK_DATA
    while pos < size:
        is_data, n = status(img, pos, size)
        if is_data == want_data:
            return pos
        pos += n
    return None if want_data else size
