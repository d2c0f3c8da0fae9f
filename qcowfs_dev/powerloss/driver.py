"""The guest model and the workload driver: a workload runs through Disk(Qcow2Image(...)) with the
recording file factory, and the Driver keeps, independently of qcowfs, what the guest wrote and
what every bitmap must hold.

Bitmap facts come from the markers alone: a Tracker replays them (the Driver feeds its own, the
explorer one per walk), so the checker of a crash state knows, for every bitmap, its state as of
the last completed command or guest write (BmState: recording or not, the guest writes it recorded
since its last clear, ranges dirty without a write of its own) and the command under way.

Internal snapshots (Disk.take_snapshot / delete_snapshot / checkpoint) are markers too: "sn+" /
"sn+done" around a creation, "sn-" / "sn-done" around a deletion, "ckpt" / "ckpt-done" around a
checkpoint (snapshot + new bitmap + bitmaps disabled). The model knows every snapshot's guest
content: the pristine image's (Model.snapshots, read by QEMU) or the guest writes issued before
the snapshot was taken (Model.snap_at)."""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any, Iterable, Optional

from bitarray import bitarray

from qcowfs.engine import host_map
from qcowfs.engine.disk import Disk
from qcowfs.engine.encryption import Keys
from qcowfs.engine.image import Qcow2Image

from .iolog import IOLog, recording_factory


@dataclasses.dataclass
class BitmapSpec:
    """What a bitmap must hold: bits of guest writes[start:] (plus `initial` set bits)."""

    name: str
    granularity: int
    start: int  # first guest write index it records
    pristine_clean: bool = False  # present and not in_use in the pristine image
    enabled: bool = True  # recording (the "auto" flag) in the pristine image
    initial: tuple = ()  # byte ranges (offset, length) dirty in the pristine image (QEMU's view)


@dataclasses.dataclass(frozen=True)
class BmState:
    """What one bitmap must hold, exactly, as of a point of the workload."""

    granularity: int
    recording: bool = True
    rec: tuple = ()  # guest write indices it recorded since its last clear (a merge adds the source's)
    #: byte ranges (offset, length) dirty without a guest write of its own since the last clear:
    #: the bits it held in the pristine image, the bits merged in from another bitmap
    extra: tuple = ()


@dataclasses.dataclass(frozen=True)
class BmPhase:
    """One bitmap at a crash point: its state as of the last completed command or guest write
    (None while its creation is under way) and the one under way, if it concerns this bitmap:
    op is "write", "create", "remove", "clear", "disable", "enable" or "merge" (as destination),
    after the state it leads to (None for remove). A checkpoint under way is "create" for its new
    bitmap and "disable" for the bitmaps it stops."""

    name: str
    before: Optional[BmState]
    op: str = ""
    after: Optional[BmState] = None


@dataclasses.dataclass
class Model:
    """Everything a checker needs to judge a crash state of one workload."""

    name: str
    image: str  # image file name (inside a state directory)
    files: list  # every file of a state (image first, then the external data file)
    size: int  # virtual size
    initial: bytes  # guest content of the pristine image (qemu-img convert)
    writes: list  # guest writes (offset, bytes) in issue order
    lazy: bool = False
    bitmaps: dict = dataclasses.field(default_factory=dict)  # name -> BitmapSpec
    #: (name, version) -> bitarray: every content a clean (not in_use) bitmap may legitimately show:
    #: version "pristine" (QEMU-made, empty) and "s<k>" (stored by the k-th clean close)
    versions: dict = dataclasses.field(default_factory=dict)
    snapshots: dict = dataclasses.field(
        default_factory=dict
    )  # name -> guest bytes of a QEMU-made internal snapshot
    #: name -> number of guest writes issued before the Driver took internal snapshot NAME (its content:
    #: the pristine guest content with writes[:n] applied); snapshot names are never reused
    snap_at: dict = dataclasses.field(default_factory=dict)
    ops: list = dataclasses.field(default_factory=list)  # human-readable workload for reports
    pristine_bitmap_names: set = dataclasses.field(default_factory=set)
    granularities: dict = dataclasses.field(default_factory=dict)  # bitmap name -> granularity
    oracle_every: int = 10  # qemu-img convert comparison on every Nth new state
    bitmap_sync: str = "close"  # Disk(bitmap_sync=...) of the first open (reopen may switch it)
    pristine_specs: tuple = ()  # BitmapSpec of every bitmap of the pristine image (the Tracker's start)
    nbd_every: int = (
        4  # intent mode: QEMU's view of the bitmaps (qemu-nbd -B) on every Nth new state
    )
    #: Driver.grow steps (old size, new size) in order; `size` and `initial` are the final ones (the grown
    #: area reads as zeros), a crash state's own size is one of the sizes the grow markers allow
    grows: list = dataclasses.field(default_factory=list)
    snap_sizes: dict = dataclasses.field(
        default_factory=dict
    )  # Driver-made snapshot name -> disk size when taken
    #: an encrypted (LUKS) image's passphrase (Workload.passphrase; None: a plain image), and the key
    #: file holding it (absolute; QEMU's tools read it: keyed.py); qcowfs gets it as keys()
    passphrase: Optional[bytes] = dataclasses.field(default=None, repr=False)
    key_file: str = ""

    def keys(self) -> Optional[Keys]:
        """What every qcowfs open of the image (or of a crash state) passes: None for a plain image."""
        if self.passphrase is None:
            return None
        return Keys(top=self.passphrase, top_source=self.key_file)


