"""Repairs after a consistency check (QEMU's qcow2_check_refcounts repair half) and the
refcount rebuild a lazy-refcounts image needs after an unclean close."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from ..errors import QcowError, RepairImpossible
from ..format import header as fmt
from .consistency import Checker

if TYPE_CHECKING:
    from .consistency import CheckedImage

    class RepairedImage(CheckedImage, Protocol):
        """A Qcow2Image (image.py imports this module, so it cannot be named here)."""

        def set_dirty_bit(self, on: bool) -> None: ...


log = logging.getLogger(__name__)


def apply_repair(img: RepairedImage, ck: Checker, mode: str) -> tuple:
    """Fix leaks (and with mode 'all', refcounts that are too low), then COPIED flags.

    As in QEMU's qcow2_check_refcounts(): the COPIED flags are judged against the repaired
    refcounts, with mode 'all' always, with mode 'leaks' only when that is safe (nothing but
    leaks and COPIED flags was wrong). With mode 'leaks', an image whose refcount structures
    need rebuilding (a cluster in use with refcount 0, a broken refcount block) is refused
    like qemu-img refuses it ('need to rebuild refcount structures'), before anything is written."""
    rc = img.refcounts
    if mode == "leaks" and ck.rebuild:
        raise RepairImpossible(
            "the refcount structures need to be rebuilt (a cluster in use has refcount 0, or a "
            "refcount block is damaged): use --repair=all",
            img.path,
        )
    fixed_leaks = fixed_corr = 0
    for c, stored, want in ck.leaked:
        rc.update(c, want - stored)
        fixed_leaks += 1
    if mode == "all":
        for c, stored, want in ck.wrong:
            if rc.block(c // rc.entries_per_block) is None:
                raise RepairImpossible(
                    f"cannot repair: the refcount block covering cluster {c} is missing; "
                    f"use 'qemu-img check -r all'",
                    img.path,
                )
            rc.update(c, want - stored)
            fixed_corr += 1
    rc.write_dirty()
    img.file.flush()
    safe = not ck.res.check_errors and ck.res.corruptions == len(ck.copied_wrong)
    if mode == "all" or safe:
        done = set()
        for table_off, idx, e, is_l1, data_file in ck.copied_checks:
            if (table_off, idx) in done:
                continue
            done.add((table_off, idx))
            try:
                stored = 1 if data_file else rc.get((e & fmt.OFFSET_MASK) >> img.geo.cluster_bits)
            except QcowError:
                continue
            ne = (e | fmt.QCOW_OFLAG_COPIED) if stored == 1 else (e & ~fmt.QCOW_OFLAG_COPIED)
            if ne == e:
                continue
            img.file.pwrite(ne.to_bytes(8, "big"), table_off + 8 * idx)
            if is_l1:
                img.active.l1_entry_written(idx, ne)
            fixed_corr += 1
        img.l2.clear()  # the tables were rewritten on disk behind the cache
        img.file.flush()
    if img.header.dirty:
        img.set_dirty_bit(False)
    return fixed_leaks, fixed_corr


def rebuild_refcounts(img: RepairedImage) -> int:
    """Used on open when a lazy-refcounts image has the dirty bit set: make refcounts exact."""
    ck = Checker(img)
    ck.run()
    fixed = apply_repair(img, ck, "all")
    rc = img.refcounts
    rc.free_hint = 0
    log.info("%s: refcounts rebuilt (%d leaks, %d other fixes)", img.path, fixed[0], fixed[1])
    return sum(fixed)
