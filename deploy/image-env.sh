#!/usr/bin/env bash
# Prepares what `make test-image` needs on a machine with no Docker engine and no image
# registry: Debian's docker.io and debootstrap, a private dockerd (no bridge, no iptables:
# containers run with --network host and reach only loopback), and the Dockerfile's base image
# (debian:bookworm-slim) built with debootstrap from Debian's own packages.
# Usage: deploy/image-env.sh <state dir>   (prints the DOCKER_HOST to use on its last line)
set -euo pipefail
state=$(realpath -m "${1:-.image-test}")
mkdir -p "$state"
socket="$state/docker.sock"
export DOCKER_HOST="unix://$socket"
docker=/usr/bin/docker  # docker.io's client, matching its daemon

missing=()
command -v dockerd > /dev/null || missing+=(docker.io)
command -v debootstrap > /dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  apt-get install -y -q --no-install-recommends "${missing[@]}" > "$state/apt.log" 2>&1 \
    || { apt-get update -q >> "$state/apt.log" 2>&1 \
         && apt-get install -y -q --no-install-recommends "${missing[@]}" >> "$state/apt.log" 2>&1; }
fi

if ! "$docker" info > /dev/null 2>&1; then
  nohup dockerd --host "$DOCKER_HOST" --bridge=none --iptables=false --ip6tables=false \
    --data-root "$state/data" --exec-root "$state/exec" --pidfile "$state/dockerd.pid" \
    > "$state/dockerd.log" 2>&1 &
  for _ in $(seq 1 100); do
    "$docker" info > /dev/null 2>&1 && break
    sleep 0.2
  done
  "$docker" info > /dev/null || { tail -20 "$state/dockerd.log" >&2; exit 1; }
fi

if ! "$docker" image inspect debian:bookworm-slim > /dev/null 2>&1; then
  rootfs="$state/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian \
    > "$state/debootstrap.log" 2>&1 || { tail -20 "$state/debootstrap.log" >&2; exit 1; }
  # What the official slim image does too: no caches, no docs.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  tar -C "$rootfs" -c . | "$docker" import - debian:bookworm-slim > /dev/null
  rm -rf "$rootfs"
fi
echo "$DOCKER_HOST"
