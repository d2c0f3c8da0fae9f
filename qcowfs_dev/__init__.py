"""qcowfs's development tools, and what they share with the tests (not part of qcowfs itself).

Shared with tests/:
- proc: run a command (output captured, failures shown), wait for a condition by polling;
- oracles: QEMU's tools as the oracle: qemu-img, qemu-io, qemu-img check/info/convert, dirty
  bitmaps and allocation maps as QEMU serves them (qemu-nbd read with nbdinfo);
- mounts: the one lifecycle of a qcowfs daemon and its mount (start, wait until mounted, unmount
  with retries, kill, lazy detach of dead mounts, diagnostics);
- probes: raw qcow2 readers (header fields, extensions, L1/L2 entries, refcounts, the bitmap
  directory) written with struct from the specification, independent of qcowfs;
- fio: fio job files, replayed I/O logs and checked JSON results;
- powerloss: the power-loss crash-state harness (tests/harness/test_powerloss.py, scripts/crash-states).

The tools behind scripts/ (each script is a thin entry point):
- bench: scripts/bench, fio against qcowfs, QEMU's FUSE export and a pass-through ceiling;
- ceiling_fs: the ceiling, a pass-through pyfuse3 file system (also the bench's slow host);
- soak: scripts/soak; crash_states: scripts/crash-states; fuzz: scripts/fuzz;
  bench_snapshots: scripts/bench-snapshots.

Nothing here imports pytest; failures of the shared helpers raise AssertionError (pytest reports
it as a test failure; scripts catch it).
"""
