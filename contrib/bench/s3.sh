#!/usr/bin/env bash
# backupfs' s3 target against restic, on the same radosgw, same data, one run: a full
# backup of a volume (half random, a quarter text, a quarter hole), an incremental one
# after a 1 % change (scattered 1 MiB pieces), and a restore of the incremental; then the
# same chunk objects fetched in parallel without backupfs (the bound a restore can
# reach). Then as an operator does it: the release daemon mounted, a backup of the
# changed volume requested, and its image copied out of the mount with `cp` (then
# `sync`), against the parallel GET of that backup's objects. Every restore is compared
# with the volume. Prints a table of seconds and ratios, and the bytes each stored.
#
#   contrib/bench/s3.sh                          # starts and stops its own cluster
#   contrib/bench/s3.sh --dir DIR                # a cluster contrib/ceph-cluster.sh
#                                                # started with --rgw-port
#   options: --size-mib N (1024), --profile dev|release (release)
#
# Needs restic (Debian's), jq, bc, and for its own cluster what
# contrib/ceph-cluster.sh needs (ceph-mon ceph-osd ceph-mgr ceph-common radosgw).
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR= SIZE_MIB=1024 PROFILE=release
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --profile) PROFILE=$2; shift 2 ;;
        *) echo "s3.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
for program in restic jq bc radosgw-admin; do
    command -v "$program" >/dev/null || {
        echo "s3.sh: $program is missing (Debian: restic jq bc radosgw)" >&2
        exit 1
    }
done

if [ "$PROFILE" = release ]; then
    cargo build --release --quiet --bin backupfs --example s3_bench
    BENCH=target/release/examples/s3_bench BIN=target/release/backupfs
else
    cargo build --quiet --bin backupfs --example s3_bench
    BENCH=target/debug/examples/s3_bench BIN=target/debug/backupfs