class Tracker:
    """Replays the driver's markers into the per-bitmap facts a crash point needs (phases())."""

    def __init__(self, model: "Model"):
        self.model = model
        self.done: dict = {
            s.name: BmState(s.granularity, s.enabled, (), tuple(s.initial))
            for s in model.pristine_specs
        }
        self.op = ""
        self.ops: dict = {}  # name -> its own op when a step does several (a checkpoint: create + disable)
        self.after: dict = {}  # name -> BmState (None: removed) once the command under way completes

    def feed(self, kind: str, val: Any) -> None:
        m = self.model
        self.ops = {} if kind in ("gw", "bm+", "bm-", "bmc") else self.ops
        if kind == "gw":
            self.op = "write"
            self.after = {
                n: dataclasses.replace(s, rec=s.rec + (val,))
                for n, s in self.done.items()
                if s.recording
            }
        elif kind in ("gw-done", "bm+done", "bm-done", "bmc-done", "ckpt-done"):
            for n, s in self.after.items():
                if s is None:
                    self.done.pop(n, None)
                else:
                    self.done[n] = s
            self.op, self.after, self.ops = "", {}, {}
        elif kind == "ckpt":
            # one step: bitmap `name` created (recording, empty), every bitmap of `disable` stopped
            name, _granularity, disable = val
            self.op = "checkpoint"
            self.after = {name: BmState(m.granularities[name])}
            self.ops = {name: "create"}
            for b in disable:
                self.after[b] = dataclasses.replace(self.done[b], recording=False)
                self.ops[b] = "disable"
        elif kind == "bm+":
            self.op, self.after = "create", {val: BmState(m.granularities[val])}
        elif kind == "bm-":
            self.op, self.after = "remove", {val: None}
        elif kind == "bmc":
            op, name, arg = val
            s = self.done[name]
            if op == "clear":
                new = dataclasses.replace(s, rec=(), extra=())
            elif op in ("disable", "enable"):
                new = dataclasses.replace(s, recording=op == "enable")
            elif op == "merge":
                src = self.done[arg]
                new = dataclasses.replace(
                    s,
                    rec=tuple(sorted(set(s.rec) | set(src.rec))),
                    extra=s.extra + dirty_ranges(m, src),
                )
            else:  # pragma: no cover
                raise AssertionError(f"unknown bitmap command {op}")
            self.op, self.after = op, {name: new}

    def phases(self) -> tuple:
        names = sorted(set(self.done) | set(self.after))
        return tuple(
            BmPhase(
                n,
                self.done.get(n),
                self.ops.get(n, self.op) if n in self.after else "",
                self.after.get(n),
            )
            for n in names
        )


