"""Benchmark qcowfs against QEMU's own FUSE export and a pass-through ceiling.

    .venv/bin/python scripts/bench [--runtime S] [--repeat R] [--jobs a,b] [--targets t,u]
                                   [--preset issue15] [--qemu10-dir DIR]
                                   [--size 1G] [--out DIR] [--workdir DIR] [--fresh] [--keep]

Targets (every one serves a 1 GiB guest disk as a file, fio opens it with O_DIRECT):
  qcowfs   `python -m qcowfs mount --foreground` of a qcow2 image (64 KiB clusters) carrying one
           recording persistent dirty bitmap (bench0), fio on MNT/disk.raw
  qemu     the system's qemu-storage-daemon (Debian bookworm: QEMU 7.2, column "qsd 7.2")
           exporting the same kind of image (no bitmap) with `--export type=fuse`, fio on the
           export file
  qemu10   qemu-storage-daemon 10.0 from Debian bookworm-backports ("qsd 10.0"), exported
           exactly like qemu but with aio=io_uring on the file node (the daemon must hold an
           io_uring instance, or the run stops). Not in the default run. On first use qemu-utils
           (and any library this system lacks) is downloaded with apt-get through a private
           source list, lists and cache, and unpacked with dpkg -x into --qemu10-dir (default
           ~/.cache/qcowfs-bench/qemu-10/root); the system QEMU stays as it is. Later runs reuse it
           (delete the directory to reinstall).
  ceiling  qcowfs_dev/ceiling_fs.py over a raw file: pyfuse3 + trio doing nothing but
           os.pread/os.pwrite, i.e. the fastest a Python FUSE filesystem gets here
  intent   qcowfs as above, mounted with --bitmap-sync=intent (crash-proof bitmaps); for the
           steady-state jobs its warm-up writes the whole disk once, so every granule is
           already durably dirty (first-write and first-rand-write-4k start from clean bitmaps)
  baseline qcowfs as of git revision --baseline REV (exported from this repository with
           git archive), mounted exactly like qcowfs: a before/after comparison in one run
  serial   qcowfs as above with -o io_threads=0: one request at a time, no host I/O threads
  luks     qcowfs on a LUKS-encrypted image (aes-256-xts-plain64, made by qemu-img convert or
           create with a secret; --key-file), not in the default run
  luks-qemu10  qemu-storage-daemon 10.0 as qemu10 on the same kind of LUKS image, the passphrase
           from a secret object (encrypt.key-secret)

--host-latency-us N puts every target's image file behind qcowfs_dev/ceiling_fs.py
--latency-us=N (each host read, write and fsync waits N us, many at once): a slow disk or
network storage under the image, where host I/O threads pay (qcowfs/fuse/concurrent_io.py).

Jobs (fio --ioengine=psync --direct=1 --size=<disk>, --time_based --runtime=S):
  seq-write, seq-read (1M), rand-write-4k, rand-read-4k, rand-write-64k, rand-read-64k,
  rand-read-4k-x4 (numjobs=4, group_reporting): all on a fully allocated image (filled with
  0x5a before mounting), so reads never see holes and writes are overwrites.
  Queue depth (one fio job, --ioengine=libaio unless named -uring, --iodepth=N; not in the
  default run, --jobs all selects them): rand-read-4k-qd16, rand-write-4k-qd16,
  rand-read-4k-uring-qd32 (io_uring), seq-write-qd8, seq-read-qd8 (1M), rand-write-64k-qd16,
  rand-rw-4k-qd16 (randrw, rwmixread=70; IOPS and MB/s of reads and writes summed).
  first-write: one sequential 1M pass over a fresh empty image (cluster allocation; the
  --first-write-size first bytes, default 512M, capped at 10 x runtime seconds), a fresh
  image and mount for every repeat.
  NAME@fresh (any job above but first-*): NAME on a fresh empty image and mount per repeat,
  no warm-up, R repeats: reads read holes (time-based); writes allocate, at most one pass
  over the disk (fio writes every block once, stopping at S seconds or the disk's end).
  --preset issue15: the ten jobs of issue 15 (rand-read-4k, rand-write-4k, seq-write and the
  seven queue-depth jobs) and issue 21's four synchronous clients (rand-write-4k-x4,
  rand-write-64k-x4, rand-read-4k-x4, rand-rw-4k-x4: psync, numjobs=4), each on the filled
  image and @fresh, targets qcowfs,qemu,qemu10.
  --preset issue23: the queue-depth-1 jobs (seq-write, seq-read, rand-write-4k, rand-read-4k,
  rand-write-64k, rand-read-64k) on the filled image and @fresh, targets luks,luks-qemu10.

Every measurement is repeated R times and the median reported; the repeats of the
targets are interleaved and rotated (qcowfs, qemu, ceiling; qemu, ceiling, qcowfs; ...), so
drift of the machine hits all of them alike, and each mount on a filled image gets one untimed
warm-up write. By default one filled image per target is mounted for all steady-state jobs
(--fresh: a newly filled image and mount for every job). Dirty host page cache is
synced before each fio run, so writeback does not land inside another measurement.

Output: a table (IOPS, MB/s = 10^6 B/s, busy% = how busy the whole machine was during the job,
fio and the kernel included, in percent of all CPUs, from /proc/stat; ratios of MB/s of qcowfs to
each other target), the
daemons' peak RSS (VmHWM after the read jobs), OUT/bench-<time>.json and, if matplotlib imports
(or --install-plot installs it into this interpreter's environment), OUT/bench-<time>.png:
horizontal bars per job, MB/s on a log scale and the ratios (bars from 1).
Defaults (runtime 2 s, 3 repeats, the psync jobs and default targets: 72 fio runs) take about 4
minutes on 2 cores; --preset issue15 (28 jobs x 3 targets x 3 repeats) about 15.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import Optional, Sequence

from qcowfs_dev import mounts

from .chart import plot
from .host import REPO, BenchError, log
from .jobs import ALL_JOBS, ALL_TARGETS, DEFAULT_JOBS, FRESH, JOBS, PRESETS, TARGETS, parse_size
from .qemu10 import QEMU10_DIR, QEMU10_SUITE, Qemu10
from .report import chart_title, qsd_label, report, result_doc, run_header, table, versions
from .run import Bench
from .stats import medians
from .targets import BaselineTarget, Qemu10Target, Target

__all__ = ["parse_args", "main"]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench",
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Jobs: "
        + ", ".join(JOBS)
        + f"; NAME{FRESH} for any but first-*. Targets: "
        + ", ".join(ALL_TARGETS)
        + " (stock: the ceiling on pyfuse3's own request loop; not in the "
        "default run). Presets: "
        + "; ".join(
            f"{k} = --jobs {','.join(v['jobs'])} --targets {','.join(v['targets'])}"
            for k, v in PRESETS.items()
        ),
    )
    p.add_argument(
        "--runtime", type=float, default=2, help="seconds per time-based fio run (default 2)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per job and target; the median is reported (default 3)",
    )
    p.add_argument(
        "--jobs",
        default=None,
        help="comma-separated jobs, 'all' for every job without @fresh "
        "(default: the psync jobs, " + ",".join(DEFAULT_JOBS) + ")",
    )
    p.add_argument(
        "--targets",
        default=None,
        help="comma-separated targets (default: qcowfs,intent,qemu,ceiling)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a set of jobs and targets (issue15: the ten jobs of issue 15 and the four-client "
        "jobs of issue 21 on filled and fresh images, qcowfs against QEMU 7.2 and 10.0); "
        "--jobs/--targets override",
    )
    p.add_argument(
        "--qemu10-dir",
        default=QEMU10_DIR,
        help="where target qemu10's QEMU is installed on first use and "
        f"found later (default {QEMU10_DIR}); a DIR with bin/ or usr/bin/qemu-storage-daemon is used as is",
    )
    p.add_argument(
        "--size", type=parse_size, default=parse_size("1G"), help="guest disk size (default 1G)"
    )
    p.add_argument(
        "--first-write-repeat",
        type=int,
        default=7,
        help="fresh images per target for first-write, the median reported (default 7: the host "
        "filesystem's allocation is the noisiest part of the run)",
    )
    p.add_argument(
        "--no-rss-1t",
        dest="rss_1t",
        action="store_false",
        help="skip the memory check: peak RSS reading a 1 TiB fully allocated image at 4096 places",
    )
    p.add_argument(
        "--first-write-size",
        type=parse_size,
        default=None,
        help="bytes written by first-write (default: 512M or --size if smaller)",
    )
    p.add_argument(
        "--out", default="bench-results", help="directory for JSON and PNG (default bench-results/)"
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="where images and mounts live (default: a new dir under /var/tmp)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="a freshly filled image and mount per job, not one per run",
    )
    p.add_argument("--keep", action="store_true", help="keep the workdir (daemon logs) afterwards")
    p.add_argument(
        "--install-plot",
        action="store_true",
        help="pip install matplotlib into this environment if missing",
    )
    p.add_argument(
        "--baseline", metavar="REV", help="add target 'baseline': qcowfs as of git revision REV"
    )
    p.add_argument(
        "--host-latency-us",
        type=int,
        default=0,
        metavar="N",
        help="serve every target's image file through qcowfs_dev/ceiling_fs.py --latency-us=N: each host "
        "read, write and fsync waits N us, many at once (a slow disk or network storage)",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        help="print the table of an earlier run's JSON and draw its PNG; runs nothing",
    )
    a = p.parse_args(argv)
    preset = PRESETS.get(a.preset, {})
    a.jobs = (
        [j.strip() for j in a.jobs.split(",") if j.strip()]
        if a.jobs
        else list(preset.get("jobs", DEFAULT_JOBS))
    )
    a.targets = (
        [t.strip() for t in a.targets.split(",") if t.strip()]
        if a.targets
        else list(preset.get("targets", TARGETS))
    )
    if "all" in a.jobs:
        a.jobs = [j for j in a.jobs if j != "all"] + list(JOBS)
    for j in a.jobs:
        if j not in ALL_JOBS:
            p.error(
                f"unknown job {j!r} (jobs: {', '.join(JOBS)}; NAME{FRESH} for the ones not starting with first-)"
            )
    for t in a.targets:
        if t not in ALL_TARGETS:
            p.error(f"unknown target {t!r} (targets: {', '.join(ALL_TARGETS)})")
    if a.baseline and "baseline" not in a.targets:
        a.targets.append("baseline")
    if "baseline" in a.targets and not a.baseline:
        p.error("target 'baseline' needs --baseline REV")
    if not a.jobs or not a.targets:
        p.error("no jobs or no targets selected")
    a.jobs = [j for j in ALL_JOBS if j in a.jobs]  # fixed order: RSS is read after the read jobs
    a.targets = [t for t in ALL_TARGETS if t in a.targets]
    if a.runtime <= 0 or a.repeat < 1 or a.first_write_repeat < 1:
        p.error("--runtime must be > 0, --repeat and --first-write-repeat >= 1")
    if a.first_write_size is None:
        a.first_write_size = min(a.size, 512 << 20)
    a.first_write_size = min(a.first_write_size, a.size)
    return a


def main(argv: Optional[Sequence[str]]) -> int:
    a = parse_args(argv)
    if a.report:
        return report(a.report)
    for tool in ["fio", "qemu-img", "fusermount3"] + (
        ["qemu-storage-daemon"] if "qemu" in a.targets else []
    ):
        if not shutil.which(tool):
            log(f"bench: {tool} not found")
            return 2
    if not os.path.exists("/dev/fuse"):
        log("bench: /dev/fuse is missing")
        return 2
    qemu10 = None
    if "qemu10" in a.targets or "luks-qemu10" in a.targets:
        qemu10 = Qemu10Target.install = Qemu10(a.qemu10_dir)
        try:
            qemu10.setup()
        except (BenchError, OSError) as e:
            msg = str(e).strip().splitlines() or [""]
            log(
                f"bench: qemu10: no usable QEMU 10 in {qemu10.dir} ({QEMU10_SUITE}): {msg[0][:300]}"
                + (f" ... {msg[-1].strip()[:300]}" if len(msg) > 1 else "")
            )
            return 2
        log(f"bench: qemu10 = {qemu10.binary} ({qemu10.version}), aio=io_uring works")
    labels = {
        "qemu": qsd_label(versions(None)["qemu"], "qemu") if "qemu" in a.targets else "qemu",
        "qemu10": qsd_label(qemu10.version, "qemu10") if qemu10 else "qemu10",
        "luks": "qcowfs LUKS",
        "luks-qemu10": (qsd_label(qemu10.version, "qemu10") if qemu10 else "qemu10") + " LUKS",
    }
    own_workdir = a.workdir is None
    if own_workdir:
        a.workdir = tempfile.mkdtemp(prefix="qcowfs-bench.", dir="/var/tmp")
    else:
        os.makedirs(a.workdir, exist_ok=True)
    a.workdir = os.path.abspath(a.workdir)
    if a.baseline:
        src = os.path.join(a.workdir, "baseline-src")
        os.makedirs(src, exist_ok=True)
        arch = subprocess.run(
            ["git", "-C", REPO, "archive", a.baseline, "qcowfs"], stdout=subprocess.PIPE
        )
        if arch.returncode != 0:
            log(f"bench: git archive {a.baseline} failed")
            return 2
        subprocess.run(["tar", "-x", "-C", src], input=arch.stdout, check=True)
        BaselineTarget.source = src
        log(f"bench: baseline = qcowfs at {a.baseline} ({src})")
    Target.host_latency_us = a.host_latency_us

    # SIGTERM/SIGHUP: unwind like Ctrl-C so every mount and daemon is cleaned up
    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # even if started with SIGINT ignored (cmd &)

    runs = len(a.jobs) * len(a.targets) * a.repeat
    log(
        f"bench: {len(a.jobs)} jobs x {len(a.targets)} targets x {a.repeat} repeats = {runs} fio runs, "
        f"{a.runtime:g}s each; workdir {a.workdir}"
    )
    load0 = os.getloadavg()
    if load0[0] > 0.5 * (os.cpu_count() or 1):
        log(
            f"bench: note: load average {load0[0]:.1f} on {os.cpu_count()} CPUs before starting; "
            "other work will make the numbers noisy"
        )
    b = Bench(a)
    t0 = time.monotonic()
    ok = False
    code = 1
    try:
        b.run()
        ok = True
    except KeyboardInterrupt:
        log("bench: interrupted; cleaning up")
        code = 130
    except BenchError as e:
        log(f"bench: {e}")
    finally:
        b.stop_all()
        leftover = [
            mp
            for _, mp, _ in mounts.mount_table()
            if mp.startswith(os.path.realpath(a.workdir) + "/")
        ]
        if leftover:
            # never rm -r through a live mount: that would write into the images (or worse)
            log(f"bench: still mounted, leaving {a.workdir} in place: {', '.join(leftover)}")
        elif own_workdir and not a.keep and ok:
            shutil.rmtree(a.workdir, ignore_errors=True)
        else:
            for root, _, files in os.walk(a.workdir):
                for f in files:
                    if f.endswith((".qcow2", ".img", ".raw")):
                        os.unlink(os.path.join(root, f))
            log(f"bench: logs kept in {a.workdir}")
    elapsed = time.monotonic() - t0
    if not ok:
        return code

    med = medians(b.results)
    print()
    for line in run_header(
        a.jobs, a.size, a.runtime, a.repeat, a.first_write_size, a.first_write_repeat, elapsed
    ):
        print(line)
    print(table(med, a.targets, b.mem, labels))

    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(a.out, f"bench-{stamp}")
    machine = dict(versions(qemu10), loadavg_start=load0, loadavg_end=os.getloadavg())
    doc = result_doc(a, labels, machine, elapsed, med, b.results, b.mem)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nresults: {base}.json")
    if a.install_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("bench: installing matplotlib into " + sys.prefix)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])
    title = chart_title(doc["config"], doc["machine"]["cpus"], labels)
    if plot(med, a.targets, base + ".png", title, labels):
        print(f"chart:   {base}.png")
    else:
        print(
            "chart:   skipped (matplotlib not importable; --install-plot installs it into this environment)"
        )
    return 0
