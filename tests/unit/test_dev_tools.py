"""The pure parts of the development tools (qcowfs_dev): the bench's job tables, presets, fio
command lines and results, statistics and report; the soak's models; the fuzz driver's command
line and time split; the power-loss harness's I/O log and crash-state enumeration.

Nothing here mounts or runs fio: every function under test is called on values made here.
"""

from __future__ import annotations

import argparse
import json
import random
import re

import pytest

from qcowfs_dev import fuzz
from qcowfs_dev.bench import cli, cpu, jobs, report, stats
from qcowfs_dev.bench.chart import plot
from qcowfs_dev.bench.host import BenchError
from qcowfs_dev.mounts import _unescape
from qcowfs_dev.powerloss import explore, iolog
from qcowfs_dev.powerloss.workloads import Bounds
from qcowfs_dev.soak import BitmapModel, Intervals, _first_diff, _short

G, M, K = 1 << 30, 1 << 20, 1 << 10


# ----------------------------------------------------------------------------- bench: jobs and presets
def test_every_steady_job_has_a_fresh_variant_and_first_jobs_do_not():
    steady = [j for j in jobs.JOBS if not jobs.JOBS[j].get("fresh")]
    assert jobs.ALL_JOBS == list(jobs.JOBS) + [j + "@fresh" for j in steady]
    assert (
        "first-write@fresh" not in jobs.ALL_JOBS
        and "first-rand-write-4k@fresh" not in jobs.ALL_JOBS
    )
    assert all(j.startswith("first-") for j in jobs.JOBS if jobs.JOBS[j].get("fresh"))


def test_default_jobs_are_the_psync_ones():
    assert jobs.DEFAULT_JOBS == [
        "seq-write",
        "seq-read",
        "rand-write-4k",
        "rand-read-4k",
        "rand-write-64k",
        "rand-read-64k",
        "rand-read-4k-x4",
        "first-write",
        "first-rand-write-4k",
    ]
    assert all(jobs.JOBS[j].get("ioengine", "psync") == "psync" for j in jobs.DEFAULT_JOBS)


def test_issue15_preset_is_its_jobs_filled_and_fresh_against_both_qemus():
    """Issue 15's ten jobs and issue 21's four synchronous clients (numjobs=4, psync)."""
    p = jobs.PRESETS["issue15"]
    assert len(jobs.ISSUE15) == 14 and len(set(jobs.ISSUE15)) == 14
    x4 = [j for j in jobs.ISSUE15 if j.endswith("-x4")]
    assert x4 == ["rand-write-4k-x4", "rand-write-64k-x4", "rand-read-4k-x4", "rand-rw-4k-x4"]
    assert all(jobs.JOBS[j]["numjobs"] == 4 and "ioengine" not in jobs.JOBS[j] for j in x4)
    assert p["jobs"] == jobs.ISSUE15 + [j + "@fresh" for j in jobs.ISSUE15]
    assert p["targets"] == ["qcowfs", "qemu", "qemu10"]
    assert set(p["jobs"]) <= set(jobs.ALL_JOBS)


def test_job_spec_of_a_fresh_job_is_the_steady_one_on_a_fresh_image():
    spec = jobs.job_spec("rand-write-4k-qd16@fresh")
    assert spec == dict(
        rw="randwrite",
        bs="4k",
        ioengine="libaio",
        iodepth=16,
        fresh=True,
        fresh_of="rand-write-4k-qd16",
    )
    assert "fresh" not in jobs.JOBS["rand-write-4k-qd16"]  # the table itself is left alone
    assert jobs.job_spec("first-write") is jobs.JOBS["first-write"]


@pytest.mark.parametrize(
    "text,size",
    [
        ("1G", G),
        ("512M", 512 * M),
        ("512MiB", 512 * M),
        ("64k", 64 * K),
        ("1.5G", 1536 * M),
        ("65536", 64 * K),
        (" 2g ", 2 * G),
    ],
)
def test_parse_size(text, size):
    assert jobs.parse_size(text) == size


@pytest.mark.parametrize("text", ["100", "1KB", "", "M", "0G", "1000K"])
def test_parse_size_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        jobs.parse_size(text)


def test_human_and_writes():
    assert [jobs.human(n) for n in (G, 3 * G, 512 * M, 64 * K, 1000)] == [
        "1G",
        "3G",
        "512M",
        "64K",
        "1000",
    ]
    assert jobs.writes(jobs.JOBS["rand-rw-4k-qd16"]) and jobs.writes(jobs.JOBS["seq-write"])
    assert not jobs.writes(jobs.JOBS["seq-read"])


