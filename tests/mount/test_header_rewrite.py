"""Header rewrites that keep what qcowfs does not know (unknown extensions and header fields) while
clearing unknown autoclear bits, through a mount."""

from __future__ import annotations

import struct
from pathlib import Path

from conftest import needs_fuse

from qcowfs_dev.oracles import assert_clean, qemu_bitmaps, qemu_img, run
from qcowfs_dev.probes import OFF_AUTOCLEAR, OFF_HEADER_LENGTH, extensions, header


def _add_unknowns(img: Path) -> bytes:
    """Give a v3 image an unknown autoclear bit, an unknown header field (header_length 120)
    and an unknown header extension; returns the unknown extension's payload."""
    raw = bytearray(img.read_bytes()[:65536])
    hl = header(raw)["header_length"]
    assert hl == 112
    # the extensions up to their end marker
    exts = [bytes(raw[pos : pos + 8 + (length + 7) // 8 * 8]) for _, pos, length in extensions(raw)]
    payload = b"qcowfs-unknown-extension"
    unknown = struct.pack(">II", 0x7A7A7A7A, len(payload)) + payload
    new = bytearray(raw[:112]) + b"\xab" * 8  # 8 unknown header bytes
    struct.pack_into(">I", new, OFF_HEADER_LENGTH, 120)
    autoclear = header(new)["autoclear"] | (1 << 5)
    struct.pack_into(">Q", new, OFF_AUTOCLEAR, autoclear)
    for e in exts:
        new += e
    new += unknown + b"\0" * 8
    with open(img, "r+b") as f:
        f.write(new)
    return payload


@needs_fuse
def test_header_rewrite_keeps_unknowns_and_clears_unknown_autoclear(tmp_path, mount):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    payload = _add_unknowns(img)
    assert run(["qemu-img", "check", img], check=False).returncode == 0
    m = mount(img)
    (m.bitmaps / "b0").touch()  # rewrites the header (bitmaps extension)
    with open(m.disk, "r+b") as f:
        f.write(b"x" * 4096)
    assert m.unmount() == 0
    raw = img.read_bytes()[:65536]
    assert header(raw)["header_length"] == 120 and raw[112:120] == b"\xab" * 8
    assert not header(raw)["autoclear"] & (1 << 5), "unknown autoclear bit not cleared"
    assert payload in raw, "unknown header extension lost"
    assert qemu_bitmaps(img)["b0"]["flags"] == ["auto"]
    assert_clean(img)
