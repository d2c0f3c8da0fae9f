"""How `qcowfs check` and `qcowfs info` print: qemu-img's human text, and the progress bar.
(The JSON forms are the results' own to_json / the info dict.)"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from ..engine.consistency import CheckResult


def human_size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if x < 1024 or unit == "PiB":
            return f"{x:.3g} {unit}" if unit != "B" else f"{n} B"
        x /= 1024
    return str(n)


def format_info(info: dict) -> str:
    """qemu-img info's text layout for image_info()'s dict, in qemu-img's order: the image's
    fields, the snapshot list, then the format-specific section (bitmaps nested where qemu-img
    puts them, after lazy refcounts); then what qcowfs adds: the files the image opens."""
    d = info["format-specific"]["data"]
    lines = [
        f"image: {info['filename']}",
        "file format: qcow2",
        f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {human_size(info['actual-size'])}",
        *(["encrypted: yes"] if info.get("encrypted") else []),
        f"cluster_size: {info['cluster-size']}",
    ]
    if "backing-filename" in info:
        actual = info.get("full-backing-filename", info["backing-filename"])
        suffix = f" (actual path: {actual})" if actual != info["backing-filename"] else ""
        lines.append(f"backing file: {info['backing-filename']}{suffix}")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(
            f"{'ID':<10}{'TAG':<18}{'VM SIZE':>7}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
        )
        for s in info["snapshots"]:
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
            clock = s["vm-clock-sec"]
            vmc = f"{clock // 3600:02d}:{clock // 60 % 60:02d}:{clock % 60:02d}.{s['vm-clock-nsec'] // 1000000:03d}"
            lines.append(
                f"{s['id']:<10}{s['name']:<18}{human_size(s['vm-state-size']):>7}{date:>20}{vmc:>13}"
                f"{s.get('icount', ''):>11}"
            )
    lines.append("Format specific information:")
    lines.append(f"    compat: {d['compat']}")
    lines.append(f"    compression type: {d['compression-type']}")
    for key in (
        "lazy-refcounts",
        "bitmaps",
        "refcount-bits",
        "encrypt",
        "corrupt",
        "extended-l2",
        "data-file",
        "data-file-raw",
    ):
        if key == "bitmaps" and d.get("bitmaps"):
            lines.append("    bitmaps:")
            for n, bm in enumerate(d["bitmaps"]):
                lines.append(f"        [{n}]:")
                lines.append("            flags:")
                lines.extend(f"                [{i}]: {flag}" for i, flag in enumerate(bm["flags"]))
                lines.append(f"            name: {bm['name']}")
                lines.append(f"            granularity: {bm['granularity']}")
        elif key == "encrypt" and "encrypt" in d:
            lines += _encrypt_lines(d["encrypt"])
        elif key in d and key not in ("bitmaps", "encrypt"):
            v = d[key]
            lines.append(
                f"    {key.replace('-', ' ')}: {str(v).lower() if isinstance(v, bool) else v}"
            )
    f = d["features"]
    for kind in ("incompatible", "compatible", "autoclear"):
        lines.append(f"    {kind} features: {', '.join(f[kind]) or 'none'}")
    lines.append(f"    internal snapshots: {d['snapshots']}")
    if info["resolved-chain"]:
        lines.append("Files this image opens (resolved):")
        for c in info["resolved-chain"]:
            lines.append(
                f"    {c['role']} of {c['named-by']}: {c['filename']} -> {c['resolved']} "
                f"({c['format']}, {c['type']})"
            )
    return "\n".join(lines)


#: qemu-img's order of QCryptoBlockInfoLUKS's fields in its text output
_ENCRYPT_ORDER = (
    "ivgen-alg",
    "hash-alg",
    "cipher-alg",
    "uuid",
    "ivgen-hash-alg",
    "format",
    "cipher-mode",
    "slots",
    "payload-offset",
    "master-key-iters",
)


def _encrypt_lines(e: dict) -> list[str]:
    out = ["    encrypt:"]
    for key in _ENCRYPT_ORDER:
        if key not in e:
            continue
        if key == "slots":
            out.append("        slots:")
            for n, slot in enumerate(e["slots"]):
                out.append(f"            [{n}]:")
                for k in ("active", "iters", "key-offset", "stripes"):
                    if k in slot:
                        v = slot[k]
                        v = str(v).lower() if isinstance(v, bool) else v
                        out.append(f"                {k.replace('-', ' ')}: {v}")
        else:
            out.append(f"        {key.replace('-', ' ')}: {e[key]}")
    return out


def format_check(res: CheckResult) -> str:
    """qemu-img check's text layout."""
    lines = list(res.messages)
    if res.corruptions:
        lines.append(
            f"\n{res.corruptions} errors were found on the image.\n"
            "Data may be corrupted, or further writes to the image may corrupt it."
        )
    if res.leaks:
        lines.append(
            f"\n{res.leaks} leaked clusters were found on the image.\n"
            "This means waste of disk space, but no harm to data."
        )
    if res.check_errors:
        lines.append(f"\n{res.check_errors} internal errors have occurred during the check.")
    if res.leaks_fixed or res.corruptions_fixed:
        lines.append(
            f"The following inconsistencies were found and repaired:\n\n"
            f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n"
        )
    if not res.corruptions and not res.leaks and not res.check_errors:
        lines.append("No errors were found on the image.")
    for w in res.warnings:
        lines.append(f"Warning: {w}")
    if res.total_clusters and res.allocated_clusters:
        a = res.allocated_clusters
        lines.append(
            f"{a}/{res.total_clusters} = {100.0 * a / res.total_clusters:.2f}% allocated, "
            f"{100.0 * res.fragmented_clusters / a:.2f}% fragmented, "
            f"{100.0 * res.compressed_clusters / a:.2f}% compressed clusters"
        )
    if res.image_end_offset:
        lines.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(lines)


def progress_bar(stream: TextIO = sys.stderr) -> Callable[[float], None]:
    last = [-1]

    def update(frac: float) -> None:
        pct = int(frac * 100)
        if pct != last[0]:
            last[0] = pct
            stream.write(f"\r    ({pct:3d}/100%)")
            stream.flush()
            if pct >= 100:
                stream.write("\n")

    return update
