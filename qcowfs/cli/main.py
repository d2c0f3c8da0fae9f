"""Command line: argument parsing, logging, exit codes, one-line errors.

Every error a user can cause is reported as one line on stderr,
`qcowfs: <what failed, on which file, what to do>`, with exit code 1 (2 for
usage errors, as argparse does). Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import select
import subprocess
import sys
import time
from typing import Optional, Sequence

from .. import __version__
from ..engine.bitmap_commands import PID_XATTR
from ..engine.encryption import Keys
from ..errors import OptionError, QcowError
from ..fuse.options import BACKING_POLICIES, BITMAP_SYNC_MODES, MountOptions, parse_into
from .backup import add_parser as add_backup_parser
from .keys import add_key_options
from .pidns import exit_ends_pid_namespace

log = logging.getLogger("qcowfs")


def _setup_logging(log_file: str | None, foreground: bool, debug: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("qcowfs[%(process)d]: %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if debug else logging.INFO)
        return
    else:
        handler = logging.NullHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _fail(message: str, code: int = 1) -> int:
    print(f"qcowfs: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------- mount
def mount_options(args: argparse.Namespace) -> MountOptions:
    """The flags and every -o, in that order; --read-only wins over an -o rw (mount.fuse
    always passes rw or ro first, then what fstab or mount -o said)."""
    opts = MountOptions(
        foreground=args.foreground,
        log=args.log,
        debug=args.debug,
        backing=args.backing,
        bitmap_sync=args.bitmap_sync,
    )
    parse_into(opts, args.options)
    if args.read_only:
        opts.read_only = True
    if args.key_file:
        opts.key_file = os.path.abspath(args.key_file)
    opts.backing_key_files += [os.path.abspath(f) for f in args.backing_key_file or ()]
    if args.allow_shared_key_file:
        opts.allow_shared_key_file = True
    return opts


def early_keys(image: str, opts: MountOptions) -> Optional[Keys]:
    """In the process that will serve the mount, before it loads pyfuse3 and trio: the key
    files read and the image's unlock begun in a thread (Keys.start_unlock), so that PBKDF2's
    seconds overlap the loading. None where that fails: the mount reads them again and says
    why."""
    if opts.key_file is None and not opts.backing_key_files:
        return None
    try:
        keys = Keys.from_files(opts.key_file, opts.backing_key_files, opts.allow_shared_key_file)
    except QcowError:
        return None
    if keys is not None:
        keys.start_unlock(image)
    return keys


def cmd_mount(args: argparse.Namespace) -> int:
    try:
        opts = mount_options(args)
    except OptionError as e:
        return _fail(str(e), 2)
    image = os.path.abspath(args.image)
    mnt = os.path.abspath(args.mountpoint)
    if not os.path.exists(image):
        return _fail(f"{args.image}: no such file")
    if opts.foreground:
        _setup_logging(opts.log, True, opts.debug)
        # a list, so that no name here holds the passphrases once the mount has opened the image
        early = [early_keys(image, opts)]
        from ..fuse.mount import mount

        try:
            return mount(image, mnt, opts, keys=early.pop())
        except QcowError as e:
            return _fail(str(e))
    # Daemon: the child does all the work and tells the parent through a pipe
    # whether the mount is ready; the parent returns only then.
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        msg = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            msg += chunk
        os.close(r)
        text = msg.decode(errors="replace")
        if text.startswith("OK"):
            return 0
        if text.startswith("ERR "):
            return _fail(text[4:].strip())
        _, status = os.waitpid(pid, 0)
        return _fail(
            f"{args.image}: the qcowfs daemon died during set-up (status {status}); see the log"
        )
    # child
    os.close(r)
    os.setsid()
    _setup_logging(opts.log, False, opts.debug)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    reported = False

    def ready(error: Optional[str]) -> None:
        nonlocal reported
        reported = True
        os.write(w, (f"ERR {error}\n" if error else "OK\n").encode())
        os.close(w)

    code = 1
    try:
        early = [early_keys(image, opts)]  # (as above)
        from ..fuse.mount import mount

        code = mount(image, mnt, opts, ready=ready, keys=early.pop())
    except QcowError as e:
        log.error("%s", e)
    except BaseException:
        log.exception("qcowfs daemon failed")
        if not reported:
            ready(f"{args.image}: internal error during set-up; see the log")
    finally:
        logging.shutdown()
        os._exit(code)


# ---------------------------------------------------------------------- umount
def cmd_umount(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    if not os.path.ismount(mnt):
        return _fail(f"{args.mountpoint}: not mounted")
    pid = None
    try:
        pid = int(os.getxattr(mnt, PID_XATTR))
    except (OSError, ValueError):
        return _fail(f"{args.mountpoint}: not a qcowfs mount")
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        pidfd = None
    tool = "fusermount3" if _which("fusermount3") else "umount"
    cmd = [tool, "-u", mnt] if tool == "fusermount3" else [tool, mnt]
    # known before the unmount: once it is done, the daemon may end this namespace any moment
    ends_namespace = exit_ends_pid_namespace(pid)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return _fail(
            f"{args.mountpoint}: unmount failed: {p.stderr.strip() or p.stdout.strip()} (is it busy?)"
        )
    if ends_namespace:
        # In a container whose main process is the daemon (docker run ... mount --foreground),
        # the daemon's exit ends the PID namespace and the kernel kills everything left in it,
        # this command too (docker exec ... umount exited 137). The unmount is done and the
        # daemon finishes its clean shutdown on its own; the container then stops. This command
        # exits at once (os._exit: no interpreter shutdown, which the daemon's end could
        # overtake: the test saw exit code 137 after this line now and then)
        print(
            f"qcowfs: {args.mountpoint}: unmounted; the daemon (pid {pid}) finishes and ends "
            "this container, so not waiting for it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(0)
    # Wait until the daemon has stored the bitmaps and closed the image.
    deadline = time.monotonic() + args.timeout
    if pidfd is not None:
        remaining = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([pidfd], [], [], remaining)
        os.close(pidfd)
        if not ready:
            return _fail(
                f"{args.mountpoint}: unmounted, but the daemon (pid {pid}) is still finishing after {args.timeout}s"
            )
    else:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


def _which(name: str) -> bool:
    from shutil import which

    return which(name) is not None


# ---------------------------------------------------------------------- info
def image_info(path: str, backing_policy: str = "follow") -> dict:
    from ..engine.backing import chain
    from ..engine.bitmaps import BitmapStore
    from ..engine.offline import locked_image
    from ..format import header as fmt

    with locked_image(
        path, write=False, lock=False, backing_policy=backing_policy, metadata_only=True
    ) as img:
        h = img.header
        info: dict = {
            "filename": path,
            "format": "qcow2",
            "virtual-size": h.size,
            "cluster-size": h.cluster_size,
            "actual-size": img.allocated_host_bytes(),
            "dirty-flag": h.dirty,
        }
        if h.crypt_method:
            info["encrypted"] = True
        if h.backing_file:
            info["backing-filename"] = h.backing_file
            # as QEMU combines them: relative to the image's name as given (not made absolute)
            full = (
                h.backing_file
                if os.path.isabs(h.backing_file)
                else os.path.join(os.path.dirname(path), h.backing_file)
            )
            info["full-backing-filename"] = full
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
        data: dict = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            data.update(
                {
                    "compression-type": fmt.COMPRESSION_NAMES.get(
                        h.compression_type, str(h.compression_type)
                    ),
                    "lazy-refcounts": h.lazy_refcounts,
                    "refcount-bits": h.refcount_bits,
                    "corrupt": h.corrupt,
                    "extended-l2": h.extended_l2,
                }
            )
            if h.data_file:
                data["data-file"] = h.data_file
                data["data-file-raw"] = h.data_file_raw
        else:
            data.update({"compression-type": "zlib", "refcount-bits": 16})
        store = BitmapStore(img)
        if store.bitmaps:
            bms = []
            for bm in store.bitmaps.values():
                flags = []
                if bm.inconsistent:
                    flags.append("in-use")
                if bm.enabled:
                    flags.append("auto")
                bms.append({"flags": flags, "name": bm.name, "granularity": bm.granularity})
            data["bitmaps"] = bms
        feats = {
            "incompatible": [
                h.feature_name(0, b) for b in range(64) if h.incompatible_features >> b & 1
            ],
            "compatible": [
                h.feature_name(1, b) for b in range(64) if h.compatible_features >> b & 1
            ],
            "autoclear": [h.feature_name(2, b) for b in range(64) if h.autoclear_features >> b & 1],
        }
        if img.luks is not None:
            data["encrypt"] = img.luks.info()
        elif h.crypt_method == 1:
            data["encrypt"] = {"format": "aes"}
        data["features"] = feats
        data["snapshots"] = h.nb_snapshots
        if h.nb_snapshots:
            from ..engine.snapshots import read_all

            info["snapshots"] = [s.info() for s in read_all(img)]
        info["format-specific"] = {"type": "qcow2", "data": data}
        # qcowfs's own key: every other file a mount would open, resolved (symlinks followed)
        info["resolved-chain"] = chain(img)
        return info


def cmd_info(args: argparse.Namespace) -> int:
    try:
        info = image_info(args.image, args.backing)
    except QcowError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{args.image}: {e.strerror}")
    if args.json:
        print(json.dumps(info, indent=4))
        return 0
    from .report import format_info

    print(format_info(info))
    return 0


# ---------------------------------------------------------------------- bitmap
def cmd_bitmap(args: argparse.Namespace) -> int:
    from ..engine import offline

    target = args.target
    live = offline.is_qcowfs_mount(target)
    try:
        if args.op == "list":
            rows = offline.live_bitmaps(target) if live else offline.list_bitmaps(target)
            if args.json:
                print(json.dumps(rows, indent=4))
            else:
                for r in rows:
                    state = (
                        "INCONSISTENT"
                        if r["inconsistent"]
                        else ("recording" if r["recording"] else "disabled")
                    )
                    safe = "crash-safe" if r.get("crash-safe") else "in-use-while-open"
                    print(
                        f"{r['name']}\tgranularity={r['granularity']}\tcount={r['count']}\t{state}\t{safe}"
                    )
            return 0
        if args.op == "extents":
            ext = (
                offline.live_extents(target, args.name)
                if live
                else offline.bitmap_extents(target, args.name)
            )
            if args.json:
                print(json.dumps(ext))
            else:
                for e in ext:
                    print(
                        f"{e['start']:>16} {e['length']:>16} {'dirty' if e['dirty'] else 'clean'}"
                    )
            return 0
        kw = {}
        if args.op == "add":
            kw = {"granularity": args.granularity, "enabled": not args.disabled}
            if args.transient:
                if not live:
                    return _fail(f"{target}: transient bitmaps exist only on a live mount")
                kw["persistent"] = False
        if args.op == "merge":
            kw = {"dst": args.dst}
        if live:
            offline.live_command(target, args.op, args.name, **kw)
        else:
            kw.pop("persistent", None)
            offline.offline_command(target, args.op, args.name, **kw)
        return 0
    except OSError as e:
        return _fail(f"{target}: {e.strerror}")


# ---------------------------------------------------------------------- checkpoint
def cmd_checkpoint(args: argparse.Namespace) -> int:
    from ..engine import offline

    if not offline.is_qcowfs_mount(args.mountpoint):
        return _fail(
            f"{args.mountpoint}: not a qcowfs mount (a checkpoint is taken on a live mount)"
        )
    try:
        done = offline.live_checkpoint(args.mountpoint, args.name, args.disable, args.snapshot)
    except OSError as e:
        return _fail(f"{args.mountpoint}: {e.strerror}")
    if args.json:
        print(json.dumps(done, indent=4))
    else:
        snap = done.get("snapshot")
        print(
            f"checkpoint {args.name}: "
            + (f"snapshot {snap['name']} (id {snap['id']}), " if snap else "")
            + f"bitmap {args.name} recording"
            + "".join(f", bitmap {b} disabled" for b in done["disabled"])
        )
    return 0


# ---------------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    from ..engine.offline import check_image
    from .report import format_check, progress_bar

    progress = None
    try:
        if not args.json and sys.stderr.isatty() and os.path.getsize(args.image) > (1 << 30):
            progress = progress_bar()
        res = check_image(args.image, repair=args.repair, progress=progress)
    except QcowError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{args.image}: {e.strerror}")
    if res.check_errors:
        # like qemu-img's "Check failed" (exit 1); the report itself still goes to stdout
        print(
            f"qcowfs: {args.image}: check failed: {res.check_errors} internal errors (parts of the image "
            f"could not be read, see the messages)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(res.to_json(), indent=4))
    else:
        print(format_check(res))
    return res.exit_code


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcowfs",
        description="Mount a qcow2 image with FUSE: MOUNTPOINT/disk.raw is the guest disk, "
        "MOUNTPOINT/.bitmaps/ holds its persistent dirty bitmaps (one file each) and "
        "MOUNTPOINT/.snapshots/ its internal snapshots (one read-only file each).",
    )
    p.add_argument("--version", action="version", version=f"qcowfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser(
        "mount",
        help="mount IMAGE on MOUNTPOINT",
        description=(
            "Mount a qcow2 image. Without --foreground the command returns once the mount is ready and the "
            "daemon runs on (logging to syslog, or to --log FILE). The image is locked like QEMU locks it: "
            "read-write mounts conflict with QEMU and other qcowfs writers."
        ),
    )
    m.add_argument("image", metavar="IMAGE", help="qcow2 image file")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="existing empty directory")
    m.add_argument(
        "--foreground",
        "-f",
        action="store_true",
        help="stay in the foreground (log to stderr unless --log)",
    )
    m.add_argument(
        "--read-only",
        "-r",
        action="store_true",
        help="never modify the image; writes fail with EROFS",
    )
    add_key_options(m)
    m.add_argument("--log", metavar="FILE", help="append the daemon's log to FILE")
    m.add_argument("--debug", action="store_true", help="log debug messages")
    m.add_argument(
        "--backing",
        choices=BACKING_POLICIES,
        default="follow",
        help="which backing and external data files the image may open: follow (QEMU's "
        "behaviour, default), same-dir (regular files in the image's directory only), none",
    )
    m.add_argument(
        "--bitmap-sync",
        choices=BITMAP_SYNC_MODES,
        default="close",
        help="close: QEMU's semantics (bitmaps in use while mounted, stored at unmount; a crash "
        "makes them inconsistent); intent: every recording bitmap valid on disk at every instant "
        "(a crash leaves it consistent, possibly coarser than the writes)",
    )
    m.add_argument(
        "-o",
        dest="options",
        metavar="OPT[,OPT...]",
        action="append",
        default=[],
        help="mount options: ro, rw, allow_other, default_permissions (always on), uid=N, gid=N, "
        "umask=NNN (default 077: only the owner may open the disk), log=FILE, debug, foreground, "
        "backing=POLICY, bitmap_sync=MODE, io_threads=N (default 4; 0: one request at a time), "
        "offload=auto|always, lanes=N|auto (request threads, default one per CPU; 0: none), "
        "key_file=FILE, backing_key_file=FILE, allow_shared_key_file; "
        "mount(8)'s own (dev, suid, noauto, nofail, x-*, ...) are accepted",
    )
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser(
        "umount",
        help="unmount and wait until the daemon has finished",
        description=(
            "Unmount a qcowfs mount and wait until its daemon has stored the dirty bitmaps and closed the "
            "image. 'fusermount3 -u MOUNTPOINT' also unmounts cleanly but does not wait."
        ),
    )
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the daemon (default 300)"
    )
    u.set_defaults(func=cmd_umount)

    i = sub.add_parser(
        "info",
        help="show what qemu-img info shows",
        description=(
            "Show an image's format version, virtual size, cluster size, features, backing file, bitmaps, "
            "compression type and refcount width. Does not lock the image."
        ),
    )
    i.add_argument("image", metavar="IMAGE")
    i.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output (qemu-img info's keys, "
        "plus resolved-chain: every backing and external data file, symlinks resolved)",
    )
    i.add_argument(
        "--backing",
        choices=BACKING_POLICIES,
        default="follow",
        help="refuse images whose backing or data files this policy does not allow, as mount does",
    )
    i.set_defaults(func=cmd_info)

    c = sub.add_parser(
        "check",
        help="check (and repair) an image like qemu-img check",
        description=(
            "Check an unmounted image's metadata: leaked clusters, refcount errors, COPIED flags, reserved bits, "
            "references past the end of the file, bitmap tables; also bitmaps left in use by a crash. "
            "Exit codes as qemu-img check: 0 clean, 2 corruptions, 3 leaks only (1 if the check itself failed)."
        ),
    )
    c.add_argument("image", metavar="IMAGE")
    c.add_argument(
        "--repair",
        "-r",
        choices=("leaks", "all"),
        help="fix leaks, or leaks and refcount/COPIED errors",
    )
    c.add_argument(
        "--json", action="store_true", help="machine-readable output (qemu-img check's keys)"
    )
    c.set_defaults(func=cmd_check)

    b = sub.add_parser(
        "bitmap",
        help="list and change dirty bitmaps (offline image or live mount)",
        description=(
            "Dirty bitmap commands, like 'qemu-img bitmap'. TARGET is an unmounted image (QEMU's locks are taken, "
            "so an image in use is refused) or the mountpoint of a running qcowfs (the daemon does the work)."
        ),
    )
    bsub = b.add_subparsers(dest="op", metavar="OP")
    bsub.required = True
    bl = bsub.add_parser("list", help="name, granularity, dirty count, flags")
    bl.add_argument("target", metavar="IMAGE|MOUNTPOINT")
    bl.add_argument("--json", action="store_true")
    ba = bsub.add_parser("add", help="create a persistent bitmap (transient only on a live mount)")
    ba.add_argument("target", metavar="IMAGE|MOUNTPOINT")
    ba.add_argument("name", metavar="NAME")
    ba.add_argument(
        "--granularity",
        "-g",
        type=int,
        help="bytes per bit, a power of two from 512 to 2 GiB "
        "(default: cluster size clamped to 4 KiB..64 KiB)",
    )
    ba.add_argument("--disabled", action="store_true", help="create it not recording")
    ba.add_argument(
        "--transient",
        action="store_true",
        help="live mount only: keep it in memory, never store it",
    )
    for op, text in (
        ("remove", "remove a bitmap and free its clusters"),
        ("clear", "reset every bit"),
        ("enable", "start recording writes"),
        ("disable", "stop recording writes"),
    ):
        bo = bsub.add_parser(op, help=text)
        bo.add_argument("target", metavar="IMAGE|MOUNTPOINT")
        bo.add_argument("name", metavar="NAME")
    bm = bsub.add_parser("merge", help="OR bitmap SRC into DST")
    bm.add_argument("target", metavar="IMAGE|MOUNTPOINT")
    bm.add_argument("name", metavar="SRC")
    bm.add_argument("dst", metavar="DST")
    be = bsub.add_parser(
        "extents", help="dirty extents of a bitmap (unmounted image), like qemu-img map"
    )
    be.add_argument("target", metavar="IMAGE")
    be.add_argument("name", metavar="NAME")
    be.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bitmap)

    k = sub.add_parser(
        "checkpoint",
        help="snapshot + new bitmap (+ disable others) as one step, on a live mount",
        description=(
            "On a running qcowfs mount, as one step with no guest write in between: take internal snapshot NAME, "
            "create persistent recording bitmap NAME, disable each --disable BITMAP. All of it happens or none of "
            "it; the command returns once all of it is on disk."
        ),
    )
    k.add_argument("mountpoint", metavar="MOUNTPOINT")
    k.add_argument("name", metavar="NAME")
    k.add_argument(
        "--disable",
        metavar="BITMAP",
        action="append",
        default=[],
        help="stop this bitmap (repeatable)",
    )
    k.add_argument(
        "--no-snapshot", dest="snapshot", action="store_false", help="only the bitmaps, no snapshot"
    )
    k.add_argument("--json", action="store_true", help="print what was done as JSON")
    k.set_defaults(func=cmd_checkpoint)
    add_backup_parser(sub)
    return p


COMMANDS = ("mount", "umount", "info", "check", "bitmap", "checkpoint", "backup")


def _mount_helper_form(argv: list) -> list:
    """mount(8) runs `qcowfs IMAGE MOUNTPOINT -o OPTS` (through /sbin/mount.fuse): no
    subcommand. A first word that is not a command or an option means `mount`."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return ["mount", *argv]
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_mount_helper_form(list(sys.argv[1:] if argv is None else argv)))
    if args.command != "mount":
        logging.basicConfig(level=logging.WARNING, format="qcowfs: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except QcowError as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
