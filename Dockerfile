# qcowfs in a container. Build:  docker build -t qcowfs .
# Run (FUSE needs the device and CAP_SYS_ADMIN; see README "Docker"):
#   docker run --rm -it --init --device /dev/fuse --cap-add SYS_ADMIN \
#       -v /path/to/images:/images qcowfs mount --foreground /images/x.qcow2 /mnt

# --- build: pyfuse3 is source-only on PyPI and compiles against libfuse3 ------
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev pkg-config libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qcowfs ./qcowfs
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: libfuse3 + fusermount3, and qemu-img for inspecting images ------
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        fuse3 libfuse3-3 qemu-utils \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels qcowfs \
 && rm -rf /wheels \
 && mkdir -p /mnt /images
ENTRYPOINT ["qcowfs"]
CMD ["--help"]
