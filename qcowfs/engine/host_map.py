"""Where guest clusters live on the host, for requests served without the metadata owner.

The request lanes (fuse/lanes.py) serve reads and writes on threads of their own, from a map
of one 64-bit entry per guest cluster: the host offset (cluster aligned) in the data file, and
flags in the low bits:

- READ: reads may be served from the entry (data at the host offset, or zeros with ZERO);
- WRITE: writes may go to the host offset in place: the cluster is allocated, not compressed,
  not shared with a snapshot (COPIED, qcow2.txt "Cluster mapping": refcount exactly 1, so an
  overwrite in place needs no copy-on-write), the image is writable, and every granule the
  cluster spans is already dirty in every recording bitmap (durably, in intent mode), so the
  write changes no metadata at all: QEMU's in-place overwrite (qcow2_co_pwritev_part with a
  QCOW2_CLUSTER_NORMAL mapping and no allocation);
- ZERO: the cluster reads as zeros (a zero cluster, or unallocated with nothing below it);
- 0: unknown; the request goes to the metadata owner (the trio thread), which republishes.

Entries are derived from the L2 tables and the bitmaps on the metadata thread, and forgotten
(ActiveMap.on_change) before the mapping they describe changes. What is never published:
compressed clusters, clusters showing a backing file, extended L2 images (subclusters),
clusters an external data file holds without an offset, entries QEMU would call corrupt
(unaligned, past the end of the file): the metadata owner serves and reports those.
"""

from __future__ import annotations

from array import array
from typing import Callable, Optional

from ..format.entries import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG
from .cluster_map import ActiveMap

READ = 1
WRITE = 2
ZERO = 4


def entries(
    active: ActiveMap,
    first: int,
    count: int,
    *,
    backing_size: int,
    file_size: int,
    writable: bool,
    marked: Optional[Callable[[int, int], bool]],
) -> array:
    """The map entries of guest clusters [first, first+count), within one L2 table.

    backing_size: guest bytes a backing file shows through unallocated clusters (0: none);
    file_size: the image file's size (data offsets at or past it are corrupt); marked(offset,
    length): whether every recording bitmap has those bytes dirty (None: no bitmap records)."""
    geo = active.geo
    out = array("Q", bytes(8 * count))
    if geo.extended:
        return out
    cb = geo.cluster_bits
    cs = geo.cluster_size
    ext = geo.has_data_file
    l2 = active.l2_for_read(first >> geo.l2_bits)
    base = first & (geo.l2_entries - 1)
    for k in range(count):
        ci = first + k
        guest = ci << cb
        e = l2[base + k] if l2 is not None else 0
        if e & COMPRESSED:
            continue
        if e & ZERO_FLAG:
            out[k] = READ | ZERO
            continue
        off = e & OFFSET_MASK
        if off == 0 and not (ext and e & COPIED):
            # unallocated: zeros unless a backing file shows through (or a data file holds it)
            if not ext and guest >= backing_size:
                out[k] = READ | ZERO
            continue
        if off & (cs - 1) or (not ext and off >= file_size):
            continue  # corrupt: the metadata owner says so
        v = off | READ
        if writable and e & COPIED and (marked is None or marked(guest, cs)):
            v |= WRITE
        out[k] = v
    return out


def lane_write(
    entries: array, first: int, offset: int, data: bytes, cluster_bits: int, zero_detect: bool
) -> Optional[list]:
    """What a request lane does with a guest write (pyfuse3's lanes.h, lane_serve), for models
    of it (the power-loss harness): the host runs [(host offset, bytes)] to write in place, or
    None when the write goes to the metadata owner (a cluster not WRITE, or, with zero
    detection, a whole cluster of zeros). entries[k] is guest cluster first + k's entry."""
    cs = 1 << cluster_bits
    end = offset + len(data)
    if zero_detect:
        c = -(-offset // cs) * cs
        while c + cs <= end:
            if not any(data[c - offset : c - offset + cs]):
                return None
            c += cs
    runs: list = []
    pos = offset
    while pos < end:
        e = entries[(pos >> cluster_bits) - first]
        if e & (READ | WRITE) != READ | WRITE:
            return None
        n = min(end - pos, cs - (pos & (cs - 1)))
        host = (e & ~0x1FF) + (pos & (cs - 1))
        piece = data[pos - offset : pos - offset + n]
        if runs and runs[-1][0] + len(runs[-1][1]) == host:
            runs[-1] = (runs[-1][0], runs[-1][1] + piece)
        else:
            runs.append((host, piece))
        pos += n
    return runs
