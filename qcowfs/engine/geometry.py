"""The image's geometry: what its header fixes for as long as it is open (qcow2.txt "Header",
"Cluster mapping", "Extended L2 Entries"). Frozen: every part of the engine reads the same
values, and nothing can change them under another part."""

from __future__ import annotations

from dataclasses import dataclass

from ..format.header import Header


@dataclass(frozen=True)
class Geometry:
    cluster_bits: int
    cluster_size: int
    #: entries per L2 table (a cluster of 8-byte entries, or of 16-byte ones with extended L2)
    l2_entries: int
    l2_bits: int
    #: an extended L2 entry splits a cluster into 32 subclusters
    subcluster_bits: int
    extended: bool
    #: version 3: zero clusters, refcount widths, feature bits (version 2 has none)
    v3: bool
    #: data clusters live in an external data file at their guest offsets (not refcounted)
    has_data_file: bool
    #: ... and that file holds the guest data as a raw image (reads past its end are zeros)
    data_file_raw: bool
    compression_type: int

    @classmethod
    def from_header(cls, h: Header) -> Geometry:
        l2_entries = h.l2_entries
        return cls(
            cluster_bits=h.cluster_bits,
            cluster_size=h.cluster_size,
            l2_entries=l2_entries,
            l2_bits=l2_entries.bit_length() - 1,
            subcluster_bits=h.cluster_bits - 5,
            extended=h.extended_l2,
            v3=h.version >= 3,
            has_data_file=h.has_data_file,
            data_file_raw=bool(h.has_data_file and h.data_file_raw),
            compression_type=h.compression_type,
        )

    @property
    def l2_span_bits(self) -> int:
        """log2 of the guest bytes one L2 table maps."""
        return self.l2_bits + self.cluster_bits
