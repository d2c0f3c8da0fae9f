"""The qcow2 on-disk format: declared structures, entry encodings, the snapshot table,
compressed cluster bodies. No I/O, and nothing above it: it imports only qcowfs.errors."""
