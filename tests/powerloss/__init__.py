"""Power-loss simulation: replay every crash state a workload can leave on the disk.

Modules: iolog (the recording HostFile and the I/O log), driver (the guest model and the Driver),
workloads (the workloads, their sampling bounds, record()), explore (crash-state enumeration, the
worker pool, reports), verify (the checks of one crash state). tests/test_powerloss.py and
scripts/crash-states use what this package exports.

How it works
------------
1. RecordingHostFile (iolog) is a HostFile that does its I/O on a working copy and appends every
   write (file, offset, bytes), flush and truncate to a shared IOLog. recording_factory()
   makes one for the image and for its external data file (Qcow2Image's file_factory).
2. A workload (workloads) runs through Qcow2Image + Disk with that factory, starting from a pristine
   image whose bytes were saved first. The Driver (driver) also drops markers into the log: a
   guest write begins ("gw"), a guest flush returned ("gf"), bitmap create/remove, close.
3. Explorer (explore) walks the log and materialises crash states. Model of the disk: a write to
   file F is durable once a later flush *of F* completed; writes after F's last flush may
   each have reached the disk or not, in any combination (the disk reorders within a
   flush epoch), and optionally only some of their 512-byte sectors (torn writes;
   a sector itself is atomic). Crash points:
     a) right after every flush: every write issued before it applied (the log prefix);
     b) just before every flush: the writes of the epoch since the previous flush, as
        subsets on top of the flushed state: all subsets when there are few, else the
        in-order prefixes, "all but one", "only one", random subsets and torn sectors.
   A truncate is treated as a barrier for its file (qcowfs does not truncate today).
   Distinct states are counted by content: same base + same differing 512-byte sectors.
4. Each distinct state (file bytes hashed) is written to its own directory and checked
   (verify) in a worker process (ProcessPoolExecutor; qemu-img runs in parallel):
     - qemu-img check --output=json exits 0 or 3 (leaks allowed, never 2). With lazy
       refcounts and the dirty bit set, errors are allowed if `qemu-img check -r all` (on a
       copy) repairs them to exit 0, and qcowfs' own read-write open (start_writing()
       rebuilds refcounts) leaves qemu-img check at 0 or 3 with the guest data unchanged;
     - qcowfs opens it read-only (Qcow2Image + BitmapStore) and reads the whole guest disk:
       every byte equals the guest content at the last completed guest flush, except
       bytes written since then, which may hold any value written there since (old or new);
     - every persistent bitmap is either in_use, or clean with exactly the right contents
       (QEMU's flags from qemu-img info, contents via qcowfs' loader; the expected bits
       are computed here from the guest writes, independently of qcowfs): a version stored
       by a clean close, allowed until the next session's first guest write; after a
       completed close, all of them clean and exact. A bitmap whose creation completed is
       present; one whose removal completed is gone. Inside a read-write open the whole
       extension may be stale (autoclear bit clear, QEMU's in-place protocol): no bitmaps;
     - qcowfs logs no error while reading the state;
     - on a sample of states, qemu-img convert -O raw equals qcowfs' read of the state
       (and internal snapshots read back unchanged).
"""

from __future__ import annotations

import os
import sys

try:
    import qcowfs  # noqa: F401
except ImportError:  # run from a checkout without an installed qcowfs
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from .driver import BitmapSpec, Driver, Model, expected_bits
from .explore import Explorer, Stats, explore_workload, failure_report
from .iolog import SECTOR, F, IOLog, M, RecordingHostFile, T, W, recording_factory, replay_all
from .verify import Expect, Task, check_state, compare_guest
from .workloads import Bounds, Recorded, Workload, record, workloads

__all__ = ["W", "F", "T", "M", "SECTOR", "IOLog", "RecordingHostFile", "recording_factory", "replay_all",
           "BitmapSpec", "Model", "Driver", "expected_bits", "Bounds", "Workload", "Recorded", "record",
           "workloads", "Expect", "Task", "check_state", "compare_guest", "Stats", "Explorer",
           "explore_workload", "failure_report"]
