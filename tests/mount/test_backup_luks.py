"""`qcowfs backup` of encrypted (LUKS) disks: the backups are encrypted with the source's own LUKS
header, and QEMU opens every file of the chain with the source's passphrase (the oracle:
qemu-img check and compare with the secret). docs/backup.md, "Encrypted disks"."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import QCOWFS, needs_fuse, run
from support.images import create
from support.luks import key_file, luks_image, qemu_with_key
from test_luks import fill, qemu_clean, qemu_same, random_writes, reference

from qcowfs.format.header import parse_header

pytestmark = [needs_fuse, pytest.mark.slow]  # in the full run, not in --quick

MiB = 1 << 20


def chain_spec(img: Path, depth: int) -> str:
    """QEMU's --image-opts for img and the `depth` encrypted files below it, all with sec0."""
    spec = f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"
    for d in range(1, depth + 1):
        spec += "," + "backing." * d + "encrypt.key-secret=sec0"
    return spec


def backup(*args: object, check: bool = True) -> dict:
    p = run([*QCOWFS, "backup", "--json", *args], check=False)
    if not check:
        return {"rc": p.returncode, "stderr": p.stderr}
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def luks_area(path: Path) -> bytes:
    h = parse_header(path.read_bytes()[: 64 << 10], allow_encrypted=True)
    assert h.crypt_method == 2 and h.crypto_header is not None
    off, length = h.crypto_header
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(length)


