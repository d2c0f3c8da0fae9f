"""Who may touch the guest disk, and deploying qcowfs as FUSE filesystems are deployed.

Real mounts, real users: other uids are reached with setpriv (util-linux), the kernel
does the permission checks (default_permissions), QEMU's tools are the oracle for what
reaches the image. Mount points that other users must reach live in a world-traversable
directory under /tmp (pytest's own tmp directories are 0700).
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import pytest
from conftest import needs_fuse
from support.images import create
from support.repo import readme_block

from qcowfs_dev.mounts import QCOWFS, detach, is_mounted
from qcowfs_dev.oracles import assert_clean, qemu_img, qemu_info, qemu_io, run
from qcowfs_dev.proc import wait_for

NOBODY = 65534
STRANGER = 4321  # a uid no option names

pytestmark = needs_fuse


def as_user(
    uid: int, *cmd, gid: int | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run cmd as uid (no supplementary groups), capture output, never raise."""
    g = uid if gid is None else gid
    return run(
        ["setpriv", f"--reuid={uid}", f"--regid={g}", "--clear-groups", *cmd],
        check=False,
        input=input,
    )


@pytest.fixture
def public_dir():
    """A directory every user can traverse, for mount points other users must reach."""
    d = Path(tempfile.mkdtemp(prefix="qcowfs-access-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        if is_mounted(p):
            detach(p, lazy_only=True)
    shutil.rmtree(d, ignore_errors=True)


def private_image(tmp_path: Path, size: str = "16M") -> Path:
    """A 0600 image whose first cluster holds a pattern (the guest's data)."""
    img = create(tmp_path / "p.qcow2", size, writes=["write -P 0x61 0 64k"])
    img.chmod(0o600)
    return img


def mnt_in(public_dir: Path, name: str = "mnt") -> Path:
    m = public_dir / name
    m.mkdir()
    m.chmod(0o755)
    return m


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------- the defect
def test_root_mount_does_not_show_the_guest_disk_to_other_users(tmp_path, public_dir, mount):
    """Regression: a root mount was allow_other with disk.raw 0644, so every user read the disk."""
    img = private_image(tmp_path)
    m = mount(img, mnt=mnt_in(public_dir))
    assert as_user(NOBODY, "head", "-c", "8", img).returncode != 0  # the image itself is private
    r = as_user(NOBODY, "head", "-c", "8", m.disk)
    assert r.returncode != 0 and "aaaa" not in r.stdout, r
    assert "Permission denied" in r.stderr, r.stderr
    assert mode_of(m.disk) == 0o600
    assert os.stat(m.disk).st_uid == os.getuid()
    with open(m.disk, "rb") as f:  # the owner still reads it
        assert f.read(4) == b"aaaa"
    mounts = Path("/proc/self/mounts").read_text()
    line = next(x for x in mounts.splitlines() if f" {m.mnt} " in x)
    assert "allow_other" not in line and "default_permissions" in line


def test_without_allow_other_only_the_mounting_user_gets_in(tmp_path, public_dir, mount):
    img = private_image(tmp_path)
    m = mount(img, extra=["-o", "uid=65534,umask=000"], mnt=mnt_in(public_dir))
    assert mode_of(m.disk) == 0o666
    for uid in (
        NOBODY,
        STRANGER,
    ):  # even the uid the files name: the kernel refuses all but the mounter
        r = as_user(uid, "head", "-c", "4", m.disk)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (uid, r)


def test_allow_other_with_uid_lets_that_user_in_and_no_one_else(tmp_path, public_dir, mount):
    img = private_image(tmp_path)
    m = mount(img, extra=["-o", f"allow_other,uid={NOBODY}"], mnt=mnt_in(public_dir))
    st = os.stat(m.disk)
    assert (st.st_uid, mode_of(m.disk)) == (NOBODY, 0o600)
    assert mode_of(m.bitmaps) == 0o700 and mode_of(m.mnt) == 0o500
    # nobody reads, writes, and manages bitmaps
    assert as_user(NOBODY, "head", "-c", "4", m.disk).stdout == "aaaa"
    w = as_user(
        NOBODY,
        "dd",
        "of=" + str(m.disk),
        "bs=4096",
        "seek=4",
        "conv=notrunc,fsync",
        input="hello\n",
    )
    assert w.returncode == 0, w.stderr
    assert as_user(NOBODY, "touch", m.bitmaps / "nb").returncode == 0
    st_json = as_user(NOBODY, "cat", m.bitmaps / "nb")
    assert json.loads(st_json.stdout)["name"] == "nb"
    assert as_user(NOBODY, "ls", m.bitmaps).stdout.split() == ["nb"]
    assert mode_of(m.bitmaps / "nb") == 0o600 and os.stat(m.bitmaps / "nb").st_uid == NOBODY
    # anybody else: EACCES on the disk, the bitmaps and the root
    for cmd in (
        ["head", "-c", "4", m.disk],
        ["ls", m.bitmaps],
        ["cat", m.bitmaps / "nb"],
        ["ls", m.mnt],
    ):
        r = as_user(STRANGER, *cmd)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r)
    assert m.unmount() == 0
    assert_clean(img)
    out = qemu_io(img, "read -P 0x61 0 16k", "read -v 16k 6", fmt="qcow2").stdout
    assert "hello" in out


def test_gid_and_umask_give_a_group_access(tmp_path, public_dir, mount):
    img = private_image(tmp_path)
    m = mount(
        img, extra=["-o", f"allow_other,uid=0,gid={NOBODY},umask=027"], mnt=mnt_in(public_dir)
    )
    assert (os.stat(m.disk).st_gid, mode_of(m.disk)) == (NOBODY, 0o640)
    assert mode_of(m.bitmaps) == 0o750 and mode_of(m.mnt) == 0o550
    # a member of the group reads but cannot write; others get nothing
    assert as_user(STRANGER, "head", "-c", "4", m.disk, gid=NOBODY).stdout == "aaaa"
    w = as_user(STRANGER, "dd", "of=" + str(m.disk), "conv=notrunc", gid=NOBODY, input="x")
    assert w.returncode != 0 and "Permission denied" in w.stderr
    assert as_user(STRANGER, "head", "-c", "4", m.disk).returncode != 0


def test_read_only_mounts_show_read_only_modes(tmp_path, mount):
    img = private_image(tmp_path)
    qemu_img("bitmap", "--add", img, "b0")
    m = mount(img, extra=["-o", "ro,umask=022"])
    assert mode_of(m.disk) == 0o444 and mode_of(m.bitmaps / "b0") == 0o444
    assert mode_of(m.bitmaps) == 0o555 and mode_of(m.mnt) == 0o555
    m2 = mount(img, read_only=True)  # readers share; the default umask is owner-only
    assert mode_of(m2.disk) == 0o400 and mode_of(m2.bitmaps) == 0o500


def test_ownership_cannot_be_changed_through_the_mount(tmp_path, mount):
    m = mount(private_image(tmp_path))
    with pytest.raises(PermissionError):
        os.chmod(m.disk, 0o666)
    with pytest.raises(PermissionError):
        os.chown(m.disk, NOBODY, NOBODY)
    assert mode_of(m.disk) == 0o600


# ---------------------------------------------------------------------- -o parsing
@pytest.mark.parametrize(
    "opts, says",
    [
        ("bogus", "unknown mount option 'bogus'"),
        ("allow_other,frobnicate=1", "unknown mount option 'frobnicate=1'"),
        ("umask=999", "umask=999"),
        ("uid=no-such-user-here", "no such user"),
        ("backing=anywhere", "backing=anywhere"),
        ("ro=1", "unknown mount option 'ro=1'"),
    ],
)
def test_bad_options_are_refused_with_one_line(tmp_path, opts, says):
    img = private_image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = img.read_bytes()
    p = run([*QCOWFS, "mount", "-o", opts, img, mnt], check=False)
    assert p.returncode == 2, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowfs: ") and says in lines[0], p.stderr
    assert not os.path.ismount(mnt) and img.read_bytes() == before


def test_qcowfs_options_spelled_as_o(tmp_path):
    img = private_image(tmp_path)
    log = tmp_path / "o.log"
    (tmp_path / "m").mkdir()
    # mount(8)'s calling form: no subcommand, options after the operands
    p = run(
        [
            *QCOWFS,
            img,
            tmp_path / "m",
            "-o",
            f"rw,dev,suid,noatime,nofail,x-systemd.automount,log={log},debug",
        ],
        check=False,
    )
    try:
        assert p.returncode == 0, p.stderr
        line = next(
            x
            for x in Path("/proc/self/mounts").read_text().splitlines()
            if f" {tmp_path / 'm'} " in x
        )
        # mount(8)'s defaults (dev,suid) never make a qcowfs mount dev or suid
        assert "nosuid" in line and "nodev" in line and "noatime" in line, line
        assert "DEBUG" in log.read_text()  # -o log=FILE and -o debug reached the daemon
    finally:
        run([*QCOWFS, "umount", tmp_path / "m"], check=False)
    assert_clean(img)


# ---------------------------------------------------------------------- mount(8), fstab, systemd
def _helper_on_path() -> str:
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    found = shutil.which("qcowfs", path=path)
    assert found, "scripts/setup puts a qcowfs command on mount(8)'s PATH (/usr/local/bin/qcowfs)"
    return found


def _bitmap_flags(img: Path) -> dict:
    return {
        b["name"]: b["flags"] for b in qemu_info(img)["format-specific"]["data"].get("bitmaps", [])
    }


def _wait_released(img: Path) -> None:
    """After a plain umount the daemon still stores bitmaps; it is done when QEMU can lock the image."""
    wait_for(
        lambda: run(["qemu-img", "info", img], check=False).returncode == 0,
        timeout=30,
        what="the daemon to release the image after umount",
    )


def test_mount_t_fuse_qcowfs_and_plain_umount(tmp_path, public_dir):
    _helper_on_path()
    img = private_image(tmp_path)
    qemu_img("bitmap", "--add", img, "b0")
    mnt = mnt_in(public_dir)
    p = run(
        ["mount", "-t", "fuse.qcowfs", img, mnt, "-o", f"allow_other,uid={NOBODY}"], check=False
    )
    try:
        assert p.returncode == 0, p
        assert os.path.ismount(mnt), "mount(8) returned before the mount was ready"
        assert os.stat(mnt / "disk.raw").st_uid == NOBODY
        w = as_user(
            NOBODY,
            "dd",
            f"of={mnt}/disk.raw",
            "bs=65536",
            "seek=3",
            "conv=notrunc",
            input="z" * 100,
        )
        assert w.returncode == 0, w.stderr
        assert _bitmap_flags(img) == {"b0": ["in-use", "auto"]}
    finally:
        u = run(["umount", mnt], check=False)
    assert u.returncode == 0, u
    _wait_released(img)
    assert _bitmap_flags(img) == {"b0": ["auto"]}
    assert_clean(img)
    dirty = run(["qcowfs", "bitmap", "extents", img, "b0", "--json"]).stdout
    assert {"start": 3 * 65536, "length": 65536, "dirty": True} in json.loads(dirty)


def test_fstab_entry_mounts_with_mount_T(tmp_path, public_dir):
    _helper_on_path()
    img = private_image(tmp_path)
    mnt = mnt_in(public_dir)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"# test fstab\n{img} {mnt} fuse.qcowfs defaults,allow_other,uid={NOBODY},nofail 0 0\n"
    )
    p = run(["mount", "-T", fstab, mnt], check=False)
    try:
        assert p.returncode == 0, p
        assert os.path.ismount(mnt)
        assert as_user(NOBODY, "head", "-c", "4", mnt / "disk.raw").stdout == "aaaa"
        assert as_user(STRANGER, "head", "-c", "4", mnt / "disk.raw").returncode != 0
    finally:
        u = run(["umount", mnt], check=False)
    assert u.returncode == 0
    _wait_released(img)
    assert_clean(img)


