#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm where no container registry can be reached:
# Debian bookworm (debootstrap --variant=minbase) with Debian's python3 3.11, python3-venv
# and python3-pip, `python` and `pip` on the PATH as in the official image, imported into the
# local engine as one layer.
#
#   deploy/base-image.sh [NAME]          # default NAME: glow-python-base:3.11-bookworm
#   docker build --build-arg PYTHON_IMAGE=glow-python-base:3.11-bookworm -t glow-service .
#
# Does nothing when NAME already exists. Needs root, debootstrap and Debian's archive
# (DEBIAN_MIRROR, default http://deb.debian.org/debian). Takes 2-4 minutes.
set -euo pipefail

NAME=${1:-glow-python-base:3.11-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "base image $NAME: present"
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi

root=$(mktemp -d /var/tmp/glow-base.XXXXXX)
trap 'umount "$root/proc" 2>/dev/null || true; rm -rf "$root"' EXIT

debootstrap --variant=minbase bookworm "$root" "$MIRROR"
mount -t proc proc "$root/proc"
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip
umount "$root/proc"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
# what the image does not need at run time: apt's lists and caches, docs, man pages
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*

tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$NAME"
docker run --rm "$NAME" python -c "import sys, venv, ensurepip; print('base image $NAME: made, python', sys.version.split()[0])"