def test_fio_desc_names_queue_depth_only_when_a_job_has_it():
    assert jobs.fio_desc(["rand-read-4k", "seq-write@fresh"]) == "fio O_DIRECT, psync"
    assert (
        jobs.fio_desc(["rand-read-4k", "seq-read-qd8"])
        == "fio O_DIRECT, psync (*-qdN: libaio or io_uring at iodepth N)"
    )


# ----------------------------------------------------------------------------- bench: fio command lines
BASE = ["--direct=1", "--output-format=json", "--invalidate=0"]


def _cmd(job, runtime=2.0, size=G, fw=512 * M):
    return jobs.fio_command(job, jobs.job_spec(job), "/m/disk.raw", size, runtime, fw)


def test_fio_command_of_a_steady_job_is_time_based_over_the_disk():
    assert _cmd("rand-read-4k") == [
        "fio",
        "--name=rand-read-4k",
        "--filename=/m/disk.raw",
        "--rw=randread",
        "--bs=4k",
        "--ioengine=psync",
        *BASE,
        f"--size={G}",
        "--time_based",
        "--runtime=2000ms",
    ]


def test_fio_command_queue_depth_mix_and_jobs():
    c = _cmd("rand-rw-4k-qd16")
    assert "--ioengine=libaio" in c and "--iodepth=16" in c and "--rwmixread=70" in c
    assert "--iodepth=1" not in _cmd("rand-read-4k")
    x4 = _cmd("rand-read-4k-x4")
    assert x4[-2:] == ["--numjobs=4", "--group_reporting"]


def test_fio_command_fresh_writes_make_one_pass_and_fresh_reads_are_timed():
    w = _cmd("seq-write@fresh", runtime=1.5)
    assert w[-2:] == [f"--size={G}", "--runtime=1500ms"] and "--time_based" not in w
    r = _cmd("seq-read@fresh", runtime=1.5)
    assert r[-3:] == [f"--size={G}", "--runtime=1500ms", "--time_based"]


def test_fio_command_first_write_passes_over_its_size_with_a_budget():
    assert _cmd("first-write", runtime=2)[-2:] == [f"--size={512 * M}", "--runtime=20"]
    assert _cmd("first-write", runtime=0.5)[-2:] == [
        f"--size={512 * M}",
        "--runtime=10",
    ]  # at least 10 s
    assert _cmd("first-rand-write-4k", runtime=3)[-3:] == [
        f"--size={512 * M}",
        "--time_based",
        "--runtime=3000ms",
    ]


def _side(iops, bw, io, runtime, mean_ns, p99_ns, ios=0):
    return {
        "iops": iops,
        "bw_bytes": bw,
        "io_bytes": io,
        "runtime": runtime,
        "total_ios": ios,
        "clat_ns": {"mean": mean_ns, "percentile": {"99.000000": p99_ns}},
    }


def test_fio_result_reads_the_measured_side_after_notes():
    doc = {
        "jobs": [
            {
                "read": _side(100, 409600, 819200, 2000, 5000, 20000),
                "write": _side(0, 0, 0, 0, 0, 0),
            }
        ]
    }
    res = jobs.fio_result(
        "rand-read-4k", jobs.JOBS["rand-read-4k"], "f", 0, "fio: note\n" + json.dumps(doc), ""
    )
    assert res == {
        "iops": 100,
        "bw_bytes": 409600,
        "io_bytes": 819200,
        "runtime_ms": 2000,
        "clat_mean_us": 5.0,
        "clat_p99_us": 20.0,
    }


def test_fio_result_of_a_mix_sums_both_sides():
    r = _side(70, 700, 7000, 1000, 1000, 5000, ios=70)
    w = _side(30, 300, 3000, 1100, 3000, 4000, ios=30)
    assert jobs.mixed(r, w) == {
        "iops": 100,
        "bw_bytes": 1000,
        "io_bytes": 10000,
        "runtime": 1100,
        "clat_ns": {"mean": 1600.0, "percentile": {"99.000000": 5000}},
    }
    res = jobs.fio_result(
        "m",
        jobs.JOBS["rand-rw-4k-qd16"],
        "f",
        0,
        json.dumps({"jobs": [{"read": r, "write": w}]}),
        "",
    )
    assert (res["iops"], res["bw_bytes"], res["clat_mean_us"], res["clat_p99_us"]) == (
        100,
        1000,
        1.6,
        5.0,
    )