fi

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-s3-bench.XXXXXX")
OWN= OURS= THEIRS= DAEMON_PID=
MNT=$WORK/mnt
cleanup() {
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID"
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    if awk -v m="$MNT" '$2 == m {f=1} END{exit !f}' /proc/mounts; then umount -l "$MNT"; fi
    if [ -n "$OWN" ]; then
        contrib/ceph-cluster.sh stop "$OWN" >/dev/null 2>&1 || true
    else
        # Someone else's cluster: take our two buckets away (a few GiB each run).
        for bucket in $OURS $THEIRS; do
            radosgw-admin bucket rm --bucket="$bucket" --purge-objects --bypass-gc \
                >/dev/null 2>&1 || true
        done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
if [ -z "$DIR" ]; then
    OWN=$WORK/cluster
    contrib/ceph-cluster.sh start "$OWN" --mon-port 3398 --mon-port-v1 6798 --rgw-port 7498 >/dev/null
    DIR=$OWN
fi
PORT=$(sed -n 's/.*endpoint=127.0.0.1:\([0-9]*\).*/\1/p' "$DIR/ceph.conf")
ENDPOINT=http://127.0.0.1:$PORT
export CEPH_CONF=$DIR/ceph.conf
export AWS_ACCESS_KEY_ID=TESTACCESSKEY AWS_SECRET_ACCESS_KEY=TESTSECRETKEY
export RESTIC_PASSWORD=backupfs-bench
RUN=$(date +%s)
OURS=backupfs-bench-$RUN THEIRS=restic-bench-$RUN

(umask 077
 printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
     "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > "$WORK/credentials"
 od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$WORK/key"; echo >> "$WORK/key")

# The volume: random, text, hole. Then a copy with 1 % changed in 1 MiB pieces.
mkdir -p "$WORK/volume" "$WORK/restic-out"
VOL=$WORK/volume/volume-bench
HALF=$((SIZE_MIB / 2)) QUARTER=$((SIZE_MIB / 4))
head -c "$((HALF << 20))" /dev/urandom > "$VOL"
find /usr/share/doc /usr/share/man -type f -name '*' 2>/dev/null | head -20000 | xargs cat 2>/dev/null \
    | head -c "$((QUARTER << 20))" >> "$VOL" || true
truncate -s "$((SIZE_MIB << 20))" "$VOL"
VOL2=$WORK/volume2
cp --sparse=always "$VOL" "$VOL2"
CHANGES=$((SIZE_MIB / 100)); [ "$CHANGES" -ge 1 ] || CHANGES=1
for i in $(seq 1 "$CHANGES"); do
    dd if=/dev/urandom of="$VOL2" bs=1M count=1 seek=$(((i * 7919) % (HALF + QUARTER))) \
        conv=notrunc status=none
done
sync

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }

# backupfs
TIMED=()
[ -x /usr/bin/time ] && TIMED=(/usr/bin/time -f "%M" -o "$WORK/rss.txt")
"${TIMED[@]}" "$BENCH" "$ENDPOINT" "$OURS" "" "$WORK/credentials" "$WORK/key" "$VOL" "$VOL2" \
    "$WORK/backupfs-out" > "$WORK/ours.txt"
cmp "$WORK/backupfs-out" "$VOL2" || { echo "s3.sh: backupfs' restore differs" >&2; exit 1; }
ours() { awk -v s="$1" '$1 == s { print $2 }' "$WORK/ours.txt"; }


# restic, on a bucket of its own on the same gateway
REPO=s3:$ENDPOINT/$THEIRS
restic -r "$REPO" init -q >/dev/null
t0=$(now); restic -r "$REPO" backup -q "$WORK/volume" >/dev/null; t1=$(now)
R_FULL=$(secs "$t0" "$t1")
cp --sparse=always "$VOL2" "$VOL"
t0=$(now); restic -r "$REPO" backup -q "$WORK/volume" >/dev/null; t1=$(now)
R_INCR=$(secs "$t0" "$t1")
t0=$(now); restic -r "$REPO" restore -q latest --target "$WORK/restic-out" >/dev/null; t1=$(now)
R_RESTORE=$(secs "$t0" "$t1")
cmp "$WORK/restic-out$VOL" "$VOL2" || { echo "s3.sh: restic's restore differs" >&2; exit 1; }

stored() {
    radosgw-admin bucket stats --bucket="$1" 2>/dev/null | jq '.usage["rgw.main"].size_actual // 0'
}
B_STORED=$(stored "$OURS") R_STORED=$(stored "$THEIRS")

# Through the mount: the daemon backs the changed volume up (under a prefix of its own,
# after the bytes stored were counted),
# then `cp` copies the image out, and `sync` writes it (the library's restore ends with
# an fsync too); the image's pages are dropped first (nothing read before is cached).
mkdir -p "$MNT" "$WORK/state" "$WORK/pool"
cp --sparse=always "$VOL2" "$WORK/pool/volume-v2"
cat > "$WORK/backupfs.toml" <<EOF
state_dir = "$WORK/state"
[backends.src]
driver = "file"
pools = { p = "$WORK/pool" }
[targets.bench]
kind = "s3"
endpoint = "$ENDPOINT"
bucket = "$OURS"
prefix = "mount/"
credentials = "$WORK/credentials"
encryption_key = "$WORK/key"
EOF
BACKUPFS_LOG=warn "$BIN" mount "$MNT" --config "$WORK/backupfs.toml" </dev/null \
    >>"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 600); do
    awk -v m="$MNT" '$2 == m && $3 ~ /^fuse/ {f=1} END{exit !f}' /proc/mounts && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log" >&2; exit 1; }
    sleep 0.05
done
exec 3<>"$MNT/backups/bench/request"; echo "v2 wait" >&3; read -r MOUNT_ID <&3; exec 3>&-
IMG=$MNT/backups/bench/$MOUNT_ID.img
[ -f "$IMG" ] || { echo "s3.sh: the backup through the mount failed: $MOUNT_ID" >&2; exit 1; }
dd if="$IMG" iflag=nocache count=0 status=none
t0=$(now); cp "$IMG" "$WORK/mount-out"; sync -f "$WORK/mount-out"; t1=$(now)
M_CP=$(secs "$t0" "$t1")
cmp "$WORK/mount-out" "$VOL2" || { echo "s3.sh: the restore through the mount differs" >&2; exit 1; }
rm -f "$WORK/mount-out"
M_GET=$("$BENCH" get "$ENDPOINT" "$OURS" mount/ "$WORK/credentials" "$WORK/key" "$MOUNT_ID" \
    | awk '$1 == "get-all" { print $2 }')

printf '%-28s %10s %10s %8s\n' "${SIZE_MIB} MiB volume" backupfs restic ratio
for step in full incremental restore; do
    case $step in
        full) r=$R_FULL ;; incremental) r=$R_INCR ;; restore) r=$R_RESTORE ;;
    esac
    b=$(ours "$step")
    printf '%-28s %9.2fs %9.2fs %7.2fx\n' "$step" "$b" "$r" "$(echo "$r / $b" | bc -l)"
done
printf '%-28s %9.2fs %10s %7.2fx\n' "parallel GET of the chunks" "$(ours get-all)" "" \
    "$(echo "$(ours get-all) / $(ours restore)" | bc -l)"
printf '%-28s %9.2fs %10s\n' "restore by cp from the mount" "$M_CP" ""
printf '%-28s %9.2fs %10s %7.2fx\n' "parallel GET of its chunks" "$M_GET" "" \
    "$(echo "$M_GET / $M_CP" | bc -l)"
printf '%-28s %10s %10s\n' "stored bytes" "$B_STORED" "$R_STORED"
[ -s "$WORK/rss.txt" ] && printf '%-28s %9s KiB\n' "backupfs peak RSS (one pass)" "$(tail -1 "$WORK/rss.txt")"
echo "ratio: restic's time / backupfs' (above 1: backupfs faster); for the parallel GET:"
echo "its time / the restore above it (the share of the raw fetch speed a restore reaches)."
