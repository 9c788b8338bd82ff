#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, then runs every test.
# Run as root: the tests make loop devices, filesystems and FUSE mounts.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "contrib/test.sh: run as root (the tests mount real filesystems)" >&2
    exit 1
fi

# Package -> a command it provides (python3: the system one, which the tests run as
# other users too).
declare -A needs=(
    [btrfs-progs]=mkfs.btrfs [xfsprogs]=mkfs.xfs [e2fsprogs]=mkfs.ext4
    [fuse3]=fusermount3 [attr]=getfattr [qemu-utils]=qemu-img
    [util-linux]=losetup [jq]=jq [fio]=fio [python3]=/usr/bin/python3
    [passwd]=useradd [coreutils]=timeout [mount]=mount
    # A single-node Ceph cluster for the rbd tests (tests/common/ceph.rs); ceph-common
    # brings librbd1, which backupfs loads at run time.
    [ceph-mon]=ceph-mon [ceph-osd]=ceph-osd [ceph-mgr]=ceph-mgr [ceph-common]=rbd
    # The S3 gateway of tests/s3.rs, started by contrib/ceph-cluster.sh (which also
    # needs curl and uuidgen).
    [radosgw]=radosgw [curl]=curl [uuid-runtime]=uuidgen
    # The throw-away CA and certificate of its https gateway (tests/common/rgw.rs).
    [openssl]=openssl
    # promtool checks the metrics file (tests/operator.rs).
    [prometheus]=promtool
)
missing=()
for package in "${!needs[@]}"; do
    command -v "${needs[$package]}" >/dev/null 2>&1 || missing+=("$package")
done
# python3-venv gives python3 its venv and ensurepip modules (tests/cinder.rs).
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
modprobe -a loop fuse btrfs xfs overlay 2>/dev/null || true

# Cinder's own code for tests/cinder.rs: cinder from PyPI (its wheel holds Cinder's
# unit tests and their fakes) in a virtualenv at a fixed path, made again only when
# the package list below changes.
venv=target/cinder-venv
cinder_packages="cinder==29.0.0 ddt fixtures oslotest testtools"
mkdir -p target
# Two runs in one checkout at once: the second waits while the first makes the
# virtualenv, instead of using (or clearing) a half-made one.
exec 8>target/cinder-venv.lock
flock 8
if [ "$(cat "$venv/packages" 2>/dev/null)" != "$cinder_packages" ]; then
    echo "making $venv: $cinder_packages"
    python3 -m venv --clear "$venv"
    # shellcheck disable=SC2086 # one word per package
    "$venv/bin/pip" install -q --disable-pip-version-check $cinder_packages
    echo "$cinder_packages" > "$venv/packages"
fi
flock -u 8

# --no-fail-fast: a failing test file must not hide the results of the others.
cargo test --all-targets --no-fail-fast -- --test-threads=4
