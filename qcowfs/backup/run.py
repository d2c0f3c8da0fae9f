"""One `qcowfs backup SOURCE DIR`, step by step, in the order that keeps it crash-safe.

    1. tidy DIR: half-written files of killed runs go, and manifests of runs that died between
       publishing their manifest and their image
    2. decide: incremental when a consistent bitmap chain covers everything since the last
       complete backup (that backup's bitmap, then the bitmaps of runs that started after it and
       never completed), else full, saying why
    3. DIR/.NAME.pending, durable: from here the source may hold checkpoint NAME
    4. checkpoint NAME in the source: snapshot NAME + recording bitmap NAME, the chain's
       recording bitmap disabled, in one step
    5. copy (copier.py) into DIR/.NAME.qcow2.part, fsync; the manifest likewise
    6. publish NAME.json, then NAME.qcow2 (rename + directory fsync): the backup is complete
    7. only now drop what the source no longer needs: snapshot NAME, the chain's bitmaps, and
       whatever killed runs left (snapshots and bitmaps DIR's records name, nothing else)
    8. remove the pending markers

A run killed anywhere before 6 leaves the previous chain as it was, and its bitmap (if step 4
happened) in the chain the next run merges; after 6, the next run finds a complete backup and
drops the leftovers of 7. The power-loss harness covers the source's steps (checkpoint, drops);
docs/backup.md has the whole story.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

from bitarray import bitarray

from ..errors import BackupError, QcowError
from . import copier
from . import table as tables
from .catalog import (
    MANIFEST_VERSION,
    Backup,
    BackupDir,
    atomic_write,
    check_name,
    header_backing,
    publish,
)
from .source import Source, encryption_of

Progress = Callable[[int, int], None]
#: incremental files have clusters as small as the bitmaps' granularity, but not below 4 KiB
FILE_CLUSTER_BITS_MIN = 12
#: the largest bitmap a backup checkpoint makes: 2^27 bits, 16 MiB
BITMAP_BITS_MAX = 1 << 27


def bitmap_granularity(disk_size: int) -> int:
    """The granularity of a backup checkpoint's bitmap: 4 KiB (what guests write), coarser only
    for disks over 512 GiB, to keep the bitmap at most 16 MiB. QEMU's default is the cluster size
    (64 KiB): after 20,000 random 4 KiB writes to a 4 GiB disk that is 1.05 GiB to copy, at
    4 KiB it is 80 MiB (docs/backup.md, "Granularity")."""
    g = 4096
    while disk_size > g * BITMAP_BITS_MAX:
        g <<= 1
    return g


def default_name(bdir: BackupDir, taken: set[str]) -> str:
    base = time.strftime("backup-%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = base, 1
    while name in taken or os.path.exists(bdir.manifest_path(name)):
        n += 1
        name = f"{base}-{n}"
    return name


def chain_problem(bdir: BackupDir, last: Backup) -> Optional[str]:
    """What is wrong with the files last's chain reads, by their headers (None: nothing)."""
    name: Optional[str] = f"{last.name}.qcow2"
    seen: set[str] = set()
    child = None
    while name is not None:
        if name in seen or len(seen) > 4096:
            return f"the backing chain of {last.name}.qcow2 loops"
        seen.add(name)
        path = os.path.join(bdir.path, name)
        if os.path.dirname(name) or not name.endswith(".qcow2"):
            return f"{child} has backing file {name!r}, which is not a backup in this directory"
        try:
            backing = header_backing(path)
        except FileNotFoundError:
            return f"{name}" + (f" (backing file of {child})" if child else "") + " is missing"
        except (OSError, QcowError) as e:
            return f"{name} cannot be read: {e}"
        if not os.path.exists(bdir.manifest_path(name[: -len(".qcow2")])):
            return f"{name} has no manifest"
        child, name = name, backing
    try:  # the table the next point starts from
        m = last.manifest
        tables.decode(str(m["table"]), -(-int(m["disk_size"]) // int(m["cluster_size"])))
    except Exception as e:  # noqa: BLE001 - any damage of the manifest means: start a new chain
        return f"the manifest of {last.name} is damaged ({e})"
    return None


def decide(
    bdir: BackupDir, full: bool, bitmaps: dict[str, dict[str, Any]]
) -> tuple[Optional[Backup], list[str], Optional[str]]:
    """(the backup an incremental builds on, the bitmaps whose union it copies, why full)."""
    done = [b for b in bdir.backups() if b.has_image]
    if full:
        return None, [], "--full was given"
    if not done:
        return None, [], "no earlier backup in this directory"
    last = done[-1]
    problem = chain_problem(bdir, last)
    if problem:
        return None, [], f"the backup chain is damaged: {problem}"
    chain = [last.name] + [n for n, seq in bdir.pending() if seq > last.seq and n in bitmaps]
    if last.name not in bitmaps:
        return None, [], f"bitmap {last.name} of the last backup is gone from the source"
    for n in chain:
        if bitmaps[n].get("inconsistent"):
            return (
                None,
                [],
                f"bitmap {n} is inconsistent (the image was not closed cleanly while it "
                "recorded): what changed since the last backup is unknown",
            )
    if not bitmaps[chain[-1]].get("recording"):
        return (
            None,
            [],
            f"bitmap {chain[-1]} stopped recording (disabled) after the last backup",
        )
    return last, chain, None


def backup(
    src: Source,
    directory: str,
    *,
    name: Optional[str] = None,
    full: bool = False,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    t0 = time.monotonic()
    bdir = BackupDir(directory, create=True)
    bdir.lock()
    # 1. tidy
    bdir.remove_parts()
    pending = bdir.pending()
    for n, _ in pending:
        if os.path.exists(bdir.manifest_path(n)) and not os.path.exists(bdir.image(n)):
            os.unlink(bdir.manifest_path(n))
    known = {b.name for b in bdir.backups()} | {n for n, _ in pending}
    bitmaps = src.bitmaps()
    snapshots = src.snapshot_names()
    if name is None:
        name = default_name(bdir, known | set(bitmaps) | snapshots)
    check_name(name)
    if name in known or os.path.exists(bdir.image(name)):
        raise BackupError(f"a backup named {name!r} exists already", directory)
    if name in bitmaps or name in snapshots:
        raise BackupError(
            f"the source has a bitmap or snapshot named {name!r} already: choose another --name",
            src.label,
        )
    # 2. decide
    last, chain, why_full = decide(bdir, full, bitmaps)
    # 3. pending
    seq = bdir.next_seq()
    bdir.mark_pending(name, seq)
    # 4. checkpoint
    disable = [n for n in chain if bitmaps[n].get("recording")]
    try:
        src.checkpoint(name, disable, bitmap_granularity(src.disk_size()))
    except BaseException:
        # a checkpoint is all or nothing: one that was refused left no bitmap, and its marker
        # goes. But a daemon killed after taking it and before answering leaves the bitmap (and
        # the previous one disabled): the marker stays unless the source says NAME is not there.
        try:
            taken = name in src.bitmaps()
        except (OSError, QcowError):
            taken = True
        if not taken:
            bdir.clear_pending([name])
        raise
    phases: dict[str, float] = {"prepare": time.monotonic() - t0}
    # 5. copy
    tmp = bdir.part(name, "qcow2")
    try:
        result, extents, size, cs, fcs = _copy(src, bdir, name, tmp, last, chain, bitmaps, progress)
    except BaseException:
        _discard(tmp)
        # the snapshot pins the disk's old clusters: let them go now (the bitmap stays: the
        # next run merges it)
        src.drop([], [name])
        raise
    seconds = time.monotonic() - t0
    phases["copy"] = seconds - phases["prepare"]
    manifest = {
        "qcowfs-backup": MANIFEST_VERSION,
        "name": name,
        "seq": seq,
        "kind": "incremental" if last is not None else "full",
        "backing": f"{last.name}.qcow2" if last is not None else None,
        "created": time.time(),
        "disk_size": size,
        "cluster_size": cs,
        "file_cluster_size": fcs,
        "source": src.image_path,
        # encrypted with the source's LUKS header: the source's passphrase opens it
        "encryption": "luks" if result.encrypted else None,
        "bytes": result.bytes_copied,
        "data_clusters": result.data_clusters,
        "zero_clusters": result.zero_clusters,
        "extents": extents,
        "seconds": round(seconds, 3),
        "why_full": why_full,
        "table": tables.encode(result.table),
    }
    # 6. publish: manifest, then the image (the image's name is what makes it complete)
    try:
        atomic_write(bdir.manifest_path(name), json.dumps(manifest, indent=1).encode())
        publish(tmp, bdir.image(name))
    except BaseException:
        _discard(tmp)
        raise
    phases["publish"] = time.monotonic() - t0 - seconds
    # 7. drop what the source no longer needs
    everything = {b.name for b in bdir.backups()} | {n for n, _ in bdir.pending()}
    left = src.drop(sorted(everything - {name}), sorted(everything))
    # 8. the pending markers
    bdir.clear_pending([n for n, _ in bdir.pending()])
    out: dict[str, Any] = {
        k: v for k, v in manifest.items() if k != "table" and k != "qcowfs-backup"
    }
    out["file"] = os.path.abspath(bdir.image(name))
    total = time.monotonic() - t0
    out["seconds"] = round(total, 3)
    out["left_in_source"] = left
    phases["drop"] = total - sum(phases.values())
    out["phases"] = {k: round(v, 3) for k, v in phases.items()}
    return out


def _copy(
    src: Source,
    bdir: BackupDir,
    name: str,
    tmp: str,
    last: Optional[Backup],
    chain: list[str],
    bitmaps: dict[str, dict[str, Any]],
    progress: Optional[Progress],
) -> tuple[copier.CopyResult, int, int, int, int]:
    with src.reader(name) as view:
        cs = view.mapping.cluster_size
        cb = view.mapping.cluster_bits
        size = view.size
        nclusters = -(-size // cs)
        base_table = None
        fcb = cb
        dirty = None
        if last is not None:
            prev_size = int(last.manifest["disk_size"])
            if int(last.manifest["cluster_size"]) != cs:
                raise BackupError(
                    f"the disk's cluster size changed since backup {last.name}: "
                    "take a full backup (--full)",
                    src.label,
                )
            # the new file's clusters: as fine as the chain's bitmaps (4 KiB at the finest)
            finest = min(int(bitmaps[n]["granularity"]) for n in chain)
            fcb = min(cb, max(FILE_CLUSTER_BITS_MIN, finest.bit_length() - 1))
            dirty, extents = src.dirty(chain, fcb, -(-size >> fcb))
            # a grown disk: everything past the last backup's end is new
            if prev_size < size:
                dirty[prev_size >> fcb :] = 1
            wanted = bitarray(nclusters)
            wanted.setall(0)
            ratio = 1 << (cb - fcb)
            for fc in dirty.search(1):
                wanted[fc // ratio] = 1
            base_table = tables.decode(str(last.manifest["table"]), -(-prev_size // cs))
            runs = copier.plan(view, wanted, zeros=True)
        else:
            runs = copier.plan(view, None, zeros=False)
            extents = sum(1 for r in runs if r.kind != copier.ZERO)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            result = copier.copy(
                view,
                runs,
                fd,
                incremental=last is not None,
                base_table=base_table,
                backing_file=f"{last.name}.qcow2" if last is not None else None,
                file_bits=fcb,
                dirty=dirty,
                progress=progress,
                encryption=encryption_of(view),
            )
        finally:
            os.close(fd)
    return result, extents, size, cs, 1 << fcb


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
