"""Run the power-loss crash-state harness (qcowfs_dev/powerloss/) from the command line.

Examples:
  scripts/crash-states                          # every workload, CI bounds
  scripts/crash-states --scale 4 --seed 7       # bigger sampling, different random workloads
  scripts/crash-states -w lazy -w bitmaps       # workloads whose name contains "lazy" or "bitmaps"
  scripts/crash-states -w intent                # the intent-mode bitmap workloads (bitmap_sync="intent")
  scripts/crash-states -w snapshot -w checkpoint   # the internal snapshot workloads
  PYTHONPATH=/tmp/broken scripts/crash-states -w snapshot-ops   # against a copy of qcowfs (negative control)
  scripts/crash-states -w zero-grow             # discard/zeroing and growing the disk (close and intent mode)
  scripts/crash-states --list

Prints one line per workload (distinct crash states checked, ...) and the total; for failing
workloads a report (which writes the crash state kept, qemu-img check output, the log before the
crash point; the failing states stay under --workdir). Exit status 1 if any crash state failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

from qcowfs_dev import powerloss as pl


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="crash-states", description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "-w",
        "--workload",
        action="append",
        default=[],
        help="run workloads whose name contains this (repeatable; default: all)",
    )
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the per-epoch sampling bounds (default 1)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="0: the CI workloads; other values: different random workloads and subsets",
    )
    ap.add_argument(
        "-j", "--jobs", type=int, default=0, help="checker processes (default: CPU count)"
    )
    ap.add_argument(
        "--workdir",
        help="keep pristine images, logs and failing states here (default: a temp dir, "
        "removed when everything passed)",
    )
    ap.add_argument(
        "--no-barriers",
        action="store_true",
        help="drop every flush from the log (negative control: must find corrupt states)",
    )
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = ap.parse_args(argv)

    wls = pl.workloads()
    if args.list:
        for w in wls:
            print(w.name)
        return 0
    if args.workload:
        wls = [w for w in wls if any(s in w.name for s in args.workload)]
        if not wls:
            print("crash-states: no workload matches", args.workload, file=sys.stderr)
            return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="qcowfs-crash-states-")
    total = intent_total = 0
    intent_names = []
    failed = []
    t0 = time.monotonic()
    for w in wls:
        ex = pl.explore_workload(
            w,
            os.path.join(workdir, w.name),
            jobs=args.jobs or None,
            scale=args.scale,
            seed=args.seed,
            record_flushes=not args.no_barriers,
        )
        print(ex.stats.line(), flush=True)
        total += ex.stats.distinct
        if ex.stats.bitmap_sync == "intent":
            intent_total += ex.stats.distinct
            intent_names.append(w.name)
        if ex.stats.failures:
            failed.append(ex)
    print(pl.total_line(total, len(wls), time.monotonic() - t0, intent_total, intent_names))
    for ex in failed:
        print()
        print(pl.failure_report(ex))
    if failed:
        print(
            f"\ncrash-states: {len(failed)} workload(s) FAILED; states kept under {workdir}",
            file=sys.stderr,
        )
        return 1
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
