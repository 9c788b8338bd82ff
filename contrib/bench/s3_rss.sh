#!/usr/bin/env bash
# Peak memory of the daemon while it backs up N volumes at once to an s3 target (issue 29:
# at most 256 MiB with four), through the mount as an operator would: N requests with
# `wait` written at the same moment, then VmHWM of the daemon, the wall time, and the
# restore of one image by `cmp` against its volume.
#
#   contrib/bench/s3_rss.sh [--volumes N] [--size-mib M] [--runs R]   # 4, 1024, 1
#
# Starts its own Ceph cluster with radosgw (contrib/ceph-cluster.sh, ports 3395/6795/
# 7495: none a test uses) and stops it at the end; builds the release binary. Needs curl (bucket creation,
# SigV4), and what contrib/ceph-cluster.sh needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=4 SIZE_MIB=1024 RUNS=1
while [ $# -gt 0 ]; do
    case $1 in
        --volumes) N=$2; shift 2 ;;
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        *) echo "usage: $0 [--volumes N] [--size-mib M] [--runs R]" >&2; exit 2 ;;
    esac
done
cargo build --release --quiet
BIN=$PWD/target/release/backupfs

T=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-s3-rss.XXXXXX")
MNT=$T/mnt DAEMON_PID= CLUSTER=
cleanup() {
    set +e
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID"
        wait "$DAEMON_PID" 2>/dev/null
    fi
    awk -v m="$MNT" '$2 == m {f=1} END{exit !f}' /proc/mounts && umount -l "$MNT"
    [ -z "$CLUSTER" ] || contrib/ceph-cluster.sh stop "$CLUSTER" >/dev/null 2>&1
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CLUSTER=$T/cluster
contrib/ceph-cluster.sh start "$CLUSTER" --mon-port 3395 --mon-port-v1 6795 --rgw-port 7495 >/dev/null
ENDPOINT=http://127.0.0.1:7495
BUCKET=rss-$(date +%s)
curl -sf -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user TESTACCESSKEY:TESTSECRETKEY \
    -X PUT "$ENDPOINT/$BUCKET" >/dev/null
(umask 077
 printf '[default]\naws_access_key_id = TESTACCESSKEY\naws_secret_access_key = TESTSECRETKEY\n' \
     > "$T/credentials")
"$BIN" keygen "$T/key" >/dev/null

mkdir -p "$MNT" "$T/state" "$T/pool"
for i in $(seq "$N"); do head -c "$((SIZE_MIB << 20))" /dev/urandom > "$T/pool/volume-v$i"; done
cat > "$T/backupfs.toml" <<EOF
state_dir = "$T/state"
[backends.src]
driver = "file"
pools = { p = "$T/pool" }
[targets.off]
kind = "s3"
endpoint = "$ENDPOINT"
bucket = "$BUCKET"
credentials = "$T/credentials"
encryption_key = "$T/key"
EOF
BACKUPFS_LOG=warn "$BIN" mount "$MNT" --config "$T/backupfs.toml" </dev/null >>"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 600); do
    awk -v m="$MNT" '$2 == m && $3 ~ /^fuse/ {f=1} END{exit !f}' /proc/mounts && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$T/daemon.log" >&2; exit 1; }
    sleep 0.05
done

for r in $(seq "$RUNS"); do
    before=$(awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$DAEMON_PID/status")
    echo 5 > "/proc/$DAEMON_PID/clear_refs"
    sync; echo 3 > /proc/sys/vm/drop_caches
    t0=$(date +%s.%N)
    pids=()
    for i in $(seq "$N"); do
        (exec 3<>"$MNT/backups/off/request"; echo "v$i wait" >&3; read -r id <&3; echo "$id" > "$T/id-$r-$i") &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || { cat "$T/daemon.log" >&2; echo "a backup failed" >&2; exit 1; }; done
    t1=$(date +%s.%N)
    peak=$(awk '/^VmHWM:/ {printf "%.1f", $2/1024}' "/proc/$DAEMON_PID/status")
    id=$(cat "$T/id-$r-1")
    cmp "$MNT/backups/off/$id.img" "$T/pool/volume-v1" || { echo "the image differs" >&2; exit 1; }
    printf 'run %d: %d backups of %d MiB at once to s3: %.1f s; daemon RSS before %s MiB, peak %s MiB (target <= 256)\n' \
        "$r" "$N" "$SIZE_MIB" "$(echo "$t1 - $t0" | bc -l)" "$before" "$peak"
    for i in $(seq "$N"); do rm "$MNT/backups/off/$(cat "$T/id-$r-$i").img"; done
done
