"""The guest model and the workload driver: a workload runs through Disk(Qcow2Image(...)) with the
recording file factory, and the Driver keeps, independently of qcowfs, what the guest wrote and
what every bitmap must hold."""

from __future__ import annotations

import dataclasses

from bitarray import bitarray

from qcowfs.disk import Disk
from qcowfs.image import Qcow2Image

from .iolog import IOLog, recording_factory


@dataclasses.dataclass
class BitmapSpec:
    """What a bitmap must hold: bits of guest writes[start:] (plus `initial` set bits)."""

    name: str
    granularity: int
    start: int  # first guest write index it records
    pristine_clean: bool = False  # present and not in_use in the pristine image


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
    snapshots: dict = dataclasses.field(default_factory=dict)  # name -> guest bytes of an internal snapshot
    ops: list = dataclasses.field(default_factory=list)  # human-readable workload for reports
    pristine_bitmap_names: set = dataclasses.field(default_factory=set)
    granularities: dict = dataclasses.field(default_factory=dict)  # bitmap name -> granularity
    oracle_every: int = 10  # qemu-img convert comparison on every Nth new state


class Driver:
    """Runs a workload on Disk(Qcow2Image(..., file_factory=recording)) and keeps the guest model."""

    def __init__(self, image_path: str, log: IOLog, model: Model):
        self.log = log
        self.model = model
        self.writes = model.writes
        self.path = image_path
        self.sessions = 0
        self._open()

    def _open(self) -> None:
        self.log.marker("open")
        self.img = Qcow2Image(self.path, read_only=False, file_factory=recording_factory(self.log))
        self.disk = Disk(self.img)  # start_writing() + bitmaps in_use, durably
        self.log.marker("opened")

    def reopen(self) -> None:
        """Clean close, then a new read-write open (bitmaps loaded and marked in_use again)."""
        self.close()
        self.model.ops.append("reopen")
        self._open()

    @property
    def cluster_size(self) -> int:
        return self.img.cluster_size

    def write(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        self.log.marker("gw", len(self.writes))
        self.model.ops.append(f"write {offset:#x}+{len(data):#x}" + (" zeros" if not any(data) else ""))
        self.writes.append((offset, data))
        n = self.disk.write(offset, data)
        assert n == len(data)

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def flush(self) -> None:
        self.model.ops.append("flush")
        self.disk.flush()
        self.log.marker("gf", len(self.writes))

    def create_bitmap(self, name: str, granularity: int) -> None:
        self.model.ops.append(f"bitmap create {name} g={granularity}")
        self.log.marker("bm+", name)
        self.model.bitmaps[name] = BitmapSpec(name, granularity, len(self.writes))
        self.model.granularities[name] = granularity
        self.disk.bitmaps.create(name, granularity)
        self.log.marker("bm+done", name)

    def remove_bitmap(self, name: str) -> None:
        self.model.ops.append(f"bitmap remove {name}")
        self.log.marker("bm-", name)
        self.disk.bitmaps.remove(name)
        self.model.bitmaps.pop(name, None)
        self.log.marker("bm-done", name)

    def close(self) -> None:
        """Clean close (bitmaps stored, in_use cleared); the in-memory bitmaps must equal the model."""
        self.model.ops.append("close")
        self.sessions += 1
        version = f"s{self.sessions}"
        stored = []
        for name, spec in self.model.bitmaps.items():
            want = expected_bits(self.model, spec)
            have = self.disk.bitmaps.get(name).bits
            if have != want:
                raise AssertionError(f"in-memory bitmap {name} differs from the guest writes before close")
            self.model.versions[(name, version)] = want
            stored.append(name)
        self.log.marker("close", (version, tuple(stored)))
        self.disk.close()
        self.log.marker("gf", len(self.writes))
        self.log.marker("closed")


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
