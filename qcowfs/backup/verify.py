"""`qcowfs backup verify DIR [NAME]`: re-read backups and check them against their records.

For each backup file X (NAME.qcow2) with backing file P (by X's header):
  1. X is a sound qcow2 image (qcowfs check: no corruptions, no leaks);
  2. every cluster X holds reads with the crc32 X's table records (data read from X's file,
     zero clusters as zeros);
  3. every cluster X does not hold records the same crc32 in X's table as in P's (it reads
     through to P; past P's end, or without P, it reads as zeros).
An encrypted backup (LUKS, copier.py) is read with its passphrase (keys): data is decrypted
before its crc32 is taken, since the tables are of the plaintext; the files of one chain carry
copies of one header, so one PBKDF2 unlock serves them all (Keys.unlocked). Without keys an
encrypted backup is refused before anything is read.
Given 3 for X and 2-3 for each file below it, X's whole chain reads exactly as the disk did at
checkpoint X: each cluster of the disk is checked once, in the file that holds it (table.py says
why the tables are of points, not files). Reading cost: the size of the files, once.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from array import array
from typing import Any, Optional

from ..engine.cluster_map import DATA, UNALLOCATED
from ..engine.encryption import Keys
from ..engine.image import Qcow2Image
from ..engine.offline import check_image
from ..errors import BackupError, EncryptionError, QcowError
from . import table as tables
from .catalog import BackupDir, header_backing

RUN = 8 << 20


@dataclasses.dataclass
class Verdict:
    name: str
    ok: bool
    problems: list[str]
    clusters_read: int = 0

    def line(self) -> str:
        if self.ok:
            return f"{self.name}: ok ({self.clusters_read} clusters read)"
        return f"{self.name}: DAMAGED: " + "; ".join(self.problems)


def _table_of(bdir: BackupDir, name: str) -> tuple[array, int, int]:
    m = bdir.load_manifest(name)
    cs = int(m["cluster_size"])
    size = int(m["disk_size"])
    return tables.decode(str(m["table"]), -(-size // cs)), size, cs


def verify_file(bdir: BackupDir, name: str, keys: Optional[Keys] = None) -> Verdict:
    v = Verdict(name, True, [])
    path = bdir.image(name)

    def bad(msg: str) -> Verdict:
        v.ok = False
        v.problems.append(msg)
        return v

    try:
        mine, size, cs = _table_of(bdir, name)
    except (BackupError, ValueError, KeyError, TypeError, zlib.error) as e:
        return bad(f"its manifest cannot be read ({e})")
    try:
        res = check_image(path)
    except (QcowError, OSError) as e:
        return bad(f"not a readable qcow2 image ({e})")
    if res.corruptions or res.leaks:
        bad(f"qcow2 check finds {res.corruptions} corruptions and {res.leaks} leaked clusters")
    try:
        img = Qcow2Image(path, read_only=True, backing_policy="same-dir", keys=keys)
    except EncryptionError:
        raise  # no key, or a wrong one: the run stops with its one line
    except (QcowError, OSError) as e:
        return bad(f"cannot be opened ({e})")
    try:
        if img.size != size:
            return bad(f"its size ({img.size}) is not the recorded {size}")
        parent: Optional[array] = None
        backing = img.header.backing_file
        if backing is not None:
            pname = backing[: -len(".qcow2")] if backing.endswith(".qcow2") else backing
            if os.path.dirname(backing) or not os.path.exists(bdir.manifest_path(pname)):
                return bad(f"its backing file {backing!r} is not a backup in this directory")
            try:
                parent, _, pcs = _table_of(bdir, pname)
            except (BackupError, ValueError, KeyError, TypeError, zlib.error) as e:
                return bad(f"the manifest of its backing file cannot be read ({e})")
            if pcs != cs:
                return bad(f"its backing file {backing!r} has another cluster size")
        _compare(img, mine, parent, cs, v)
    except (QcowError, OSError) as e:
        bad(f"reading it failed ({e})")
    finally:
        img.close(flush=False)
    return v


def _compare(img: Qcow2Image, mine: array, parent: Optional[array], cs: int, v: Verdict) -> None:
    """Each table cluster (cs bytes) of X: read from X's own file where X holds all of it, through
    the chain where X holds part of it, and compared table to table where X holds none of it."""
    m = img.active
    cb = cs.bit_length() - 1
    size = img.size
    zero_crc = tables.zero_crc(cs)
    data_io = img.data_io  # the data file, or it through its cipher (an encrypted backup)
    wrong: list[int] = []
    c = 0
    n = len(mine)
    buf = memoryview(bytearray(RUN))
    while c < n:
        pos = c << cb
        end = min(size, pos + RUN)
        kind, host, length = m.map(pos, end)
        if kind == DATA:
            length = m.data_run(pos, end, host, length)
        whole = n - c if pos + length >= size else length >> cb  # table clusters fully covered
        if kind == DATA and whole:
            mv = buf[: whole << cb]
            got = data_io.preadv_into([mv], host)
            if got < len(mv):
                mv[got:] = bytes(len(mv) - got)
            visible = size - pos
            if visible < len(mv):
                mv[visible:] = bytes(len(mv) - visible)
            for i in range(whole):
                if zlib.crc32(mv[i << cb : (i + 1) << cb]) != mine[c + i]:
                    wrong.append(c + i)
            v.clusters_read += whole
            c += whole
            continue
        tend = min(size, pos + cs)
        if _all_unallocated(m, pos, tend):  # reads through to the backing file
            below = parent[c] if parent is not None and c < len(parent) else zero_crc
            if mine[c] != below:
                wrong.append(c)
        else:  # zeros, compressed, or X holds part of it: the chain's bytes
            data = bytearray(img.read(pos, cs))
            data += bytes(cs - len(data))
            if zlib.crc32(data) != mine[c]:
                wrong.append(c)
            v.clusters_read += 1
        c += 1
    if wrong:
        v.ok = False
        v.problems.append(
            f"{len(wrong)} clusters do not read as recorded at backup time (the first at guest "
            f"offset {wrong[0] << cb})"
        )


def _all_unallocated(m: Any, pos: int, end: int) -> bool:
    while pos < end:
        kind, _, n = m.map(pos, end)
        if kind != UNALLOCATED:
            return False
        pos += n
    return True


def verify(
    directory: str, name: Optional[str] = None, keys: Optional[Keys] = None
) -> list[Verdict]:
    """Verdicts for every complete backup in DIR, or for NAME and the files its chain reads;
    keys: the passphrase of encrypted backups."""
    bdir = BackupDir(directory)
    complete = [b.name for b in bdir.backups() if b.has_image]
    if name is None:
        names = complete
    else:
        if name not in complete:
            raise BackupError(f"no backup named {name!r} here", directory)
        names = []
        cur: Optional[str] = name
        while cur is not None and cur not in names:
            names.append(cur)
            try:
                backing = header_backing(bdir.image(cur))
            except (QcowError, OSError):
                backing = bdir.load_manifest(cur).get("backing")
            cur = str(backing)[: -len(".qcow2")] if backing else None
            if cur is not None and not os.path.exists(bdir.image(cur)):
                break
        names.reverse()
    if not names:
        raise BackupError("no backups here", directory)
    return [verify_file(bdir, n, keys) for n in names]
