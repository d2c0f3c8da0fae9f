"""`qcowfs backup`: incremental backups of a qcow2 disk into qcow2 chains QEMU reads.

catalog.py  the backup directory: one manifest per backup, pending markers, atomic files
table.py    what each backup's disk looked like, one crc32 per cluster (verify's record)
source.py   the disk backed up: a live mount or an unmounted image (checkpoint, bitmaps, drop)
copier.py   a snapshot's clusters into a new qcow2 file (format/new_image.py's layout)
run.py      one backup, step by step, in crash-safe order (docs/backup.md)
verify.py   re-read a chain and check it against the tables
"""
