"""Encrypted (LUKS) images without their key: `qcowfs info` describes them as `qemu-img info`
does, `qcowfs check` checks them, a mount refuses them with one line and writes nothing, and a
hostile LUKS header is refused with one line naming the problem (QEMU refuses the same ones)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import QCOWFS, run
from support.luks import SECRET, luks_image, qemu_timing_pbkdf2

from qcowfs_dev.oracles import qemu_img

MiB = 1 << 20


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One LUKS image (QEMU's defaults) that tests copy before they damage it."""
    return luks_image(tmp_path_factory.mktemp("luks"))


def qemu_info_json(img: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", img).stdout)


def ours_json(img: Path) -> dict:
    return json.loads(run([*QCOWFS, "info", "--json", img]).stdout)


@pytest.mark.parametrize(
    "opts",
    [
        (),  # QEMU's default: aes-256 xts-plain64, sha256
        pytest.param(
            (
                "encrypt.cipher-alg=aes-128",
                "encrypt.cipher-mode=cbc",
                "encrypt.ivgen-alg=essiv",
                "encrypt.ivgen-hash-alg=sha256",
                "encrypt.hash-alg=sha512",
                "cluster_size=4096",
            ),
            marks=pytest.mark.slow,
        ),
        # (aes-192 in cbc mode: QEMU 7.2's qemu-img create aborts on an assertion in
        # crypto/block.c, so it is not here)
        pytest.param(
            ("encrypt.cipher-alg=aes-128", "encrypt.cipher-mode=cbc", "encrypt.ivgen-alg=plain64"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["xts-plain64", "cbc-essiv", "cbc-plain64"],
)
def test_info_and_check_describe_an_encrypted_image_without_its_key(tmp_path, opts):
    img = luks_image(tmp_path, "vm.qcow2", *opts)
    q, ours = qemu_info_json(img), ours_json(img)
    assert ours["encrypted"] is True and q["encrypted"] is True
    assert ours["format-specific"]["data"]["encrypt"] == q["format-specific"]["data"]["encrypt"]
    text = run([*QCOWFS, "info", img]).stdout.splitlines()
    want = qemu_img("info", img).stdout.splitlines()
    assert text[: len(want)] == want
    assert run([*QCOWFS, "check", img]).returncode == 0  # no key needed
    # QEMU wants the key even to check
    qemu_img(
        "check",
        "--object",
        SECRET.format(key=tmp_path / "key"),
        "--image-opts",
        f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0",
    )


@pytest.mark.slow  # in the full run, not in --quick
def test_several_key_slots_are_described(tmp_path):
    img = luks_image(tmp_path)
    (tmp_path / "key2").write_bytes(b"second passphrase")
    qemu_timing_pbkdf2(
        "amend",
        "--object", SECRET.format(key=tmp_path / "key"),
        "--object", f"secret,id=sec1,file={tmp_path / 'key2'},format=raw",
        "--image-opts",
        f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0",
        "-o", "encrypt.keyslot=3,encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
    )  # fmt: skip
    enc = ours_json(img)["format-specific"]["data"]["encrypt"]
    assert [s["active"] for s in enc["slots"]] == [True, False, False, True] + [False] * 4
    assert enc == qemu_info_json(img)["format-specific"]["data"]["encrypt"]


def test_mount_refuses_an_encrypted_image_and_writes_nothing(tmp_path, pristine):
    img = tmp_path / "vm.qcow2"
    img.write_bytes(pristine.read_bytes())
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    (tmp_path / "m").mkdir()
    p = run([*QCOWFS, "mount", img, tmp_path / "m"], check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "encrypted image (LUKS)" in p.stderr and "Traceback" not in p.stderr
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def _luks_area(img: Path) -> int:
    """Where the LUKS header lies in the image (the encryption header extension)."""
    data = img.read_bytes()[:65536]
    pos = struct.unpack(">I", data[100:104])[0]
    while True:
        magic, length = struct.unpack(">II", data[pos : pos + 8])
        assert magic, "no encryption header extension"
        if magic == 0x0537BE77:
            return struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        pos += 8 + (length + 7) // 8 * 8


SLOT0 = 208  # the first key slot in a LUKS1 header; slots are 48 bytes


@pytest.mark.slow  # in the full run, not in --quick
@pytest.mark.parametrize(
    "where, value, says, qemu_refuses",
    [
        (0, b"LUKX", "bad magic", True),
        (6, struct.pack(">H", 2), "version 2", True),
        (8, b"blowfish".ljust(32, b"\0"), "cipher 'blowfish'", True),
        (40, b"xts-weird".ljust(32, b"\0"), "not one QEMU supports", True),
        (SLOT0 + 4, struct.pack(">I", 0), "key slot 0 is active with 0 iterations", True),
        (SLOT0 + 4, struct.pack(">I", 0xFFFFFFFF), "", False),  # valid, only slow to unlock
        (SLOT0 + 44, struct.pack(">I", 3999), "key slot 0 has 3999 stripes", True),
        # QEMU 7.2 adds offset and length in 32 bits and accepts this one (format/luks.py)
        (SLOT0 + 40, struct.pack(">I", 0xFFFFFF00), "past the", False),
        (SLOT0 + 40, struct.pack(">I", 0), "overlaps the LUKS header", True),
        (SLOT0 + 48 + 40, struct.pack(">I", 8), "overlap", True),  # slot 1 over slot 0
        (104, struct.pack(">I", 16), "overlaps the payload", True),  # payload inside the slots
        (SLOT0, struct.pack(">I", 0x12345678), "invalid state", True),
        (SLOT0, struct.pack(">I", 0xDEAD), "", False),  # no active slot: described, never opened
        (108, struct.pack(">I", 40), "does not fit cipher", True),
    ],
    ids=[
        "magic",
        "version",
        "cipher",
        "mode",
        "iters-0",
        "iters-max",
        "stripes",
        "slot-past-end",
        "slot-in-header",
        "slots-overlap",
        "payload-inside",
        "slot-state",
        "no-active-slot",
        "key-bytes",
    ],
)
def test_hostile_luks_headers_are_refused_in_one_line(
    tmp_path, pristine, where, value, says, qemu_refuses
):
    """Each damaged field: qcowfs info and check refuse it in one line naming it (or describe
    it, where it is valid), never a traceback, the image unchanged; QEMU refuses the same."""
    img = tmp_path / "vm.qcow2"
    img.write_bytes(pristine.read_bytes())
    off = _luks_area(img) + where
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(value)
    before = img.read_bytes()
    p = run([*QCOWFS, "info", img], check=False)
    q = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True)
    assert "Traceback" not in p.stderr
    if says:
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
        c = run([*QCOWFS, "check", img], check=False)
        assert c.returncode == 1 and says in c.stderr and "Traceback" not in c.stderr
    else:
        assert p.returncode == 0, p.stderr
    assert (q.returncode != 0) == qemu_refuses, q.stdout + q.stderr
    assert img.read_bytes() == before
