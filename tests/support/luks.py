"""LUKS-encrypted test images made by qemu-img, and QEMU's tools pointed at them with the key.

QEMU opens an encrypted image only with its passphrase: `--object secret,id=sec0,file=KEY,
format=raw` and `encrypt.key-secret=sec0` in an --image-opts spec (qemu_spec)."""

from __future__ import annotations

from pathlib import Path

from qcowfs_dev.oracles import qemu_img

MiB = 1 << 20
SECRET = "secret,id=sec0,file={key},format=raw"
PASSPHRASE = b"hunter2"


def qemu_timing_pbkdf2(*args: object) -> None:
    """qemu-img create/amend/convert making LUKS key slots. QEMU times PBKDF2 with the thread's
    CPU clock and gives up when that clock says no time passed ("Unable to get accurate CPU
    usage"), which this VM's clock does now and then: a QEMU quirk, not the behaviour under
    test, so it is tried again."""
    for _attempt in range(12):
        p = qemu_img(*args, check=False)
        if p.returncode == 0 or "accurate CPU usage" not in p.stderr:
            break
    assert p.returncode == 0, p.stderr


def key_file(tmp: Path, passphrase: bytes = PASSPHRASE, name: str = "key") -> Path:
    """A key file readable by its owner only."""
    key = tmp / name
    key.write_bytes(passphrase)
    key.chmod(0o600)
    return key


def luks_image(
    tmp: Path,
    name: str = "vm.qcow2",
    *opts: str,
    size: int = 64 * MiB,
    key: Path | None = None,
    backing: Path | None = None,
    backing_fmt: str = "qcow2",
    iter_time: int = 100,
) -> Path:
    """qemu-img create with LUKS (PBKDF2 timed at iter_time ms), the passphrase in tmp/key
    unless key names another file."""
    key = key or key_file(tmp)
    img = tmp / name
    o = ",".join(
        ["encrypt.format=luks", "encrypt.key-secret=sec0", f"encrypt.iter-time={iter_time}", *opts]
    )
    args: list[object] = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET.format(key=key),
        "-o",
        o,
    ]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    qemu_timing_pbkdf2(*args, img, *([] if backing is not None else [str(size)]))
    return img


def qemu_spec(img: Path, backing_secret: str | None = None) -> str:
    """The --image-opts spec QEMU opens img with, its key the secret sec0 (and a backing image's
    the secret backing_secret)."""
    spec = f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"
    if backing_secret:
        spec += f",backing.encrypt.key-secret={backing_secret}"
    return spec


def qemu_with_key(key: Path, *args: object, check: bool = True):
    """qemu-img ARGS with the secret object sec0 (from key) in front of them."""
    return qemu_img(args[0], "--object", SECRET.format(key=key), *args[1:], check=check)
