"""Decompression of qcow2 compressed clusters (qcow2.txt "Compressed Clusters Descriptor").

zlib clusters are raw deflate streams (window bits -12, no header); zstd clusters are
zstd frames without a length prefix. Both decode to exactly one cluster; trailing
input (the descriptor rounds up to 512-byte sectors) is ignored.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

from ..errors import CorruptImage
from .header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

zstandard: Optional[Any]
try:
    import zstandard
except ImportError:  # pragma: no cover - zstandard is a declared dependency
    zstandard = None


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Inflate one compressed cluster; raises CorruptImage if it does not yield cluster_size bytes."""
    d: Any  # a zlib or zstandard decompression object
    try:
        if compression_type == COMPRESSION_ZLIB:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            if zstandard is None:
                raise CorruptImage("zstd-compressed cluster but the zstandard module is missing")
            d = zstandard.ZstdDecompressor().decompressobj()
            out = d.decompress(data)
            # A frame may end early; QEMU decodes frames until the cluster is full.
            while len(out) < cluster_size and d.unused_data:
                rest = d.unused_data
                d = zstandard.ZstdDecompressor().decompressobj()
                out += d.decompress(rest)
            out = out[:cluster_size]
        else:
            raise CorruptImage(f"unknown compression type {compression_type}")
    except (zlib.error, ValueError) as e:
        raise CorruptImage(f"compressed cluster does not inflate: {e}") from None
    except Exception as e:  # zstandard.ZstdError and friends
        if zstandard is not None and isinstance(e, zstandard.ZstdError):
            raise CorruptImage(f"compressed cluster does not inflate: {e}") from None
        raise
    if len(out) != cluster_size:
        raise CorruptImage(f"compressed cluster inflates to {len(out)} bytes, not {cluster_size}")
    return out