def test_readme_systemd_mount_unit_parses_and_verifies(tmp_path):
    unit_text = readme_block("ini", "/etc/systemd/system/mnt-vm.mount")
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str
    cp.read_string(unit_text)
    mnt = cp["Mount"]
    assert mnt["Type"] == "fuse.qcowfs"
    assert mnt["What"].endswith(".qcow2") and mnt["Where"] == "/mnt/vm"
    opts = mnt["Options"].split(",")
    # the options the unit passes are ones qcowfs accepts
    from qcowfs.fuse.options import MountOptions, parse_into

    parsed = parse_into(MountOptions(), [mnt["Options"]])
    assert parsed.allow_other and "allow_other" in opts
    # systemd requires the unit name to be the escaped Where=
    esc = run(["systemd-escape", "-p", "--suffix=mount", mnt["Where"]]).stdout.strip()
    assert esc == "mnt-vm.mount"
    unit = tmp_path / esc  # systemd-analyze: scripts/setup installs systemd
    unit.write_text(unit_text)
    v = run(["systemd-analyze", "verify", "--man=no", unit], check=False)
    # verify may grumble about a missing What= on this machine; never about the unit's syntax
    bad = [
        x
        for x in (v.stderr + v.stdout).splitlines()
        if "Unknown" in x or "Failed to parse" in x or "Invalid" in x or "bad-setting" in x
    ]
    assert not bad, v.stderr


