"""Power-loss simulation: replay every crash state a workload can leave on the disk.

Modules: iolog (the recording HostFile and the I/O log), driver (the guest model and the Driver),
workloads (the workloads, their sampling bounds, record()), explore (crash-state enumeration, the
worker pool, reports), verify (the checks of one crash state), keyed (QEMU's tools on an encrypted
workload's images, with the key). tests/harness/test_powerloss.py and
scripts/crash-states use what this package exports.

How it works
------------
1. RecordingHostFile (iolog) is a HostFile that does its I/O on a working copy and appends every
   write (file, offset, bytes), flush and truncate to a shared IOLog. recording_factory()
   makes one for the image and for its external data file (Qcow2Image's file_factory).
2. A workload (workloads) runs through Qcow2Image + Disk with that factory, starting from a pristine
   image whose bytes were saved first. The Driver (driver) also drops markers into the log: a
   guest write begins ("gw"), a guest flush returned ("gf"), bitmap create/remove, close, internal
   snapshot create ("sn+"/"sn+done") and delete ("sn-"/"sn-done"), checkpoint ("ckpt"/"ckpt-done":
   snapshot + bitmap + bitmaps disabled, Disk.checkpoint). A snapshot step that returned is followed
   by a "gf" (it flushes every acknowledged write first).
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
     - on a sample of states, qemu-img convert -O raw equals qcowfs' read of the state;
     - internal snapshots (whenever the workload has any): qcowfs' table and qemu-img info list the
       same (id, name, VM state size); a snapshot whose creation completed (QEMU-made ones from the
       start) is listed until its deletion starts, one whose deletion completed is not, one being
       created or deleted may be either; nothing else is listed; every listed snapshot reads
       (qcowfs' SnapshotView on every state, qemu-img convert -l snapshot.name=NAME on the sample)
       as the guest disk when it was taken (the model: the guest writes issued before the step).
       While a snapshot step is under way, qemu-img check may exit 2 for OFLAG_COPIED mismatches
       only, and only harmless ones (COPIED set where the refcount above 1 is a leak, or clear on
       refcount 1; -r all repairs them): no order of in-place writes avoids them, QEMU's own
       leaves them too (verify._copied_mismatch_problem). Anything else stays exit 0 or 3;
     - a completed checkpoint: its snapshot and bitmap present; in close mode the bitmaps it
       disabled have their auto flag clear on disk (intent mode: the Tracker's per-bitmap phases).
5. Intent mode (Workload(bitmap_sync="intent"); the Driver opens and reopens with
   Disk(bitmap_sync=...), a reopen may switch modes; the "open" marker says which). The driver's
   markers (guest write started "gw" / returned "gw-done", bitmap create/remove, "bmc" commands:
   clear, disable, enable, merge) are replayed by driver.Tracker into, per bitmap, its exact state as
   of the last completed step (recording or not, the guest writes it recorded since its last clear,
   ranges dirty without a write of its own: QEMU-made bits, merged bits) and the step under way.
   Every crash state of an intent-mode open is checked (verify._check_intent_bitmaps) for:
     - qemu-img check 0 or 3, the guest data, as above; the bitmaps extension never stale;
     - every bitmap present (created -> present, removal completed -> gone), never in_use (QEMU's
       flags and qcowfs' loader), not even while it is being created, "auto" as recording;
     - lower bound: every bit of the exact state as of the last completed step (a write's intent is
       durable before it is issued), except while a clear or the creation is under way;
     - changed data (the issue's superset property): in a granule whose bit is clear, every byte is
       explained without the writes the bitmap recorded (the durable writes it did not record over
       the pristine content, or a value an unflushed write it did not record put there); writes
       while it was disabled, or before its last clear, need no bit;
     - upper bound: no bit outside the 8 MiB intent regions of the writes it recorded and its extra
       ranges (qcowfs marks whole regions, nothing else: a clear or disable that did not reach the
       disk shows here);
     - after a completed clean close: exactly the model's bits;
     - on every nbd_every-th new state (and every state after a close or inside an open) the same
       checks on QEMU's own view of each bitmap (qemu-nbd -B + nbdinfo --map), which must also equal
       qcowfs' reading.
   wl_intent_minimal (not in workloads()) is the negative controls' workload: test_powerloss runs it
   against qcowfs with the intents not written, and with their fdatasync moved after the data.
6. Internal snapshots: snapshot-ops-c4k (close mode) and intent-checkpoint-c4k (intent mode) take and
   delete snapshots through the Driver over QEMU-made ones (q1; vm1 with VM state, from savevm) and
   compressed clusters, and each takes one checkpoint. wl_snapshot_minimal (not in workloads()) is
   the quick controls' workload: it passes as is, and fails with the snapshot steps' flushes deferred.
   For heavier negative controls, run scripts/crash-states with PYTHONPATH naming a broken copy of qcowfs.
7. Discard / zeroing and growing: zero-grow-close-c4k and zero-grow-intent-c4k (4 MiB, 4 KiB clusters, QEMU-made
   snapshot q1 and compressed clusters, bitmap q0). Driver.zero_range (Disk.zero_range) is a guest write of
   zeros in the model ("gw" markers; unflushed, it may or may not have happened; the bitmaps record it).
   Driver.grow (Disk.grow: 4 -> 10 MiB, a new 5-entry L1 table) logs "grow" (old, new) / "grow-done", then
   "gf" (durable when it returns); Model.size/initial become the grown ones (zeros past the old end). Every
   crash state's virtual size (header and qemu-img info) must be the old one before a grow, either while it
   is under way, the new one after; the state is checked at its own size (Model.grows, Expect.sizes). While
   a grow is under way, intent-mode bitmaps may be in_use, or the extension stale (QEMU's in-place in_use
   protocol); nowhere else. QEMU-made snapshots keep their old size (qemu-img convert -l pads them with zeros
   to the grown disk's size: allowed when it does).
8. Encrypted images: a Workload with a passphrase (luks-cow-c64k: LUKS, aes-xts-plain64, 64 KiB clusters)
   has create() write it to a key file (keyed.KEY_FILE, mode 0600) in its directory; Model.passphrase /
   Model.key_file carry it. The Driver opens the image with Model.keys() (qcowfs' Keys), and so does every
   qcowfs open of a crash state (read-only, and the dirty-bit repair); every QEMU tool that opens its data
   (qemu-img check incl. -r all and the OFLAG_COPIED / leak checks, convert incl. -l snapshot.name, qemu-io,
   qemu-nbd) gets the secret object and an --image-opts spec (keyed.py); qemu-img info needs no key. Plain
   workloads run the very same commands as before. Data is encrypted per 512-byte sector with the host
   offset as IV, so copy-on-write re-encrypts and sub-sector writes read-modify-write a sector; the
   checks are the plain ones, on decrypted data (the workload's verify also requires no plaintext on the
   host and a copied cluster re-encrypted for its new place). The Driver serves no write as a request lane
   does on an encrypted image (a mount starts none for it).
"""

from __future__ import annotations

from .driver import BitmapSpec, BmPhase, BmState, Driver, Model, Tracker, expected_bits, state_bits
from .explore import Explorer, Stats, explore_workload, failure_report, total_line
from .iolog import SECTOR, F, IOLog, M, RecordingHostFile, T, W, recording_factory, replay_all
from .verify import Expect, Task, check_state, compare_guest
from .workloads import (
    Bounds,
    Recorded,
    Workload,
    record,
    wl_intent_minimal,
    wl_snapshot_minimal,
    workloads,
)

__all__ = [
    "W",
    "F",
    "T",
    "M",
    "SECTOR",
    "IOLog",
    "RecordingHostFile",
    "recording_factory",
    "replay_all",
    "BitmapSpec",
    "Model",
    "Driver",
    "expected_bits",
    "Bounds",
    "Workload",
    "Recorded",
    "record",
    "workloads",
    "wl_intent_minimal",
    "wl_snapshot_minimal",
    "Expect",
    "Task",
    "check_state",
    "compare_guest",
    "Stats",
    "Explorer",
    "explore_workload",
    "failure_report",
    "total_line",
    "BmState",
    "BmPhase",
    "Tracker",
    "state_bits",
]
