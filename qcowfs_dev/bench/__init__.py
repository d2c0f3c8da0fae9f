"""scripts/bench: fio against qcowfs, QEMU's own FUSE export and a pass-through ceiling.

What the bench does and its options: cli (`python -m qcowfs_dev.bench --help`). Modules:
- jobs: the fio jobs, presets and target names; how a job becomes an fio run and what it returns;
- host: commands, processes and images on the host (fill, qemu-img), the bench's errors and log;
- qemu10: qemu-storage-daemon 10.0 unpacked from bookworm-backports next to the system's QEMU;
- targets: the mounted guest disks fio runs against (qcowfs and its variants, QEMU, the ceiling);
- run: the run itself (images, mounts, repeats interleaved and rotated, peak RSS);
- stats: medians of the repeats, ratios between targets;
- report: the table, the chart's title, the JSON document; chart: the PNG (matplotlib);
- cli: the command line.
"""
