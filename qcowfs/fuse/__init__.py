"""The FUSE layer: Operations, the request loop, host I/O threads, mount and mount options.
The only place that knows pyfuse3 and trio."""
