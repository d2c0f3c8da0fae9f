"""Checking one crash state (in a worker process): what must hold (Expect, from the driver's
markers before the crash point), and the checks: qemu-img check (and, with lazy refcounts and the
dirty bit, both repairs), qcowfs' read-only open reading the durable guest data, the bitmaps'
flags and contents, internal snapshots (listed alike by qcowfs and QEMU, present or absent as the
snapshot steps before the crash point allow, every listed one reading as the guest disk when it was
taken), no error logged by qcowfs, and on a sample qemu-img convert against qcowfs.

The explorer sets _MODEL before it forks its workers; check_state() runs in them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Optional, Union

from bitarray import bitarray

from qcowfs.engine.bitmap_intent import INTENT_REGION
from qcowfs.engine.bitmaps import BitmapStore
from qcowfs.engine.image import Qcow2Image
from qcowfs.engine.snapshots import SnapshotView, read_all
from qcowfs_dev.oracles import qemu_bitmaps, run
from qcowfs_dev.probes import header_dirty, read_header_field

from . import keyed
from .driver import BmPhase, BmState, Model, state_bits
from .iolog import SECTOR, _merge

#: the guest disk as qcowfs reads it
GuestBytes = Union[bytes, bytearray]


@dataclasses.dataclass
class Expect:
    """What must hold in a crash state, from the markers the driver logged before the crash point."""

    durable: int = 0  # guest writes[:durable] were flushed
    pending: tuple = ()  # guest writes issued since (may or may not be there)
    #: (name, version) a clean bitmap may show: the last stored versions until a guest write starts
    #: (a read-write open marks them in_use first), plus the versions a clean close is storing
    clean_ok: frozenset = frozenset()
    closed: bool = (
        False  # a clean close completed (and no new open since): bitmaps stored, exactly right
    )
    must: frozenset = frozenset()  # after a clean close: exactly these (name, version), clean
    opening: bool = False  # inside a read-write open: activation may leave the extension stale
    created: frozenset = frozenset()  # bitmaps whose creation completed (present from then on)
    creating: frozenset = frozenset()  # bitmaps whose creation had started
    removed: frozenset = frozenset()  # bitmaps whose removal completed (absent from then on)
    intent: bool = (
        False  # the open under way (or the last one) is in intent mode: never in_use, supersets
    )
    bms: tuple = ()  # intent mode: driver.BmPhase of every bitmap (state as of the last completed step, step under way)
    snaps: frozenset = (
        frozenset()
    )  # internal snapshots that must be listed and intact (creation completed)
    snaps_maybe: frozenset = (
        frozenset()
    )  # creation or deletion under way: absent, or listed and intact
    disabled: frozenset = (
        frozenset()
    )  # close mode: bitmaps a completed checkpoint disabled (auto flag clear)
    #: virtual sizes the state may have (workloads with a Driver.grow; empty: the model's size): the old one
    #: before a grow, old or new while it is under way, the new one once it returned
    sizes: tuple = ()
    growing: bool = False  # a grow is under way (intent mode: its bitmaps may be in_use)

    def key(self) -> tuple:
        return dataclasses.astuple(self)


@dataclasses.dataclass
class Task:
    sid: int
    dir: str
    expect: Expect
    content_new: bool  # first time these bytes are checked: run the content-only checks
    oracle: bool  # compare qemu-img convert with qcowfs' read
    where: str  # crash point and kept writes, for reports
    failed_dir: str = ""  # where a failing state is kept
    nbd: bool = (
        False  # intent mode: check the bitmaps in QEMU's own view too (qemu-nbd -B + nbdinfo)
    )


_MODEL: Optional[Model] = None
_GUEST_CACHE: list = [None, None]  # [durable count, bytearray]


def _guest_at(m: Model, n: int) -> bytearray:
    c_n, c_buf = _GUEST_CACHE
    if c_buf is None or c_n > n or _GUEST_CACHE[0] is None:
        c_n, c_buf = 0, bytearray(m.initial)
    for off, data in m.writes[c_n:n]:
        c_buf[off : off + len(data)] = data
    _GUEST_CACHE[0], _GUEST_CACHE[1] = n, c_buf
    return c_buf


def compare_guest(actual: GuestBytes, m: Model, ex: Expect) -> Optional[str]:
    """None if every byte is the flushed guest content or a value written there since."""
    expected = _guest_at(m, ex.durable)
    if actual == expected:
        return None
    if len(actual) != len(expected):
        return f"guest disk reads {len(actual)} bytes, expected {len(expected)}"
    pend = [(i, m.writes[i][0], m.writes[i][1]) for i in ex.pending if m.writes[i][1]]
    regions = _merge((o, o + len(d)) for _, o, d in pend)

    def bad(pos: int) -> str:
        last = next(
            (
                i
                for i in range(ex.durable - 1, -1, -1)
                if m.writes[i][0] <= pos < m.writes[i][0] + len(m.writes[i][1])
            ),
            None,
        )
        src = f"guest write #{last}" if last is not None else "the pristine image"
        return (
            f"guest byte {pos:#x} reads {actual[pos]:#04x}, expected {expected[pos]:#04x} (from {src}, "
            f"made durable by a guest flush after {ex.durable} writes; pending writes {list(ex.pending)})"
        )

    # outside the pending writes' regions: equal to the expected content (compared in one go, without
    # copying a whole disk's slices: the regions are patched into the cached buffer, then restored)
    saved = [(a, bytes(expected[a:b])) for a, b in regions]
    try:
        for a, b in regions:
            expected[a:b] = actual[a:b]
        outside_ok = actual == expected
    finally:
        for a, old in saved:
            expected[a : a + len(old)] = old
    pos = 0
    for a, b in regions + [(len(actual), len(actual))]:
        if outside_ok:
            break
        if actual[pos:a] != expected[pos:a]:
            k = next(k for k in range(pos, a) if actual[k] != expected[k])
            return bad(k)
        pos = b
    for a, b in regions:
        cuts = sorted({a, b} | {x for _, o, d in pend for x in (o, o + len(d)) if a < x < b})
        for x, y in zip(cuts, cuts[1:]):
            seg = actual[x:y]
            cands = [expected[x:y]] + [
                d[x - o : y - o] for _, o, d in pend if o <= x and y <= o + len(d)
            ]
            if any(seg == c for c in cands):
                continue
            # mixed: sector by sector (guest sectors map to host sectors), then byte by byte
            s0 = x
            while s0 < y:
                s1 = min(y, (s0 // SECTOR + 1) * SECTOR)
                blk = seg[s0 - x : s1 - x]
                if not any(blk == c[s0 - x : s1 - x] for c in cands):
                    for k in range(s0, s1):
                        v = actual[k]
                        if v != expected[k] and all(v != c[k - x] for c in cands[1:]):
                            return bad(k) + " (and no pending write wrote that value there)"
                s0 = s1
    return None


def _copy_state(src: str, dst: str, files: list) -> None:
    os.makedirs(dst, exist_ok=True)
    for n in files:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))


class _ErrorLog(logging.Handler):
    """Collects what qcowfs logs at ERROR level while it reads a crash state: it found damage."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_ERRORS: Optional[_ErrorLog] = None


