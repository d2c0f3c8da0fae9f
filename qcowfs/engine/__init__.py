"""The engine: an image and the parts it owns (host file, L2 cache and mapping,
refcounts, read and write paths, snapshots, bitmaps, resize, check and repair, locks).
No pyfuse3, no trio: the FUSE layer above calls it; it imports only qcowfs.format and qcowfs.errors."""
