"""L1/L2 table entries (qcow2.txt "Cluster mapping"): flags, masks, compressed cluster
descriptors and the big-endian table encoding. No I/O.

The one place these facts are written; the read path, the write path and check use
them. The hottest loops (Qcow2Image.read_view, the contiguous-run comparisons) test
the flag constants inline, which is the same thing spelled in place.
"""

from __future__ import annotations

import sys
from array import array

from .header import (
    L1E_RESERVED_MASK,
    L2E_RESERVED_MASK,
    OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
)

__all__ = [
    "L1E_RESERVED_MASK",
    "L2E_RESERVED_MASK",
    "OFFSET_MASK",
    "COPIED",
    "COMPRESSED",
    "ZERO_FLAG",
    "SUBCLUSTERS",
    "ALL_ALLOC",
    "ALL_ZERO",
    "be_array",
    "to_be",
    "compressed_descriptor",
    "compressed_host_clusters",
    "l2_reserved_mask",
]

COPIED = QCOW_OFLAG_COPIED  # bit 63: refcount is exactly 1, writable in place
COMPRESSED = QCOW_OFLAG_COMPRESSED  # bit 62: the rest is a compressed cluster descriptor
ZERO_FLAG = QCOW_OFLAG_ZERO  # bit 0 of a standard L2 entry (v3): reads as zeros

# Extended L2 (qcow2.txt "Extended L2 Entries"): 32 subclusters, a 64-bit bitmap per entry,
# low half "allocated", high half "reads as zeros".
SUBCLUSTERS = 32
ALL_ALLOC = (1 << SUBCLUSTERS) - 1
ALL_ZERO = ALL_ALLOC << SUBCLUSTERS

_LITTLE = sys.byteorder == "little"


def be_array(raw: bytes) -> array:
    """A table of big-endian 64-bit entries as an array of native integers."""
    a = array("Q", raw)
    if _LITTLE:
        a.byteswap()
    return a


def to_be(a: array) -> bytes:
    """The inverse of be_array (the array itself is left as it is)."""
    if _LITTLE:
        b = array("Q", a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


def l2_reserved_mask(extended: bool) -> int:
    """Bits of a standard-cluster L2 entry that must be zero; with extended L2 the zero flag
    (bit 0) moves to the subcluster bitmap and is reserved too."""
    return L2E_RESERVED_MASK | (1 if extended else 0)


def compressed_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, sector count) of a compressed cluster descriptor: x = 62 - (cluster_bits - 8)
    low bits hold the offset, the next cluster_bits - 8 bits the number of additional 512-byte
    sectors (qcow2.txt "Compressed Clusters Descriptor")."""
    x = 62 - (cluster_bits - 8)
    off = entry & ((1 << x) - 1)
    nsec = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return off, nsec


def compressed_host_clusters(entry: int, cluster_bits: int) -> range:
    """Host cluster indexes a compressed descriptor touches (each holds a reference)."""
    off, nsec = compressed_descriptor(entry, cluster_bits)
    last = (off & ~511) + nsec * 512 - 1
    return range(off >> cluster_bits, (last >> cluster_bits) + 1)