def _worker_logging() -> _ErrorLog:
    global _ERRORS
    if _ERRORS is None:
        lg = logging.getLogger("qcowfs")
        lg.handlers[:] = []
        lg.propagate = False  # expected warnings (refcount rebuilds) stay quiet
        lg.setLevel(logging.WARNING)
        _ERRORS = _ErrorLog()
        lg.addHandler(_ERRORS)
    _ERRORS.messages.clear()
    return _ERRORS


def check_state(task: Task) -> dict[str, Any]:
    m = _MODEL
    assert m is not None, "the worker has no model (Explorer's pool initializer sets it)"
    errors = _worker_logging()
    img_path = os.path.join(task.dir, m.image)
    fails: list[str] = []
    res: dict[str, Any] = {"sid": task.sid, "dir": task.dir, "where": task.where, "failures": fails}
    try:
        _check_state(m, task, img_path, res, fails)
    except Exception as e:  # a checker crash is a failure too, with its traceback
        import traceback

        fails.append("checker raised: " + "".join(traceback.format_exception(e)))
    if errors.messages:
        fails.append("qcowfs logged errors reading the state: " + "; ".join(errors.messages[:5]))
    if fails:
        failed = os.path.join(task.failed_dir, str(task.sid))
        os.makedirs(os.path.dirname(failed), exist_ok=True)
        shutil.move(task.dir, failed)
        res["dir"] = failed
        with open(os.path.join(failed, "REPORT.txt"), "w") as f:
            f.write(task.where + "\n" + "\n".join(fails) + "\n")
    else:
        shutil.rmtree(task.dir, ignore_errors=True)
    return res


