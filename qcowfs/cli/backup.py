"""`qcowfs backup`: the command line of qcowfs/backup/ (make, list, verify)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Optional, TextIO

from ..errors import BackupError
from .keys import add_key_options, keys_from
from .report import human_size

USAGE = """\
qcowfs backup SOURCE DIR [--full] [--name NAME] [--json] [--backing POLICY] [--key-file FILE]
qcowfs backup list DIR [--json]
qcowfs backup verify DIR [NAME] [--json] [--key-file FILE]"""

DESCRIPTION = (
    "Back up a qcow2 disk into DIR as a chain of qcow2 files QEMU reads: the first backup (or "
    "--full) holds every data cluster of the disk, each later one the clusters that changed "
    "since the previous backup, with the previous one as its backing file. SOURCE is the mount "
    "point of a running qcowfs or an unmounted image. `list` shows the chain, `verify` re-reads "
    "it and checks it against the checksums recorded at backup time (exit code 2 when a backup "
    "is damaged). The backup of an encrypted (LUKS) disk is encrypted with the disk's own LUKS "
    "header: --key-file gives the passphrase, to back it up and to verify it."
)


def add_parser(sub: Any) -> None:
    b = sub.add_parser(
        "backup",
        help="incremental backups into a qcow2 chain; list, verify",
        usage=USAGE,
        description=DESCRIPTION,
    )
    b.add_argument("words", nargs="+", metavar="SOURCE DIR | list DIR | verify DIR [NAME]")
    b.add_argument(
        "--full", action="store_true", help="a full backup even if an incremental is possible"
    )
    b.add_argument(
        "--name",
        help="the backup's name (default: backup-<UTC time>), also the checkpoint's in the source",
    )
    b.add_argument("--json", action="store_true", help="print the result as one JSON object")
    b.add_argument(
        "--backing",
        default="follow",
        choices=("follow", "same-dir", "none"),
        help="which backing files an unmounted source image may open (as for mount)",
    )
    add_key_options(b)
    b.set_defaults(func=cmd_backup)


def progress_line(stream: TextIO = sys.stderr) -> Callable[[int, int], None]:
    """`qemu-img convert -p`'s progress, with bytes, rate and time left; at most 4 updates/s."""
    t0 = time.monotonic()
    last = [0.0]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.25 and done < total:
            return
        last[0] = now
        dt = max(now - t0, 1e-6)
        rate = done / dt
        eta = (total - done) / rate if rate > 0 else 0.0
        pct = 100.0 * done / total if total else 100.0
        stream.write(
            f"\r    {human_size(done)} of {human_size(total)} ({pct:5.1f}%), "
            f"{human_size(int(rate))}/s, {int(eta) // 60}:{int(eta) % 60:02d} left   "
        )
        if done >= total:
            stream.write("\n")
        stream.flush()

    return update


def cmd_backup(args: argparse.Namespace) -> int:
    try:
        return _backup(args)
    except OSError as e:
        where = e.filename or (args.words[-1] if args.words else "")
        raise BackupError(f"backup failed: {e.strerror or e}", str(where)) from None


def _backup(args: argparse.Namespace) -> int:
    from ..backup import run, verify
    from ..backup.catalog import BackupDir
    from ..backup.source import open_source

    w = args.words
    if w[0] == "list":
        if len(w) != 2:
            return _usage("backup list DIR")
        return _list(BackupDir(w[1]), args.json)
    if w[0] == "verify":
        if len(w) not in (2, 3):
            return _usage("backup verify DIR [NAME]")
        verdicts = verify.verify(w[1], w[2] if len(w) == 3 else None, keys_from(args))
        if args.json:
            print(json.dumps([dataclass_dict(v) for v in verdicts], indent=4))
        else:
            for v in verdicts:
                print(v.line())
        return 0 if all(v.ok for v in verdicts) else 2
    if len(w) != 2:
        return _usage("backup SOURCE DIR")
    src = open_source(w[0], args.backing, keys_from(args))
    progress = None if args.json or not sys.stderr.isatty() else progress_line()
    out = run.backup(src, w[1], name=args.name, full=args.full, progress=progress)
    if args.json:
        print(json.dumps(out, indent=4))
    else:
        kind = out["kind"]
        why = f" ({out['why_full']})" if kind == "full" and out["why_full"] else ""
        over = f" over {out['backing']}" if out["backing"] else ""
        print(
            f"backup {out['name']}: {kind}{why}{over}, {human_size(out['bytes'])} in "
            f"{out['extents']} extents, {out['seconds']:.1f} s -> {out['file']}"
        )
    for left in out["left_in_source"]:
        print(
            f"qcowfs: warning: {src.label}: could not drop {left}; the next backup drops it",
            file=sys.stderr,
        )
    return 0


def dataclass_dict(v: Any) -> dict[str, Any]:
    return {"name": v.name, "ok": v.ok, "problems": v.problems, "clusters_read": v.clusters_read}


def _usage(form: str) -> int:
    print(f"qcowfs: usage: qcowfs {form}", file=sys.stderr)
    return 2


def _list(bdir: Any, as_json: bool) -> int:
    import os

    rows = []
    for b in bdir.backups():
        m = b.manifest
        size: Optional[int] = None
        if b.has_image:
            size = os.stat(bdir.image(b.name)).st_blocks * 512
        rows.append(
            {
                "name": b.name,
                "kind": b.kind,
                "backing": b.backing,
                "created": m.get("created"),
                "disk_size": m.get("disk_size"),
                "bytes": m.get("bytes"),
                "file_size": size,
                "state": "complete" if b.has_image else "pruned",
                "why_full": m.get("why_full"),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=4))
        return 0
    if not rows:
        print(f"no backups in {bdir.path}")
        return 0
    print(f"{'NAME':<30} {'KIND':<12} {'DATE':<20} {'COPIED':>10} {'FILE':>10}  BACKING")
    for r in rows:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"] or 0))
        fsize = human_size(r["file_size"]) if r["file_size"] is not None else "pruned"
        print(
            f"{r['name']:<30} {r['kind']:<12} {date:<20} {human_size(r['bytes'] or 0):>10} "
            f"{fsize:>10}  {r['backing'] or '-'}"
        )
    return 0
