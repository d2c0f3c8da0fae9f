"""One dirty bitmap in memory (QEMU's BdrvDirtyBitmap): the bits, marking, counting, status,
extents, and the rules a bitmap's name and granularity follow. No I/O; bitmaps.py stores it.

Bit k covers guest bytes [k*g, (k+1)*g) and is stored at byte k/8, bit k%8 (LSB
first, qcow2.txt "Bitmaps"), which is bitarray's endian="little".
"""

from __future__ import annotations

import errno
from typing import Optional

from bitarray import bitarray

from ..errors import BitmapError
from ..format import header as fmt
from ..format.header import div_round_up


def default_granularity(cluster_size: int) -> int:
    """QEMU's default: the cluster size clamped to [4 KiB, 64 KiB]."""
    return min(max(cluster_size, 4096), 65536)


def table_size_for(size: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table entries QEMU expects for a bitmap that is not in use."""
    bits = div_round_up(size, granularity)
    data_bytes = div_round_up(bits, 64) * 8
    return div_round_up(data_bytes, cluster_size)


def validate_name(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise BitmapError("bitmap name is empty", err=errno.EINVAL)
    if len(raw) > fmt.MAX_BITMAP_NAME:
        raise BitmapError(
            f"bitmap name is longer than {fmt.MAX_BITMAP_NAME} bytes", err=errno.ENAMETOOLONG
        )
    if b"/" in raw or b"\0" in raw:
        raise BitmapError("bitmap name contains '/' or NUL", err=errno.EINVAL)
    return raw


class DirtyBitmap:
    """One dirty bitmap in memory: one bit per granule, nothing per write."""

    def __init__(
        self,
        name: str,
        granularity: int,
        size: int,
        *,
        persistent: bool = True,
        enabled: bool = True,
        inconsistent: bool = False,
    ):
        self.name = name
        self.granularity = granularity
        self.granularity_bits = granularity.bit_length() - 1
        self.size = size
        self.persistent = persistent
        self.enabled = enabled
        self.inconsistent = inconsistent
        self.nbits = div_round_up(size, granularity)
        self.bits: Optional[bitarray] = (
            None if inconsistent else bitarray(self.nbits, endian="little")
        )
        if self.bits is not None:
            self.bits.setall(0)
        #: the entry this bitmap has in the on-disk directory: (table_offset, table_size, flags, extra)
        self.disk_entry: Optional[tuple] = None
        #: intent mode (bitmap_intent.py): the bits as they are on disk, a superset of `bits`,
        #: and the host offset of every data cluster; None / [] otherwise
        self.durable: Optional[bitarray] = None
        self.data_offsets: list = []

    @property
    def recording(self) -> bool:
        return self.enabled and not self.inconsistent

    def mark(self, offset: int, length: int) -> None:
        """Dirty every granule [offset, offset+length) touches (one slice assignment)."""
        gb = self.granularity_bits
        # only recording bitmaps are marked, and a recording bitmap is consistent: bits is set
        self.bits[offset >> gb : ((offset + length - 1) >> gb) + 1] = 1  # type: ignore[index]

    def resize(self, size: int) -> None:
        """The disk grew: the bitmap covers the new size, the new area clean."""
        self.size = size
        self.nbits = div_round_up(size, self.granularity)
        for bits in (self.bits, self.durable):
            if bits is not None and len(bits) < self.nbits:
                extra = bitarray(self.nbits - len(bits), endian="little")
                extra.setall(0)
                bits.extend(extra)

    def data(self) -> bitarray:
        """The bits of a consistent bitmap (an inconsistent one has none: BitmapStore._usable
        refuses it before this is reached)."""
        if self.bits is None:
            raise BitmapError(
                f"bitmap {self.name!r} is inconsistent: it has no usable bits", err=errno.EBUSY
            )
        return self.bits

    def count(self) -> int:
        """Dirty bytes, as QMP's query-block reports them (dirty granules * granularity)."""
        return 0 if self.bits is None else self.bits.count() * self.granularity

    def status(self) -> dict:
        d = {
            "name": self.name,
            "granularity": self.granularity,
            "count": self.count(),
            "persistent": self.persistent,
            "recording": self.recording,
            "busy": False,
            "inconsistent": self.inconsistent,
            # valid on disk at every instant: a crash leaves it consistent (intent mode)
            "crash-safe": self.durable is not None,
        }
        if self.inconsistent:
            d["hint"] = (
                f"bitmap was in use when the image was last closed (crash?): its contents cannot be trusted; "
                f"remove it (rm .bitmaps/{self.name}) and create a new one, then take a full backup"
            )
        return d

    def extents(self, start: int = 0, limit: int = 0) -> list:
        """[(start, length, dirty)] runs over the guest disk from guest offset `start` (a
        granule boundary), at most `limit` of them (0: all)."""
        if self.bits is None:
            return [(0, self.size, False)]
        out: list = []
        g = self.granularity
        bits = self.bits
        n = len(bits)
        pos = start // g
        while pos < n and not (limit and len(out) >= limit):
            v = bits[pos]
            try:
                nxt = bits.index(not v, pos)
            except ValueError:
                nxt = n
            s0 = pos * g
            out.append((s0, min(nxt * g, self.size) - s0, bool(v)))
            pos = nxt
        return out