class Driver:
    """Runs a workload on Disk(Qcow2Image(..., file_factory=recording)) and keeps the guest model."""

    def __init__(self, image_path: str, log: IOLog, model: Model):
        self.log = log
        self.model = model
        self.writes = model.writes
        self.path = image_path
        self.sessions = 0
        self.tracker = Tracker(model)
        self.mode = model.bitmap_sync
        self.lane_writes = 0  # intent mode: writes served as a request lane serves them
        self._open()

    def _marker(self, kind: str, val: Any = None) -> None:
        self.log.marker(kind, val)
        self.tracker.feed(kind, val)

    def _open(self) -> None:
        self._marker("open", self.mode)
        self.img = Qcow2Image(
            self.path,
            read_only=False,
            file_factory=recording_factory(self.log),
            keys=self.model.keys(),
        )
        # start_writing(); close mode: bitmaps in_use, durably; intent mode: stored, every data cluster allocated
        self.disk = Disk(self.img, bitmap_sync=self.mode)
        self._marker("opened")

    def reopen(self, bitmap_sync: Optional[str] = None) -> None:
        """Clean close, then a new read-write open (close mode: bitmaps marked in_use again; intent
        mode: stored with every data cluster allocated), in bitmap_sync mode if given."""
        self.close()
        self.mode = bitmap_sync or self.mode
        self.model.ops.append(f"reopen ({self.mode})")
        self._open()

    @property
    def cluster_size(self) -> int:
        return self.img.geo.cluster_size

    def write(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        assert data and offset + len(data) <= self.model.size
        i = len(self.writes)
        self._marker("gw", i)
        self.model.ops.append(
            f"write {offset:#x}+{len(data):#x}" + (" zeros" if not any(data) else "")
        )
        self.writes.append((offset, data))
        if not (self.mode == "intent" and self._lane_write(offset, data)):
            n = self.disk.write(offset, data)
            assert n == len(data)
        self._marker("gw-done", i)

    def _lane_write(self, offset: int, data: bytes) -> bool:
        """Intent mode: a write a request lane would serve (qcowfs/fuse/lanes.py) is served as
        a lane serves it, from the map the mount would publish (engine/host_map.py) with no
        bitmap or metadata step: straight pwrites of the data. So the crash states check that
        whatever the map lets a lane write in place has its bits durable already. False: the
        write goes through Disk.write, as a lane hands it over. An encrypted image has no lanes
        (fuse/mount.py: the metadata thread serves it; its sector cipher is one thread's)."""
        img = self.img
        if img.read_only or img.geo.extended or img.chain_encrypted():
            return False
        geo = img.geo
        cb = geo.cluster_bits
        first, last = offset >> cb, (offset + len(data) - 1) >> cb
        bitmaps = self.disk.bitmaps
        reader = img.reader
        entries = array("Q")
        ci = first
        while ci <= last:
            n = min(last + 1, ((ci >> geo.l2_bits) + 1) << geo.l2_bits) - ci
            entries += host_map.entries(
                img.active,
                ci,
                n,
                backing_size=reader.backing_size if reader.backing is not None else 0,
                file_size=img.file.size,
                writable=True,
                marked=bitmaps.all_marked if bitmaps.recording else None,
            )
            ci += n
        runs = host_map.lane_write(entries, first, offset, data, cb, img.writer.can_zero_detect())
        if runs is None:
            return False
        for host, piece in runs:
            img.data_file.pwrite(piece, host)
        self.lane_writes += 1
        self.model.ops[-1] += " (as a lane)"
        return True

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def zero_range(self, offset: int, length: int) -> None:
        """Disk.zero_range (discard / write-zeroes): in the model a guest write of zeros ("gw" markers,
        recorded by the bitmaps like a write); unflushed, it may or may not have happened."""
        assert length > 0 and offset + length <= self.model.size
        i = len(self.writes)
        self._marker("gw", i)
        self.model.ops.append(f"zero_range {offset:#x}+{length:#x}")
        self.writes.append((offset, bytes(length)))
        n = self.disk.zero_range(offset, length)
        assert n == length, (n, length)
        self._marker("gw-done", i)

    def grow(self, new_size: int) -> None:
        """Disk.grow(new_size): the guest disk gets bigger, the new area reads as zeros; durable (and
        every write before it) when it returns. Markers "grow" (old, new) / "grow-done" (old, new), then "gf"."""
        old = self.model.size
        assert new_size > old
        self.model.ops.append(f"grow {old:#x} -> {new_size:#x}")
        self._marker("grow", (old, new_size))
        self.disk.grow(new_size)
        self.model.grows.append((old, new_size))
        self.model.size = new_size
        self.model.initial = bytes(self.model.initial) + bytes(new_size - old)
        self._marker("grow-done", (old, new_size))
        self._marker("gf", len(self.writes))
        assert self.disk.size == new_size and self.img.size == new_size
        self._check_memory()

    def flush(self) -> None:
        self.model.ops.append("flush")
        self.disk.flush()
        self.log.marker("gf", len(self.writes))

    def create_bitmap(self, name: str, granularity: int) -> None:
        self.model.ops.append(f"bitmap create {name} g={granularity}")
        assert self.model.granularities.get(name, granularity) == granularity, (
            "a name keeps its granularity"
        )
        self.model.bitmaps[name] = BitmapSpec(name, granularity, len(self.writes))
        self.model.granularities[name] = granularity
        self._marker("bm+", name)
        self.disk.bitmaps.create(name, granularity)
        self._marker("bm+done", name)
        self._check_memory()

    def remove_bitmap(self, name: str) -> None:
        self.model.ops.append(f"bitmap remove {name}")
        self._marker("bm-", name)
        self.disk.bitmaps.remove(name)
        self.model.bitmaps.pop(name, None)
        self._marker("bm-done", name)
        self._check_memory()

    def _command(self, op: str, name: str, arg: Optional[str] = None) -> None:
        self.model.ops.append(f"bitmap {op} {name}" + (f" from {arg}" if arg else ""))
        self._marker("bmc", (op, name, arg))
        bs = self.disk.bitmaps
        if op == "merge":
            assert arg is not None, "merge needs a source bitmap"
            bs.merge(arg, name)
        else:
            getattr(bs, op)(name)
        self._marker("bmc-done", (op, name))
        self._check_memory()

    def clear_bitmap(self, name: str) -> None:
        self._command("clear", name)

    def disable_bitmap(self, name: str) -> None:
        self._command("disable", name)

    def enable_bitmap(self, name: str) -> None:
        self._command("enable", name)

    def merge_bitmap(self, src: str, dst: str) -> None:
        """dst |= src (qcowfs' merge); dst then also covers the writes src recorded."""
        self._command("merge", dst, src)

    # ------------------------------------------------------------------ internal snapshots
    def snapshot_names(self) -> list:
        """The snapshots the model says the image holds, in table order."""
        return [s.name for s in self.disk.snapshots()]

    def _check_snapshots(self, want: list) -> None:
        got = self.snapshot_names()
        if got != want:
            raise AssertionError(f"qcowfs lists snapshots {got}, the model {want}")

    def _check_snapshot_content(self, name: str) -> None:
        """qcowfs' view of a snapshot just taken equals the guest disk now (the model's own sanity)."""
        snap = next(s for s in self.disk.snapshots() if s.name == name)
        got = self.disk.snapshot_view(snap).read(0, self.model.size)
        want = bytearray(self.model.initial)
        for off, data in self.writes[: self.model.snap_at[name]]:
            want[off : off + len(data)] = data
        if bytes(got) != bytes(want):
            raise AssertionError(f"snapshot {name} just taken does not read as the guest disk")

    def take_snapshot(self, name: str) -> None:
        """Disk.take_snapshot(name) between guest writes: its content is the guest disk now; durable
        (and every write before it) when it returns."""
        assert name not in self.model.snap_at and name not in self.model.snapshots, (
            "snapshot names are never reused"
        )
        before = self.snapshot_names()
        self.model.ops.append(f"snapshot create {name}")
        self.model.snap_at[name] = len(self.writes)
        self.model.snap_sizes[name] = self.model.size
        self._marker("sn+", name)
        self.disk.take_snapshot(name)
        self._marker("sn+done", name)
        self._marker("gf", len(self.writes))
        self._check_snapshots(before + [name])
        self._check_snapshot_content(name)

    def delete_snapshot(self, name: str) -> None:
        """Disk.delete_snapshot(its id); durable (and every write before it) when it returns."""
        snaps = self.disk.snapshots()
        snap = next(s for s in snaps if s.name == name)
        self.model.ops.append(f"snapshot delete {name} (id {snap.id})")
        self._marker("sn-", name)
        self.disk.delete_snapshot(snap.id)
        self._marker("sn-done", name)
        self._marker("gf", len(self.writes))
        self._check_snapshots([s.name for s in snaps if s is not snap])

    def checkpoint(self, name: str, disable: Iterable[str] = ()) -> None:
        """Disk.checkpoint(name, disable): snapshot NAME + recording bitmap NAME (QEMU's default
        granularity: the cluster size clamped to [4 KiB, 64 KiB]) + the bitmaps of `disable` stopped,
        one step, durable when it returns."""
        assert name not in self.model.snap_at and name not in self.model.snapshots, (
            "snapshot names are never reused"
        )
        disable = tuple(disable)
        g = min(max(self.cluster_size, 4096), 65536)
        before = self.snapshot_names()
        self.model.ops.append(
            f"checkpoint {name} g={g}" + (f" disable {','.join(disable)}" if disable else "")
        )
        self.model.bitmaps[name] = BitmapSpec(name, g, len(self.writes))
        self.model.granularities[name] = g
        self.model.snap_at[name] = len(self.writes)
        self.model.snap_sizes[name] = self.model.size
        self._marker("ckpt", (name, g, disable))
        res = self.disk.checkpoint(name, disable=list(disable))
        self._marker("ckpt-done", (name, g, disable))
        self._marker("gf", len(self.writes))
        assert res["bitmap"] == name and res["snapshot"]["name"] == name, res
        assert self.disk.bitmaps.get(name).granularity == g
        self._check_snapshots(before + [name])
        self._check_snapshot_content(name)
        self._check_memory()

    def _check_memory(self) -> None:
        """qcowfs' in-memory bitmaps equal the model's exact bits (and recording flags)."""
        bs = self.disk.bitmaps
        if set(bs.bitmaps) != set(self.tracker.done):
            raise AssertionError(
                f"qcowfs has bitmaps {sorted(bs.bitmaps)}, the model {sorted(self.tracker.done)}"
            )
        for name, st in self.tracker.done.items():
            bm = bs.get(name)
            if bm.bits != state_bits(self.model, st):
                raise AssertionError(
                    f"in-memory bitmap {name} differs from the guest writes it recorded"
                )
            if bm.recording != st.recording:
                raise AssertionError(
                    f"bitmap {name}: qcowfs recording={bm.recording}, model {st.recording}"
                )

    def close(self) -> None:
        """Clean close (bitmaps stored, in_use cleared); the in-memory bitmaps must equal the model."""
        self.model.ops.append("close")
        self.sessions += 1
        version = f"s{self.sessions}"
        stored = []
        self._check_memory()
        for name, st in self.tracker.done.items():
            self.model.versions[(name, version)] = state_bits(self.model, st)
            stored.append(name)
        self._marker("close", (version, tuple(stored)))
        self.disk.close()
        self._marker("gf", len(self.writes))
        self._marker("closed")


def _granules(bits: bitarray, g: int, off: int, length: int) -> None:
    if length > 0:
        bits[off // g : (off + length - 1) // g + 1] = 1


def state_bits(model: Model, st: BmState) -> bitarray:
    """The exact dirty bits of a bitmap state: the granules its recorded writes and extra ranges touch."""
    g = st.granularity
    bits = bitarray(-(-model.size // g), endian="little")
    bits.setall(0)
    for i in st.rec:
        off, data = model.writes[i]
        _granules(bits, g, off, len(data))
    for off, length in st.extra:
        _granules(bits, g, off, length)
    return bits


def dirty_ranges(model: Model, st: BmState) -> tuple:
    """The dirty runs of a bitmap state as byte ranges (offset, length), clipped to the disk."""
    return bits_ranges(state_bits(model, st), st.granularity, model.size)


def bits_ranges(bits: bitarray, g: int, size: int) -> tuple:
    out = []
    k = bits.find(1)
    while k >= 0:
        e = bits.find(0, k)
        e = len(bits) if e < 0 else e
        out.append((k * g, min(e * g, size) - k * g))
        k = bits.find(1, e)
    return tuple(out)


def expected_bits(model: Model, spec: BitmapSpec) -> bitarray:
    """The dirty bits a bitmap must hold: every granule touched by guest writes[spec.start:]."""
    g = spec.granularity
    nbits = -(-model.size // g)
    bits = bitarray(nbits, endian="little")
    bits.setall(0)
    for off, data in model.writes[spec.start :]:
        if data:
            bits[off // g : (off + len(data) - 1) // g + 1] = 1
    return bits
