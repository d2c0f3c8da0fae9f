"""What each backup's disk held, one crc32 per guest cluster: the record `verify` checks against.

A backup NAME.qcow2 with its backing chain reads as the disk at checkpoint NAME (its "point").
The table of a point has one crc32 per guest cluster of that disk, of the cluster's bytes as the
guest saw them (bytes past the end of the disk count as zeros). Clusters that read as zeros hold
ZERO_CRC, so a table is dense but compresses to almost nothing where the disk is empty; a full
4 GiB disk of data costs 256 KiB (0.006%).

Why a table of the whole point, not of what one file holds: pruning a chain with
`qemu-img rebase` moves clusters from one file into another without changing what any
remaining point reads, so the per-point record stays true. verify.py checks a file X whose
backing file is P as: every cluster X holds has the crc X's table records, and every cluster X
does not hold has the same crc in X's table as in P's (it reads through to P).

crc32 (zlib's): 4 GB/s per core here against ~1 GB/s for blake2b; it is a check against bit rot
and lost writes, not against an adversary who can write the backup store.
"""

from __future__ import annotations

import base64
import sys
import zlib
from array import array
from functools import lru_cache


@lru_cache(maxsize=8)
def zero_crc(cluster_size: int) -> int:
    return zlib.crc32(bytes(cluster_size))


def new(clusters: int, cluster_size: int) -> array:
    """The table of a disk of `clusters` clusters that reads as zeros."""
    return array("I", [zero_crc(cluster_size)]) * clusters


def resized(table: array, clusters: int, cluster_size: int) -> array:
    """The table for a disk grown (or shrunk) to `clusters` clusters: new ones read as zeros."""
    if clusters <= len(table):
        return table[:clusters]
    return table + new(clusters - len(table), cluster_size)


def encode(table: array) -> str:
    """Little-endian uint32s, zlib, base64: how a manifest stores a table."""
    a = array("I", table)
    if sys.byteorder != "little":
        a.byteswap()
    return base64.b64encode(zlib.compress(a.tobytes(), 6)).decode()


def decode(text: str, clusters: int) -> array:
    a = array("I")
    a.frombytes(zlib.decompress(base64.b64decode(text.encode())))
    if sys.byteorder != "little":
        a.byteswap()
    if len(a) != clusters:
        raise ValueError(f"table has {len(a)} entries, the disk {clusters} clusters")
    return a
