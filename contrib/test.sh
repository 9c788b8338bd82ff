#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, then runs every test.
# Run as root: the tests make loop devices, filesystems and FUSE mounts.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "contrib/test.sh: run as root (the tests mount real filesystems)" >&2
    exit 1
fi

# Package -> a command it provides.
declare -A needs=(
    [btrfs-progs]=mkfs.btrfs [xfsprogs]=mkfs.xfs [e2fsprogs]=mkfs.ext4
    [fuse3]=fusermount3 [attr]=getfattr [qemu-utils]=qemu-img
    [util-linux]=losetup [jq]=jq [fio]=fio [python3]=python3
    # A single-node Ceph cluster for the rbd tests (tests/common/ceph.rs); ceph-common
    # brings librbd1, which backupfs loads at run time.
    [ceph-mon]=ceph-mon [ceph-osd]=ceph-osd [ceph-mgr]=ceph-mgr [ceph-common]=rbd
)
missing=()
for package in "${!needs[@]}"; do
    command -v "${needs[$package]}" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
modprobe -a loop fuse btrfs xfs 2>/dev/null || true

cargo test --all-targets -- --test-threads=4
