#!/usr/bin/env bash
# Build the Dockerfile's base image from Debian packages, for machines that reach a Debian mirror and
# PyPI but no container registry (python:3.11-slim-bookworm cannot be pulled there). Debian bookworm's
# Python is 3.11, the version the lock was resolved on; a venv at /opt/python on PATH gives the
# `python` and `pip` commands the Dockerfile expects of its base. Needs root (debootstrap, chroot).
#   docker/local-base.sh [ENGINE] [TAG]        e.g. docker/local-base.sh podman localhost/nst-base:bookworm
set -euo pipefail
engine=${1:-podman}
tag=${2:-localhost/nst-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "local-base.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 2; }
root=$(mktemp -d /var/tmp/nst-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -5 "$root.log" >&2; echo "local-base.sh: debootstrap failed (log: $root.log)" >&2; exit 1; }
rm -f "$root.log"
chroot "$root" python3 -m venv /opt/python
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$engine" import \
  --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python"]' - "$tag" >/dev/null
echo "$tag"
