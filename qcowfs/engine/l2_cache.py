"""The L2 table cache (QEMU's qcow2-cache.c for L2 tables): one per image, shared by the active
disk's mapping and every snapshot view, since a table two L1s reach is one table on disk.

Tables are arrays of native 64-bit words (entries.be_array), kept in LRU order. A table
changed in memory is dirty until the image's flush writes it. Writing a dirty table needs its
dependencies on disk first (QEMU's qcow2_cache_set_dependency: the refcounts of what it
references, copied data; docs/crash-ordering.md rules 1 and 3), so the cache never writes one
itself: evicting a dirty table calls `write_back`, the owner's ordered flush, first.
"""

from __future__ import annotations

import collections
from array import array
from typing import Callable

from ..errors import CorruptImage
from ..format.entries import be_array, to_be
from .hostfile import HostFile


class L2Cache:
    def __init__(
        self,
        file: HostFile,
        cluster_size: int,
        capacity: int,
        corrupt: Callable[[str], CorruptImage],
    ):
        self.file = file
        self.cluster_size = cluster_size
        self.capacity = capacity
        self.corrupt = corrupt
        #: host offset -> table, least recently used first
        self.tables: collections.OrderedDict[int, array] = collections.OrderedDict()
        #: offsets of tables changed in memory and not yet written
        self.dirty: set[int] = set()
        #: the owner's ordered flush (dependencies first, then every dirty table); set by the image
        self.write_back: Callable[[], None] = lambda: None
        #: called after an eviction (the refcount cache trims its clean blocks along)
        self.after_evict: Callable[[], None] = lambda: None

    def peek(self, offset: int) -> array | None:
        """The cached table at offset, or None; no read, no LRU update (the read hot path
        calls touch() itself when it uses the table)."""
        return self.tables.get(offset)

    def touch(self, offset: int) -> None:
        self.tables.move_to_end(offset)

    def load(self, offset: int) -> array:
        """The table at host offset, read on a miss (a damaged offset: CorruptImage)."""
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
            return t
        cs = self.cluster_size
        if offset & (cs - 1):
            raise self.corrupt(f"L2 table offset 0x{offset:x} is not cluster aligned")
        raw = self.file.pread(cs, offset)
        if len(raw) < cs:
            raise self.corrupt(f"L2 table at 0x{offset:x} lies past the end of the file")
        t = be_array(raw)
        self.insert(offset, t)
        return t

    def insert(self, offset: int, table: array) -> None:
        """Cache a table (read, or new in memory); evicts the least recently used one beyond
        the capacity, writing everything back in order first if that one is dirty."""
        self.tables[offset] = table
        if len(self.tables) > self.capacity:
            victim = next(iter(self.tables))
            if victim in self.dirty:
                self.write_back()
            self.tables.pop(victim, None)
            self.after_evict()

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def drop(self, offset: int) -> None:
        """Forget a table whose cluster is freed (never read it through a stale copy)."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def clear(self) -> None:
        """Forget every table (after the tables were rewritten on disk behind the cache)."""
        self.tables.clear()
        self.dirty.clear()

    def write_dirty(self) -> bool:
        """Write every dirty table (the caller flushes, and has made its dependencies durable).
        Returns whether there was any."""
        if not self.dirty:
            return False
        for off in sorted(self.dirty):
            t = self.tables.get(off)
            if t is not None:
                self.file.pwrite(to_be(t), off)
        self.dirty.clear()
        return True
