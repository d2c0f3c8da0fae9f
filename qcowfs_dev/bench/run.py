"""The run: filled images or fresh ones, one mount per target, the repeats of the targets
interleaved and rotated, warm-up writes, peak RSS; every mount and daemon torn down."""

from __future__ import annotations

import argparse
import os
import time
from typing import Mapping

from .host import CLUSTER, fill_raw, log, run
from .jobs import fio, human, job_spec
from .stats import Results, rotated
from .targets import TARGET_CLASSES, Target

__all__ = ["Bench"]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results: Results = {j: {t: [] for t in args.targets} for j in args.jobs}
        self.mem: dict[str, dict[str, int]] = {}
        self.live: list[Target] = []
        self.seq = 0
        self.t0 = time.monotonic()

    def new_targets(self, filled: bool) -> dict[str, Target]:
        """Prepare and mount one target of each kind; filled: a fully allocated disk of 0x5a."""
        self.seq += 1
        tag = str(self.seq)
        raw = None
        if filled:
            raw = os.path.join(self.args.workdir, f"fill-{tag}.raw")
            fill_raw(raw, self.args.size)
        targets = {}
        try:
            # ceiling last: it takes the filled raw file over, the qcow2 ones are converted from it
            order = sorted(self.args.targets, key=lambda t: (t == "ceiling", t == "stock"))
            for name in order:
                t = TARGET_CLASSES[name](self.args.workdir, tag, self.args.size)
                self.live.append(t)
                targets[name] = t
                t.fio_file = t.start(raw)
        finally:
            if raw and os.path.exists(raw):
                os.unlink(raw)
        return targets

    def stop(self, targets: Mapping[str, Target]) -> None:
        for t in targets.values():
            try:
                t.stop()
            finally:
                if t in self.live:
                    self.live.remove(t)
                for f in ("disk.qcow2", "disk.img"):
                    p = os.path.join(t.dir, f)
                    if os.path.exists(p):
                        os.unlink(p)

    def stop_all(self) -> None:
        while self.live:
            t = self.live.pop()
            try:
                t.stop()
            except BaseException as e:  # keep cleaning up the others
                log(f"bench: stopping {t.name}: {e}")

    def measure(self, job: str, target: Target, r: int) -> None:
        os.sync()  # previous writes' dirty pages go to disk now, not during this run
        res = fio(
            job,
            job_spec(job),
            target.fio_file,
            self.args.size,
            self.args.runtime,
            self.args.first_write_size,
        )
        self.results[job][target.name].append(res)
        log(
            f"  [{time.monotonic() - self.t0:5.0f}s] {job:16} {target.name:8} #{r + 1}: "
            f"{res['iops']:10.0f} IOPS {res['bw_bytes'] / 1e6:9.1f} MB/s"
        )

    def warm_up(self, targets: Mapping[str, Target]) -> None:
        """One short untimed sequential write per target: the first measured run of a fresh
        mount must not pay for warming caches and CPU clocks that the later ones find ready."""
        for t in targets.values():
            if t.prefill_bitmap:
                # the whole disk once: every granule of the bitmap dirty (steady state)
                fio(
                    "warm-up",
                    dict(rw="write", bs="1M", fresh=True),
                    t.fio_file,
                    self.args.size,
                    self.args.runtime,
                    self.args.size,
                )
            else:
                fio(
                    "warm-up",
                    dict(rw="write", bs="1M"),
                    t.fio_file,
                    self.args.size,
                    max(0.5, self.args.runtime / 2),
                    0,
                )

    def record_mem(self, phase: str, targets: Mapping[str, Target]) -> None:
        for name, t in targets.items():
            m = t.mem()
            if m:
                cur = self.mem.setdefault(name, {})
                cur[phase] = max(cur.get(phase, 0), m.get("VmHWM", 0))

    def run(self) -> None:
        a = self.args
        steady = [j for j in a.jobs if not job_spec(j).get("fresh")]
        fresh = [j for j in a.jobs if job_spec(j).get("fresh")]
        if steady and not a.fresh:
            log(
                f"bench: preparing {human(a.size)} filled images and mounting {', '.join(a.targets)}"
            )
            targets = self.new_targets(filled=True)
            try:
                self.warm_up(targets)
                for job in steady:
                    for r in range(a.repeat):
                        for name in rotated(a.targets, r):
                            self.measure(job, targets[name], r)
                self.record_mem("steady_VmHWM", targets)
            finally:
                self.stop(targets)
        elif steady:
            for job in steady:
                log(f"bench: {job}: preparing freshly filled images")
                targets = self.new_targets(filled=True)
                try:
                    self.warm_up(targets)
                    for r in range(a.repeat):
                        for name in rotated(a.targets, r):
                            self.measure(job, targets[name], r)
                    self.record_mem("steady_VmHWM", targets)
                finally:
                    self.stop(targets)
        for job in fresh:
            spec = job_spec(job)
            if spec.get("fresh_of"):
                # NAME@fresh: --repeat fresh images, no warm-up (it would allocate)
                repeats, phase = a.repeat, "fresh_VmHWM"
                log(
                    f"bench: {job}: a fresh empty image and mount per repeat ({spec['bs']} {spec['rw']}"
                    f"{', iodepth %d' % spec['iodepth'] if spec.get('iodepth', 1) > 1 else ''} over {human(a.size)})"
                )
            else:
                repeats, phase = a.first_write_repeat, "first_write_VmHWM"
                log(
                    f"bench: {job}: a fresh empty image and mount per repeat "
                    f"({human(a.first_write_size)} of {spec['bs']} {spec['rw']})"
                )
            for r in range(repeats):
                for name in rotated(a.targets, r):
                    t = TARGET_CLASSES[name](a.workdir, f"fw{r}", a.size)
                    self.live.append(t)
                    try:
                        t.fio_file = t.start(None)
                        self.measure(job, t, r)
                        self.record_mem(phase, {name: t})
                    finally:
                        self.stop({name: t})
        if a.rss_1t:
            self.rss_1t()

    def rss_1t(self) -> None:
        """Peak RSS of qcowfs and qemu-storage-daemon serving a 1 TiB image whose every L2 table
        is allocated (preallocation=metadata: 2048 tables of 64 KiB), read at 4096 places."""
        a = self.args
        log("bench: rss-1t: 1 TiB image, preallocation=metadata, 4096 reads of 4 KiB across it")
        size = 1 << 40
        for name in [t for t in ("qcowfs", "qemu", "qemu10") if t in a.targets]:
            t = TARGET_CLASSES[name](a.workdir, "rss1t", size)

            def preallocated(t: Target = t) -> None:
                # in place of the image prepare() made (empty): one with every L2 table allocated
                os.unlink(t.image)
                run(
                    [
                        "qemu-img",
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        f"cluster_size={CLUSTER},preallocation=metadata",
                        t.image,
                        str(size),
                    ]
                )

            t.after_prepare = preallocated
            self.live.append(t)
            try:
                fd = os.open(t.start(None), os.O_RDONLY)
                try:
                    step = size // 4096
                    for i in range(4096):
                        os.pread(fd, 4096, i * step + (i * 7919 % 256) * 4096)
                finally:
                    os.close(fd)
                m = t.mem()
                self.mem.setdefault(name, {})["rss_1t_VmHWM"] = m.get("VmHWM", 0)
                log(f"  {name:8} peak RSS {m.get('VmHWM', 0) / 2**20:.1f} MiB")
            finally:
                self.stop({name: t})