def _check_state(
    m: Model, task: Task, img_path: str, res: dict[str, Any], fails: list[str]
) -> None:
    ex = task.expect
    dirty = header_dirty(img_path)
    full = m
    if m.grows:
        # the state's own virtual size (header): one the grow markers allow; checked at that size, the
        # model's bytes past it are zeros (no guest write goes there before a grow to there returned)
        vsize = read_header_field(img_path, 24, 8)
        if vsize not in ex.sizes:
            fails.append(f"virtual size {vsize} in the header, expected one of {list(ex.sizes)}")
        if ex.growing and task.content_new:
            res["grow_old" if vsize == ex.sizes[0] else "grow_new"] = 1
        if 0 < vsize <= m.size and vsize != m.size:
            m = dataclasses.replace(m, size=vsize)
    if task.content_new:
        res["qemu_checks"] = 1
        rc, out = keyed.check_rc(img_path, m.key_file)
        if rc == 3:
            res["leaks"] = 1
        if dirty:
            res["dirty_states"] = 1
            res["dirty_repaired"] = int(rc == 2)
            if not m.lazy:
                fails.append("dirty bit set on an image without lazy refcounts")
            _check_dirty_repairs(m, task, res, fails)
        elif rc not in (0, 3):
            # while a snapshot creation/deletion is under way, harmless OFLAG_COPIED mismatches (QEMU's own
            # order leaves them too: _copied_mismatch_problem) are allowed; nothing else
            why = _copied_mismatch_problem(task, img_path) if rc == 2 and ex.snaps_maybe else ""
            if rc == 2 and ex.snaps_maybe and not why:
                res["copied_mismatch"] = 1
            else:
                fails.append(
                    f"qemu-img check exit {rc} (want 0 or 3): {json.dumps(out)}"
                    + (f"; {why}" if why else "")
                )
    # qcowfs opens it read-only and reads the guest disk
    try:
        img = Qcow2Image(img_path, read_only=True, keys=m.keys())
    except Exception as e:
        fails.append(f"qcowfs cannot open the state read-only: {e!r}")
        return
    with_snaps = bool(m.snapshots or m.snap_at or img.header.nb_snapshots)
    snaps = views = None
    try:
        actual = img.read(0, m.size)
        store = BitmapStore(img)
        bms = {
            n: (b.inconsistent, b.bits, b.granularity, b.enabled) for n, b in store.bitmaps.items()
        }
        stale = img.header.stale_bitmaps_ext is not None
        if with_snaps:
            try:
                listed = read_all(img)
                views = {s.id: bytes(SnapshotView(img, s).read(0, s.disk_size)) for s in listed}
                snaps = listed
            except Exception as e:
                fails.append(f"qcowfs cannot read the internal snapshots: {e!r}")
    finally:
        img.close(flush=False)
    lost = compare_guest(
        actual + bytes(len(full.initial) - len(actual))
        if len(actual) < len(full.initial)
        else actual,
        full,
        ex,
    )
    if lost:
        fails.append("durable data lost: " + lost)
    if task.oracle:
        res["oracle_reads"] = 1
        ref = keyed.raw(img_path, os.path.join(task.dir, "ref.raw"), m.key_file)
        if ref != actual:
            k = next(
                (k for k in range(min(len(ref), len(actual))) if ref[k] != actual[k]),
                min(len(ref), len(actual)),
            )
            fails.append(
                f"qemu-img convert and qcowfs read the state differently (first at guest byte {k:#x})"
            )
    qinfo: dict[str, Any] = {}  # asked for only when something below reads it
    if with_snaps or ex.intent or m.granularities or bms or ex.sizes:
        qinfo = _qemu_info(img_path)
    if ex.sizes and qinfo.get("virtual-size") not in ex.sizes:
        fails.append(
            f"qemu-img info: virtual size {qinfo.get('virtual-size')}, expected one of {list(ex.sizes)}"
        )
    if snaps is not None and views is not None:
        _check_snapshots(m, task, img_path, snaps, views, qinfo, res, fails)
    if ex.intent:
        _check_intent_bitmaps(
            m, task, img_path, bms, stale, actual, res, fails, q=_info_bitmaps(qinfo)
        )
    elif m.granularities or bms:
        _check_bitmaps(m, ex, img_path, bms, stale, res, fails, q=_info_bitmaps(qinfo))


def _qemu_info(img_path: str) -> dict:
    """qemu-img info -U --output=json, run in the image's directory (one call for snapshots and bitmaps)."""
    img_path = os.path.abspath(img_path)
    p = run(["qemu-img", "info", "-U", "--output=json", img_path], cwd=os.path.dirname(img_path))
    return json.loads(p.stdout)


def _info_bitmaps(info: dict) -> dict:
    """name -> {"name", "granularity", "flags"} (qcowfs_dev.oracles.qemu_bitmaps from one qemu-img info)."""
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in data.get("bitmaps", [])}


_SNAP_CACHE: dict = {}  # snapshot name -> expected guest bytes (per worker process)


def snapshot_content(m: Model, name: str) -> Optional[bytes]:
    """The guest content of snapshot NAME: the pristine image's (read by QEMU), or the pristine guest
    content with the guest writes issued before the Driver took it. None for a name the model does not know."""
    if name in m.snapshots:
        return m.snapshots[name]
    if name not in m.snap_at:
        return None
    got = _SNAP_CACHE.get(name)
    if got is None:
        buf = bytearray(m.initial)
        for off, data in m.writes[: m.snap_at[name]]:
            buf[off : off + len(data)] = data
        got = _SNAP_CACHE[name] = bytes(buf[: m.snap_sizes.get(name, len(buf))])
    return got


