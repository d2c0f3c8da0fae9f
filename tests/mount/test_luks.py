"""Encrypted (LUKS) images through a mount, QEMU as the oracle: what qemu-img makes reads
byte-identical through qcowfs with the key file, what qcowfs writes QEMU reads back
(`qemu-img compare` with the secret) and `qemu-img check` passes; copy-on-write, discard, grow,
snapshots, bitmaps and backing chains on encrypted images; every refusal one line with the
image's bytes unchanged (docs/encryption.md)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
from pathlib import Path

import pytest
from conftest import QCOWFS, needs_fuse, run
from support.images import create
from support.luks import (
    SECRET,
    key_file,
    luks_image,
    qemu_spec,
    qemu_timing_pbkdf2,
    qemu_with_key,
)
from support.syscalls import fallocate

from qcowfs_dev.oracles import qemu_img

pytestmark = needs_fuse

MiB = 1 << 20
KiB = 1 << 10


def reference(tmp: Path, img: Path, key: Path, name: str = "ref.raw", extra: tuple = ()) -> bytes:
    """The guest disk as QEMU reads it (qemu-img convert with the secret)."""
    out = tmp / name
    qemu_with_key(key, "convert", *extra, "--image-opts", qemu_spec(img), "-O", "raw", out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_clean(img: Path, key: Path, extra: tuple = (), spec: str | None = None) -> None:
    p = qemu_with_key(key, "check", *extra, "--image-opts", spec or qemu_spec(img), check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def qemu_same(img: Path, key: Path, raw: Path, extra: tuple = (), spec: str | None = None) -> None:
    """qemu-img compare of the encrypted image (opened with its key) with a raw file."""
    p = qemu_with_key(
        key,
        "compare",
        *extra,
        "--image-opts",
        spec or qemu_spec(img),
        f"driver=raw,file.filename={raw}",
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def add_key_slot(img: Path, key: Path, new_key: Path, iter_time: int) -> None:
    """qemu-img amend: a new active key slot for new_key's passphrase (key opens the image)."""
    qemu_timing_pbkdf2(
        "amend",
        "--object", SECRET.format(key=key),
        "--object", SECRET.format(key=new_key).replace("sec0", "sec1"),
        "--image-opts", qemu_spec(img),
        "-o", f"encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time={iter_time}",
    )  # fmt: skip


