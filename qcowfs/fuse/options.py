"""Mount options, spelled the way FUSE filesystems spell them (`-o OPT[,OPT...]`).

No I/O here (user names are looked up only when an option names one): the CLI
parses its flags and every `-o` into one MountOptions, and the mount and the
FUSE layer read only that.

The conventions are those of sshfs, s3ql and libfuse's own options:
- `ro`/`rw`, `allow_other`, `default_permissions`, `uid=`, `gid=`, `umask=`:
  who may open what. The kernel checks permissions itself on every qcowfs mount
  (`default_permissions` is always on), against owners and modes that follow
  uid/gid/umask. The default umask, 077, lets only the owner (the mounting user
  unless uid= says otherwise) touch the guest disk: it holds a whole machine.
- options mount(8) and /sbin/mount.fuse pass along (`dev`, `suid`, `noexec`,
  `noatime`, ...): accepted; qcowfs mounts are always nosuid,nodev.
- fstab bookkeeping (`defaults`, `noauto`, `nofail`, `_netdev`, `x-*`, ...):
  accepted and ignored, as mount.fuse itself drops most of them.
- qcowfs's own: `log=FILE`, `debug`, `foreground`, `backing=follow|same-dir|none`,
  `bitmap_sync=close|intent`, `io_threads=N` (host data I/O threads serving several
  requests at once, fuse/concurrent_io.py; 0 serves one request at a time), `offload=auto|always`
  (auto: to the threads only while the host keeps requests waiting; always: whenever
  another request is waiting or running), `lanes=N|auto` (request lanes: threads that each
  read their own clone of the FUSE device and serve reads and in-place writes without the
  metadata thread, fuse/lanes.py; auto: one per CPU; 0: none), `key_file=FILE`,
  `backing_key_file=FILE` (once per backing level, in order) and `allow_shared_key_file`
  (encrypted images: engine/encryption.py; relative names are taken from the directory qcowfs
  was started in).
Anything else is refused with one line.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from typing import Callable, Iterable, Optional

from ..errors import OptionError

BACKING_POLICIES = ("follow", "same-dir", "none")
BITMAP_SYNC_MODES = ("close", "intent")
DEFAULT_UMASK = 0o077

# Kernel mount flags libfuse's fuse_session_new() accepts and passes on to mount(2).
_KERNEL_FLAGS = frozenset({"sync", "async", "dirsync", "atime", "noatime", "exec", "noexec"})
# Flags qcowfs always overrides (nosuid,nodev, libfuse's default): a disk image
# filesystem has no device nodes and no set-user-ID programs to honour.
_ALWAYS_NOSUID_NODEV = frozenset({"dev", "nodev", "suid", "nosuid"})
# What mount(8) and fstab say for their own use.
_MOUNT8_ONLY = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "nofail",
        "_netdev",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "diratime",
        "nodiratime",
    }
)

KNOWN = (
    "ro, rw, allow_other, default_permissions, uid=N, gid=N, umask=NNN, log=FILE, debug, "
    "foreground, backing=follow|same-dir|none, bitmap_sync=close|intent, io_threads=N, offload=auto|always, "
    "lanes=N|auto, key_file=FILE, backing_key_file=FILE, allow_shared_key_file"
)
OFFLOAD_MODES = ("auto", "always")
DEFAULT_IO_THREADS = 4
MAX_IO_THREADS = 64
MAX_LANES = 32  # pyfuse3's lanes.h LANES_MAX


@dataclasses.dataclass
class MountOptions:
    read_only: bool = False
    allow_other: bool = False
    uid: Optional[int] = None  # None: the mounting user
    gid: Optional[int] = None
    umask: int = DEFAULT_UMASK
    log: Optional[str] = None
    debug: bool = False
    foreground: bool = False
    backing: str = "follow"
    bitmap_sync: str = "close"  # "intent": crash-proof bitmaps (bitmap_intent.py)
    io_threads: int = DEFAULT_IO_THREADS  # 0: one request at a time (fuse/concurrent_io.py)
    offload: str = "auto"  # "always": to the threads under load, however fast the host
    lanes: Optional[int] = None  # request lanes (fuse/lanes.py); None: one per CPU; 0: none
    kernel_flags: list = dataclasses.field(default_factory=list)
    #: passphrase files of an encrypted image and of its encrypted backing images (the same
    #: one unless backing_key_file is given): engine/encryption.py
    key_file: Optional[str] = None
    #: the Nth for the image N levels below the one mounted; the last for every deeper one
    backing_key_files: list[str] = dataclasses.field(default_factory=list)
    allow_shared_key_file: bool = False  # key files readable by group or others are accepted

    def fuse_options(self, fsname: str) -> set:
        """The option set for pyfuse3.init (libfuse's fuse_session_new)."""
        opts = {"default_permissions", f"fsname={fsname}", "subtype=qcowfs", "nosuid", "nodev"}
        opts.update(self.kernel_flags)
        if self.allow_other:
            opts.add("allow_other")
        if self.read_only:
            opts.add("ro")
        return opts

    def mode(self, base: int, read_only: bool) -> int:
        """Permission bits for an entry whose widest mode is `base` (0o666 file, 0o777 directory);
        no write bits while the image is read-only (a mount can turn read-only after corruption)."""
        m = base & ~self.umask
        return m & ~0o222 if read_only else m


def _id(value: str, what: str, lookup: Callable[[str], int]) -> int:
    if value.isdigit():
        n = int(value)
        if n >= (1 << 32) - 1:  # (uid_t)-1 means 'unchanged' to the kernel
            raise OptionError(f"mount option {what}={value}: out of range")
        return n
    try:
        return lookup(value)
    except KeyError:
        raise OptionError(
            f"mount option {what}={value}: no such {'user' if what == 'uid' else 'group'}"
        ) from None


def parse_into(opts: MountOptions, specs: Iterable[str]) -> MountOptions:
    """Apply every `-o` argument, in order (a later option wins, as with mount(8))."""
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            if eq and not value and key not in ("comment",):
                raise OptionError(f"mount option {key}= needs a value")
            if key == "ro" and not eq:
                opts.read_only = True
            elif key == "rw" and not eq:
                opts.read_only = False
            elif key == "allow_other" and not eq:
                opts.allow_other = True
            elif key == "default_permissions" and not eq:
                pass  # always on
            elif key == "uid" and eq:
                opts.uid = _id(value, "uid", lambda v: pwd.getpwnam(v).pw_uid)
            elif key == "gid" and eq:
                opts.gid = _id(value, "gid", lambda v: grp.getgrnam(v).gr_gid)
            elif key == "umask" and eq:
                try:
                    opts.umask = int(value, 8)
                except ValueError:
                    opts.umask = -1
                if not 0 <= opts.umask <= 0o777:
                    raise OptionError(
                        f"mount option umask={value}: expected an octal number up to 777"
                    )
            elif key == "log" and eq:
                opts.log = value
            elif key == "debug" and not eq:
                opts.debug = True
            elif key == "foreground" and not eq:
                opts.foreground = True
            elif key == "backing" and eq:
                if value not in BACKING_POLICIES:
                    raise OptionError(
                        f"mount option backing={value}: expected one of {', '.join(BACKING_POLICIES)}"
                    )
                opts.backing = value
            elif key == "bitmap_sync" and eq:
                if value not in BITMAP_SYNC_MODES:
                    raise OptionError(
                        f"mount option bitmap_sync={value}: expected one of {', '.join(BITMAP_SYNC_MODES)}"
                    )
                opts.bitmap_sync = value
            elif key == "io_threads" and eq:
                if not value.isdigit() or int(value) > MAX_IO_THREADS:
                    raise OptionError(
                        f"mount option io_threads={value}: expected a number from 0 to {MAX_IO_THREADS}"
                    )
                opts.io_threads = int(value)
            elif key == "lanes" and eq:
                if value == "auto":
                    opts.lanes = None
                elif value.isdigit() and int(value) <= MAX_LANES:
                    opts.lanes = int(value)
                else:
                    raise OptionError(
                        f"mount option lanes={value}: expected auto or a number from 0 to {MAX_LANES}"
                    )
            elif key == "key_file" and eq:
                opts.key_file = os.path.abspath(value)
            elif key == "backing_key_file" and eq:
                opts.backing_key_files.append(os.path.abspath(value))
            elif key == "allow_shared_key_file" and not eq:
                opts.allow_shared_key_file = True
            elif key == "offload" and eq:
                if value not in OFFLOAD_MODES:
                    raise OptionError(
                        f"mount option offload={value}: expected one of {', '.join(OFFLOAD_MODES)}"
                    )
                opts.offload = value
            elif not eq and key in _KERNEL_FLAGS:
                opts.kernel_flags.append(key)
            elif not eq and (key in _ALWAYS_NOSUID_NODEV or key in _MOUNT8_ONLY):
                pass
            elif key.startswith("x-") or key == "comment":
                pass  # fstab annotations for systemd and other tools
            else:
                raise OptionError(f"unknown mount option {item!r} (qcowfs knows: {KNOWN})")
    return opts