def _first_diff(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        return min(len(a), len(b))
    lo, hi = 0, len(a)
    while hi - lo > 4096:  # bisect on slices, then scan
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(k for k in range(lo, hi) if a[k] != b[k])


def _check_snapshots(
    m: Model,
    task: Task,
    img_path: str,
    snaps: list,
    views: dict,
    qinfo: dict,
    res: dict,
    fails: list,
) -> None:
    """Internal snapshots: qcowfs' table and QEMU's (qemu-img info) list the same (id, name, VM state
    size) in the same order; every snapshot whose creation completed (and whose deletion did not start)
    is listed, one whose deletion completed is not, one under way may be either; nothing else is
    listed; every listed one reads (qcowfs' SnapshotView; on oracle states also qemu-img convert -l
    snapshot.name=NAME) as the guest disk when it was taken."""
    ex = task.expect
    ours = [(s.id, s.name, s.vm_state_size) for s in snaps]
    theirs = [(s["id"], s["name"], s.get("vm-state-size", 0)) for s in qinfo.get("snapshots", [])]
    if ours != theirs:
        fails.append(
            f"snapshots: qcowfs lists (id, name, vm state size) {ours}, qemu-img info {theirs}"
        )
    names = [s.name for s in snaps]
    if len(set(names)) != len(names):
        fails.append(f"snapshots: a name is listed twice: {names}")
    listed = set(names)
    missing = ex.snaps - listed
    if missing:
        fails.append(
            f"snapshot(s) {sorted(missing)} missing although their creation completed (listed: {names}; "
            f"under way: {sorted(ex.snaps_maybe)})"
        )
    extra = listed - ex.snaps - ex.snaps_maybe
    if extra:
        fails.append(
            f"snapshot(s) {sorted(extra)} listed although "
            + " / ".join(
                "its deletion completed"
                if n in m.snap_at or n in m.snapshots
                else "the workload never made it"
                for n in sorted(extra)
            )
            + f" (listed: {names})"
        )
    if task.content_new:
        under_way = ex.snaps_maybe
        if under_way:
            res["snap_midway_listed"] = int(bool(under_way & listed))
            res["snap_midway_absent"] = int(bool(under_way - listed))
    for s in snaps:
        want = snapshot_content(m, s.name)
        if want is None:
            continue
        how = " (its creation or deletion under way)" if s.name in ex.snaps_maybe else ""
        if s.disk_size != len(want):
            fails.append(f"snapshot {s.name}{how}: disk size {s.disk_size}, expected {len(want)}")
            continue
        got = views[s.id]
        res["snap_views"] = res.get("snap_views", 0) + 1
        if got != want:
            k = _first_diff(got, want)
            fails.append(
                f"snapshot {s.name}{how}: qcowfs reads guest byte {k:#x} as "
                f"{got[k : k + 1].hex() or 'nothing'}, the guest disk held {want[k : k + 1].hex()} when it was taken"
            )
        if task.oracle:
            res["snap_oracle"] = res.get("snap_oracle", 0) + 1
            q = keyed.raw(img_path, os.path.join(task.dir, "snap.raw"), m.key_file, snapshot=s.name)
            if len(q) > len(want) and m.grows and q[len(want) :].count(0) == len(q) - len(want):
                # QEMU loads a snapshot smaller than the grown disk at the disk's current size (zeros past its own)
                q = q[: len(want)]
            if q != want:
                fails.append(
                    f"snapshot {s.name}{how}: qemu-img convert -l snapshot.name={s.name} differs from the "
                    f"guest disk when it was taken (first at guest byte {_first_diff(q, want):#x})"
                )


_L2E_OFFSET = 0x00FFFFFFFFFFFE00  # qcow2.txt: host cluster offset bits of a standard L1/L2 entry


def _copied_mismatch_problem(task: Task, img_path: str) -> str:
    """While a snapshot is being created or deleted, qemu-img check may find OFLAG_COPIED "errors" that
    no order of in-place writes avoids: the refcount of a cluster and the COPIED flag of the entry that
    reaches it live in different clusters, and both change (creation: refcount 1 -> 2 and COPIED
    cleared; deletion: 2 -> 1 and COPIED set). QEMU's own order leaves them too (blkdebug: a failed
    l2_update after qcow2_update_snapshot_refcount's refcount writes in `qemu-img snapshot -c`, a failed
    refblock_update_part after its L2 writes in `-d`). Both kinds are harmless, and exactly these are
    allowed (the empty string), anything else is named:
      - COPIED set on an entry whose cluster has refcount >= 2, where that refcount is a leak (qemu-img
        check: reference=1): a write in place changes a cluster nothing else reaches;
      - COPIED clear on an entry whose cluster has refcount 1: a write copies it needlessly;
    and nothing else but leaks, and qemu-img check -r all (on a copy) leaves the image clean."""
    m = _MODEL
    assert m is not None, "the worker has no model (Explorer's pool initializer sets it)"
    p = keyed.check_text(img_path, m.key_file, cwd=task.dir)
    cb = read_header_field(img_path, 20, 4)
    leaked: dict = {}  # cluster -> references
    mism = []
    for line in p.stderr.splitlines():
        w = line.split()
        if not w:
            continue
        if line.startswith("Leaked cluster "):
            leaked[int(w[2])] = int(w[4].split("=")[1])
        elif line.startswith("ERROR OFLAG_COPIED "):
            kv = dict(x.split("=", 1) for x in w if "=" in x)
            entry = int(kv.get("l1_entry", kv.get("l2_entry", "0")), 16)
            mism.append((line, entry, int(kv["refcount"])))
        else:
            return f"qemu-img check: {line.strip()!r} (not an OFLAG_COPIED mismatch or a leak)"
    if not mism:
        return "qemu-img check exit 2 without an OFLAG_COPIED line"
    for line, entry, refcount in mism:
        copied = bool(entry >> 63)
        cluster = (entry & _L2E_OFFSET) >> cb
        if refcount == 1 and not copied:
            continue
        if refcount >= 2 and copied and leaked.get(cluster) == 1:
            continue
        return (
            f"qemu-img check: {line.strip()!r} is not harmless (cluster {cluster}: leaked with references "
            f"{leaked.get(cluster)})"
        )
    rdir = task.dir + ".crepair"
    _copy_state(task.dir, rdir, m.files)
    try:
        r = os.path.join(rdir, m.image)
        end = os.path.getsize(r)
        keyed.check_rc(r, m.key_file, repair="all")
        rc2, out2 = keyed.check_rc(r, m.key_file)
        # leaks past the crash state's end of file are refcounts that reached the disk before the
        # clusters they count (legal); the repair's own close can grow the file over them
        # (_check_dirty_repairs says more). Found by backup-source-intent: the L1 copy of a
        # checkpoint's snapshot not yet written, its refcount already raised.
        if rc2 != 0 and not (rc2 == 3 and _leaks_past(r, end, m.key_file)):
            return f"after qemu-img check -r all, qemu-img check exits {rc2}: {json.dumps(out2)}"
    finally:
        shutil.rmtree(rdir, ignore_errors=True)
    return ""


def _leaks_past(path: str, end: int, key_file: str = "") -> bool:
    """qemu-img check of path finds leaks only (no errors), every leaked cluster at or past byte `end`."""
    path = os.path.abspath(path)
    p = keyed.check_text(path, key_file)
    cs = 1 << read_header_field(path, 20, 4)
    leaked = [int(x.split()[2]) for x in p.stderr.splitlines() if x.startswith("Leaked cluster ")]
    other = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("Leaked cluster ")]
    return p.returncode == 3 and bool(leaked) and not other and min(leaked) * cs >= end


