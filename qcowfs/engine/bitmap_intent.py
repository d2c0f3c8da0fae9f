"""Write-intent bitmaps (`--bitmap-sync=intent`): the on-disk side.

Linux md's write-intent bitmap rule, applied to qcow2's persistent dirty bitmaps: a
bit may reach the disk early, never late. Before guest data can reach the host disk
in a granule, that granule's bit is durable in the bitmap's on-disk data, so the
on-disk bitmap is at every instant a superset of what changed, and QEMU (or qcowfs)
reads it as a valid, consistent bitmap after any crash: the bitmap is never marked
in_use.

How (bitmaps.py calls these):
- materialise: when intent mode starts for a bitmap (mount, or creation), it is stored
  like at a clean close but with *every* data cluster allocated, so later updates are
  in-place writes of a few bytes into clusters that already exist (no allocation, no
  refcount or table change at write time);
- each bitmap keeps `durable`, a copy of the bits as they are on disk. A write whose
  granules are all durable costs one bitarray search. Otherwise the intent covers a
  whole region (INTENT_REGION guest bytes, aligned; or the granule, if larger), those
  bytes of the on-disk data are rewritten, and one fdatasync covers every bitmap the
  write touched; only then does the guest write go to the host;
- bits only go from 0 to 1 while recording, so a torn sector holds old and new bytes,
  both supersets: any mix is still correct. `clear` writes zeros (the user asked for
  them, and nothing written after the clear returns is missing from what follows it).
The in-memory bitmap stays exact; a clean close stores the exact bits as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hostfile import HostFile

#: guest bytes one intent covers at least (a power of two): the coarseness after a crash,
#: and the number of fdatasyncs (one per newly touched region) before it
INTENT_REGION_BITS = 23  # 8 MiB
INTENT_REGION = 1 << INTENT_REGION_BITS


def intent_range(g0: int, g1: int, granularity_bits: int, nbits: int) -> tuple[int, int]:
    """The granules [r0, r1) an intent for granules [g0, g1) covers: whole regions, aligned so
    that r0 and r1 fall on byte boundaries of the bitmap data (8 granules) at least."""
    shift = max(INTENT_REGION_BITS - granularity_bits, 3)
    r0 = (g0 >> shift) << shift
    r1 = (((g1 - 1) >> shift) + 1) << shift
    return r0, min(r1, nbits)


def write_bytes(
    file: HostFile, data_offsets: list, cluster_size: int, data: bytes, start: int
) -> None:
    """Write bitmap data bytes [start, start + len(data)) in place into the bitmap's data
    clusters (data_offsets[j] holds bytes [j * cluster_size, (j + 1) * cluster_size))."""
    pos = 0
    while pos < len(data):
        b = start + pos
        j, within = divmod(b, cluster_size)
        n = min(len(data) - pos, cluster_size - within)
        file.pwrite(data[pos : pos + n], data_offsets[j] + within)
        pos += n