@pytest.mark.parametrize(
    "rc,out,what",
    [
        (1, json.dumps({"jobs": [{"write": _side(1, 1, 1, 1, 1, 1)}]}), "failed (exit 1)"),
        (0, "no json here", "failed (exit 0)"),
        (0, json.dumps({"jobs": []}), "failed (exit 0)"),
        (0, json.dumps({"jobs": [{"error": 5, "write": _side(1, 1, 1, 1, 1, 1)}]}), "error 5"),
        (0, json.dumps({"jobs": [{"write": _side(0, 0, 0, 1, 0, 0)}]}), "did no I/O"),
    ],
)
def test_fio_result_refuses_failed_runs(rc, out, what):
    with pytest.raises(BenchError, match=re.escape(what)):
        jobs.fio_result("seq-write", jobs.JOBS["seq-write"], "f", rc, out, "stderr text")


# ----------------------------------------------------------------------------- bench: statistics
def _run(iops, bw=0.0):
    return {
        "iops": iops,
        "bw_bytes": bw,
        "io_bytes": 1,
        "runtime_ms": 1,
        "clat_mean_us": iops / 10,
        "clat_p99_us": 1.0,
    }


def test_medians_of_the_repeats():
    res = {
        "j": {
            "qcowfs": [_run(1, 10), _run(3, 30), _run(2, 20)],
            "qemu": [_run(1), _run(4), _run(2), _run(3)],
            "ceiling": [],
        }
    }
    med = stats.medians(res)
    assert med == {
        "j": {
            "qcowfs": {"iops": 2, "bw_bytes": 20, "clat_mean_us": 0.2, "clat_p99_us": 1.0},
            "qemu": {"iops": 2.5, "bw_bytes": 0.0, "clat_mean_us": 0.25, "clat_p99_us": 1.0},
        }
    }


def test_rotated_starts_each_repeat_with_the_next_target():
    t = ["qcowfs", "qemu", "ceiling"]
    assert [stats.rotated(t, r) for r in range(4)] == [
        t,
        ["qemu", "ceiling", "qcowfs"],
        ["ceiling", "qcowfs", "qemu"],
        t,
    ]
    assert stats.rotated(("a",), 5) == ["a"]


def test_ratio_pairs_and_bw_ratio():
    pairs = stats.ratio_pairs(["qcowfs", "intent", "qemu", "ceiling"], {"qemu": "qsd 7.2"})
    assert pairs == [
        ("qcowfs/qsd 7.2", "qcowfs", "qemu"),
        ("qcowfs/ceiling", "qcowfs", "ceiling"),
        ("intent/close", "intent", "qcowfs"),
    ]
    assert stats.ratio_pairs(["qemu", "ceiling"], {}) == []
    per = {"qcowfs": {"bw_bytes": 300.0}, "qemu": {"bw_bytes": 200.0}, "ceiling": {"bw_bytes": 0.0}}
    assert stats.bw_ratio(per, "qcowfs", "qemu") == 1.5
    assert stats.bw_ratio(per, "qcowfs", "ceiling") is None  # the denominator did nothing
    assert stats.bw_ratio(per, "qcowfs", "qemu10") is None


# ----------------------------------------------------------------------------- bench: report
MED = {
    "rand-read-4k": {
        "qcowfs": {
            "iops": 1000.4,
            "bw_bytes": 4_096_000.0,
            "clat_mean_us": 1.0,
            "clat_p99_us": 2.0,
        },
        "qemu": {"iops": 500.0, "bw_bytes": 2_048_000.0, "clat_mean_us": 2.0, "clat_p99_us": 4.0},
    },
    "seq-write@fresh": {
        "qcowfs": {"iops": 12.0, "bw_bytes": 12_582_912.0, "clat_mean_us": 1.0, "clat_p99_us": 2.0}
    },
}