def _check_dirty_repairs(m: Model, task: Task, res: dict, fails: list) -> None:
    """Lazy refcounts, dirty bit set: qemu-img check -r all must repair it fully, and qcowfs' own
    read-write open must rebuild the refcounts (qemu-img check 0 or 3 after, guest data unchanged)."""
    qdir = task.dir + ".qrepair"
    _copy_state(task.dir, qdir, m.files)
    q = os.path.join(qdir, m.image)
    end = os.path.getsize(q)
    rc, out = keyed.check_rc(q, m.key_file, repair="all")
    rc2, out2 = keyed.check_rc(q, m.key_file)
    if rc2 == 3 and _leaks_past(q, end, m.key_file):
        # qemu-img check cannot see refcounted clusters past the end of the file (leaks there are
        # legal: refcounts reached the disk, the data not), so -r all leaves them; when the repair's
        # own close grows the file (QEMU stores consistent persistent bitmaps, as intent mode leaves
        # them, at close) they come into view as leaks. Only leaks, and only those, are allowed.
        res["repair_eof_leaks"] = 1
    elif rc2 != 0:
        fails.append(
            f"after qemu-img check -r all (exit {rc}: {json.dumps(out)}), qemu-img check exits {rc2}: "
            f"{json.dumps(out2)}"
        )
    shutil.rmtree(qdir, ignore_errors=True)
    fdir = task.dir + ".frepair"
    _copy_state(task.dir, fdir, m.files)
    f = os.path.join(fdir, m.image)
    try:
        before = Qcow2Image(os.path.join(task.dir, m.image), read_only=True, keys=m.keys())
        try:
            want = before.read(0, m.size)
        finally:
            before.close(flush=False)
        img = Qcow2Image(f, read_only=False, keys=m.keys())
        try:
            img.start_writing()
        finally:
            img.close()
        rc3, out3 = keyed.check_rc(f, m.key_file)
        if rc3 not in (0, 3):
            fails.append(
                f"after qcowfs' read-write open (refcount rebuild), qemu-img check exits {rc3}: {json.dumps(out3)}"
            )
        if header_dirty(f):
            fails.append("dirty bit still set after qcowfs' read-write open and close")
        after = Qcow2Image(f, read_only=True, keys=m.keys())
        try:
            if after.read(0, m.size) != want:
                fails.append("qcowfs' refcount rebuild changed the guest data")
        finally:
            after.close(flush=False)
    except Exception as e:
        fails.append(f"qcowfs' read-write open of the dirty state failed: {e!r}")
    shutil.rmtree(fdir, ignore_errors=True)


