"""Checking one crash state (in a worker process): what must hold (Expect, from the driver's
markers before the crash point), and the checks: qemu-img check (and, with lazy refcounts and the
dirty bit, both repairs), qcowfs' read-only open reading the durable guest data, the bitmaps'
flags and contents, no error logged by qcowfs, and on a sample qemu-img convert against qcowfs.

The explorer sets _MODEL before it forks its workers; check_state() runs in them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Optional

from qcowfs.bitmaps import BitmapStore
from qcowfs.image import Qcow2Image

from support.oracles import qemu_bitmaps, qemu_check_rc, qemu_raw
from support.probes import header_dirty

from .driver import Model
from .iolog import SECTOR, _merge


@dataclasses.dataclass
class Expect:
    """What must hold in a crash state, from the markers the driver logged before the crash point."""

    durable: int = 0  # guest writes[:durable] were flushed
    pending: tuple = ()  # guest writes issued since (may or may not be there)
    #: (name, version) a clean bitmap may show: the last stored versions until a guest write starts
    #: (a read-write open marks them in_use first), plus the versions a clean close is storing
    clean_ok: frozenset = frozenset()
    closed: bool = False  # a clean close completed (and no new open since): bitmaps stored, exactly right
    must: frozenset = frozenset()  # after a clean close: exactly these (name, version), clean
    opening: bool = False  # inside a read-write open: activation may leave the extension stale
    created: frozenset = frozenset()  # bitmaps whose creation completed (present from then on)
    creating: frozenset = frozenset()  # bitmaps whose creation had started
    removed: frozenset = frozenset()  # bitmaps whose removal completed (absent from then on)

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


def compare_guest(actual: bytes, m: Model, ex: Expect) -> Optional[str]:
    """None if every byte is the flushed guest content or a value written there since."""
    expected = _guest_at(m, ex.durable)
    if actual == expected:
        return None
    if len(actual) != len(expected):
        return f"guest disk reads {len(actual)} bytes, expected {len(expected)}"
    pend = [(i, m.writes[i][0], m.writes[i][1]) for i in ex.pending if m.writes[i][1]]
    regions = _merge((o, o + len(d)) for _, o, d in pend)

    def bad(pos: int) -> str:
        last = next((i for i in range(ex.durable - 1, -1, -1)
                     if m.writes[i][0] <= pos < m.writes[i][0] + len(m.writes[i][1])), None)
        src = f"guest write #{last}" if last is not None else "the pristine image"
        return (f"guest byte {pos:#x} reads {actual[pos]:#04x}, expected {expected[pos]:#04x} (from {src}, "
                f"made durable by a guest flush after {ex.durable} writes; pending writes {list(ex.pending)})")

    pos = 0
    for a, b in regions + [(len(actual), len(actual))]:
        if actual[pos:a] != expected[pos:a]:
            k = next(k for k in range(pos, a) if actual[k] != expected[k])
            return bad(k)
        pos = b
    for a, b in regions:
        cuts = sorted({a, b} | {x for _, o, d in pend for x in (o, o + len(d)) if a < x < b})
        for x, y in zip(cuts, cuts[1:]):
            seg = actual[x:y]
            cands = [expected[x:y]] + [d[x - o : y - o] for _, o, d in pend if o <= x and y <= o + len(d)]
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

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list = []

    def emit(self, record) -> None:
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


def check_state(task: Task) -> dict:
    m = _MODEL
    errors = _worker_logging()
    img_path = os.path.join(task.dir, m.image)
    res = {"sid": task.sid, "dir": task.dir, "where": task.where, "failures": []}
    fails = res["failures"]
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


def _check_state(m: Model, task: Task, img_path: str, res: dict, fails: list) -> None:
    ex = task.expect
    dirty = header_dirty(img_path)
    if task.content_new:
        res["qemu_checks"] = 1
        rc, out = qemu_check_rc(img_path)
        if rc == 3:
            res["leaks"] = 1
        if dirty:
            res["dirty_states"] = 1
            res["dirty_repaired"] = int(rc == 2)
            if not m.lazy:
                fails.append("dirty bit set on an image without lazy refcounts")
            _check_dirty_repairs(m, task, fails)
        elif rc not in (0, 3):
            fails.append(f"qemu-img check exit {rc} (want 0 or 3): {json.dumps(out)}")
    # qcowfs opens it read-only and reads the guest disk
    try:
        img = Qcow2Image(img_path, read_only=True)
    except Exception as e:
        fails.append(f"qcowfs cannot open the state read-only: {e!r}")
        return
    try:
        actual = img.read(0, m.size)
        store = BitmapStore(img)
        bms = {n: (b.inconsistent, b.bits, b.granularity) for n, b in store.bitmaps.items()}
        stale = img.header.stale_bitmaps_ext is not None
    finally:
        img.close(flush=False)
    why = compare_guest(actual, m, ex)
    if why:
        fails.append("durable data lost: " + why)
    if task.oracle:
        res["oracle_reads"] = 1
        ref = qemu_raw(img_path, os.path.join(task.dir, "ref.raw"))
        if ref != actual:
            k = next((k for k in range(min(len(ref), len(actual))) if ref[k] != actual[k]), min(len(ref), len(actual)))
            fails.append(f"qemu-img convert and qcowfs read the state differently (first at guest byte {k:#x})")
        for snap, want in m.snapshots.items():
            got = qemu_raw(img_path, os.path.join(task.dir, "snap.raw"), snapshot=snap)
            if got != want:
                fails.append(f"internal snapshot {snap} changed")
    if m.granularities or bms:
        _check_bitmaps(m, ex, img_path, bms, stale, res, fails)


def _check_dirty_repairs(m: Model, task: Task, fails: list) -> None:
    """Lazy refcounts, dirty bit set: qemu-img check -r all must repair it fully, and qcowfs' own
    read-write open must rebuild the refcounts (qemu-img check 0 or 3 after, guest data unchanged)."""
    qdir = task.dir + ".qrepair"
    _copy_state(task.dir, qdir, m.files)
    q = os.path.join(qdir, m.image)
    rc, out = qemu_check_rc(q, repair="all")
    rc2, out2 = qemu_check_rc(q)
    if rc2 != 0:
        fails.append(f"after qemu-img check -r all (exit {rc}: {json.dumps(out)}), qemu-img check exits {rc2}: "
                     f"{json.dumps(out2)}")
    shutil.rmtree(qdir, ignore_errors=True)
    fdir = task.dir + ".frepair"
    _copy_state(task.dir, fdir, m.files)
    f = os.path.join(fdir, m.image)
    try:
        before = Qcow2Image(os.path.join(task.dir, m.image), read_only=True)
        try:
            want = before.read(0, m.size)
        finally:
            before.close(flush=False)
        img = Qcow2Image(f, read_only=False)
        try:
            img.start_writing()
        finally:
            img.close()
        rc3, out3 = qemu_check_rc(f)
        if rc3 not in (0, 3):
            fails.append(f"after qcowfs' read-write open (refcount rebuild), qemu-img check exits {rc3}: {json.dumps(out3)}")
        if header_dirty(f):
            fails.append("dirty bit still set after qcowfs' read-write open and close")
        after = Qcow2Image(f, read_only=True)
        try:
            if after.read(0, m.size) != want:
                fails.append("qcowfs' refcount rebuild changed the guest data")
        finally:
            after.close(flush=False)
    except Exception as e:
        fails.append(f"qcowfs' read-write open of the dirty state failed: {e!r}")
    shutil.rmtree(fdir, ignore_errors=True)


def _check_bitmaps(m: Model, ex: Expect, img_path: str, bms: dict, stale: bool, res: dict, fails: list) -> None:
    """Every bitmap is in_use (inconsistent), or clean with exactly a stored version's contents."""
    q = qemu_bitmaps(img_path)
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
    for name, (inconsistent, bits, gran) in bms.items():
        qin = "in-use" in q[name]["flags"]
        if qin != inconsistent:
            fails.append(f"bitmap {name}: QEMU says in-use={qin}, qcowfs inconsistent={inconsistent}")
        if q[name]["granularity"] != gran or gran != m.granularities.get(name, gran):
            fails.append(f"bitmap {name}: granularity {q[name]['granularity']} (QEMU) / {gran} (qcowfs), "
                         f"expected {m.granularities.get(name)}")
        if name not in allowed_names:
            fails.append(f"bitmap {name} appeared from nowhere")
            continue
        if name in ex.removed:
            fails.append(f"bitmap {name} is still there after its removal completed")
            continue
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
            fails.append(f"bitmap {name} is clean (not in_use) but holds "
                         + (f"version {match} (allowed here: {ok or 'none: it must be in_use'})" if match else
                            f"no stored version ({bits.count()} bits set; allowed here: {ok or 'none: it must be in_use'})"))
    for name in ex.created:
        if name not in bms:
            fails.append(f"bitmap {name} is missing although its creation completed")
    if ex.closed:
        want = {n for n, _ in ex.must}
        if set(bms) != want:
            fails.append(f"after a clean close the bitmaps are {sorted(bms)}, expected {sorted(want)}")