def test_cpu_busy_fraction_from_proc_stat():
    # user nice system idle iowait irq softirq steal guest guest_nice
    a = cpu.parse_cpu_line("cpu  100 0 50 800 50 0 0 0 40 0")
    b = cpu.parse_cpu_line("cpu  300 0 150 900 50 0 0 0 90 0\n")
    assert a == (150, 1000) and b == (450, 1400)  # guest time is in user already
    assert cpu.busy_fraction(a, b) == pytest.approx(300 / 400)
    assert cpu.busy_fraction(a, a) == 0.0
    with pytest.raises(ValueError):
        cpu.parse_cpu_line("cpu0 1 2 3 4")
    busy, total = cpu.cpu_times()
    assert 0 < busy < total


def test_table_shows_cpu_busy_when_the_run_measured_it():
    med = {"rand-write-4k-x4": {"qcowfs": dict(MED["rand-read-4k"]["qcowfs"], cpu_busy=0.561)}}
    med["rand-write-4k-x4"]["qemu"] = MED["rand-read-4k"]["qemu"]  # an older run's numbers
    lines = report.table(med, ["qemu", "qcowfs"], {}, {"qemu": "qsd 7.2"}).splitlines()
    assert lines[1].split() == ["IOPS", "MB/s", "busy%", "IOPS", "MB/s", "busy%"]
    assert lines[3].split() == ["rand-write-4k-x4", "1000", "4.1", "56", "500", "2.0", "-", "2.00"]
    runs = {
        "j": {
            "t": [
                {"iops": 1, "bw_bytes": 2, "clat_mean_us": 3, "clat_p99_us": 4, "cpu_busy": c}
                for c in (0.2, 0.9, 0.5)
            ]
        }
    }
    assert stats.medians(runs)["j"]["t"]["cpu_busy"] == 0.5