def fill(img: Path, key: Path, seed: int, size: int) -> None:
    """Data written by QEMU: random extents of random bytes, some holes, some zeros."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(24):
        off = rng.randrange(0, size - 300 * KiB) & ~511
        n = rng.randrange(1, 300) * 512
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
    cmds.append(f"write -z {size // 2} 128k")
    args = ["qemu-io", "--object", SECRET.format(key=key), "--image-opts", qemu_spec(img)]
    for c in cmds:
        args += ["-c", c]
    run(args)


def random_writes(disk: Path, mirror: bytearray, seed: int, count: int = 200) -> None:
    """Writes of every alignment through the mount, the same into mirror."""
    rng = random.Random(seed)
    size = len(mirror)
    fd = os.open(disk, os.O_WRONLY)
    try:
        for _ in range(count):
            n = rng.choice([1, 7, 511, 512, 513, 4096, 4097, 65536, 200 * KiB])
            off = rng.randrange(0, size - n)
            if rng.random() < 0.5:
                off &= ~4095
            data = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)
            os.pwrite(fd, data, off)
            mirror[off : off + n] = data
        os.fsync(fd)
    finally:
        os.close(fd)


LAYOUTS = [
    pytest.param((), id="xts-plain64-64k"),
    pytest.param(("cluster_size=4096",), id="xts-4k-clusters", marks=pytest.mark.slow),
    pytest.param(("cluster_size=2M",), id="xts-2M-clusters", marks=pytest.mark.slow),
    pytest.param(
        ("cluster_size=65536", "extended_l2=on"), id="extended-l2", marks=pytest.mark.slow
    ),
    pytest.param(
        (
            "encrypt.cipher-alg=aes-256",
            "encrypt.cipher-mode=cbc",
            "encrypt.ivgen-alg=essiv",
            "encrypt.ivgen-hash-alg=sha256",
        ),
        id="cbc-essiv-sha256",
        marks=pytest.mark.slow,
    ),
    pytest.param(("encrypt.cipher-alg=aes-128",), id="aes-128-xts", marks=pytest.mark.slow),
    pytest.param(
        ("encrypt.cipher-mode=cbc", "encrypt.ivgen-alg=plain"),
        id="cbc-plain",
        marks=pytest.mark.slow,
    ),
    pytest.param(("encrypt.hash-alg=sha512",), id="sha512-slots", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("opts", LAYOUTS)
def test_qemu_written_data_reads_and_writes_back(tmp_path, mount, opts):
    """What QEMU wrote reads byte-identical through the mount; random writes of every alignment
    equal a raw reference as QEMU reads them; qemu-img check is clean."""
    size = 48 * MiB
    key = key_file(tmp_path)
    img = luks_image(tmp_path, "vm.qcow2", *opts, size=size, key=key)
    fill(img, key, 1, size)
    ref = bytearray(reference(tmp_path, img, key))
    m = mount(img, read_only=True, extra=("--key-file", key))
    assert hashlib.sha256(m.disk.read_bytes()).digest() == hashlib.sha256(ref).digest()
    assert m.unmount() == 0
    m = mount(img, extra=("--key-file", key))
    random_writes(m.disk, ref, 2)
    assert m.disk.read_bytes() == bytes(ref)
    assert m.unmount() == 0
    raw = tmp_path / "mirror.raw"
    raw.write_bytes(ref)
    qemu_same(img, key, raw)
    qemu_clean(img, key)
    assert run([*QCOWFS, "check", img]).returncode == 0


@pytest.mark.slow  # in the full run, not in --quick
def test_copy_on_write_discard_grow_bitmaps_and_snapshots(tmp_path, mount):
    """On a LUKS image: a snapshot taken through the mount, writes after it (copy-on-write to
    new host offsets, so re-encrypted), discards, a grow, a bitmap in intent mode; QEMU reads
    the active disk and the snapshot as the mirrors say."""
    size = 32 * MiB
    key = key_file(tmp_path)
    img = luks_image(tmp_path, size=size, key=key)
    fill(img, key, 3, size)
    ref = bytearray(reference(tmp_path, img, key))
    m = mount(img, extra=("--key-file", key, "--bitmap-sync=intent"))
    run([*QCOWFS, "bitmap", "add", m.mnt, "b0"])
    snap_ref = bytes(ref)
    assert m.unmount() == 0
    qemu_with_key(key, "snapshot", "-c", "s1", "--image-opts", qemu_spec(img))
    m = mount(img, extra=("--key-file", key, "--bitmap-sync=intent"))
    random_writes(m.disk, ref, 4, count=120)
    fd = os.open(m.disk, os.O_RDWR)
    try:
        fallocate(fd, 0x02 | 0x01, 1 * MiB, 2 * MiB)  # punch hole, keep size
        ref[1 * MiB : 3 * MiB] = bytes(2 * MiB)
        os.ftruncate(fd, size + 8 * MiB)
        ref += bytes(8 * MiB)
        os.pwrite(fd, b"\x5a" * 5000, size + 1000)
        ref[size + 1000 : size + 6000] = b"\x5a" * 5000
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (m.mnt / ".snapshots" / "s1").read_bytes() == snap_ref
    assert m.disk.read_bytes() == bytes(ref)
    assert m.unmount() == 0
    raw = tmp_path / "mirror.raw"
    raw.write_bytes(ref)
    qemu_same(img, key, raw)
    snap = reference(tmp_path, img, key, "snap.raw", ("-l", "snapshot.name=s1"))
    # qemu-img convert -l gives the snapshot at the active disk's (grown) size: zeros past it
    assert snap[: len(snap_ref)] == snap_ref and not any(snap[len(snap_ref) :])
    qemu_clean(img, key)
    info = qemu_img("info", "--output=json", img).stdout
    assert '"b0"' in info and "in-use" not in info


@pytest.mark.slow  # in the full run, not in --quick
def test_backing_chains_with_one_or_two_keys(tmp_path, mount):
    """An encrypted overlay over a plain base, and over an encrypted base with its own key
    (--backing-key-file): reads show the base through the overlay; writes land in the overlay
    only; QEMU agrees."""
    size = 16 * MiB
    base = create(
        tmp_path / "base.qcow2", size, writes=("write -P 0x33 0 4M", "write -P 0x44 9M 1M")
    )
    key = key_file(tmp_path)
    top = luks_image(tmp_path, "top.qcow2", key=key, backing=base)
    ref = bytearray(reference(tmp_path, top, key))
    assert ref[:16] == b"\x33" * 16
    m = mount(top, extra=("--key-file", key))
    random_writes(m.disk, ref, 5, count=60)
    assert m.disk.read_bytes() == bytes(ref)
    assert m.unmount() == 0
    raw = tmp_path / "mirror.raw"
    raw.write_bytes(ref)
    qemu_same(top, key, raw)

    # both encrypted, with different passphrases
    kb = key_file(tmp_path, b"base secret", "kb")
    ebase = luks_image(tmp_path, "ebase.qcow2", size=size, key=kb)
    run(
        [
            "qemu-io", "--object", SECRET.format(key=kb), "--image-opts", qemu_spec(ebase),
            "-c", "write -P 0x77 0 3M",
        ]
    )  # fmt: skip
    etop = luks_image(tmp_path, "etop.qcow2", key=key, backing=ebase)
    (tmp_path / "nope").mkdir()
    p = run([*QCOWFS, "mount", "--key-file", key, etop, tmp_path / "nope"], check=False)
    assert p.returncode != 0 and "ebase.qcow2" in p.stderr and p.stderr.count("\n") == 1
    m = mount(etop, extra=("--key-file", key, "--backing-key-file", kb))
    data = bytearray(m.disk.read_bytes())
    assert data[: 3 * MiB] == b"\x77" * (3 * MiB) and data[3 * MiB :] == bytes(size - 3 * MiB)
    random_writes(m.disk, data, 6, count=60)
    assert m.unmount() == 0
    raw.write_bytes(data)
    spec = qemu_spec(etop, backing_secret="sec1")
    objs = (SECRET.format(key=kb).replace("sec0", "sec1"),)
    p = qemu_img(
        "compare",
        "--object", SECRET.format(key=key), "--object", objs[0],
        "--image-opts", spec, f"driver=raw,file.filename={raw}",
        check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.slow  # in the full run, not in --quick
def test_a_chain_of_three_encrypted_images_with_three_keys(tmp_path, mount):
    """--backing-key-file once per level: the top's key, the middle one's, the base's; QEMU
    opens the same chain with backing.encrypt.key-secret and backing.backing.encrypt.key-secret."""
    size = 8 * MiB
    kt, km, kb = (key_file(tmp_path, f"{n} secret".encode(), n) for n in ("top", "mid", "base"))
    base = luks_image(tmp_path, "base.qcow2", size=size, key=kb)
    run(["qemu-io", "--object", SECRET.format(key=kb), "--image-opts", qemu_spec(base), "-c", "write -P 0x61 0 2M"])  # fmt: skip
    mid = luks_image(tmp_path, "mid.qcow2", key=km, backing=base)
    top = luks_image(tmp_path, "top.qcow2", key=kt, backing=mid)
    objs = [
        "--object", SECRET.format(key=kt),
        "--object", SECRET.format(key=km).replace("sec0", "sec1"),
        "--object", SECRET.format(key=kb).replace("sec0", "sec2"),
    ]  # fmt: skip
    spec = qemu_spec(top) + ",backing.encrypt.key-secret=sec1"
    spec += ",backing.backing.encrypt.key-secret=sec2"
    run(["qemu-io", *objs, "--image-opts", spec, "-c", "write -P 0x62 1M 2M"])
    # two backing keys given: the middle's, then the base's
    m = mount(top, extra=("--key-file", kt, "--backing-key-file", km, "--backing-key-file", kb))
    data = bytearray(m.disk.read_bytes())
    assert data[: 1 * MiB] == b"\x61" * MiB and data[1 * MiB : 3 * MiB] == b"\x62" * (2 * MiB)
    random_writes(m.disk, data, 7, count=40)
    assert m.unmount() == 0
    raw = tmp_path / "mirror.raw"
    raw.write_bytes(data)
    p = qemu_img(
        "compare", *objs, "--image-opts", spec, f"driver=raw,file.filename={raw}", check=False
    )
    assert p.returncode == 0, p.stdout + p.stderr
    # one backing key short: the base is tried with the middle's key, and refused in one line
    (tmp_path / "short").mkdir()
    p = run([*QCOWFS, "mount", "--key-file", kt, "--backing-key-file", km, top, tmp_path / "short"], check=False)  # fmt: skip
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert f"no key slot of {base} accepts the passphrase in {km}" in p.stderr, p.stderr


@pytest.mark.slow  # in the full run, not in --quick
def test_several_key_slots_each_open_it(tmp_path, mount):
    key = key_file(tmp_path)
    img = luks_image(tmp_path, key=key, size=8 * MiB)
    k2 = key_file(tmp_path, b"second passphrase", "k2")
    add_key_slot(img, key, k2, iter_time=100)
    for k in (key, k2):
        m = mount(img, read_only=True, extra=("--key-file", k))
        assert m.disk.read_bytes() == bytes(8 * MiB)
        assert m.unmount() == 0


def _luks_area(img: Path) -> int:
    data = img.read_bytes()[:65536]
    pos = struct.unpack(">I", data[100:104])[0]
    while True:
        magic, length = struct.unpack(">II", data[pos : pos + 8])
        assert magic
        if magic == 0x0537BE77:
            return struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        pos += 8 + (length + 7) // 8 * 8


def _patched(src: Path, dst: Path, at: int, value: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[at : at + len(value)] = value
    dst.write_bytes(data)
    return dst


def _assert_refused(tmp_path: Path, cases: list) -> None:
    """Each (image, mount arguments, what stderr says): one line, exit 1, nothing mounted, the
    image's bytes unchanged."""
    for i, (image, args, says) in enumerate(cases):
        before = hashlib.sha256(image.read_bytes()).hexdigest()
        mnt = tmp_path / f"m{i}"
        mnt.mkdir()
        p = run([*QCOWFS, "mount", *args, image, mnt], check=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, (args, p.stderr)
        assert says in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
        assert not os.path.ismount(mnt)
        assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_key_refusals_are_one_line_and_write_nothing(tmp_path):
    """Wrong key, missing key file, a key file others can read, no key: one line, exit 1, the
    image unchanged; told otherwise, a shared key file is accepted."""
    key = key_file(tmp_path)
    img = luks_image(tmp_path, key=key, size=8 * MiB)
    wrong = key_file(tmp_path, b"hunter3", "wrong")
    shared = key_file(tmp_path, b"hunter2", "shared")
    shared.chmod(0o644)
    _assert_refused(
        tmp_path,
        [
            (img, ("--key-file", wrong), f"no key slot of {img} accepts the passphrase in {wrong}"),
            (img, ("--key-file", tmp_path / "absent"), "key file not found"),
            (img, ("--key-file", shared), "readable by others than its owner"),
            (img, (), "give its passphrase with --key-file"),
        ],
    )
    mnt = tmp_path / "ok"
    mnt.mkdir()
    run([*QCOWFS, "mount", "--key-file", shared, "--allow-shared-key-file", "-r", img, mnt])
    try:
        assert os.path.ismount(mnt)
    finally:
        run([*QCOWFS, "umount", mnt])


@pytest.mark.slow  # in the full run, not in --quick
def test_damaged_headers_are_refused_with_the_key(tmp_path):
    """With the right key: a damaged key slot, hostile iteration counts and stripes, a payload
    offset inside the key material, key material past the area, an unsupported cipher: one
    line each, exit 1, the image unchanged."""
    key = key_file(tmp_path)
    img = luks_image(tmp_path, key=key, size=8 * MiB)
    area = _luks_area(img)
    slot0 = area + 208
    key_material = struct.unpack(">I", img.read_bytes()[slot0 + 40 : slot0 + 44])[0] * 512
    k = ("--key-file", key)
    _assert_refused(
        tmp_path,
        [
            (
                _patched(img, tmp_path / "slot.qcow2", area + key_material + 100, b"\0" * 64),
                k,
                "accepts the passphrase",
            ),
            (
                _patched(img, tmp_path / "iter.qcow2", slot0 + 4, struct.pack(">I", 0xFFFFFFFF)),
                k,
                "key slot 0 asks 4294967295 PBKDF2 iterations",
            ),
            (
                _patched(img, tmp_path / "stripes.qcow2", slot0 + 44, struct.pack(">I", 1)),
                k,
                "key slot 0 has 1 stripes",
            ),
            (
                _patched(img, tmp_path / "payload.qcow2", area + 104, struct.pack(">I", 1)),
                k,
                "overlaps the payload",
            ),
            (
                _patched(img, tmp_path / "past.qcow2", slot0 + 40, struct.pack(">I", 1 << 30)),
                k,
                "past the encryption area",
            ),
            (
                _patched(img, tmp_path / "cipher.qcow2", area + 8, b"twofish".ljust(32, b"\0")),
                k,
                "cipher twofish-xts",
            ),
        ],
    )


@pytest.mark.slow  # in the full run, not in --quick (test_key_refusals mounts with a key file)
def test_key_file_mount_option(tmp_path):
    """-o key_file=FILE, as an fstab line gives it."""
    key = key_file(tmp_path)
    img = luks_image(tmp_path, key=key, size=8 * MiB)
    mnt = tmp_path / "m"
    mnt.mkdir()
    run([*QCOWFS, "mount", "-o", f"ro,key_file={key}", img, mnt])
    try:
        assert (mnt / "disk.raw").read_bytes() == bytes(8 * MiB)
        # the passphrase is in no process's command line or environment (the daemon's included)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            for what in ("cmdline", "environ"):
                try:
                    seen = Path(f"/proc/{pid}/{what}").read_bytes()
                except OSError:
                    continue  # gone, or not ours to read
                assert b"hunter2" not in seen, f"pid {pid} {what}"
    finally:
        run([*QCOWFS, "umount", mnt])


@pytest.mark.slow  # in the full run, not in --quick
def test_legacy_aes_reads_only(tmp_path, mount):
    """encrypt.format=aes: a read-only mount reads what QEMU reads; read-write is refused."""
    key = key_file(tmp_path)
    img = tmp_path / "aes.qcow2"
    p = qemu_img(
        "create", "-q", "-f", "qcow2", "--object", SECRET.format(key=key),
        "-o", "encrypt.format=aes,encrypt.key-secret=sec0", img, "8M",
        check=False,
    )  # fmt: skip
    if p.returncode != 0:
        pytest.fail(f"this QEMU cannot create legacy AES images: {p.stderr}")
    run(
        [
            "qemu-io", "--object", SECRET.format(key=key), "--image-opts",
            f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0",
            "-c", "write -P 0x42 100k 300k", "-c", "write -P 0x43 5M 7k",
        ]
    )  # fmt: skip
    ref = reference(tmp_path, img, key)
    m = mount(img, read_only=True, extra=("--key-file", key))
    assert m.disk.read_bytes() == ref and ref[100 * KiB] == 0x42
    assert m.unmount() == 0
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    (tmp_path / "rw").mkdir()
    p = run([*QCOWFS, "mount", "--key-file", key, img, tmp_path / "rw"], check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "read-only" in p.stderr and "qemu-img convert" in p.stderr
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def _started(keys, img: Path) -> bool:
    """Keys.start_unlock on img: whether it began deriving a slot key."""
    keys.start_unlock(str(img))
    return len(keys.pending) == 1


@pytest.mark.slow  # in the full run, not in --quick
def test_slots_are_tried_at_once_and_the_unlock_begins_early(tmp_path):
    """QEMU tries key slots one after the other; qcowfs tries them at once, one per CPU
    (crypto/unlock.py): a passphrase in slot 1 opens without waiting for slot 0's PBKDF2
    (timed at 2 s). And a mount begins the unlock before it loads pyfuse3 and trio
    (Keys.start_unlock): the open takes that result, or its refusal."""
    from qcowfs.engine.encryption import Keys
    from qcowfs.engine.image import Qcow2Image
    from qcowfs.errors import EncryptionError

    key = key_file(tmp_path)
    img = luks_image(tmp_path, key=key, size=8 * MiB, iter_time=2000)
    k2 = key_file(tmp_path, b"the second slot's", "k2")
    add_key_slot(img, key, k2, iter_time=20)
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    t = time.perf_counter()
    Qcow2Image(str(img), read_only=True, keys=Keys(top=k2.read_bytes())).close()
    took = time.perf_counter() - t
    # slot 0 alone takes about 2 s (QEMU's calibration); slot 1 a few tens of ms
    assert took < 1.0, f"slot 1 waited for slot 0: {took:.2f} s"
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    # the early unlock (one active slot, QEMU's default): begun, then taken by the open; with
    # two slots it is not begun (unlock() tries them at once)
    assert not _started(Keys(top=k2.read_bytes()), img)
    one = luks_image(tmp_path, "one-slot.qcow2", key=key, size=8 * MiB)
    one_before = hashlib.sha256(one.read_bytes()).hexdigest()
    keys = Keys(top=key.read_bytes(), top_source=str(key))
    assert _started(keys, one)
    Qcow2Image(str(one), read_only=True, keys=keys).close()
    assert not keys.pending and len(keys.unlocked) == 1
    # and with a wrong passphrase, the open's one line
    wrong = Keys(top=b"neither", top_source="wrong-key")
    assert _started(wrong, one)
    with pytest.raises(EncryptionError, match="no key slot .* accepts the passphrase in wrong-key"):
        Qcow2Image(str(one), read_only=True, keys=wrong)
    assert not wrong.unlocked and not wrong.pending
    assert hashlib.sha256(one.read_bytes()).hexdigest() == one_before
