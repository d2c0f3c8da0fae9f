"""QEMU's tools as the oracle: images are made with qemu-img/qemu-io, results are judged by
qemu-img check/info/compare/convert/map, and dirty bitmaps as QEMU serves them over NBD
(qemu-nbd -B NAME, read with nbdinfo --map)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Optional

from .proc import StrPath, run

__all__ = [
    "run",
    "qemu_img",
    "qemu_io",
    "qemu_check",
    "qemu_check_rc",
    "assert_clean",
    "assert_compare",
    "qemu_info",
    "qemu_bitmaps",
    "qemu_map",
    "qemu_raw",
    "nbd_map",
    "dirty_map",
    "dirty_extents",
]


def qemu_img(
    *args: object, check: bool = True, timeout: Optional[float] = None
) -> subprocess.CompletedProcess[str]:
    return run(["qemu-img", *args], check=check, timeout=timeout)


def qemu_io(
    image: StrPath,
    *commands: str,
    fmt: str = "qcow2",
    check: bool = True,
    read_only: bool = False,
    timeout: Optional[float] = None,
) -> subprocess.CompletedProcess[str]:
    """qemu-io -f FMT [-r] -c CMD ... IMAGE."""
    cmd = ["qemu-io", "-f", fmt] + (["-r"] if read_only else [])
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(image))
    return run(cmd, check=check, timeout=timeout)


def qemu_check(image: StrPath) -> dict[str, Any]:
    """qemu-img check as JSON plus its exit code under key 'rc' (0 clean, 2 corrupt, 3 leaks)."""
    p = run(["qemu-img", "check", "--output=json", image], check=False)
    try:
        data = json.loads(p.stdout)
    except json.JSONDecodeError:
        data = {"stdout": p.stdout}
    data["rc"] = p.returncode
    data["stderr"] = p.stderr
    return data


def qemu_check_rc(
    path: str, repair: Optional[str] = None, image_args: Optional[list[str]] = None
) -> tuple[int, dict[str, Any]]:
    """(exit code, parsed JSON or raw text) of qemu-img check [-r REPAIR], run in the image's
    directory; its stderr kept briefly (the often numerous 'Leaked cluster' lines counted).
    image_args: how qemu-img opens the image (default: its path; an encrypted one needs the
    secret and --image-opts)."""
    cmd = ["qemu-img", "check", "--output=json"]
    if repair:
        cmd += ["-r", repair]
    path = os.path.abspath(path)
    p = run(cmd + (image_args or [path]), check=False, cwd=os.path.dirname(path))
    try:
        out = json.loads(p.stdout)
    except ValueError:
        out = {"stdout": p.stdout}
    if p.stderr.strip():
        lines = p.stderr.strip().splitlines()
        leaks = [x for x in lines if x.startswith("Leaked cluster")]
        other = [x for x in lines if not x.startswith("Leaked cluster")]
        out["stderr"] = (
            other[:12]
            + ([f"... {len(other) - 12} more"] if len(other) > 12 else [])
            + ([f"({len(leaks)} 'Leaked cluster' lines)"] if leaks else [])
        )
    return p.returncode, out


def assert_clean(image: StrPath) -> None:
    """The image passes qemu-img check with no errors and no leaks."""
    res = qemu_check(image)
    assert res["rc"] == 0, f"qemu-img check {image}: {res}"


def assert_compare(img: StrPath, ref: StrPath, what: str = "") -> None:
    """qemu-img compare -f qcow2 -F raw IMG REF says identical."""
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, ref, check=False)
    assert p.returncode == 0, (
        f"{what}qemu-img compare {img} {ref}: exit {p.returncode}: {p.stdout.strip()} {p.stderr.strip()}"
    )


def qemu_info(image: StrPath) -> dict[str, Any]:
    """qemu-img info -U --output=json (-U: also while a mount holds the image)."""
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", image]).stdout)


def qemu_bitmaps(image: StrPath) -> dict[str, dict[str, Any]]:
    """name -> {"name", "granularity", "flags"} as `qemu-img info -U` reports them."""
    image = os.path.abspath(image)
    p = run(["qemu-img", "info", "-U", "--output=json", image], cwd=os.path.dirname(image))
    data = json.loads(p.stdout).get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in data.get("bitmaps", [])}


def qemu_map(image: StrPath, fmt: Optional[str] = None) -> list[dict[str, Any]]:
    """qemu-img map --output=json [-f FMT] IMAGE: [{start, length, depth, present, zero, data, offset?}]."""
    return json.loads(qemu_img("map", "--output=json", *(["-f", fmt] if fmt else []), image).stdout)


def qemu_raw(path: StrPath, dest: StrPath, snapshot: Optional[str] = None) -> bytes:
    """The guest content as QEMU reads it (qemu-img convert -U -O raw [-l snapshot.name=S]); dest is
    a scratch file, removed again."""
    cmd = ["qemu-img", "convert", "-U", "-O", "raw"]
    if snapshot:
        cmd += ["-l", f"snapshot.name={snapshot}"]
    path = os.path.abspath(path)
    run(cmd + [path, os.path.abspath(dest)], cwd=os.path.dirname(path))
    with open(dest, "rb") as f:
        data = f.read()
    os.unlink(dest)
    return data


# ----------------------------------------------------------------------------- NBD: qemu-nbd + nbdinfo
def nbd_map(
    image: StrPath,
    context: str = "base:allocation",
    *,
    bitmap: Optional[str] = None,
    fmt: str = "qcow2",
    timeout: float = 120,
) -> list[dict[str, Any]]:
    """nbdinfo --json --map=CONTEXT of IMAGE served by a private `qemu-nbd -r -f FMT [-B BITMAP]`
    (nbdinfo starts qemu-nbd itself on a socket of its own and stops it): [{offset, length, type}]."""
    server = ["qemu-nbd", "-r", "-f", fmt] + (["-B", bitmap] if bitmap else []) + [str(image)]
    p = run(
        ["nbdinfo", "--json", f"--map={context}", "--", "[", *server, "]"],
        check=False,
        timeout=timeout,
    )
    if p.returncode != 0:
        raise AssertionError(
            f"nbdinfo --map={context} of {' '.join(server)} exited {p.returncode}: {p.stderr.strip()}"
        )
    return json.loads(p.stdout)


def dirty_map(image: StrPath, name: str) -> list[tuple[int, int, bool]]:
    """Every extent of dirty bitmap NAME as QEMU serves it: [(offset, length, dirty)]."""
    return [
        (e["offset"], e["length"], e["type"] == 1)
        for e in nbd_map(image, f"qemu:dirty-bitmap:{name}", bitmap=name)
    ]


def dirty_extents(image: StrPath, name: str) -> list[tuple[int, int]]:
    """The dirty ranges of bitmap NAME as QEMU serves them, adjacent ones merged: [(offset, length)]."""
    out: list[tuple[int, int]] = []
    for e in nbd_map(image, f"qemu:dirty-bitmap:{name}", bitmap=name):
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out
