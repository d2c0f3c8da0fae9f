# qcowfs in a container. Build:  docker build -t qcowfs .
# Run (FUSE needs the device and CAP_SYS_ADMIN; see README "Docker"):
#   docker run --rm -it --init --device /dev/fuse --cap-add SYS_ADMIN \
#       -v /path/to/images:/images qcowfs mount --foreground /images/x.qcow2 /mnt

# --- build: qcowfs' patched pyfuse3 (discard/zeroing, SEEK_DATA/SEEK_HOLE, several requests in
# flight, write views), compiled against libfuse3, and qcowfs, in one venv --------------------
# The stock pyfuse3 from PyPI would work too, but serves one request at a time and answers
# fallocate and SEEK_DATA/SEEK_HOLE with EOPNOTSUPP: the same scripts/build-pyfuse3 that
# scripts/setup runs builds the patched one here.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev pkg-config libfuse3-dev patch \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qcowfs ./qcowfs
COPY patches ./patches
COPY scripts/build-pyfuse3 ./scripts/build-pyfuse3
RUN python -m venv /opt/qcowfs \
 && bash scripts/build-pyfuse3 /opt/qcowfs/bin/python \
 && /opt/qcowfs/bin/pip install --no-cache-dir --no-input . \
 && /opt/qcowfs/bin/python -c 'import pyfuse3, inspect, sys; \
sys.exit(not ("+qcowfs" in pyfuse3.__version__ and "wait_readable" in inspect.signature(pyfuse3.main).parameters))'

# --- runtime: the venv (same base image, so the same /usr/local/bin/python3.11), libfuse3 +
# fusermount3, and qemu-img for inspecting images ---------------------------------------------
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        fuse3 libfuse3-3 qemu-utils \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/qcowfs /opt/qcowfs
RUN ln -s /opt/qcowfs/bin/qcowfs /usr/local/bin/qcowfs \
 && mkdir -p /mnt /images
ENTRYPOINT ["qcowfs"]
CMD ["--help"]
