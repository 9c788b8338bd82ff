#!/bin/bash
# Backup of a dense block volume by backupfs (`block` driver) against Cinder's own copy
# of it: `dd if=<dev> of=<file on the target> bs=1M iflag=direct oflag=direct
# conv=sparse` + sync. Cold (page cache dropped before every run), the two taking
# turns; prints each run, the medians and the ratio dd time / backupfs time (the
# target is at least 1.0). Everything it makes lives in one temporary directory and is
# removed on exit (daemon stopped, mounts and loop devices it made let go).
#
#   sudo contrib/bench/block.sh [--bin PATH] [--runs N] [--size-mb MB]
set -euo pipefail

BIN=target/release/backupfs
RUNS=3
SIZE_MB=1024
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --size-mb) SIZE_MB=$2; shift 2 ;;
        *) echo "usage: $0 [--bin PATH] [--runs N] [--size-mb MB]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
[ -x "$BIN" ] || { echo "no binary $BIN (cargo build --release, or --bin)" >&2; exit 2; }
BIN=$(realpath "$BIN")

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-block-bench.XXXXXX")
DAEMON=""
LOOPS=()
MOUNTS=()
cleanup() {
    if [ -n "$DAEMON" ]; then
        kill -TERM "$DAEMON" 2>/dev/null || true
        wait "$DAEMON" 2>/dev/null || true
    fi
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || true
    done
    for dev in "${LOOPS[@]}"; do losetup -d "$dev" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# The volume: SIZE_MB of random data on a loop device (direct I/O to its file where the
# host filesystem allows it), linked as volume-dense in the block pool.
head -c "${SIZE_MB}M" /dev/urandom > "$WORK/dense.lv"
DEV=$(losetup --direct-io=on -f --show "$WORK/dense.lv" 2>/dev/null ||
      losetup -f --show "$WORK/dense.lv")
LOOPS+=("$DEV")
mkdir "$WORK/vg"
ln -s "$DEV" "$WORK/vg/volume-dense"

# The target: XFS on its own loop device.
truncate -s $((SIZE_MB * 3))M "$WORK/target.fs"
mkfs.xfs -q -f "$WORK/target.fs"
TDEV=$(losetup --direct-io=on -f --show "$WORK/target.fs" 2>/dev/null ||
       losetup -f --show "$WORK/target.fs")
LOOPS+=("$TDEV")
mkdir -p "$WORK/tfs" "$WORK/mnt" "$WORK/state"
mount "$TDEV" "$WORK/tfs"
MOUNTS+=("$WORK/tfs")
mkdir "$WORK/tfs/backups" "$WORK/tfs/dd"

cat > "$WORK/backupfs.toml" <<EOF
state_dir = "$WORK/state"
[backends.lvm]
driver = "block"
pools = { vg = "$WORK/vg" }
[backends.store]
driver = "file"
pools = { backups = "$WORK/tfs/backups" }
[targets.t]
backend = "store"
pool = "backups"
EOF
MOUNTS+=("$WORK/mnt")
"$BIN" mount "$WORK/mnt" --config "$WORK/backupfs.toml" > "$WORK/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do
    grep -q " $WORK/mnt fuse" /proc/mounts && break
    sleep 0.1
done
grep -q " $WORK/mnt fuse" /proc/mounts || { cat "$WORK/daemon.log" >&2; exit 1; }

cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

B=()
D=()
for run in $(seq "$RUNS"); do
    cold
    start=$(now)
    exec 3<>"$WORK/mnt/backups/t/request"
    echo "dense wait" >&3
    read -r id <&3
    exec 3>&-
    end=$(now)
    B+=("$(echo "$end - $start" | bc)")
    [ "$run" = 1 ] && cmp "$WORK/mnt/backups/t/$id.img" "$DEV"
    rm "$WORK/mnt/backups/t/$id.img"

    cold
    start=$(now)
    dd if="$DEV" of="$WORK/tfs/dd/dense.img" bs=1M iflag=direct oflag=direct conv=sparse status=none
    sync
    end=$(now)
    D+=("$(echo "$end - $start" | bc)")
    rm "$WORK/tfs/dd/dense.img"
    echo "run $run: backupfs ${B[-1]} s, dd ${D[-1]} s" >&2
done

mb=$SIZE_MB
bt=$(printf '%s\n' "${B[@]}" | median)
dt=$(printf '%s\n' "${D[@]}" | median)
ratio=$(echo "scale=2; $dt / $bt" | bc)
printf '%-34s %8s %10s  %s\n' "block volume, ${mb} MiB dense, cold" "median" "MiB/s" "runs"
printf '%-34s %7.2fs %10.0f  %s\n' "backupfs (block driver)" "$bt" "$(echo "$mb / $bt" | bc -l)" "${B[*]}"
printf '%-34s %7.2fs %10.0f  %s\n' "dd iflag/oflag=direct conv=sparse" "$dt" "$(echo "$mb / $dt" | bc -l)" "${D[*]}"
verdict=MISS
[ "$(echo "$ratio >= 1.0" | bc)" = 1 ] && verdict=PASS
echo "ratio dd/backupfs: ${ratio}x (target >= 1.0x): $verdict"
