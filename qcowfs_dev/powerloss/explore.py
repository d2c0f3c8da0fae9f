"""Exploring the crash states a recorded log allows, and collecting the checks' results.

Model of the disk: a write to file F is durable once a later flush *of F* completed; writes after
F's last flush may each have reached the disk or not, in any combination (the disk reorders within
a flush epoch), and optionally only some of their 512-byte sectors (torn writes; a sector itself
is atomic). Crash points: right after every flush (the log prefix applied), and just before every
flush (the epoch's writes as subsets on top of the flushed state: all subsets when there are few,
else in-order prefixes, "all but one", "only one", random subsets and torn sectors). A truncate is
a barrier for its file. Distinct states are counted by content: same base + same differing
512-byte sectors. Each state is written to its own directory (tmpfs when there is one) and checked
by verify.check_state in a pool of forked worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import multiprocessing
import os
import random
import shutil
import time
import zlib
from typing import Iterable, Mapping, Optional, Sequence

from . import verify
from .driver import Tracker
from .iolog import SECTOR, Entry, F, M, T, W, _apply, _merge, _truncate
from .verify import Expect, Task, check_state
from .workloads import Bounds, Recorded, Workload, record

#: the optional writes a crash state applies: (log index, the sectors kept of a torn write or None: all)
Choice = list[tuple[int, Optional[frozenset[int]]]]


@dataclasses.dataclass
class Stats:
    workload: str = ""
    crash_points: int = 0
    generated: int = 0  # candidate states drawn
    distinct: int = 0  # distinct file contents checked
    checks: int = 0  # distinct (contents, expectation) pairs checked
    qemu_checks: int = 0
    dirty_states: int = 0
    dirty_repaired: int = 0  # dirty states qemu-img check called corrupt (repaired, then clean)
    repair_eof_leaks: int = (
        0  # ... where leaks past the end of the file came into view after QEMU's repair
    )
    leaks: int = 0  # states where qemu-img check reported leaks (exit 3)
    in_use_bitmaps: int = 0
    clean_bitmaps: int = 0
    stale_bitmaps: int = 0
    oracle_reads: int = 0
    intent_bitmaps: int = 0  # intent-mode bitmaps checked: valid, covering every changed granule
    intent_landed: int = 0  # ... in states holding unflushed data of a write they recorded
    intent_opening: int = (
        0  # intent-mode states inside a read-write open (activation stores every bitmap)
    )
    bitmap_sync: str = "close"  # the workload's first open
    nbd_views: int = 0  # bitmaps checked in QEMU's own view too (qemu-nbd -B + nbdinfo)
    copied_mismatch: int = 0  # states mid-snapshot-step whose only qemu-img check errors are harmless OFLAG_COPIED ones
    snap_views: int = (
        0  # internal snapshots read back (qcowfs' SnapshotView) and compared with the model
    )
    snap_oracle: int = 0  # ... and by qemu-img convert -l snapshot.name=NAME
    snap_midway_listed: int = (
        0  # distinct states with a snapshot creation/deletion under way that list it
    )
    snap_midway_absent: int = 0  # ... that do not list it
    grow_old: int = 0  # distinct states with a grow under way at the old virtual size
    grow_new: int = 0  # ... at the new one
    grow_in_use: int = (
        0  # intent mode: distinct states with a grow under way and its bitmaps in_use
    )
    log_writes: int = 0
    log_flushes: int = 0
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)

    def line(self) -> str:
        extra = [
            f"{self.checks} state/expectation pairs",
            f"{self.crash_points} crash points",
            f"log {self.log_writes} writes / {self.log_flushes} flushes",
            f"{self.leaks} with leaks",
        ]
        if self.dirty_states:
            extra.append(
                f"{self.dirty_states} with the dirty bit ({self.dirty_repaired} corrupt until repaired"
                + (
                    f", {self.repair_eof_leaks} with leaks past the end of the file that QEMU's repair exposed"
                    if self.repair_eof_leaks
                    else ""
                )
                + ")"
            )
        if self.in_use_bitmaps or self.clean_bitmaps:
            extra.append(f"{self.in_use_bitmaps} in_use + {self.clean_bitmaps} clean bitmaps seen")
        if self.stale_bitmaps:
            extra.append(f"{self.stale_bitmaps} with the bitmaps extension stale")
        if self.intent_bitmaps:
            extra.append(
                f"intent mode: {self.intent_bitmaps} bitmaps checked valid and covering every changed granule "
                f"({self.intent_landed} states with unflushed recorded data on disk, {self.intent_opening} during "
                f"activation, {self.nbd_views} in QEMU's NBD view too" + ")"
            )
        if self.snap_views:
            midway = self.snap_midway_listed or self.snap_midway_absent or self.copied_mismatch
            extra.append(
                f"snapshots: {self.snap_views} read back by qcowfs, {self.snap_oracle} by qemu-img convert -l"
                + (
                    f"; a creation/deletion under way: listed in {self.snap_midway_listed} states, not in "
                    f"{self.snap_midway_absent}; {self.copied_mismatch} with harmless OFLAG_COPIED mismatches "
                    f"(qemu-img check exit 2, as QEMU's own order leaves them)"
                    if midway
                    else ""
                )
            )
        if self.grow_old or self.grow_new:
            extra.append(
                f"a grow under way: {self.grow_old} states at the old size, {self.grow_new} at the new"
                + (
                    f", {self.grow_in_use} with intent-mode bitmaps in_use"
                    if self.grow_in_use
                    else ""
                )
            )
        extra.append(f"{self.oracle_reads} qemu-img convert cross-checks")
        return (
            f"power-loss {self.workload}: {self.distinct} distinct crash states checked ({', '.join(extra)}) "
            f"in {self.seconds:.1f}s" + (f", {len(self.failures)} FAILING" if self.failures else "")
        )


def _choices(
    rng: random.Random, opt: list[int], entries: list[Entry], bounds: Bounds, want_full: bool
) -> list[Choice]:
    """Subsets of the optional writes `opt` (log indices) to apply: lists of (index, sector set or None)."""
    n = len(opt)
    out: list[Choice] = []
    if n == 0:
        return [[]] if want_full else []
    if (1 << n) <= bounds.exhaustive:
        for mask in range(1 << n):
            if mask == (1 << n) - 1 and not want_full:
                continue
            out.append([(opt[j], None) for j in range(n) if mask >> j & 1])
    else:
        if want_full:
            out.append([(i, None) for i in opt])
        # in-order prefixes (the disk wrote in issue order and stopped)
        ks = (
            range(n)
            if n <= bounds.prefixes
            else sorted(
                {round(j * (n - 1) / (bounds.prefixes - 1)) for j in range(bounds.prefixes)}
            )
            if bounds.prefixes > 1
            else [0]
        )
        for k in ks:
            out.append([(i, None) for i in opt[:k]])
        for j in rng.sample(range(n), min(n, bounds.drop_one)):
            out.append([(i, None) for i in opt if i != opt[j]])
        for j in rng.sample(range(n), min(n, bounds.singles)):
            out.append([(opt[j], None)])
        for _ in range(bounds.random):
            q = rng.choice((0.15, 0.5, 0.85))
            out.append([(i, None) for i in opt if rng.random() < q])
    # torn writes: some multi-sector writes keep only some of their sectors
    tearable = [i for i in opt if _nsectors(entries[i]) > 1]
    for _ in range(bounds.torn if tearable else 0):
        torn = set(rng.sample(tearable, rng.randint(1, min(3, len(tearable)))))
        pick: Choice = []
        for i in opt:
            if i in torn:
                secs = _sectors(entries[i])
                keep = frozenset(s for s in secs if rng.random() < 0.5)
                if 0 < len(keep) < len(secs):
                    pick.append((i, keep))
                    continue
            if rng.random() < 0.5:
                pick.append((i, None))
        out.append(pick)
    return out


def _sectors(e: Entry) -> range:
    off, data = e[2], e[3]
    return range(off // SECTOR, (off + len(data) - 1) // SECTOR + 1)


def _nsectors(e: Entry) -> int:
    return len(_sectors(e)) if e[0] == W and e[3] else 0


def _diff_digest(base: bytearray, regs: list, bufs: list, size: int) -> bytes:
    """A canonical digest of how a state differs from its base: the 512-byte sectors (fixed grid)
    whose bytes differ, with their offsets. Same base + same digest + same size = same bytes, and
    the other way round, whatever writes produced them."""
    sectors: dict = {}
    for (a, bb), buf in zip(regs, bufs):
        old = base[a:bb]
        if len(old) < bb - a:
            old = old + bytes(bb - a - len(old))
        if buf == old:
            continue
        for s0 in range(a - a % SECTOR, bb, SECTOR):
            sec = sectors.get(s0)
            if sec is None:
                sec = base[s0 : s0 + SECTOR]
                if len(sec) < SECTOR:
                    sec = sec + bytes(SECTOR - len(sec))
                sectors[s0] = sec
            lo, hi = max(a, s0), min(bb, s0 + SECTOR)
            sec[lo - s0 : hi - s0] = buf[lo - a : hi - a]
    h = hashlib.blake2b(digest_size=16)
    for s0 in sorted(sectors):
        sec = sectors[s0]
        old = base[s0 : s0 + SECTOR]
        if len(old) < SECTOR:
            old = old + bytes(SECTOR - len(old))
        if sec != old:
            h.update(s0.to_bytes(8, "little"))
            h.update(sec)
    return h.digest()


class Explorer:
    """Walks a recorded log, materialises crash states and feeds them to the checkers."""

    def __init__(self, rec: Recorded, bounds: Bounds, jobs: int, seed: int = 0):
        self.rec = rec
        self.bounds = bounds
        self.jobs = jobs
        self.rng = random.Random(seed ^ zlib.crc32(rec.model.name.encode()))
        self.stats = Stats(workload=rec.model.name, bitmap_sync=rec.model.bitmap_sync)
        c = rec.log.counts()
        self.stats.log_writes, self.stats.log_flushes = c["writes"], c["flushes"]
        self.seen_content: set = set()
        self.seen_pairs: set = set()
        # crash states live briefly (written, checked, deleted): tmpfs when there is one
        shm = "/dev/shm"
        if os.path.isdir(shm) and os.access(shm, os.W_OK):
            import tempfile

            self.states_dir = tempfile.mkdtemp(
                prefix=f"qcowfs-powerloss-{rec.model.name}-", dir=shm
            )
        else:
            self.states_dir = os.path.join(rec.workdir, "states")
            os.makedirs(self.states_dir, exist_ok=True)
        self.failed_dir = os.path.join(rec.workdir, "failed")
        self.sid = 0

    def crash_points(self) -> list:
        """[(p, want_full, want_subsets)]: right after every flush (p past the markers that follow
        it, everything before applied) and just before every flush (the epoch's subsets)."""
        ents = self.rec.log.entries
        n = len(ents)
        pts: dict = {0: [True, False]}
        for i, e in enumerate(ents):
            if e[0] in (F, T):
                pts.setdefault(i, [False, False])[1] = True
                j = i + 1
                while j < n and ents[j][0] == M:
                    j += 1
                pts.setdefault(j, [False, False])[0] = True
        pts.setdefault(n, [False, False])
        pts[n] = [True, True]
        return sorted((p, full, sub) for p, (full, sub) in pts.items())

    def run(self) -> Stats:
        t0 = time.monotonic()
        verify._MODEL = self.rec.model  # inherited by the forked checker processes
        ctx = multiprocessing.get_context("fork")
        try:
            with cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx) as pool:
                self.pool = pool
                self.inflight: set = set()
                try:
                    self._walk()
                    self._drain(0)
                finally:
                    for fut in self.inflight:
                        fut.cancel()
        finally:
            shutil.rmtree(self.states_dir, ignore_errors=True)
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _walk(self) -> None:
        rec = self.rec
        ents = rec.log.entries
        points = self.crash_points()
        self.stats.crash_points = len(points)
        base = {n: bytearray(b) for n, b in rec.pristine.items()}
        base_hash = {n: hashlib.blake2b(b, digest_size=16).digest() for n, b in base.items()}
        unflushed: dict = {n: [] for n in base}
        ex = Expect()
        created, creating, removed = set(), set(), set()
        snaps = set(
            rec.model.snapshots
        )  # internal snapshots that must be listed (QEMU-made ones first)
        snaps_maybe: set = set()  # creation or deletion under way: absent, or listed and intact
        disabled: set = (
            set()
        )  # close mode: bitmaps a completed checkpoint disabled (auto flag clear on disk)
        clean_ok = {k for k in rec.model.versions if k[1] == "pristine"}
        must: set = set()
        gw_started = 0
        tracker = Tracker(rec.model)
        ex.intent = rec.model.bitmap_sync == "intent"
        if rec.model.grows:
            ex.sizes = (rec.model.grows[0][0],)
        i = 0
        for p, want_full, want_sub in points:
            while i < p:
                e = ents[i]
                if e[0] == W:
                    unflushed[e[1]].append(i)
                elif e[0] in (F, T):
                    name = e[1]
                    for j in unflushed[name]:
                        _apply(base[name], ents[j][2], ents[j][3])
                    if e[0] == T:
                        _truncate(base[name], e[2])
                    if unflushed[name] or e[0] == T:
                        base_hash[name] = hashlib.blake2b(base[name], digest_size=16).digest()
                    unflushed[name] = []
                else:
                    kind, val = e[1], e[2]
                    tracker.feed(kind, val)
                    if kind == "gw":
                        gw_started = val + 1
                        clean_ok = set()
                    elif kind == "gf":
                        ex.durable = val
                    elif kind == "close":
                        version, names = val
                        must = {(n, version) for n in names}
                        clean_ok |= must
                    elif kind == "closed":
                        ex.closed = True
                    elif kind == "open":
                        ex.closed = False
                        ex.intent = val == "intent"
                        ex.opening = True
                        must = set()
                    elif kind == "opened":
                        ex.opening = False
                    elif kind == "bm+":
                        creating.add(val)
                        removed.discard(val)
                    elif kind == "bm-":
                        created.discard(val)  # removal under way: it may be gone already
                        disabled.discard(val)
                    elif kind == "bmc" and val[0] == "enable":
                        disabled.discard(val[1])
                    elif kind == "sn+":
                        snaps_maybe.add(val)
                    elif kind == "sn+done":
                        snaps_maybe.discard(val)
                        snaps.add(val)
                    elif kind == "sn-":
                        snaps.discard(val)
                        snaps_maybe.add(val)
                    elif kind == "sn-done":
                        snaps_maybe.discard(val)
                    elif kind == "ckpt":
                        creating.add(val[0])
                        removed.discard(val[0])
                        snaps_maybe.add(val[0])
                    elif kind == "ckpt-done":
                        name = val[0]
                        created.add(name)
                        snaps_maybe.discard(name)
                        snaps.add(name)
                        disabled |= set(val[2])
                    elif kind == "grow":
                        ex.sizes, ex.growing = tuple(val), True
                    elif kind == "grow-done":
                        ex.sizes, ex.growing = (val[1],), False
                    elif kind == "bm+done":
                        created.add(val)
                    elif kind == "bm-done":
                        removed.add(val)
                        created.discard(val)
                i += 1
            ex.pending = tuple(range(ex.durable, gw_started))
            ex.created, ex.creating, ex.removed = (
                frozenset(created),
                frozenset(creating),
                frozenset(removed),
            )
            ex.clean_ok, ex.must = frozenset(clean_ok), frozenset(must if ex.closed else ())
            ex.bms = tracker.phases()
            ex.snaps, ex.snaps_maybe, ex.disabled = (
                frozenset(snaps),
                frozenset(snaps_maybe),
                frozenset(disabled),
            )
            opt = sorted(j for lst in unflushed.values() for j in lst)
            choices: list[Choice]
            if not want_sub:
                choices = [[(j, None) for j in opt]] if want_full else []
            else:
                choices = _choices(self.rng, opt, ents, self.bounds, want_full)
            for choice in choices:
                self._emit(p, base, base_hash, unflushed, choice, dataclasses.replace(ex))
                if self.bounds.max_states and self.stats.distinct >= self.bounds.max_states:
                    return

    def _emit(
        self,
        p: int,
        base: Mapping[str, bytearray],
        base_hash: Mapping[str, bytes],
        unflushed: Mapping[str, list[int]],
        choice: Choice,
        ex: Expect,
    ) -> None:
        ents = self.rec.log.entries
        self.stats.generated += 1
        # per file: the regions the optional writes touch, rebuilt with the chosen pieces
        layout = {}
        key = []
        by_file: dict = {}
        for j, secs in choice:
            by_file.setdefault(ents[j][1], []).append((j, secs))
        for name in self.rec.model.files:
            regs = _merge((ents[j][2], ents[j][2] + len(ents[j][3])) for j in unflushed[name])
            b = base[name]
            bufs = [bytearray(b[a:bb]) + bytes(max(0, bb - max(a, len(b)))) for a, bb in regs]
            size = len(b)
            for j, secs in by_file.get(name, []):
                off, data = ents[j][2], ents[j][3]
                pieces = (
                    [(off, data)]
                    if secs is None
                    else [
                        (
                            max(off, s * SECTOR),
                            data[
                                max(off, s * SECTOR) - off : min(off + len(data), (s + 1) * SECTOR)
                                - off
                            ],
                        )
                        for s in sorted(secs)
                    ]
                )
                for po, pd in pieces:
                    if not pd:
                        continue
                    size = max(size, po + len(pd))
                    for (a, bb), buf in zip(regs, bufs):
                        if a <= po and po + len(pd) <= bb:
                            buf[po - a : po - a + len(pd)] = pd
                            break
                    else:  # pragma: no cover
                        raise AssertionError("write outside its region")
            key.append((name, base_hash[name], size, _diff_digest(b, regs, bufs, size)))
            layout[name] = (regs, bufs, size)
        ckey = tuple(key)
        pkey = (ckey, ex.key())
        if pkey in self.seen_pairs:
            return
        self.seen_pairs.add(pkey)
        content_new = ckey not in self.seen_content
        if content_new:
            self.seen_content.add(ckey)
            self.stats.distinct += 1
        self.stats.checks += 1
        self.sid += 1
        sdir = os.path.join(self.states_dir, str(self.sid))
        os.makedirs(sdir)
        for name, (regs, bufs, size) in layout.items():
            with open(os.path.join(sdir, name), "wb") as f:
                b = base[name]
                f.write(b)
                for (a, bb), buf in zip(regs, bufs):
                    end = min(bb, size)
                    if end > a:
                        f.seek(a)
                        f.write(buf[: end - a])
                f.truncate(size)
        kept = ", ".join(
            f"#{j}" + ("" if s is None else f"[sectors {sorted(s)}]") for j, s in choice
        )
        opt = sorted(j for lst in unflushed.values() for j in lst)
        where = (
            f"crash point: log position {p} of {len(ents)}; writes since the last flush of their file "
            f"(optional): {opt}; applied: [{kept}]"
        )
        m = self.rec.model
        oracle = content_new and (self.stats.distinct % max(1, m.oracle_every) == 1 or ex.closed)
        nbd = (
            content_new
            and ex.intent
            and (self.stats.distinct % max(1, m.nbd_every) == 0 or ex.closed or ex.opening)
        )
        task = Task(self.sid, sdir, ex, content_new, oracle, where, self.failed_dir, nbd=nbd)
        self._drain(3 * self.jobs)
        fut = self.pool.submit(check_state, task)
        self.inflight.add(fut)

    def _drain(self, limit: int) -> None:
        while len(self.inflight) > limit:
            done, _ = cf.wait(self.inflight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                self.inflight.discard(fut)
                res = fut.result()
                self._collect(res)

    def _collect(self, res: dict) -> None:
        s = self.stats
        for k in (
            "qemu_checks",
            "dirty_states",
            "dirty_repaired",
            "repair_eof_leaks",
            "leaks",
            "in_use_bitmaps",
            "clean_bitmaps",
            "stale_bitmaps",
            "oracle_reads",
            "intent_bitmaps",
            "intent_landed",
            "intent_opening",
            "nbd_views",
            "copied_mismatch",
            "snap_views",
            "snap_oracle",
            "snap_midway_listed",
            "snap_midway_absent",
            "grow_old",
            "grow_new",
            "grow_in_use",
        ):
            setattr(s, k, getattr(s, k) + res.get(k, 0))
        if res["failures"]:
            s.failures.append(res)

    # ------------------------------------------------------------------ reporting
    def describe_entries(self, indices: Iterable[int]) -> str:
        ents = self.rec.log.entries
        out = []
        for j in indices:
            e = ents[j]
            if e[0] == W:
                out.append(f"  #{j} write {e[1]} {e[2]:#x}+{len(e[3]):#x} by {e[4]}")
            elif e[0] == F:
                out.append(f"  #{j} flush {e[1]} by {e[2]}")
            elif e[0] == T:
                out.append(f"  #{j} truncate {e[1]} to {e[2]:#x} by {e[3]}")
            else:
                out.append(f"  #{j} marker {e[1]} {e[2]!r}")
        return "\n".join(out)


def total_line(
    total: int,
    workloads: int,
    seconds: float,
    intent_total: int = 0,
    intent_workloads: Sequence[str] = (),
) -> str:
    """The summary line of a run (pytest's terminal summary, scripts/crash-states)."""
    line = f"power-loss total: {total} distinct crash states checked across {workloads} workloads"
    if intent_workloads:
        line += (
            f" ({intent_total} of them in {len(intent_workloads)} intent-mode bitmap workloads: "
            f"{', '.join(intent_workloads)})"
        )
    return line + f" in {seconds:.0f}s"


def failure_report(ex: Explorer, max_failures: int = 3) -> str:
    s = ex.stats
    if not s.failures:
        return ""
    lines = [
        f"{len(s.failures)} failing crash states in workload {s.workload} (states kept under {ex.failed_dir}; "
        f"rerun: scripts/crash-states -w {s.workload} --workdir DIR)"
    ]
    lines.append("workload ops: " + "; ".join(ex.rec.model.ops))
    for res in s.failures[:max_failures]:
        lines.append(f"--- state {res['sid']} ({res['dir']}): {res['where']}")
        lines.extend("  FAIL: " + f for f in res["failures"])
        # the log around the crash point
        p = int(res["where"].split("log position ")[1].split(" ")[0])
        lo = max(0, p - 30)
        lines.append(f"log entries {lo}..{p - 1} (before the crash point):")
        lines.append(ex.describe_entries(range(lo, p)))
    return "\n".join(lines)


def explore_workload(
    wl: Workload,
    workdir: str,
    jobs: Optional[int] = None,
    scale: float = 1.0,
    seed: int = 0,
    bounds: Optional[Bounds] = None,
    record_flushes: bool = True,
) -> Explorer:
    rec = record(wl, workdir, seed=None if seed == 0 else seed, record_flushes=record_flushes)
    b = bounds or wl.bounds
    if scale != 1.0:
        b = b.scaled(scale)
    ex = Explorer(rec, b, jobs or os.cpu_count() or 2, seed=seed)
    ex.run()
    return ex