def _check_bitmaps(
    m: Model,
    ex: Expect,
    img_path: str,
    bms: dict,
    stale: bool,
    res: dict,
    fails: list,
    q: Optional[dict] = None,
) -> None:
    """Every bitmap is in_use (inconsistent), or clean with exactly a stored version's contents; the
    bitmaps a completed checkpoint disabled have their auto flag clear on disk."""
    q = qemu_bitmaps(img_path) if q is None else q
    if set(q) != set(bms):
        fails.append(f"bitmaps: qemu-img info lists {sorted(q)}, qcowfs {sorted(bms)}")
        return
    if stale:
        # bitmaps extension present, autoclear bit clear: every bitmap is dropped (QEMU's protocol
        # while a read-write open marks them in_use: autoclear off, directory, autoclear on)
        res["stale_bitmaps"] = 1
        if not ex.opening:
            fails.append("bitmaps extension without its autoclear bit outside a read-write open")
        if bms:
            fails.append(f"bitmaps listed although the extension is stale: {sorted(bms)}")
        return
    allowed_names = set(m.pristine_bitmap_names) | set(ex.creating)
    for name, (inconsistent, bits, gran, _enabled) in bms.items():
        qin = "in-use" in q[name]["flags"]
        if qin != inconsistent:
            fails.append(
                f"bitmap {name}: QEMU says in-use={qin}, qcowfs inconsistent={inconsistent}"
            )
        if q[name]["granularity"] != gran or gran != m.granularities.get(name, gran):
            fails.append(
                f"bitmap {name}: granularity {q[name]['granularity']} (QEMU) / {gran} (qcowfs), "
                f"expected {m.granularities.get(name)}"
            )
        if name not in allowed_names:
            fails.append(f"bitmap {name} appeared from nowhere")
            continue
        if name in ex.removed:
            fails.append(f"bitmap {name} is still there after its removal completed")
            continue
        if name in ex.disabled and ("auto" in q[name]["flags"] or _enabled):
            fails.append(
                f"bitmap {name}: a completed checkpoint disabled it, but on disk it records (QEMU flags "
                f"{q[name]['flags']}, qcowfs enabled={_enabled})"
            )
        if inconsistent:
            res["in_use_bitmaps"] = res.get("in_use_bitmaps", 0) + 1
            if ex.closed:
                fails.append(f"bitmap {name} still in_use after a clean close")
            continue
        res["clean_bitmaps"] = res.get("clean_bitmaps", 0) + 1
        ok = sorted(v for n, v in ex.clean_ok if n == name)
        if ex.closed:
            ok = sorted(v for n, v in ex.must if n == name)
        if not any(bits == m.versions[(name, v)] for v in ok):
            match = [v for (n, v), want in m.versions.items() if n == name and bits == want]
            fails.append(
                f"bitmap {name} is clean (not in_use) but holds "
                + (
                    f"version {match} (allowed here: {ok or 'none: it must be in_use'})"
                    if match
                    else f"no stored version ({bits.count()} bits set; allowed here: {ok or 'none: it must be in_use'})"
                )
            )
    for name in ex.created:
        if name not in bms:
            fails.append(f"bitmap {name} is missing although its creation completed")
    if ex.closed:
        want = {n for n, _ in ex.must}
        if set(bms) != want:
            fails.append(
                f"after a clean close the bitmaps are {sorted(bms)}, expected {sorted(want)}"
            )


