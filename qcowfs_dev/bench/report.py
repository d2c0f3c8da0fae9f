"""What a run prints and writes: the table, the chart's title, the JSON document; --report JSON
prints an earlier run's table and draws its chart again."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from typing import Any, Mapping, Optional, Sequence

from .chart import plot
from .host import CLUSTER, REPO
from .jobs import ALL_TARGETS, FRESH, fio_desc, human, job_spec
from .qemu10 import Qemu10
from .stats import Medians, bw_ratio, ratio_pairs

__all__ = ["qsd_label", "table", "chart_title", "run_header", "versions", "result_doc", "report"]


def qsd_label(version_line: str | None, default: str) -> str:
    """'qemu-storage-daemon version 10.0.2 (Debian ...)' -> 'qsd 10.0'."""
    m = re.search(r"version (\d+)\.(\d+)", version_line or "")
    return f"qsd {m.group(1)}.{m.group(2)}" if m else default


def table(
    med: Medians,
    targets: Sequence[str],
    mem: Mapping[str, Mapping[str, int]],
    labels: Mapping[str, str],
) -> str:
    """The run's table: IOPS and MB/s of each target per job (and, in runs that measured it, how
    busy the whole machine was, in percent of all CPUs), the ratios of MB/s, then the daemons'
    peak RSS."""
    cols = [t for t in ALL_TARGETS if t in targets]
    w = max([17] + [len(j) + 1 for j in med])
    busy = any("cpu_busy" in m for per in med.values() for m in per.values())
    cw = 29 if busy else 22
    head1 = f"{'job':{w}}" + "".join(f"{labels.get(t, t):>{cw}}" for t in cols)
    ratios = ratio_pairs(cols, labels)
    head1 += "".join(f"{lbl:>16}" for lbl, _, _ in ratios)
    head2 = (
        f"{'':{w}}"
        + "".join(f"{'IOPS':>11}{'MB/s':>11}" + (f"{'busy%':>7}" if busy else "") for _ in cols)
        + "".join(f"{'':>16}" for _ in ratios)
    )
    lines = [head1, head2, "-" * len(head1)]
    for job, per in med.items():
        row = f"{job:{w}}"
        for t in cols:
            m = per.get(t)
            row += f"{m['iops']:11.0f}{m['bw_bytes'] / 1e6:11.1f}" if m else f"{'-':>11}{'-':>11}"
            if busy:
                b = m.get("cpu_busy") if m else None
                row += f"{100 * b:7.0f}" if b is not None else f"{'-':>7}"
        for _, num, den in ratios:
            r = bw_ratio(per, num, den)
            row += f"{r:16.2f}" if r is not None else f"{'-':>16}"
        lines.append(row)
    if mem:
        lines.append("")
        lines.append("peak RSS (VmHWM) of the daemons:")
        for t in cols:
            if t in mem:
                parts = [
                    f"{k.replace('_VmHWM', '').replace('_', '-')} {v / 2**20:.1f} MiB"
                    for k, v in mem[t].items()
                ]
                lines.append(f"  {labels.get(t, t):8} " + ", ".join(parts))
    return "\n".join(lines)


def chart_title(cfg: Mapping[str, Any], cpus: Optional[int], labels: Mapping[str, str]) -> str:
    """The chart's title from a run's config (the JSON document's "config")."""
    names = {
        "ceiling": "pyfuse3 ceiling",
        "stock": "stock-loop ceiling",
        "intent": "qcowfs intent",
        "baseline": "qcowfs baseline",
        "serial": "qcowfs io_threads=0",
    }
    shown = [names.get(t, labels.get(t, t)) for t in cfg["targets"]]
    fresh = (
        " (@fresh: a new empty image per run)"
        if any(j.endswith(FRESH) for j in cfg["jobs"])
        else ""
    )
    if cfg.get("host_latency_us"):
        fresh += f", host I/O latency {cfg['host_latency_us']} us"
    return (
        f"{' vs '.join(shown)}: {fio_desc(cfg['jobs'])}, {human(cfg['size'])} disk{fresh}, "
        f"median of {cfg['repeat']}, {cpus} CPUs"
    )


def run_header(
    jobs: Sequence[str],
    size: int,
    runtime: float,
    repeat: int,
    first_write_size: int,
    first_write_repeat: int,
    elapsed: float,
) -> list[str]:
    """The lines printed above the table: what was run, how often, what the numbers mean."""
    first = any(j.startswith("first-") for j in jobs)
    lines = [
        f"{fio_desc(jobs)}, {human(size)} disk, {runtime:g}s runs, median of {repeat}"
        + (
            f" (first-write: {human(first_write_size)} once per fresh image, median of {first_write_repeat})"
            if first
            else ""
        )
        + f"; MB/s = 10^6 B/s; ratios of MB/s; total {elapsed:.0f}s"
    ]
    if any(j.endswith(FRESH) for j in jobs):
        lines.append(
            f"NAME{FRESH}: on a fresh empty image and mount per repeat (reads see holes, writes allocate), "
            f"median of {repeat}"
        )
    return lines


def versions(qemu10: Qemu10 | None) -> dict[str, Any]:
    def first_line(cmd: list[str]) -> Optional[str]:
        try:
            return subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            ).stdout.splitlines()[0]
        except (OSError, IndexError):
            return None

    return {
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "fio": first_line(["fio", "--version"]),
        "qemu": first_line(["qemu-storage-daemon", "--version"]),
        "qemu10": qemu10.version if qemu10 else None,
        "git": first_line(["git", "-C", REPO, "describe", "--always", "--dirty"]),
    }


def result_doc(
    a: argparse.Namespace,
    labels: Mapping[str, str],
    machine: Mapping[str, Any],
    elapsed: float,
    med: Medians,
    runs: Mapping[str, Any],
    mem: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON document of a run (OUT/bench-TIME.json) from its parsed arguments and results."""
    return {
        "config": {
            "runtime_s": a.runtime,
            "repeat": a.repeat,
            "size": a.size,
            "first_write_size": a.first_write_size,
            "first_write_repeat": a.first_write_repeat,
            "cluster_size": CLUSTER,
            "jobs": {j: job_spec(j) for j in a.jobs},
            "targets": a.targets,
            "labels": dict(labels),
            "fresh_per_job": a.fresh,
            "host_latency_us": a.host_latency_us,
            "fio": "--direct=1 --ioengine=psync unless the job gives ioengine and iodepth",
        },
        "machine": dict(machine),
        "elapsed_s": round(elapsed, 1),
        "median": med,
        "runs": runs,
        "peak_rss_bytes": mem,
    }


def report(path: str) -> int:
    """--report JSON: print the table of an earlier run and draw its PNG next to the JSON."""
    with open(path) as f:
        doc = json.load(f)
    cfg = doc["config"]
    med = doc["median"]
    labels = cfg.get("labels") or {
        "qemu": qsd_label(doc["machine"].get("qemu"), "qemu"),
        "qemu10": qsd_label(doc["machine"].get("qemu10"), "qemu10"),
    }
    print(table(med, cfg["targets"], doc.get("peak_rss_bytes", {}), labels))
    png = os.path.splitext(path)[0] + ".png"
    title = chart_title(cfg, doc["machine"]["cpus"], labels)
    if plot(med, cfg["targets"], png, title, labels):
        print(f"chart:   {png}")
    return 0
