"""QEMU's tools on a workload's images, with the passphrase when the workload has one.

An encrypted (LUKS) image opens in QEMU only with its key: the secret object `--object
secret,id=sec0,file=KEY,format=raw` and an --image-opts spec naming it (`driver=qcow2,
file.filename=IMG,encrypt.key-secret=sec0`). Every helper here takes key_file ("" for a plain
image): without one it is exactly the plain call of qcowfs_dev.oracles (the same command line),
so the plain workloads' checks do not change; with one it is the same tool in the keyed form.
qemu-img info needs no key (it reads no data) and stays plain everywhere.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Optional

from qcowfs_dev.oracles import qemu_check_rc, qemu_raw, run

#: the id of the secret object every keyed command line defines
SECRET_ID = "sec0"
#: the name of the key file a workload with a passphrase keeps in its directory
KEY_FILE = "key"


def _opt(value: str) -> str:
    """A value inside a QEMU option string (a comma is written twice)."""
    return value.replace(",", ",,")


def secret_object(key_file: str) -> str:
    """The --object argument of the secret holding the passphrase in key_file (its raw bytes)."""
    return f"secret,id={SECRET_ID},file={_opt(os.path.abspath(key_file))},format=raw"


def image_spec(path: str) -> str:
    """The --image-opts spec of encrypted qcow2 image `path`, its key the secret SECRET_ID."""
    return (
        f"driver=qcow2,file.filename={_opt(os.path.abspath(path))},encrypt.key-secret={SECRET_ID}"
    )


def image_args(path: str, key_file: str) -> list[str]:
    """What names the image to a QEMU tool: the secret object, --image-opts and the spec."""
    return ["--object", secret_object(key_file), "--image-opts", image_spec(path)]


def write_key_file(dirname: str, passphrase: bytes) -> str:
    """dirname/KEY_FILE holding the passphrase (its bytes exactly), readable by its owner only."""
    path = os.path.join(dirname, KEY_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, passphrase)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)
    return path


def check_rc(path: str, key_file: str = "", repair: Optional[str] = None) -> tuple[int, Any]:
    """qcowfs_dev.oracles.qemu_check_rc (exit code, parsed JSON), keyed when key_file is given."""
    path = os.path.abspath(path)
    return qemu_check_rc(
        path, repair=repair, image_args=image_args(path, key_file) if key_file else None
    )


def check_text(path: str, key_file: str = "", cwd: str = "") -> subprocess.CompletedProcess[str]:
    """qemu-img check PATH in its human-readable form (its stderr lists every leak and error), in
    cwd (default: the image's directory), keyed when key_file is given; never raises on its exit."""
    path = os.path.abspath(path)
    args = image_args(path, key_file) if key_file else [path]
    return run(["qemu-img", "check", *args], check=False, cwd=cwd or os.path.dirname(path))


def raw(path: str, dest: str, key_file: str = "", snapshot: Optional[str] = None) -> bytes:
    """qcowfs_dev.oracles.qemu_raw (the guest content as QEMU reads it, of snapshot SNAPSHOT if
    given), keyed when key_file is given; dest is a scratch file, removed again."""
    if not key_file:
        return qemu_raw(path, dest, snapshot=snapshot)
    cmd = ["qemu-img", "convert", "-U"]
    if snapshot:
        cmd += ["-l", f"snapshot.name={snapshot}"]
    path = os.path.abspath(path)
    run(
        cmd + image_args(path, key_file) + ["-O", "raw", os.path.abspath(dest)],
        cwd=os.path.dirname(path),
    )
    with open(dest, "rb") as f:
        data = f.read()
    os.unlink(dest)
    return data


def nbd_server(path: str, key_file: str = "", bitmap: str = "") -> list[str]:
    """The read-only qemu-nbd command line serving image `path` (exporting dirty bitmap BITMAP)."""
    path = os.path.abspath(path)
    b = ["-B", bitmap] if bitmap else []
    if not key_file:
        return ["qemu-nbd", "-r", "-f", "qcow2", *b, path]
    return ["qemu-nbd", "-r", *b, *image_args(path, key_file)]


def qemu_io(path: str, key_file: str, *commands: str) -> subprocess.CompletedProcess[str]:
    """qemu-io -c CMD ... on encrypted image `path` opened with the key in key_file."""
    cmd = ["qemu-io", *image_args(path, key_file)]
    for c in commands:
        cmd += ["-c", c]
    path = os.path.abspath(path)
    return run(cmd, cwd=os.path.dirname(path))


def qemu_img(key_file: str, sub: str, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """qemu-img SUB [ARGS] on encrypted image `path` opened with the key (e.g. snapshot -c NAME)."""
    path = os.path.abspath(path)
    return run(["qemu-img", sub, *args, *image_args(path, key_file)], cwd=os.path.dirname(path))


def create_luks(path: str, size: int, key_file: str, iter_time: int = 10, **opts: object) -> None:
    """qemu-img create of a LUKS-encrypted qcow2 image (PBKDF2 timed at iter_time ms: quick to
    make and to unlock), its passphrase the key file's. QEMU times PBKDF2 with the thread's CPU
    clock and gives up when that clock says no time passed ("Unable to get accurate CPU usage"),
    which a VM's clock does now and then: tried again then (tests/support/luks.py does the same)."""
    o = ",".join(
        [
            "encrypt.format=luks",
            f"encrypt.key-secret={SECRET_ID}",
            f"encrypt.iter-time={iter_time}",
            *(f"{k}={v}" for k, v in opts.items()),
        ]
    )
    path = os.path.abspath(path)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", secret_object(key_file)]
    cmd += ["-o", o, path, str(size)]
    for _attempt in range(12):
        p = run(cmd, check=False, cwd=os.path.dirname(path))
        if p.returncode == 0 or "accurate CPU usage" not in p.stderr:
            break
    if p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstderr: {p.stderr}")