def first_data_slot(path: Path) -> int:
    """Host offset of a backup file's first data cluster (right after its LUKS header)."""
    h = parse_header(path.read_bytes()[: 64 << 10], allow_encrypted=True)
    assert h.crypto_header is not None
    off, length = h.crypto_header
    cs = h.cluster_size
    return off + -(-length // cs) * cs


def test_an_unmounted_image_backs_up_into_an_encrypted_chain(tmp_path):
    key = key_file(tmp_path)
    size = 32 * MiB
    img = luks_image(tmp_path, "vm.qcow2", size=size, key=key)
    fill(img, key, 1, size)
    ref0 = tmp_path / "ref0.raw"
    ref0.write_bytes(reference(tmp_path, img, key))
    d = tmp_path / "bk"
    b0 = backup("--key-file", key, img, d, "--name", "b0")
    assert b0["kind"] == "full" and b0["encryption"] == "luks"
    fill(img, key, 2, size)
    ref1 = tmp_path / "ref1.raw"
    ref1.write_bytes(reference(tmp_path, img, key))
    b1 = backup("--key-file", key, img, d, "--name", "b1")
    assert b1["kind"] == "incremental" and b1["backing"] == "b0.qcow2"
    f0, f1 = d / "b0.qcow2", d / "b1.qcow2"
    # QEMU: both files encrypted, each opened with the source's passphrase, clean, and the
    # chain reads as the disk did at each checkpoint
    for f, depth in ((f0, 0), (f1, 1)):
        info = json.loads(qemu_with_key(key, "info", "--output=json", f).stdout)
        assert info["encrypted"] is True
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        assert luks_area(f) == luks_area(img)  # the source's header: the same key slots
        qemu_clean(f, key, spec=chain_spec(f, depth))
    qemu_same(f0, key, ref0, spec=chain_spec(f0, 0))
    qemu_same(f1, key, ref1, spec=chain_spec(f1, 1))
    # ciphertext: no 512-byte sector of the guest's data is stored in the clear
    plain = ref1.read_bytes()
    stored = f1.read_bytes()
    sectors = {plain[i : i + 512] for i in range(0, len(plain), 512)} - {bytes(512)}
    assert sectors and not any(stored[i : i + 512] in sectors for i in range(0, len(stored), 512))
    # verify decrypts with the key, refuses without it, and finds a flipped ciphertext bit
    p = run([*QCOWFS, "backup", "verify", d, "--key-file", key], check=False)
    assert p.returncode == 0 and p.stdout.count(": ok") == 2, p.stdout + p.stderr
    p = run([*QCOWFS, "backup", "verify", d], check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--key-file" in p.stderr
    at = first_data_slot(f1) + 100
    with open(f1, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    p = run([*QCOWFS, "backup", "verify", d, "--key-file", key], check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "b0: ok" in p.stdout and "b1: DAMAGED" in p.stdout


def test_a_live_encrypted_overlay_on_a_plain_base(tmp_path, mount):
    """A mounted LUKS overlay over a plain base: the full backup reads the base's clusters
    through the chain (plaintext) and encrypts them with the overlay's key; an incremental of
    the overlay's 4 KiB writes follows."""
    key = key_file(tmp_path)
    size = 16 * MiB
    base = create(
        tmp_path / "base.qcow2", size, writes=("write -P 0x5a 0 3M", "write -P 0x6b 9M 640k")
    )
    img = luks_image(tmp_path, "top.qcow2", key=key, backing=base)
    m = mount(img, extra=("--key-file", key))
    mirror = bytearray(m.disk.read_bytes())
    random_writes(m.disk, mirror, seed=7, count=60)
    d = tmp_path / "bk"
    assert backup("--key-file", key, m.mnt, d, "--name", "l0")["kind"] == "full"
    snap0 = tmp_path / "l0.raw"
    snap0.write_bytes(mirror)
    random_writes(m.disk, mirror, seed=8, count=40)
    assert backup("--key-file", key, m.mnt, d, "--name", "l1")["kind"] == "incremental"
    # a wrong key for a live source: refused before the checkpoint (no bitmap, no snapshot)
    (tmp_path / "wrong").write_bytes(b"not it")
    (tmp_path / "wrong").chmod(0o600)
    r = backup("--key-file", tmp_path / "wrong", m.mnt, d, "--name", "l2", check=False)
    assert r["rc"] == 1 and "no key slot" in r["stderr"] and r["stderr"].count("\n") == 1
    assert sorted(os.listdir(m.mnt / ".snapshots")) == []
    assert m.unmount() == 0
    snap1 = tmp_path / "l1.raw"
    snap1.write_bytes(mirror)
    qemu_same(d / "l0.qcow2", key, snap0, spec=chain_spec(d / "l0.qcow2", 0))
    qemu_same(d / "l1.qcow2", key, snap1, spec=chain_spec(d / "l1.qcow2", 1))
    for name, depth in (("l0", 0), ("l1", 1)):
        qemu_clean(d / f"{name}.qcow2", key, spec=chain_spec(d / f"{name}.qcow2", depth))
    p = run([*QCOWFS, "backup", "verify", d, "--key-file", key], check=False)
    assert p.returncode == 0 and p.stdout.count(": ok") == 2, p.stdout + p.stderr
    # the source is clean too, and its backup bitmap l1 records on
    qemu_clean(img, key, spec=f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0")
    bitmaps = run([*QCOWFS, "bitmap", "list", img]).stdout
    assert "l1" in bitmaps and "l0" not in bitmaps


def test_refusals_are_one_line_and_change_nothing(tmp_path):
    key = key_file(tmp_path)
    img = luks_image(tmp_path, key=key, size=8 * MiB)
    wrong = key_file(tmp_path, b"hunter3", "wrong")
    shared = key_file(tmp_path, name="shared")
    shared.chmod(0o644)
    legacy = tmp_path / "legacy.qcow2"
    qemu_with_key(key, "create", "-q", "-f", "qcow2", "-o",
                  "encrypt.format=aes,encrypt.key-secret=sec0", legacy, "8M")  # fmt: skip
    # a LUKS area of 32 MiB (QEMU's are about 2 MiB), otherwise sound: copied into every backup
    # file, it is refused before the checkpoint
    big = tmp_path / "big-area.qcow2"
    data = bytearray(img.read_bytes())
    h = parse_header(bytes(data[: 64 << 10]), allow_encrypted=True)
    assert h.crypto_header is not None
    at = data.index((0x0537BE77).to_bytes(4, "big") + (16).to_bytes(4, "big")) + 16
    data[at : at + 8] = (32 * MiB).to_bytes(8, "big")
    big.write_bytes(data)
    os.truncate(big, h.crypto_header[0] + 32 * MiB)
    cases = [
        ((img,), "give its passphrase with --key-file"),
        (("--key-file", key, big), "more than qcowfs copies"),
        (("--key-file", wrong, img), "no key slot"),
        (("--key-file", tmp_path / "missing", img), "key file not found"),
        (("--key-file", shared, img), "readable by others"),
        (("--key-file", key, legacy), "legacy AES"),
    ]
    for args, words in cases:
        target = args[-1]
        before = hashlib.sha256(Path(target).read_bytes()).hexdigest()
        d = tmp_path / "bk"
        p = run([*QCOWFS, "backup", *args, d], check=False)
        assert p.returncode == 1, (args, p.stderr)
        assert words in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
        assert "Traceback" not in p.stderr
        assert hashlib.sha256(Path(target).read_bytes()).hexdigest() == before, args
        assert not d.exists(), args