# ----------------------------------------------------------------------------- intent mode
def _check_intent_bitmaps(
    m: Model,
    task: Task,
    img_path: str,
    bms: dict,
    stale: bool,
    actual: GuestBytes,
    res: dict,
    fails: list,
    q: Optional[dict] = None,
) -> None:
    """Intent mode (bitmap_intent.py): at every crash point every bitmap is valid on disk, never in_use
    (not even while it is being created: the new entry is written consistent), and a superset of
    what changed since it started recording or was last cleared:

    - lower bound: every bit of the model's exact bits as of the last completed guest write or command
      (a write's bits are durable before it is issued, so before it returns), except while a clear
      (zeros) or the creation is under way;
    - changed data: a granule whose guest data in this state cannot be explained without a write the
      bitmap recorded (each byte is the content of the durable writes it did not record, or a value an
      unflushed write it did not record put there) has its bit set: the intent was on disk before the
      data (the in-progress write counts; writes while it was disabled, or before its last clear, do not);
    - upper bound: no bit outside the 8 MiB regions (aligned; 8 granules when they are larger) of the
      writes it recorded and its extra ranges (pristine bits, merges), as of before and after the step
      under way: intent mode marks whole regions, nothing else;
    - flags: "auto" as recording (either while enable/disable is under way); the granularity;
    - presence: created -> present, removal completed -> gone, nothing from nowhere;
    - after a completed clean close: exactly the model's bits.
    On task.nbd states the bits are also read through QEMU (qemu-nbd -B, nbdinfo): every check above
    is run on QEMU's view too, and it must equal qcowfs' reading."""
    ex = task.expect
    if ex.opening and task.content_new:
        res["intent_opening"] = 1
    q = qemu_bitmaps(img_path) if q is None else q
    if set(q) != set(bms):
        fails.append(f"bitmaps: qemu-img info lists {sorted(q)}, qcowfs {sorted(bms)}")
        return
    if stale and ex.growing:
        # a grow under way marks the bitmaps in_use by QEMU's in-place protocol (autoclear bit off, directory,
        # autoclear bit on): in between the extension is stale, as inside a read-write open in close mode
        res["stale_bitmaps"] = 1
        res["grow_in_use"] = 1 if task.content_new else 0
        return
    if stale:
        res["stale_bitmaps"] = 1
        fails.append(
            "intent mode: the bitmaps extension is stale (autoclear bit clear): every bitmap is lost"
        )
        return
    phases = {ph.name: ph for ph in ex.bms}
    for name in bms:
        if name not in phases:
            fails.append(
                f"bitmap {name} is still there after its removal completed"
                if name in ex.removed
                else f"bitmap {name} appeared from nowhere"
            )
    for name, ph in phases.items():
        if name not in bms:
            if ph.op not in ("create", "remove"):
                fails.append(
                    f"bitmap {name} is missing (its creation completed, its removal did not start)"
                )
            continue
        inconsistent, bits, gran, enabled = bms[name]
        st = ph.before or ph.after
        flags = q[name]["flags"]
        if q[name]["granularity"] != gran or gran != st.granularity:
            fails.append(
                f"bitmap {name}: granularity {q[name]['granularity']} (QEMU) / {gran} (qcowfs), "
                f"expected {st.granularity}"
            )
            continue
        if ("in-use" in flags) != inconsistent:
            fails.append(f"bitmap {name}: QEMU flags {flags}, qcowfs inconsistent={inconsistent}")
        if inconsistent and ex.growing:
            # a grow under way: the bitmaps follow QEMU's protocol (in_use) while their tables change size
            res["grow_in_use"] = 1 if task.content_new else 0
            continue
        if inconsistent:
            # never, not even while it is being created (the new entry is written consistent)
            fails.append(
                f"intent-mode bitmap {name} is in_use (QEMU flags {flags}; step under way: {ph.op or 'none'})"
            )
            continue
        rec_ok = {ph.before.recording} if ph.before else set()
        if ph.after is not None:
            rec_ok.add(ph.after.recording)
        if ("auto" in flags) not in rec_ok or enabled not in rec_ok:
            fails.append(
                f"bitmap {name}: QEMU flags {flags}, qcowfs enabled={enabled}, expected recording in {sorted(rec_ok)} "
                f"(step under way: {ph.op or 'none'})"
            )
        res["intent_bitmaps"] = res.get("intent_bitmaps", 0) + 1
        for why in _intent_bits_problems(m, ex, ph, bits, actual, res):
            fails.append(f"bitmap {name} (qcowfs' reading): {why}")
        if ex.closed and bits != state_bits(m, ph.before):
            fails.append(
                f"bitmap {name}: after a clean close it holds {bits.count()} bits, not the exact "
                f"{state_bits(m, ph.before).count()} the guest writes set"
            )
        if task.nbd:
            res["nbd_views"] = res.get("nbd_views", 0) + 1
            qbits = nbd_bits(img_path, name, gran, m.size, m.key_file)
            if qbits != bits:
                k = (qbits ^ bits).find(1)
                fails.append(
                    f"bitmap {name}: QEMU's NBD view differs from qcowfs' reading (first at bit {k}: "
                    f"QEMU {qbits[k]}, qcowfs {bits[k]})"
                )
            for why in _intent_bits_problems(m, ex, ph, qbits, actual, {}):
                fails.append(f"bitmap {name} (QEMU's NBD view): {why}")
            if ex.closed and qbits != state_bits(m, ph.before):
                fails.append(
                    f"bitmap {name}: after a clean close QEMU serves {qbits.count()} bits, not the exact "
                    f"{state_bits(m, ph.before).count()}"
                )
    if not task.content_new:
        res.pop("intent_landed", None)  # counted once per distinct state
    if ex.closed:
        want = {n for n, ph in phases.items() if ph.before is not None}
        if set(bms) != want:
            fails.append(
                f"after a clean close the bitmaps are {sorted(bms)}, expected {sorted(want)}"
            )


def nbd_dirty_map(img_path: str, name: str, key_file: str = "") -> list:
    """qcowfs_dev.oracles.dirty_map (qemu-nbd -r -B NAME served to nbdinfo --map), run in the image's
    directory: QEMU opens an external data file named relatively from its working directory. An
    encrypted image is opened with the key in key_file (keyed.py)."""
    img_path = os.path.abspath(img_path)
    server = keyed.nbd_server(img_path, key_file, bitmap=name)
    p = run(
        ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", "--", "[", *server, "]"],
        check=False,
        timeout=120,
        cwd=os.path.dirname(img_path),
    )
    if p.returncode != 0:
        raise AssertionError(
            f"nbdinfo --map of {' '.join(server)} exited {p.returncode}: {p.stderr.strip()}"
        )
    return [(e["offset"], e["length"], e["type"] & 1 == 1) for e in json.loads(p.stdout)]


