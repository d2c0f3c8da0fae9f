"""How long opening an encrypted image with its passphrase takes, qcowfs against QEMU (issue
23's unlock target), in one run.

    .venv/bin/python scripts/bench-unlock [--iter-time 2000] [--repeat 5] [--workdir DIR]
                                          [--json FILE]

One LUKS image made by `qemu-img create` with QEMU's defaults (aes-256-xts-plain64, sha256,
PBKDF2 timed at --iter-time ms, one key slot), then, in rotating order, --repeat times each:
  qemu-img info   `qemu-img info --image-opts ...,encrypt.key-secret=s` with the secret: what
                  the issue names. QEMU opens the image for info without I/O (BDRV_O_NO_IO), so
                  it never unlocks a key slot: it measures QEMU's start-up, not an unlock
  qemu-io open    `qemu-io -r --image-opts ... -c "read 0 512"`: QEMU unlocking the slot and
                  reading a sector (its whole process)
  qcowfs unlock   Qcow2Image(path, keys=...) in a fresh Python process, the open timed inside it
                  (PBKDF2 of the slot, the key material, the AF merge, the digest check)
  qcowfs mount    `qcowfs mount -r --key-file KEY IMAGE MNT` until it returns (the mount ready:
                  Python's start-up, the imports, the unlock, FUSE), then unmounted (not timed)
With --second-slot, `qemu-img amend` adds a second key slot (the same --iter-time) and every
way opens the image with that slot's passphrase: QEMU tries slot 0 first, then slot 1; qcowfs
tries the active slots at once, one per CPU (crypto/unlock.py).
Medians, and each against qemu-io open, printed and written as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

QCOWFS = [sys.executable, "-m", "qcowfs"]
PASSPHRASE = b"bench passphrase"

_UNLOCK = """
import sys, time
from qcowfs.engine.encryption import Keys
from qcowfs.engine.image import Qcow2Image
keys = Keys(top=open(sys.argv[2], "rb").read(), top_source=sys.argv[2])
t = time.perf_counter()
img = Qcow2Image(sys.argv[1], read_only=True, keys=keys)
print(time.perf_counter() - t)
img.close()
"""


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--iter-time", type=int, default=2000, help="PBKDF2 ms at creation (QEMU's 2000)"
    )
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workdir")
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--second-slot", action="store_true", help="open with the passphrase of a second slot"
    )
    a = p.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="qcowfs-bench-unlock.", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    key = os.path.join(work, "key")
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, PASSPHRASE)
    os.close(fd)
    img = os.path.join(work, "vm.qcow2")
    secret = f"secret,id=s,file={key},format=raw"
    spec = f"driver=qcow2,file.filename={img},encrypt.key-secret=s"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", secret]
    create += ["-o", f"encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time={a.iter_time}"]
    for _ in range(12):  # QEMU's PBKDF2 timing gives up now and then on this VM's clock
        if os.path.exists(img):
            os.unlink(img)
        if subprocess.run(create + [img, "1G"], capture_output=True).returncode == 0:
            break
    else:
        print("bench-unlock: qemu-img create failed 12 times", file=sys.stderr)
        return 2
    if a.second_slot:
        key2 = os.path.join(work, "key2")
        fd = os.open(key2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, PASSPHRASE + b" of slot 1")
        os.close(fd)
        amend = ["qemu-img", "amend", "--object", secret, "--object",
                 f"secret,id=s1,file={key2},format=raw", "--image-opts", spec, "-o",
                 f"encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time={a.iter_time}"]  # fmt: skip
        for _ in range(12):
            if subprocess.run(amend, capture_output=True).returncode == 0:
                break
        else:
            print("bench-unlock: qemu-img amend failed 12 times", file=sys.stderr)
            return 2
        key = key2  # every way opens with slot 1's passphrase
        secret = f"secret,id=s,file={key},format=raw"
    out = subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True, text=True)
    info = json.loads(out.stdout)
    enc = info["format-specific"]["data"]["encrypt"]
    slot_iters = [s["iters"] for s in enc["slots"] if s["active"]]
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)

    def qcowfs_unlock() -> float:
        out = subprocess.run(
            [sys.executable, "-c", _UNLOCK, img, key], check=True, capture_output=True, text=True
        )
        return float(out.stdout.strip())

    def qcowfs_mount() -> float:
        t = _timed([*QCOWFS, "mount", "-r", "--key-file", key, img, mnt])
        subprocess.run([*QCOWFS, "umount", mnt], check=True)
        return t

    ways = {
        "qemu-img info": lambda: _timed(
            ["qemu-img", "info", "--object", secret, "--image-opts", spec]
        ),  # fmt: skip
        "qemu-io open": lambda: _timed(
            ["qemu-io", "-r", "--object", secret, "--image-opts", spec, "-c", "read 0 512"]
        ),  # fmt: skip
        "qcowfs unlock": qcowfs_unlock,
        "qcowfs mount": qcowfs_mount,
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    names = list(ways)
    for r in range(a.repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(ways[name]())
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["qemu-io open"]
    print(
        f"LUKS image: {enc['cipher-alg']}-{enc['cipher-mode']}-{enc['ivgen-alg']}, {enc['hash-alg']}, "
        f"slot iterations {slot_iters}, digest iterations {enc['master-key-iters']}; "
        f"median of {a.repeat}"
    )
    for k, v in med.items():
        print(f"  {k:14} {v:7.3f} s   qemu-io open / this: {ref / v:5.2f}x")
    doc = dict(
        iter_time=a.iter_time,
        second_slot=a.second_slot,
        slot_iterations=slot_iters,
        digest_iterations=enc["master-key-iters"],
        repeat=a.repeat,
        times=times,
        medians=med,
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0
