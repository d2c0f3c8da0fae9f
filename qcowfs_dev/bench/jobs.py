"""The bench's fio jobs, presets and targets by name, and how a job becomes an fio run.

A job is a dict of fio parameters (ioengine psync and iodepth 1 unless given); "fresh": it runs on
a new empty image (allocation), once per repeat. Every job without "fresh" also exists as
NAME@fresh: the same job on a fresh empty image and mount per repeat.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from typing import Any, Iterable, Mapping

from .cpu import busy_fraction, cpu_times
from .host import CLUSTER, BenchError

__all__ = [
    "JOBS",
    "FRESH",
    "ALL_JOBS",
    "DEFAULT_JOBS",
    "ISSUE15",
    "PRESETS",
    "TARGETS",
    "ALL_TARGETS",
    "JobSpec",
    "job_spec",
    "writes",
    "human",
    "parse_size",
    "fio_desc",
    "fio_command",
    "fio_result",
    "mixed",
    "fio",
]

JobSpec = dict[str, Any]

# name -> fio parameters (ioengine psync and iodepth 1 unless given); "fresh": run on a new empty
# image (allocation), once per repeat. Every job without "fresh" also exists as NAME@fresh.
JOBS: dict[str, JobSpec] = {
    "seq-write": dict(rw="write", bs="1M"),
    "seq-read": dict(rw="read", bs="1M"),
    "rand-write-4k": dict(rw="randwrite", bs="4k"),
    "rand-read-4k": dict(rw="randread", bs="4k"),
    "rand-write-64k": dict(rw="randwrite", bs="64k"),
    "rand-read-64k": dict(rw="randread", bs="64k"),
    "rand-read-4k-x4": dict(rw="randread", bs="4k", numjobs=4),
    # four synchronous clients (QEMU's default aio=threads pattern; issue 21)
    "rand-write-4k-x4": dict(rw="randwrite", bs="4k", numjobs=4),
    "rand-write-64k-x4": dict(rw="randwrite", bs="64k", numjobs=4),
    "rand-rw-4k-x4": dict(rw="randrw", bs="4k", rwmixread=70, numjobs=4),
    # queue depth (issue 15): one fio job keeping iodepth requests in flight
    "rand-read-4k-qd16": dict(rw="randread", bs="4k", ioengine="libaio", iodepth=16),
    "rand-write-4k-qd16": dict(rw="randwrite", bs="4k", ioengine="libaio", iodepth=16),
    "rand-read-4k-uring-qd32": dict(rw="randread", bs="4k", ioengine="io_uring", iodepth=32),
    "seq-write-qd8": dict(rw="write", bs="1M", ioengine="libaio", iodepth=8),
    "seq-read-qd8": dict(rw="read", bs="1M", ioengine="libaio", iodepth=8),
    "rand-write-64k-qd16": dict(rw="randwrite", bs="64k", ioengine="libaio", iodepth=16),
    "rand-rw-4k-qd16": dict(rw="randrw", bs="4k", rwmixread=70, ioengine="libaio", iodepth=16),
    "first-write": dict(rw="write", bs="1M", fresh=True),
    # 4 KiB random writes into a fresh image and a fresh (clean) bitmap: what a write-intent
    # bitmap pays for marking new regions (time-based over the first-write area)
    "first-rand-write-4k": dict(rw="randwrite", bs="4k", fresh=True, timed=True),
}
FRESH = "@fresh"  # job-name suffix: the job on a fresh empty image and mount per repeat
ALL_JOBS = list(JOBS) + [j + FRESH for j in JOBS if not JOBS[j].get("fresh")]
#: issue 21's four-client writes and mix, in its preset (not in the default run)
X4_JOBS = ("rand-write-4k-x4", "rand-write-64k-x4", "rand-rw-4k-x4")
DEFAULT_JOBS = [
    j for j in JOBS if "-qd" not in j and j not in X4_JOBS
]  # the default run: the psync jobs
ISSUE15 = [
    "rand-read-4k",
    "rand-write-4k",
    "seq-write",
    "rand-read-4k-qd16",
    "rand-write-4k-qd16",
    "rand-read-4k-uring-qd32",
    "seq-write-qd8",
    "seq-read-qd8",
    "rand-write-64k-qd16",
    "rand-rw-4k-qd16",
    # issue 21: four synchronous clients
    "rand-write-4k-x4",
    "rand-write-64k-x4",
    "rand-read-4k-x4",
    "rand-rw-4k-x4",
]
#: one synchronous client, one request in flight
QD1_JOBS = [
    "seq-write",
    "seq-read",
    "rand-write-4k",
    "rand-read-4k",
    "rand-write-64k",
    "rand-read-64k",
]
# --preset NAME: jobs and targets (an explicit --jobs or --targets wins)
PRESETS: dict[str, dict[str, list[str]]] = {
    "issue15": dict(
        jobs=ISSUE15 + [j + FRESH for j in ISSUE15], targets=["qcowfs", "qemu", "qemu10"]
    ),
    # issue 23: encrypted images, the queue-depth-1 jobs, qcowfs against qsd 10.0
    "issue23": dict(jobs=QD1_JOBS + [j + FRESH for j in QD1_JOBS], targets=["luks", "luks-qemu10"]),
}
TARGETS = ("qcowfs", "intent", "qemu", "ceiling")  # the default run
ALL_TARGETS = (
    "qcowfs",
    "serial",
    "intent",
    "baseline",
    "qemu",
    "qemu10",
    "ceiling",
    "stock",
    "luks",
    "luks-qemu10",
)


def parse_size(s: str) -> int:
    s = s.strip()
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    num = s.rstrip("KMGTBkmgtbi")
    unit = s[len(num) :].upper().replace("IB", "").replace("I", "")
    if unit not in units or not num:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (use e.g. 512M, 1G)")
    n = int(float(num) * units[unit])
    if n <= 0 or n % CLUSTER:
        raise argparse.ArgumentTypeError(f"size {s!r} must be a positive multiple of 64 KiB")
    return n


def job_spec(name: str) -> JobSpec:
    """JOBS[name], or for NAME@fresh the steady job NAME on a fresh empty image ("fresh_of")."""
    if name.endswith(FRESH):
        return dict(JOBS[name[: -len(FRESH)]], fresh=True, fresh_of=name[: -len(FRESH)])
    return JOBS[name]


def writes(spec: Mapping[str, Any]) -> bool:
    return spec["rw"] in ("write", "randwrite", "randrw", "rw", "readwrite")


def human(n: int) -> str:
    for unit, f in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % f == 0:
            return f"{n // f}{unit}"
    return str(n)


def fio_desc(jobs: Iterable[str]) -> str:
    qd = any(job_spec(j).get("iodepth", 1) > 1 for j in jobs)
    return "fio O_DIRECT, psync" + (" (*-qdN: libaio or io_uring at iodepth N)" if qd else "")


# ---------------------------------------------------------------------- fio
def fio_command(
    job: str, spec: Mapping[str, Any], filename: str, size: int, runtime: float, fw_size: int
) -> list[str]:
    """The fio command line of JOB (SPEC) on FILENAME: a disk of SIZE bytes, RUNTIME seconds per
    time-based run, FW_SIZE bytes written by a first-write pass."""
    cmd = [
        "fio",
        f"--name={job}",
        f"--filename={filename}",
        f"--rw={spec['rw']}",
        f"--bs={spec['bs']}",
        f"--ioengine={spec.get('ioengine', 'psync')}",
        "--direct=1",
        "--output-format=json",
        "--invalidate=0",
    ]
    if spec.get("iodepth", 1) > 1:
        cmd += [f"--iodepth={spec['iodepth']}"]
    if "rwmixread" in spec:
        cmd += [f"--rwmixread={spec['rwmixread']}"]
    if spec.get("fresh_of"):
        # NAME@fresh over the whole disk: reads (holes) time-based; writes at most one pass (fio
        # touches every block once), so no block is written twice and every cluster is allocated
        # by the run, stopping at the runtime or the end of the disk
        cmd += [f"--size={size}", f"--runtime={round(runtime * 1000)}ms"] + (
            [] if writes(spec) else ["--time_based"]
        )
    elif spec.get("fresh") and spec.get("timed"):
        cmd += [f"--size={fw_size}", "--time_based", f"--runtime={round(runtime * 1000)}ms"]
    elif spec.get("fresh"):
        # one pass: every write allocates; stop early if it is slow rather than blow the budget
        cmd += [f"--size={fw_size}", f"--runtime={max(10, int(10 * runtime))}"]
    else:
        cmd += [f"--size={size}", "--time_based", f"--runtime={round(runtime * 1000)}ms"]
    if spec.get("numjobs", 1) > 1:
        cmd += [f"--numjobs={spec['numjobs']}", "--group_reporting"]
    return cmd


def fio_result(
    job: str, spec: Mapping[str, Any], filename: str, returncode: int, out: str, err: str
) -> dict[str, float]:
    """What one fio run measured (IOPS, bytes per second and in all, runtime, mean and p99
    completion latency), from its exit status and JSON output; BenchError if it failed or did no I/O."""
    start = out.find("{")  # fio may print notes before the JSON document
    try:
        doc = json.loads(out[start:]) if start >= 0 else None
    except ValueError:
        doc = None
    if returncode != 0 or not doc or not doc.get("jobs"):
        raise BenchError(
            f"fio {job} on {filename} failed (exit {returncode}): {(err or out).strip()[-2000:]}"
        )
    j = doc["jobs"][0]
    if j.get("error"):
        raise BenchError(f"fio {job} on {filename}: error {j['error']}: {err.strip()[-1000:]}")
    if spec["rw"] in ("randrw", "rw", "readwrite"):
        side = mixed(j["read"], j["write"])
    else:
        side = j["write"] if "write" in spec["rw"] else j["read"]
    if side["io_bytes"] <= 0:
        raise BenchError(f"fio {job} on {filename} did no I/O")
    return {
        "iops": side["iops"],
        "bw_bytes": side["bw_bytes"],
        "io_bytes": side["io_bytes"],
        "runtime_ms": side["runtime"],
        "clat_mean_us": side.get("clat_ns", {}).get("mean", 0) / 1000,
        "clat_p99_us": side.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000,
    }


def mixed(r: Mapping[str, Any], w: Mapping[str, Any]) -> dict[str, Any]:
    """A read/write mix as one side: IOPS and bytes summed, mean latency weighted by the I/Os,
    p99 the larger of the two."""
    n_r, n_w = r.get("total_ios", 0), w.get("total_ios", 0)
    lat = [(s.get("clat_ns", {}).get("mean", 0), n) for s, n in ((r, n_r), (w, n_w))]
    p99 = [s.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) for s in (r, w)]
    return {
        "iops": r["iops"] + w["iops"],
        "bw_bytes": r["bw_bytes"] + w["bw_bytes"],
        "io_bytes": r["io_bytes"] + w["io_bytes"],
        "runtime": max(r["runtime"], w["runtime"]),
        "clat_ns": {
            "mean": sum(m * n for m, n in lat) / max(1, n_r + n_w),
            "percentile": {"99.000000": max(p99)},
        },
    }


def fio(
    job: str, spec: Mapping[str, Any], filename: str, size: int, runtime: float, fw_size: int
) -> dict[str, float]:
    """Run JOB on FILENAME (see fio_command) and return what it measured (see fio_result), with
    how busy the whole machine was meanwhile ("cpu_busy", 0..1: fio, the kernel and the target
    together; 1.0 is every CPU busy)."""
    before = cpu_times()
    p = subprocess.run(
        fio_command(job, spec, filename, size, runtime, fw_size),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cpu = busy_fraction(before, cpu_times())
    return dict(fio_result(job, spec, filename, p.returncode, p.stdout, p.stderr), cpu_busy=cpu)
