"""Qcow2Image: open and validate an image, own its parts, flush in crash-safe order, header
bits. No FUSE.

The engine is split along QEMU's own seams, and the image is built from parts that own their
state (QEMU declares it once, in BDRVQcow2State; here each part declares its own):
    geo         Geometry: what the header fixes (geometry.py)
    refcounts   refcount table and blocks, allocation (refcounts.py; qcow2-refcount.c)
    l2          the L2 table cache, shared with snapshot views (l2_cache.py; qcow2-cache.c)
    active      the active disk's mapping: L1, what writes change until the flush
                (cluster_map.py ActiveMap; qcow2-cluster.c)
    reader      guest reads through the active mapping (read_path.py)
    writer      guest writes, one plan/copy/commit sequence (write_path.py)
    inflight    cluster allocations and host I/O in flight (inflight.py)
    backing     the backing file (backing.py), file / data_file the host files (hostfile.py)
and this module is block/qcow2.c's share: open, flush ordering, dirty/corrupt bits, close.

Writing keeps the crash-ordering rules of docs/crash-ordering.md. Data goes straight to the
host file; refcount blocks and L2 tables are cached and written by flush_metadata() in
dependency order:
    refcount blocks -> fdatasync -> L2 tables -> fdatasync -> L1 entries -> fdatasync
    -> deferred refcount decrements -> refcount blocks -> fdatasync
so a reference never reaches the disk before the refcount that covers it (rule 1), copied
data and new L2 tables are durable before anything points at them (rules 3, 4), and a
reference is gone from the disk before its cluster's refcount drops (rule 2). A crash at any
point leaks clusters at worst.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from ..errors import (
    CorruptImage,
    FormatError,
    QcowError,
    ReadOnlyImage,
    UnsupportedFeature,
    WriteBeyondEnd,
    with_path,
)
from ..format import header as fmt
from ..format import luks as luks_fmt
from ..format.entries import be_array
from .backing import RawImage, probe_format
from .backing import vet as vet_named_file
from .cluster_map import ActiveMap
from .encrypted_data import EncryptedDataFile, LockedDataFile
from .encryption import Keys, open_cipher
from .geometry import Geometry
from .hostfile import HostFile
from .inflight import Busy, InFlight
from .l2_cache import L2Cache
from .read_path import Reader
from .refcounts import Refcounts
from .repair import rebuild_refcounts
from .write_path import Writer, WriteRequest

log = logging.getLogger(__name__)

MAX_BACKING_DEPTH = 64
HEADER_INCOMPATIBLE_FEATURES = fmt.HEADER_FIELD_OFFSETS["incompatible_features"]


def open_backing(
    name: str,
    fmt_name: Optional[str],
    chain: tuple,
    depth: int,
    policy: str = "follow",
    metadata_only: bool = False,
    keys: Optional[Keys] = None,
) -> Qcow2Image | RawImage:
    real = os.path.realpath(name)
    if real in chain:
        raise FormatError(f"backing chain loops back to {name}")
    if depth > MAX_BACKING_DEPTH:
        raise FormatError(f"backing chain deeper than {MAX_BACKING_DEPTH}")
    if not os.path.exists(name):
        raise FormatError(f"backing file {name} not found")
    kind = fmt_name or probe_format(name)
    if kind == "raw":
        return RawImage(name)
    if kind == "qcow2":
        return Qcow2Image(
            name,
            read_only=True,
            _chain=chain + (real,),
            _depth=depth,
            backing_policy=policy,
            metadata_only=metadata_only,
            keys=keys,
        )
    raise UnsupportedFeature(f"backing file {name} has format {kind!r}; qcowfs reads qcow2 and raw")


class Qcow2Image:
    """One qcow2 image (and, below it, its backing chain)."""

    def __init__(
        self,
        path: str,
        read_only: bool = True,
        *,
        _chain: tuple = (),
        _depth: int = 0,
        cache_bytes: int = 32 << 20,
        file_factory: Callable[..., HostFile] = HostFile,
        backing_policy: str = "follow",
        metadata_only: bool = False,
        keys: Optional[Keys] = None,
    ):
        self.path = path
        #: passphrases for encrypted images in the chain (encryption.py); held only while
        #: opening: what stays is the cipher, in the data file's wrapper
        self._keys = keys
        self.read_only = read_only
        #: opened for its metadata only (info, check): an encrypted image is accepted, because
        #: nothing of its data is read; never for a mount
        self.metadata_only = metadata_only
        #: which backing and external data files this image may open (backing.py)
        self.backing_policy = backing_policy
        #: makes the HostFile for the image and its external data file; a recording
        #: variant lets the power-loss tests log every write and flush
        self.file_factory = file_factory
        self.file = file_factory(path, writable=not read_only)
        self.backing: Qcow2Image | RawImage | None = None
        self.data_file = self.file
        self._closed = False
        self._corrupt_logged: set = set()
        #: called when the image turns read-only after corruption (the mount drops its write lock)
        self.on_read_only: Optional[Callable[[], Any]] = None
        try:
            self._open(_chain, _depth, cache_bytes)
        except BaseException:
            self.close(flush=False)
            raise

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str, read_only: bool = True, **kw: Any) -> Qcow2Image:
        return cls(path, read_only=read_only, **kw)

    def _open(self, chain: tuple, depth: int, cache_bytes: int) -> None:
        first = self.file.pread(1 << fmt.MAX_CLUSTER_BITS, 0)
        try:
            h = fmt.parse_header(first, allow_encrypted=True)
        except QcowError as e:
            raise with_path(e, self.path) from None
        self.header = h
        #: the LUKS header of an encrypted image (format/luks.py), for info and check
        self.luks: Optional[Any] = None
        if h.crypt_method == 2 and h.crypto_header is not None:
            off, length = h.crypto_header
            if off + length > self.file.size:
                raise FormatError(
                    f"the encryption header ({length} bytes at {off}) lies past the end of the file",
                    self.path,
                )
            try:
                self.luks = luks_fmt.parse(self.file.pread(min(length, 4096), off), length)
            except QcowError as e:
                raise with_path(e, self.path) from None
        if h.corrupt and not self.read_only:
            raise FormatError(
                "image is marked corrupt; mount it with --read-only, or repair it "
                "(qemu-img check -r all)",
                self.path,
            )
        self.geo = geo = Geometry.from_header(h)
        self.refcounts = Refcounts(self.file, h, self._write_header_bytes)
        # L1 table
        raw = self.file.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
        if len(raw) < h.l1_size * 8:
            raise FormatError("L1 table lies past the end of the file", self.path)
        self.l2 = L2Cache(
            self.file, geo.cluster_size, max(16, cache_bytes // geo.cluster_size), self.corrupt
        )
        self.l2.write_back = self.flush_metadata  # a dirty table's dependencies go first
        self.l2.after_evict = self.refcounts.drop_clean_cache
        self.active = ActiveMap(geo, be_array(raw), self.l2, h.size, self.corrupt, self.refcounts)
        self.inflight = InFlight()
        # Backing chain / external data file
        me = os.path.realpath(self.path)
        chain = chain + (me,) if me not in chain else chain
        base_dir = os.path.dirname(os.path.abspath(self.path))
        if h.backing_file:
            name = h.backing_file
            if h.backing_file.startswith("json:"):
                raise UnsupportedFeature("json: backing file names are not supported", self.path)
            if not os.path.isabs(name):
                name = os.path.join(base_dir, name)
            vet_named_file(self.path, "backing file", name, self.backing_policy)
            try:
                self.backing = open_backing(
                    name,
                    h.backing_format,
                    chain,
                    depth + 1,
                    self.backing_policy,
                    self.metadata_only,
                    self._keys,
                )
            except QcowError as e:
                if e.path is None:
                    raise with_path(e, self.path) from None
                raise
        if h.has_data_file and h.data_file is not None:
            name = h.data_file
            if not os.path.isabs(name):
                name = os.path.join(base_dir, name)
            vet_named_file(self.path, "external data file", name, self.backing_policy)
            if not os.path.exists(name):
                raise FormatError(f"external data file {h.data_file} not found", self.path)
            self.data_file = self.file_factory(name, writable=not self.read_only)
        #: where guest data is read and written: the data file, or for an encrypted image the
        #: data file through its sector cipher (encrypted_data.py)
        self.data_io: HostFile = self.data_file
        if h.crypt_method and not self.metadata_only:
            cipher = open_cipher(
                self.path,
                h.crypt_method,
                self.luks,
                h.crypto_header,
                self.file,
                self._keys,
                depth,
                self.read_only,
            )
            self.data_io = EncryptedDataFile(self.data_file, cipher, guest_iv=h.crypt_method == 1)
        elif h.crypt_method:
            self.data_io = LockedDataFile(self.data_file)
        self._keys = None
        self.reader = Reader(self.active, self.file, self.data_io, self.backing)
        self.writer = Writer(
            self.active,
            self.reader,
            self.refcounts,
            self.file,
            self.data_io,
            self.inflight,
            self.mark_corrupt,
        )
        self.backing_size = self.reader.backing_size
        # the hot paths, bound once
        self.read = self.reader.read
        self.read_view = self.reader.read_view
        self.data_host = self.reader.data_host
        self.map = self.active.map

    def chain_encrypted(self) -> bool:
        """Whether this image or one below it reads its data through a sector cipher."""
        level: Any = self
        while isinstance(level, Qcow2Image):
            if level.data_io.encrypted:
                return True
            level = level.backing
        return False

    @property
    def size(self) -> int:
        """The guest disk's size (the active mapping's; resize changes it)."""
        return self.active.size

    # ------------------------------------------------------------------ guest writes
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyImage("image is open read-only", self.path)

    def write(self, offset: int, data: Any) -> None:
        """Write guest bytes at offset, on this thread (Writer.write). Whole clusters of zeros
        become zero clusters (detect-zeroes=unmap)."""
        self._check_writable()
        length = len(data)
        if offset + length > self.active.size:
            raise WriteBeyondEnd(
                f"write beyond the end of the disk ({offset}+{length} > {self.active.size})",
                self.path,
            )
        if length:
            self.writer.write(offset, memoryview(data).cast("B"))

    def begin_write(self, offset: int, data: Any) -> WriteRequest | Busy:
        """Start a guest write whose steps the caller copies and commits (write_path.py); data
        in range (Disk clips). BUSY: wait for a commit and ask again."""
        self._check_writable()
        mv = memoryview(data).cast("B")
        if offset + len(mv) > self.active.size:
            raise WriteBeyondEnd(
                f"write beyond the end of the disk ({offset}+{len(mv)} > {self.active.size})",
                self.path,
            )
        return self.writer.begin(offset, mv)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make guest bytes [offset, offset+length) read as zeros (Writer.write_zeroes)."""
        self._check_writable()
        end = offset + length
        if end > self.active.size:
            raise WriteBeyondEnd(
                f"write-zeroes beyond the end of the disk ({offset}+{length} > {self.active.size})",
                self.path,
            )
        if not self.geo.has_data_file and not self.writer.can_zero_detect():
            # v2 with a backing file: an unallocated cluster would show the backing file
            raise UnsupportedFeature(
                "zeroing needs the zero cluster flag of version 3 images when a backing file "
                "is present (QEMU refuses it too)",
                self.path,
            )
        self.writer.write_zeroes(offset, length)

    def start_writing(self) -> None:
        """First writes of a read-write open, done only after everything has been validated
        (and the caller holds the image lock): rebuild refcounts after an unclean lazy-refcount
        close, clear unknown autoclear bits, drop a bitmaps extension that lost its autoclear bit."""
        if self.read_only:
            return
        h = self.header
        if h.dirty:
            log.warning(
                "%s: dirty bit set (lazy refcounts, not closed cleanly): rebuilding refcounts",
                self.path,
            )
            rebuild_refcounts(self)
        changed = False
        unknown = h.autoclear_features & ~fmt.AUTOCLEAR_KNOWN
        if unknown:
            # qcow2.txt: a writer that does not know an autoclear bit must clear it.
            h.autoclear_features &= ~unknown
            changed = True
        if h.stale_bitmaps_ext is not None:
            # Bitmaps extension written without the autoclear bit: not trustworthy, drop it.
            h.stale_bitmaps_ext = None
            h.extensions = [e for e in h.extensions if e.magic != fmt.EXT_BITMAPS]
            changed = True
        if changed:
            self.write_header()

    # ------------------------------------------------------------------ header
    def _write_header_bytes(self, offset: int, data: bytes) -> None:
        self.file.pwrite(data, offset)

    def write_header(self) -> None:
        """Rewrite cluster 0's header, extensions and backing name (then flush)."""
        data = self.header.build()
        self.file.pwrite(data, 0)
        self.file.flush()

    # ------------------------------------------------------------------ helpers
    def corrupt(self, message: str) -> CorruptImage:
        """Build a CorruptImage for a bad entry met at run time; logged once per message."""
        if message not in self._corrupt_logged:
            self._corrupt_logged.add(message)
            log.error("%s: %s", self.path, message)
        return CorruptImage(message, self.path)

    # ------------------------------------------------------------------ flushing
    def flush_metadata(self) -> None:
        """Write cached metadata in crash-safe order (see the module docstring); ends durable."""
        m, l2 = self.active, self.l2
        if not (m.metadata_dirty or self.refcounts.dirty or m.pending_frees):
            return
        f = self.file
        if self.data_file is not f:
            self.data_file.flush()
        if self.header.lazy_refcounts and not self.header.dirty and (l2.dirty or m.l1_dirty):
            # Lazy refcounts: the dirty bit is on disk before the first L2 update (qcow2.txt
            # "compatible features" bit 0); a crash then means "rebuild refcounts on open".
            self.set_dirty_bit(True)
        self.refcounts.write_dirty()
        f.flush()  # refcounts (and COW data) before the L2 tables that reference them
        if l2.write_dirty():
            f.flush()  # new L2 tables before the L1 entries that point at them
        if m.l1_dirty:
            base = self.header.l1_table_offset
            for i in sorted(m.l1_dirty):
                f.pwrite(m.l1[i].to_bytes(8, "big"), base + 8 * i)
            m.l1_dirty.clear()
            f.flush()
        if m.pending_frees and self.inflight.idle:
            # the references are gone from the disk now; drop the refcounts (rule 2). Not while
            # a thread may still be copying into or out of one of them: then at a later flush
            # (fsync and unmount wait for the threads first).
            frees, m.pending_frees = m.pending_frees, []
            unused = [c for c in frees if self.refcounts.update(c, -1) == 0]
            self.refcounts.write_dirty()
            f.flush()
            # free for good (refcount 0 on disk): give the space back to the host, as QEMU's
            # discard does, so the image's actual size drops (best effort: not every host can)
            cs = self.geo.cluster_size
            for c in sorted(unused):
                f.punch_hole(c * cs, cs)
        m.metadata_dirty = False

    @property
    def metadata_dirty(self) -> bool:
        """Whether flush() has metadata to write."""
        return bool(self.active.metadata_dirty or self.refcounts.dirty or self.active.pending_frees)

    def flush(self) -> None:
        """fsync semantics: every acknowledged write and the metadata reaching it is durable."""
        if self.read_only:
            return
        if self.metadata_dirty:
            try:
                self.flush_metadata()
            except CorruptImage as e:
                # as during a write: corrupt bit, one log line, read-only from now on
                self.mark_corrupt(e.message)
                raise
        else:
            self.data_file.flush()
            if self.data_file is not self.file:
                self.file.flush()

    def set_dirty_bit(self, on: bool) -> None:
        h = self.header
        if on:
            h.incompatible_features |= fmt.INCOMPAT_DIRTY
        else:
            h.incompatible_features &= ~fmt.INCOMPAT_DIRTY
        self.file.pwrite(h.incompatible_features.to_bytes(8, "big"), HEADER_INCOMPATIBLE_FEATURES)
        self.file.flush()

    def mark_corrupt(self, reason: str) -> None:
        """An inconsistency met while writing: set the corrupt bit, log once, go read-only (as QEMU does)."""
        if self.read_only:
            return
        log.error("%s: marking image corrupt and switching to read-only: %s", self.path, reason)
        try:
            self.header.incompatible_features |= fmt.INCOMPAT_CORRUPT
            self.file.pwrite(
                self.header.incompatible_features.to_bytes(8, "big"), HEADER_INCOMPATIBLE_FEATURES
            )
            self.file.flush()
        except OSError as e:
            log.error("%s: could not set the corrupt bit: %s", self.path, e)
        self.read_only = True
        if self.on_read_only is not None:
            self.on_read_only()

    # ------------------------------------------------------------------ info
    def allocated_host_bytes(self) -> int:
        """Host space used, for st_blocks (512-byte units * 512)."""
        total = self.file.st_blocks() * 512
        if self.data_file is not self.file:
            total += self.data_file.st_blocks() * 512
        return total

    def close(self, flush: bool = True) -> None:
        if self._closed:
            return
        try:
            if flush and not self.read_only and hasattr(self, "refcounts"):
                self.flush()
                if self.header.dirty and self.header.lazy_refcounts:
                    self.set_dirty_bit(False)  # clean close: refcounts are exact again
        finally:
            self._closed = True
            if self.backing is not None:
                self.backing.close()
            if self.data_file is not self.file:
                self.data_file.close()
            self.file.close()

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(flush=exc[0] is None)