def nbd_bits(img_path: str, name: str, g: int, size: int, key_file: str = "") -> bitarray:
    """Bitmap NAME as QEMU serves it (qemu-nbd -r -B NAME, nbdinfo --map), as bits of granularity g."""
    bits = bitarray(-(-size // g), endian="little")
    bits.setall(0)
    for off, length, dirty in nbd_dirty_map(img_path, name, key_file):
        if dirty and length:
            bits[off // g : (off + length - 1) // g + 1] = 1
    return bits


def _region_bits(m: Model, st: BmState) -> bitarray:
    """The most an intent-mode bitmap in state st may hold on disk: the aligned intent region of every
    write it recorded, and the granules of its extra ranges."""
    g = st.granularity
    region = max(INTENT_REGION, 8 * g)
    bits = bitarray(-(-m.size // g), endian="little")
    bits.setall(0)
    for i in st.rec:
        off, data = m.writes[i]
        a = off // region * region
        b = -(-(off + len(data)) // region) * region
        bits[a // g : -(-b // g)] = 1
    for off, length in st.extra:
        if length:
            bits[off // g : (off + length - 1) // g + 1] = 1
    return bits


def _intent_bits_problems(
    m: Model, ex: Expect, ph: BmPhase, bits: bitarray, actual: GuestBytes, res: dict[str, Any]
) -> list[str]:
    """What is wrong with the on-disk bits of one intent-mode bitmap in this crash state (see
    _check_intent_bitmaps): one line per rule broken (lower bound, changed data, upper bound)."""
    known = ph.before or ph.after
    assert known is not None, f"bitmap {ph.name}: no state before or after the step under way"
    g = known.granularity
    nbits = -(-m.size // g)
    if len(bits) != nbits:
        return [f"{len(bits)} bits, expected {nbits}"]
    out = []
    before = ph.before
    under_way = f"step under way: {ph.op or 'none'}"
    # lower bound: the exact bits as of the last completed step (nothing while zeros or creation are under way)
    if before is not None and ph.op not in ("clear", "create"):
        missing = state_bits(m, before) & ~bits
        if missing.any():
            k = missing.find(1)
            by = [i for i in before.rec if _touches(m.writes[i], k * g, (k + 1) * g)]
            out.append(
                f"bit {k} (guest bytes {k * g:#x}+{g:#x}) is clear on disk although "
                + (
                    f"guest write #{by[0]} set it and returned before the crash"
                    if by
                    else "it was dirty (pristine or merged bits) and no clear completed"
                )
                + f" ({missing.count()} such bits; {under_way})"
            )
    # changed data: the recorded writes, including the one under way, not those of a clear under way
    rec: tuple[int, ...]
    if ph.op == "write":
        assert ph.after is not None, f"bitmap {ph.name}: a guest write under way leads to a state"
        rec = ph.after.rec
    elif ph.op in ("clear", "create"):
        rec = ()
    else:
        assert before is not None, (
            f"bitmap {ph.name}: no state before a {ph.op or 'step'} of an existing bitmap"
        )
        rec = before.rec
    bad = _unexplained(m, ex, rec, g, bits, actual, res)
    if bad:
        k, p, ws = bad
        out.append(
            f"bit {k} (guest bytes {k * g:#x}+{g:#x}) is clear on disk, but guest byte {p:#x} holds data only "
            f"a write it recorded can have put there (#{', #'.join(map(str, ws))}): the data reached the disk "
            f"before the intent (writes durable: {ex.durable}; unflushed: {list(ex.pending)}; {under_way})"
        )
    # upper bound: whole intent regions of recorded writes, as of before and after the step under way
    ub = bitarray(nbits, endian="little")
    ub.setall(0)
    for st in (before, ph.after):
        if st is not None:
            ub |= _region_bits(m, st)
    extra = bits & ~ub
    if extra.any():
        k = extra.find(1)
        out.append(
            f"bit {k} (guest bytes {k * g:#x}+{g:#x}) is set on disk outside every intent region of the "
            f"writes it recorded ({extra.count()} such bits; {under_way})"
        )
    return out


def _touches(w: tuple, a: int, b: int) -> bool:
    off, data = w
    return off < b and a < off + len(data)


def _unexplained(
    m: Model,
    ex: Expect,
    rec: tuple[int, ...],
    g: int,
    bits: bitarray,
    act: GuestBytes,
    res: dict[str, Any],
) -> Optional[tuple[int, int, list[int]]]:
    """(granule, guest byte, recorded writes there) of the first byte, in a granule whose bit is clear, that
    holds a value no write outside `rec` explains: neither the content of the durable writes not in rec
    (over the pristine content), nor a value an unflushed write not in rec wrote there. None if none.
    Also counts, in res["intent_landed"], states where unflushed data of a recorded write is on disk."""
    if not rec:
        return None
    recset = set(rec)
    pending = [i for i in ex.pending if i in recset]
    if pending and not res.get("intent_landed"):
        flushed = _guest_at(m, ex.durable)
        for i in pending:
            off, data = m.writes[i]
            if act[off : off + len(data)] == data and flushed[off : off + len(data)] != data:
                res["intent_landed"] = 1
                break
    ranges = []
    for i in rec:
        off, data = m.writes[i]
        end = off + len(data)
        g1 = (end - 1) // g + 1
        k = bits.find(0, off // g, g1)
        while k >= 0:
            ranges.append((max(off, k * g), min(end, (k + 1) * g)))
            k = bits.find(0, k + 1, g1)
    if not ranges:
        return None
    durable_other = [i for i in range(ex.durable) if i not in recset]
    pending_other = [i for i in ex.pending if i not in recset]
    for a, b in _merge(ranges):
        base = bytearray(m.initial[a:b])
        for i in durable_other:
            off, data = m.writes[i]
            lo, hi = max(a, off), min(b, off + len(data))
            if lo < hi:
                base[lo - a : hi - a] = data[lo - off : hi - off]
        if act[a:b] == base:
            continue
        cands = [m.writes[i] for i in pending_other if _touches(m.writes[i], a, b)]
        for p in range(a, b):
            v = act[p]
            if v == base[p - a] or any(o <= p < o + len(d) and d[p - o] == v for o, d in cands):
                continue
            return p // g, p, [i for i in rec if _touches(m.writes[i], p, p + 1)]
    return None
