"""qcowfs: serve a qcow2 image's guest disk as one raw file over FUSE."""

__version__ = "0.1.0"
