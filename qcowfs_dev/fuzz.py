"""Fuzz qcowfs with damaged QEMU-made images for a while: tests/harness/test_fuzz_images.py without its CI
bound (QCOWFS_FUZZ_EXAMPLES=100000), a random Hypothesis seed, the time split between the base
images (each one's run ends, reported as skipped, when its share is used up).

  scripts/fuzz [--minutes N] [--seed S] [extra pytest arguments, e.g. -k v3]

Failures are shrunk and printed with the seed (rerun with --seed S to replay the same search) and
a @reproduce_failure blob; every failing damaged image is also kept in the directory printed at
the start (with a .txt describing its mutations). Exits non-zero on any failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from types import FrameType
from typing import Optional, Sequence

from qcowfs_dev.mounts import detach, mount_table
from qcowfs_dev.proc import REPO

__all__ = ["Args", "parse_args", "minutes_value", "seconds_per_image", "count_items", "main"]

FUZZ_TESTS = ["tests/harness/test_fuzz_images.py", "-k", "test_damaged_image"]
ITEM = "::test_damaged_image["


class UsageError(Exception):
    pass


class Args:
    """The command line: --minutes and --seed as given (strings), the rest for pytest."""

    def __init__(
        self,
        minutes: str = "10",
        seed: str = "",
        extra: Optional[list[str]] = None,
        help: bool = False,
    ):
        self.minutes = minutes
        self.seed = seed
        self.extra = extra if extra is not None else []
        self.help = help


def parse_args(argv: Sequence[str]) -> Args:
    """--minutes N / --minutes=N, --seed S / --seed=S, -h / --help (it wins where it stands); every
    other argument goes to pytest. UsageError for an option without its value or a --minutes that
    is not a number (digits and dots)."""
    a = Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--minutes", "--seed"):
            if i + 1 >= len(argv):
                raise UsageError(f"{arg} needs a value")
            if arg == "--minutes":
                a.minutes = argv[i + 1]
            else:
                a.seed = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--minutes="):
            a.minutes = arg.split("=", 1)[1]
        elif arg.startswith("--seed="):
            a.seed = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            a.help = True
            return a
        else:
            a.extra.append(arg)
        i += 1
    if not re.fullmatch(r"[0-9.]+", a.minutes):
        raise UsageError("--minutes needs a number")
    return a


def minutes_value(minutes: str) -> float:
    """The number a --minutes string stands for, read like awk reads it (its longest numeric
    prefix: "1.5" 1.5, "2." 2, "1.2.3" 1.2, "." 0)."""
    m = re.match(r"\d*(\.\d*)?", minutes)
    text = m.group(0) if m else ""
    try:
        return float(text)
    except ValueError:
        return 0.0


def seconds_per_image(minutes: str, images: int) -> int:
    """Each base image's share of the time, in whole seconds (truncated)."""
    return int(minutes_value(minutes) * 60 / images)


def count_items(collect_output: str) -> int:
    """How many test_damaged_image items `pytest --collect-only -q` listed."""
    return sum(1 for line in collect_output.splitlines() if ITEM in line)


def _tmpdir() -> str:
    return os.environ.get("TMPDIR") or "/tmp"


def _cleanup(work: str) -> None:
    """The shared mount lifecycle (qcowfs_dev/mounts.py): unmount whatever is left under WORK, dead
    mounts included (fusermount3 -u, then -u -z); never rm -r through a live mount."""
    prefix = os.path.realpath(work) + "/"
    left = [mp for _, mp, _ in mount_table() if mp.startswith(prefix) and not detach(mp)]
    if left:
        print(f"fuzz: mounts left under {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"fuzz: {e}", file=sys.stderr)
        return 2
    if args.help:
        print((__doc__ or "").strip("\n"))
        return 0
    seed = args.seed or str(int.from_bytes(os.urandom(4), "little"))
    os.chdir(REPO)
    py = sys.executable

    # SIGINT/SIGTERM: like Ctrl-C in a shell, the command running now ends first, then exit 130
    # (after the clean-up below)
    signalled: list[int] = []

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        signalled.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # how many base images (test items) share the time
    collect = subprocess.run(
        [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--collect-only",
            *FUZZ_TESTS,
            *args.extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if signalled:
        return 130
    n = count_items(collect.stdout)
    if n == 0:
        print(
            "fuzz: no test_damaged_image items collected (pytest or FUSE missing?)", file=sys.stderr
        )
        return 1
    per = seconds_per_image(args.minutes, n)
    save = f"{_tmpdir()}/qcowfs-fuzz-failures.{seed}"
    print(
        f"fuzz: seed {seed}, {args.minutes} min over {n} base images ({per}s each), failing images go to {save}",
        flush=True,
    )

    # All of pytest's temporary files (and so every mount point) live in WORK: whatever happens to
    # pytest, no mount is left behind.
    work = tempfile.mkdtemp(prefix="qcowfs-fuzz.", dir=_tmpdir())
    try:
        env = dict(
            os.environ,
            TMPDIR=work,
            QCOWFS_FUZZ_EXAMPLES="100000",
            QCOWFS_FUZZ_SECONDS=str(per),
            QCOWFS_FUZZ_SAVE=save,
        )
        rc = subprocess.run(
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-rfEs",
                "-p",
                "no:cacheprovider",
                f"--hypothesis-seed={seed}",
                "--hypothesis-show-statistics",
                *FUZZ_TESTS,
                *args.extra,
            ],
            stdin=subprocess.DEVNULL,
            env=env,
        ).returncode
        if signalled:
            return 130
        if rc != 0:
            print(
                f"fuzz: FAILED (pytest exit {rc}); seed {seed}; damaged images in {save}",
                file=sys.stderr,
            )
        else:
            print(f"fuzz: no failure in {args.minutes} min (seed {seed})")
        return rc
    finally:
        _cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