def test_qsd_label():
    assert (
        report.qsd_label("qemu-storage-daemon version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "x")
        == "qsd 10.0"
    )
    assert report.qsd_label("qemu-storage-daemon version 7.2.15", "x") == "qsd 7.2"
    assert report.qsd_label(None, "qemu10") == "qemu10"


def test_table_rows_ratios_and_missing_values():
    mem = {"qcowfs": {"steady_VmHWM": 50 * M, "rss_1t_VmHWM": 60 * M}}
    lines = report.table(MED, ["qemu", "qcowfs"], mem, {"qemu": "qsd 7.2"}).splitlines()
    assert lines[0].split() == [
        "job",
        "qcowfs",
        "qsd",
        "7.2",
        "qcowfs/qsd",
        "7.2",
    ]  # columns in ALL_TARGETS order
    assert lines[1].split() == ["IOPS", "MB/s", "IOPS", "MB/s"]
    assert set(lines[2]) == {"-"} and len(lines[2]) == len(lines[0])
    assert lines[3].split() == ["rand-read-4k", "1000", "4.1", "500", "2.0", "2.00"]
    assert lines[4].split() == ["seq-write@fresh", "12", "12.6", "-", "-", "-"]
    assert lines[5:] == [
        "",
        "peak RSS (VmHWM) of the daemons:",
        "  qcowfs   steady 50.0 MiB, rss-1t 60.0 MiB",
    ]
    assert all(len(x) == len(lines[0]) for x in lines[:5])  # fixed-width columns


def test_chart_title_and_run_header():
    cfg = {
        "targets": ["qcowfs", "ceiling"],
        "jobs": {"rand-read-4k": {}, "seq-write@fresh": {}},
        "size": G,
        "repeat": 3,
        "host_latency_us": 1000,
    }
    assert report.chart_title(cfg, 2, {}) == (
        "qcowfs vs pyfuse3 ceiling: fio O_DIRECT, psync, 1G disk (@fresh: a new "
        "empty image per run), host I/O latency 1000 us, median of 3, 2 CPUs"
    )
    head = report.run_header(
        ["rand-read-4k", "first-write", "seq-write@fresh"], G, 2.0, 3, 512 * M, 7, 61.4
    )
    assert head[0] == (
        "fio O_DIRECT, psync, 1G disk, 2s runs, median of 3 (first-write: 512M once per fresh image, "
        "median of 7); MB/s = 10^6 B/s; ratios of MB/s; total 61s"
    )
    assert (
        head[1].startswith("NAME@fresh: on a fresh empty image and mount per repeat")
        and len(head) == 2
    )
    assert len(report.run_header(["rand-read-4k"], G, 0.5, 1, G, 1, 3)) == 1


def test_result_doc_is_json_and_report_prints_the_runs_table(tmp_path, capsys):
    a = cli.parse_args(
        [
            "--jobs",
            "rand-read-4k,seq-write@fresh",
            "--targets",
            "qemu,qcowfs",
            "--runtime",
            "1",
            "--repeat",
            "2",
        ]
    )
    labels = {"qemu": "qsd 7.2", "qemu10": "qemu10"}
    runs = {"rand-read-4k": {"qcowfs": [_run(1), _run(2)], "qemu": [_run(3), _run(4)]}}
    mem = {"qemu": {"steady_VmHWM": 10 * M}}
    doc = report.result_doc(a, labels, {"cpus": 2, "qemu": None}, 12.34, MED, runs, mem)
    assert doc["elapsed_s"] == 12.3 and doc["median"] is MED and doc["runs"] is runs
    cfg = doc["config"]
    assert cfg["jobs"] == {
        "rand-read-4k": jobs.JOBS["rand-read-4k"],
        "seq-write@fresh": jobs.job_spec("seq-write@fresh"),
    }
    assert (cfg["targets"], cfg["runtime_s"], cfg["repeat"], cfg["size"], cfg["cluster_size"]) == (
        ["qcowfs", "qemu"],
        1.0,
        2,
        G,
        65536,
    )
    path = tmp_path / "bench-1.json"
    path.write_text(json.dumps(doc, indent=1))
    assert report.report(str(path)) == 0
    out = capsys.readouterr().out
    assert out.startswith(report.table(MED, ["qcowfs", "qemu"], mem, labels) + "\n")
    assert (tmp_path / "bench-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.endswith(f"chart:   {tmp_path / 'bench-1.png'}\n")


def test_plot_draws_a_png(tmp_path):
    png = tmp_path / "c.png"
    assert plot(MED, ["qcowfs", "qemu", "intent"], str(png), "title", {"qemu": "qsd 7.2"})
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


# ----------------------------------------------------------------------------- bench: command line
def test_parse_args_defaults():
    a = cli.parse_args([])
    assert a.jobs == jobs.DEFAULT_JOBS
    assert a.targets == ["qcowfs", "intent", "qemu", "ceiling"]
    assert (a.runtime, a.repeat, a.size, a.first_write_size, a.first_write_repeat) == (
        2,
        3,
        G,
        512 * M,
        7,
    )
    assert a.rss_1t and not a.fresh and a.report is None


def test_parse_args_presets_all_and_order():
    a = cli.parse_args(["--preset", "issue15"])
    assert a.targets == ["qcowfs", "qemu", "qemu10"]
    assert sorted(a.jobs) == sorted(jobs.PRESETS["issue15"]["jobs"])
    assert a.jobs == [
        j for j in jobs.ALL_JOBS if j in a.jobs
    ]  # fixed order, whatever the preset lists
    assert cli.parse_args(["--preset", "issue15", "--targets", "qemu,qcowfs"]).targets == [
        "qcowfs",
        "qemu",
    ]
    assert cli.parse_args(["--jobs", "seq-read,all"]).jobs == list(jobs.JOBS)
    b = cli.parse_args(["--baseline", "HEAD~1", "--targets", "qcowfs"])
    assert b.targets == ["qcowfs", "baseline"]


def test_parse_args_sizes():
    assert cli.parse_args(["--size", "256M"]).first_write_size == 256 * M
    assert (
        cli.parse_args(["--size", "512M", "--first-write-size", "1G"]).first_write_size == 512 * M
    )
    assert cli.parse_args(["--first-write-size", "64M"]).first_write_size == 64 * M


@pytest.mark.parametrize(
    "argv",
    [
        ["--targets", "baseline"],
        ["--jobs", "nope"],
        ["--targets", "xfs"],
        ["--jobs", "first-write@fresh"],
        ["--runtime", "0"],
        ["--repeat", "0"],
        ["--jobs", ","],
        ["--size", "1000"],
    ],
)
def test_parse_args_refuses(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert "bench: error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- soak: models
def test_intervals_merge_and_complement():
    iv = Intervals()
    for s, e in ((10, 20), (30, 40), (15, 35), (40, 50), (60, 70), (5, 5)):
        iv.add(s, e)
    assert iv.iv == [
        [10, 50],
        [60, 70],
    ]  # overlapping and touching ranges merged, empty ones ignored
    assert iv.complement(100) == [(0, 10), (50, 60), (70, 100)]
    assert iv.complement(65) == [(0, 10), (50, 60)]
    assert iv.total() == 50
    iv.add(0, 100)
    assert iv.iv == [[0, 100]] and iv.complement(100) == []
    iv.clear()
    assert iv.complement(8) == [(0, 8)] and iv.total() == 0


def test_bitmap_model_marks_granules_and_merges_extents():
    g = 64 * K
    bm = BitmapModel("b0", g)
    bm.mark(0, 1)
    bm.mark(g - 1, 2)  # straddles into granule 1
    bm.mark(3 * g, g)
    bm.mark(5 * g, 0)  # nothing written: nothing marked
    assert bm.dirty == {0, 1, 3} and bm.count() == 3 * g
    assert bm.extents(4 * g - 100) == [
        (0, 2 * g),
        (3 * g, g - 100),
    ]  # the last one clipped to the disk
    bm.recording = False
    bm.mark(6 * g, g)
    assert bm.dirty == {0, 1, 3}


def test_soak_messages():
    assert _first_diff(b"abc", b"abd", 100) == "first at byte 102: 0x63 instead of 0x64"
    assert _first_diff(b"ab", b"abc", 0) == "(got 2 bytes, expected 3)"
    assert (
        _first_diff(b"x" * 9000, b"x" * 8999 + b"y", 0)
        == "first at byte 8999: 0x78 instead of 0x79"
    )
    assert _short([(1, 2)] * 13) == "[" + ", ".join(["(1, 2)"] * 12) + ", ...] (13 ranges)"
    assert _short([[0, 4]]) == "[(0, 4)] (1 ranges)"


# ----------------------------------------------------------------------------- fuzz: command line and time
def test_fuzz_parse_args():
    a = fuzz.parse_args(["--minutes", "2", "-k", "v3", "--seed=7", "-x"])
    assert (a.minutes, a.seed, a.extra, a.help) == ("2", "7", ["-k", "v3", "-x"], False)
    b = fuzz.parse_args(["--minutes=1.5", "--seed", "9"])
    assert (b.minutes, b.seed, b.extra) == ("1.5", "9", [])
    assert (fuzz.parse_args([]).minutes, fuzz.parse_args([]).seed) == ("10", "")
    assert fuzz.parse_args(["--minutes", "x", "-h"]).help  # help where it stands, before the check


@pytest.mark.parametrize(
    "argv", [["--minutes", "x"], ["--minutes="], ["--minutes", "-1"], ["--seed"], ["--minutes"]]
)
def test_fuzz_parse_args_refuses(argv):
    with pytest.raises(fuzz.UsageError):
        fuzz.parse_args(argv)


def test_fuzz_time_split():
    assert [fuzz.minutes_value(m) for m in ("1.5", "2.", "1.2.3", ".", "10")] == [
        1.5,
        2.0,
        1.2,
        0.0,
        10.0,
    ]
    assert fuzz.seconds_per_image("10", 7) == 85  # 600 / 7, truncated
    assert fuzz.seconds_per_image("0.1", 12) == 0
    out = "\n".join(
        [
            "tests/test_fuzz_images.py::test_damaged_image[v2-c64k]",
            "tests/test_fuzz_images.py::test_damaged_image[v3-c512]",
            "",
            "2 tests collected in 0.5s",
        ]
    )
    assert fuzz.count_items(out) == 2 and fuzz.count_items("no tests ran") == 0


# ----------------------------------------------------------------------------- power-loss: I/O log and crash states
def test_merge_joins_overlapping_and_touching_ranges():
    assert iolog._merge([(5, 10), (0, 3), (3, 4), (9, 12)]) == [(0, 4), (5, 12)]
    assert iolog._merge([]) == []


def test_replay_all_applies_writes_and_truncates_in_order():
    log = iolog.IOLog()
    log.write("disk", 2, b"xy")
    log.flush("disk")
    log.truncate("disk", 10)
    log.marker("gf")
    log.write("disk", 12, b"z")
    log.write("other", 0, b"q")
    files = iolog.replay_all({"disk": b"abcdef", "other": b""}, log)
    assert files == {"disk": bytearray(b"abxyef" + bytes(6) + b"z"), "other": bytearray(b"q")}
    assert log.counts() == {"writes": 3, "flushes": 1, "truncates": 1, "bytes": 4}
    quiet = iolog.IOLog(record_flushes=False)
    quiet.flush("disk")
    assert quiet.entries == []


def _writes(*sizes):
    return [(iolog.W, "disk", 4096 * i, bytes(n), "") for i, n in enumerate(sizes)]


def test_sectors_of_a_write():
    assert explore._sectors((iolog.W, "d", 1000, bytes(100), "")) == range(1, 3)
    assert explore._nsectors((iolog.W, "d", 1024, bytes(512), "")) == 1
    assert explore._nsectors((iolog.W, "d", 0, b"", "")) == 0
    assert explore._nsectors((iolog.F, "d", "")) == 0


def test_choices_enumerate_every_subset_of_a_small_epoch():
    ents = _writes(512, 512, 512)
    full = explore._choices(random.Random(0), [0, 1, 2], ents, Bounds(), want_full=True)
    sets = [frozenset(i for i, secs in c) for c in full]
    assert len(full) == 8 and len(set(sets)) == 8
    assert all(secs is None for c in full for _, secs in c)
    without = explore._choices(random.Random(0), [0, 1, 2], ents, Bounds(), want_full=False)
    assert len(without) == 7 and frozenset({0, 1, 2}) not in {
        frozenset(i for i, _ in c) for c in without
    }
    assert explore._choices(random.Random(0), [], ents, Bounds(), want_full=True) == [[]]
    assert explore._choices(random.Random(0), [], ents, Bounds(), want_full=False) == []


def test_choices_sample_a_large_epoch_by_the_bounds():
    ents = _writes(*[512] * 5)
    opt = [0, 1, 2, 3, 4]
    b = Bounds()  # 2**5 > exhaustive 16: sampled
    out = explore._choices(random.Random(1), opt, ents, b, want_full=True)
    assert (
        len(out) == 1 + 5 + b.drop_one + b.singles + b.random
    )  # no multi-sector write: nothing torn
    idx = [[i for i, _ in c] for c in out]
    assert idx[0] == opt  # everything written
    assert idx[1:6] == [
        opt[:k] for k in range(5)
    ]  # the disk stopped after k writes, in issue order
    drop = idx[6 : 6 + b.drop_one]
    assert all(len(c) == 4 and set(c) < set(opt) for c in drop)
    singles = idx[6 + b.drop_one : 6 + b.drop_one + b.singles]
    assert all(len(c) == 1 for c in singles)
    assert all(c == sorted(c) for c in idx)  # subsets keep the log's order
    fewer = explore._choices(
        random.Random(1), list(range(10)), _writes(*[512] * 10), Bounds(prefixes=3), want_full=False
    )
    assert [[i for i, _ in c] for c in fewer[:3]] == [
        [],
        list(range(4)),
        list(range(9)),
    ]  # evenly spaced prefixes


def test_choices_tear_multi_sector_writes_into_proper_sector_subsets():
    ents = [(iolog.W, "disk", 0, bytes(2048), "")]  # 4 sectors
    out = explore._choices(random.Random(3), [0], ents, Bounds(torn=6), want_full=True)
    assert out[:2] == [[], [(0, None)]]  # the two subsets, then the torn draws
    assert len(out) == 2 + 6
    torn = [secs for c in out[2:] for _, secs in c if secs is not None]
    assert torn, "no torn write drawn"
    assert all(0 < len(secs) < 4 and secs <= frozenset(range(4)) for secs in torn)


def test_total_line():
    assert (
        explore.total_line(7357, 23, 220.4)
        == "power-loss total: 7357 distinct crash states checked across 23 workloads in 220s"
    )
    assert explore.total_line(10, 3, 1.6, 4, ["intent-a", "intent-b"]) == (
        "power-loss total: 10 distinct crash states checked across 3 workloads (4 of them in 2 intent-mode bitmap "
        "workloads: intent-a, intent-b) in 2s"
    )


def test_bounds_scaled():
    b = Bounds().scaled(2)
    assert (b.exhaustive, b.prefixes, b.drop_one, b.singles, b.random, b.torn, b.max_states) == (
        64,
        12,
        6,
        6,
        16,
        6,
        0,
    )
    assert Bounds(max_states=10).scaled(0.1) == Bounds(16, 1, 1, 1, 1, 0, 1)


# ----------------------------------------------------------------------------- the mount table's escapes
def test_mount_table_escapes_are_decoded():
    assert _unescape(r"/mnt/a\040b\011c\134d\012e") == "/mnt/a b\tc\\d\ne"
    assert _unescape("/plain") == "/plain"