# ---------------------------------------------------------------------- untrusted images
@pytest.fixture
def hostile(tmp_path):
    """Images in their own directory naming files outside it."""
    d = tmp_path / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", d / "abs.qcow2", "1M")
    os.symlink("/etc/passwd", d / "link.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "link.raw", "-F", "raw", d / "sym.qcow2", "1M")
    qemu_img("create", "-q", "-f", "raw", d / "base.raw", "1M")
    qemu_io(d / "base.raw", "write -P 0x42 0 4k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "ok.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/dev/zero", "-F", "raw", d / "dev.qcow2", "1M")
    return d


@pytest.mark.parametrize(
    "name, policy, says",
    [
        (
            "abs.qcow2",
            "same-dir",
            "backing file /etc/passwd resolves to /etc/passwd, outside the image's directory",
        ),
        ("sym.qcow2", "same-dir", "resolves to /etc/passwd, outside the image's directory"),
        ("abs.qcow2", "none", "needs backing file /etc/passwd, refused by --backing=none"),
        ("sym.qcow2", "none", "refused by --backing=none"),
        ("ok.qcow2", "none", "refused by --backing=none"),
        ("dev.qcow2", "same-dir", "backing file /dev/zero"),
    ],
)
@pytest.mark.parametrize("spelling", ["flag", "o"])
def test_backing_policy_refuses_with_one_line(hostile, tmp_path, name, policy, says, spelling):
    img = hostile / name
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = img.read_bytes()
    how = [f"--backing={policy}"] if spelling == "flag" else ["-o", f"backing={policy}"]
    for cmd in (
        ["mount", *how, img, mnt],
        ["mount", "--read-only", *how, img, mnt],
        ["info", f"--backing={policy}", img],
    ):
        if cmd[0] == "info" and spelling == "o":
            continue
        p = run([*QCOWFS, *cmd], check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (cmd, p)
        assert lines[0].startswith(f"qcowfs: {img}: ") and says in lines[0], lines
        assert "--backing=" in lines[0].split(says, 1)[1] or "--backing=" in lines[0], lines
        assert not os.path.ismount(mnt) and img.read_bytes() == before


def test_same_dir_allows_files_in_the_directory(hostile, mount):
    m = mount(hostile / "ok.qcow2", extra=["--backing=same-dir"])
    with open(m.disk, "rb") as f:
        assert f.read(4) == b"BBBB"


@pytest.mark.parametrize(
    "name, target, level",
    [
        ("abs.qcow2", "/etc/passwd", "INFO"),
        ("sym.qcow2", "/etc/passwd", "INFO"),
        ("dev.qcow2", "/dev/zero", "WARNING"),
    ],
)
def test_follow_opens_them_and_logs_the_file(hostile, mount, name, target, level):
    m = mount(hostile / name, read_only=True)  # follow is the default, as in QEMU
    if target == "/etc/passwd":
        with open(m.disk, "rb") as f:
            assert f.read(5) == Path("/etc/passwd").read_bytes()[:5]
    logged = [x for x in m.log_text().splitlines() if target in x]
    assert logged and level in logged[0], m.log_text()
    if level == "WARNING":
        assert "character device" in logged[0]


def test_info_prints_the_resolved_chain(hostile):
    p = run([*QCOWFS, "info", "--json", hostile / "sym.qcow2"])
    chain = json.loads(p.stdout)["resolved-chain"]
    assert chain == [
        {
            "role": "backing file",
            "named-by": str(hostile / "sym.qcow2"),
            "filename": str(hostile / "link.raw"),
            "resolved": "/etc/passwd",
            "format": "raw",
            "type": "regular file",
        }
    ]
    text = run([*QCOWFS, "info", hostile / "dev.qcow2"]).stdout
    assert "/dev/zero -> /dev/zero (raw, character device)" in text


# ---------------------------------------------------------------------- containers
# A PID and mount namespace of its own, like a container, whatever way the machine's / is mounted:
# unshare's default (making / private) fails where / is not a mount point (a chroot), so the
# namespace keeps the propagation it inherits; --mount-proc makes /proc private before mounting
# the namespace's own, and the script then makes every mount it sees private, so that the FUSE
# mount made inside stays inside.
_PRIVATE_MOUNTS = (
    'awk "{print \\$5}" /proc/self/mountinfo | '
    'while read -r m; do mount --make-private "$m" 2>/dev/null; done; exec "$@"'
)
CONTAINER = [
    "unshare",
    "--kill-child",
    "--pid",
    "--fork",
    "--mount",
    "--propagation",
    "unchanged",
    "--mount-proc",
    "sh",
    "-c",
    _PRIVATE_MOUNTS,
    "sh",
]

# The inits `--init` runs: docker's is tini named docker-init, podman's is catatonit named
# podman-init; "sandbox-init" is a name no list could hold (qcowfs looks at what pid 1 does, not
# at its name).
_INITS = {
    "docker-init": "tini",
    "tini": "tini",
    "podman-init": "catatonit",
    "catatonit": "catatonit",
    "dumb-init": "dumb-init",
    "sandbox-init": "tini",
}


def _init_command(tmp_path: Path, name: str | None) -> list:
    if name is None:
        return []
    binary = shutil.which(_INITS[name])
    assert binary, f"{_INITS[name]} is missing (scripts/setup installs it)"
    link = tmp_path / "bin" / name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(binary)  # pid 1's comm is the name it was started by
    return [link, "--"]


# nsenter into the namespace's mounts, with pid 1's root and working directory: inside a chroot the
# namespace's mount table is the host's, and only the root tells where the chroot's files are
def _pid1_of(unshare: subprocess.Popen) -> int:
    """The namespace's pid 1, seen from here: unshare's one child."""
    return int(Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()[0])


@contextlib.contextmanager
def _container(tmp_path: Path, init: str | None, command: Callable[[Path, Path, Path], list]):
    """A container-like namespace running init (or nothing) and command(img, mnt, log), once the
    mount is up: yields (unshare's process, the namespace's pid 1 seen from here, img, mnt, log).
    Whatever is left of the namespace is killed afterwards (unshare --kill-child)."""
    img = private_image(tmp_path)
    qemu_img("bitmap", "--add", img, "b0")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "ns.log"
    ns = subprocess.Popen(
        [*CONTAINER, *_init_command(tmp_path, init), *command(img, mnt, log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: (
                "mounted on" in (log.read_text() if log.exists() else "") or ns.poll() is not None
            ),
            what="the namespaced mount",
        )
        assert ns.poll() is None, ns.communicate()
        yield ns, _pid1_of(ns), img, mnt, log
    finally:
        if ns.poll() is None:
            ns.kill()
            ns.wait()


def _umount_inside(pid1: int, mnt: Path) -> subprocess.CompletedProcess:
    """`qcowfs umount` run inside the namespace, as `docker exec` / `podman exec` run it."""
    enter = ["nsenter", "-t", pid1, "--pid", "--mount", "--root", "--wd", "--"]
    return run([*enter, *QCOWFS, "umount", mnt], check=False)


@pytest.mark.parametrize(
    "init", [None, "docker-init", "tini", "podman-init", "catatonit", "dumb-init", "sandbox-init"]
)
def test_umount_in_a_container_whose_init_is_the_daemon(tmp_path, init):
    """docker/podman run [--init] ... mount --foreground: the daemon is the PID namespace's init, or
    the one child of a minimal init that exits with it; its exit kills everything left in the
    namespace, and `docker exec ... qcowfs umount` was killed (137; podman's podman-init too)."""

    def foreground(img: Path, mnt: Path, log: Path) -> list:
        return [*QCOWFS, "mount", "--foreground", "--log", log, img, mnt]

    with _container(tmp_path, init, foreground) as (ns, inner, img, mnt, log):
        if init is not None:
            assert Path(f"/proc/{inner}/comm").read_text().strip() == init[:15]
        u = _umount_inside(inner, mnt)
        assert u.returncode == 0, u
        assert "not waiting" in u.stderr
        ns.wait(timeout=60)
        assert ns.returncode == 0, ns.communicate()
    assert "unmounted cleanly" in log.read_text()
    assert _bitmap_flags(img) == {"b0": ["auto"]}
    assert_clean(img)


def test_umount_in_a_container_waits_when_the_init_outlives_the_daemon(tmp_path):
    """The container's main process is something else (here `sleep`) and the daemon was started
    later (`docker exec ... qcowfs mount`): pid 1 has two children and stays when the daemon goes,
    so umount waits for the daemon's clean shutdown, as everywhere else."""

    def daemon_then_sleep(img: Path, mnt: Path, log: Path) -> list:
        # sh starts the daemon in the background (it is re-parented to pid 1), then becomes sleep
        q = shlex.quote
        mount = (
            f"{shlex.join(map(str, QCOWFS))} mount --log {q(str(log))} {q(str(img))} {q(str(mnt))}"
        )
        return ["sh", "-c", f"{mount} && exec sleep 300"]

    with _container(tmp_path, "docker-init", daemon_then_sleep) as (ns, inner, img, mnt, log):
        # `qcowfs mount` returns once mounted; then sh becomes sleep beside the re-parented daemon
        wait_for(
            lambda: len(Path(f"/proc/{inner}/task/{inner}/children").read_text().split()) == 2,
            what="pid 1 with two children, sleep and the daemon",
        )
        u = _umount_inside(inner, mnt)
        assert u.returncode == 0, u
        assert "not waiting" not in u.stderr
        # it waited: the daemon had finished (the image is unlocked) when umount returned
        assert "unmounted cleanly" in log.read_text()
        assert ns.poll() is None  # the container goes on
    assert _bitmap_flags(img) == {"b0": ["auto"]}
    assert_clean(img)
