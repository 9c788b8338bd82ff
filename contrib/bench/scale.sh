#!/usr/bin/env bash
# backupfs benchmark of cost that follows the work (project issue 28): full backups of
# dense volumes of growing size, a 1 TiB sparse volume holding a few GiB, and an
# incremental backup of it after 64 MiB changed. See contrib/bench/README.md, "scale.sh".
#
#   contrib/bench/scale.sh [--sizes-mib "256 1024 4096"] [--sparse-gib 1024]
#                          [--data-mib 4096] [--changed-mib 64] [--runs N]
#                          [--no-build] [--bin PATH]
#
# Run as root. The same two XFS loop filesystems as hand.sh (sparse 12 GiB image files:
# needs about 2 x --data-mib of free disk under $TMPDIR, default /var/tmp). Each backup is
# timed through the mount (`echo "<vol> [incremental] wait" > request`), caches dropped
# first; printed: seconds, MiB/s of data, and the record's figures.
set -euo pipefail
export LC_ALL=C

SIZES="256 1024 4096"
SPARSE_GIB=1024
DATA_MIB=4096
CHANGED_MIB=64
RUNS=2
BUILD=1
BIN=
FS_MB=12288
PERF_DIR=

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
    --sizes-mib) SIZES=$2; shift 2 ;;
    --sparse-gib) SPARSE_GIB=$2; shift 2 ;;
    --data-mib) DATA_MIB=$2; shift 2 ;;
    --changed-mib) CHANGED_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --bin) BIN=$2; BUILD=0; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "scale.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
die() { echo "scale.sh: $*" >&2; exit 1; }
log() { echo "[$(date -u +%T)] $*" >&2; }
[ "$(id -u)" = 0 ] || die "run as root"
for tool in mkfs.xfs losetup jq /usr/bin/time; do
    command -v "$tool" >/dev/null || die "needs $tool"
done
[ -z "$PERF_DIR" ] || command -v perf >/dev/null || die "--perf needs perf (linux-perf)"
[ -n "$BIN" ] || BIN=$REPO/target/release/backupfs
if [ "$BUILD" = 1 ]; then (cd "$REPO" && cargo build --release --quiet) || die "build failed"; fi
[ -x "$BIN" ] || die "$BIN is not an executable"

T=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-scale.XXXXXX")
MNT=$T/mnt
DAEMON_PID=
PERF_PID=
FS_MOUNTS=()
LOOPS=()
cleanup() {
    local rc=$? i
    set +e
    trap - EXIT INT TERM
    [ -z "$PERF_PID" ] || { kill -INT "$PERF_PID"; wait "$PERF_PID"; }
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID"
        wait "$DAEMON_PID" 2>/dev/null
    fi
    grep -qs " $MNT " /proc/mounts && umount -l "$MNT"
    for ((i = ${#FS_MOUNTS[@]} - 1; i >= 0; i--)); do umount "${FS_MOUNTS[$i]}" 2>/dev/null || umount -l "${FS_MOUNTS[$i]}"; done
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do losetup -d "${LOOPS[$i]}"; done
    grep -qs "$T" /proc/mounts || rm -rf "$T"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{if(NR%2) print a[(NR+1)/2]; else printf "%.3f\n",(a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "0.00"; else printf "%.2f", a/b }'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
timed() { local t0; t0=$(now); "$@"; LAST=$(elapsed "$t0" "$(now)"); }
ROWS=()
report() { ROWS+=("$(printf '%-62s %s' "$1" "$2")"); printf '%-62s %s\n' "$1" "$2"; }

make_fs() {
    local img=$T/$1.xfs mnt=$T/$1 dev
    truncate -s "${FS_MB}M" "$img"
    mkfs.xfs -q -f "$img"
    dev=$(losetup -f --show --direct-io=on "$img" 2>/dev/null || losetup -f --show "$img")
    LOOPS+=("$dev")
    mkdir -p "$mnt"
    mount "$dev" "$mnt"
    FS_MOUNTS+=("$mnt")
}
make_fs srcfs
make_fs dstfs
SRC_POOL=$T/srcfs/vols
DST_POOL=$T/dstfs/backups
mkdir -p "$SRC_POOL" "$DST_POOL" "$T/state" "$MNT"
cat >"$T/backupfs.toml" <<EOF
state_dir = "$T/state"

[backends.src]
driver = "file"
pools = { vols = "$SRC_POOL" }

[backends.dst]
driver = "file"
pools = { backups = "$DST_POOL" }

[targets.t]
backend = "dst"
pool = "backups"
EOF
is_mounted() { awk -v m="$MNT" '$2 == m && $3 ~ /^fuse/ {f=1} END{exit !f}' /proc/mounts; }
start_daemon() {
    BACKUPFS_LOG=${BACKUPFS_LOG:-warn} "$BIN" mount "$MNT" --config "$T/backupfs.toml" \
        </dev/null >>"$T/daemon.log" 2>&1 &
    DAEMON_PID=$!
    # Start-up reads every record, several times: minutes with 100,000 backups on a busy
    # machine whose caches someone drops.
    local until=$((SECONDS + 600))
    while [ "$SECONDS" -lt "$until" ]; do
        is_mounted && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$T/daemon.log" >&2; die "backupfs exited"; }
        sleep 0.05
    done
    die "backupfs did not mount"
}
stop_daemon() {
    kill -TERM "$DAEMON_PID"
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
    for _ in $(seq 100); do is_mounted || break; sleep 0.1; done
}
perf_start() { # name
    [ -n "$PERF_DIR" ] || return 0
    mkdir -p "$PERF_DIR"
    perf record -q -g -p "$DAEMON_PID" -o "$PERF_DIR/$1.data" 2>/dev/null &
    PERF_PID=$!
    sleep 0.5
}
perf_stop() { # name
    [ -n "$PERF_PID" ] || return 0
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true; PERF_PID=
    perf_summary "$1"
}
perf_summary() { # name: where the time went, callers included, by symbol
    perf report -i "$PERF_DIR/$1.data" --children --sort sym --percent-limit 3 --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -n 25 >"$PERF_DIR/$1.txt" || true
    echo "perf ($1): $PERF_DIR/$1.txt"
}
daemon_cpu_ms() { cat "/proc/$DAEMON_PID"/task/*/schedstat | awk '{s+=$1} END{printf "%.0f", s/1e6}'; }
start_daemon
REQ=$MNT/backups/t/request
backup() { # volume -> BACKUP_ID (waits for it)
    local fd id
    exec {fd}<>"$REQ"
    echo "$1 wait" >&"$fd" || die "backup of $1 failed"
    read -r id <&"$fd" || true
    exec {fd}>&-
    [ -n "$id" ] || die "no backup id for $1"
    BACKUP_ID=$id
}
log "sandbox $T, backupfs $("$BIN" --version 2>/dev/null || echo '?') ($(git -C "$REPO" describe --always --dirty))"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
record_field() { jq -r ".$2" "$DST_POOL/backup-$1.json"; }
timed_backup() { # request line (without wait) -> LAST (seconds), BACKUP_ID
    drop_caches
    local t0; t0=$(now)
    backup "$1"
    LAST=$(elapsed "$t0" "$(now)")
}
rate() { awk -v m="$1" -v s="$2" 'BEGIN{ if (s+0 == 0) print "-"; else printf "%.0f", m/s }'; }

# ---------------------------------------------------------------- dense volumes
for mib in $SIZES; do
    log "dense volume of $mib MiB"
    head -c "${mib}M" /dev/urandom >"$SRC_POOL/volume-dense-$mib"
    runs=()
    for _ in $(seq "$RUNS"); do
        timed_backup "dense-$mib"; runs+=("$LAST")
        rm "$MNT/backups/t/$BACKUP_ID.img"
    done
    rm -f "$SRC_POOL/volume-dense-$mib"
    m=$(median "${runs[@]}")
    report "full backup, dense $mib MiB (runs: ${runs[*]})" "${m}s, $(rate "$mib" "$m") MiB/s"
done

# ---------------------------------------------------------------- sparse 1 TiB
log "sparse volume of $SPARSE_GIB GiB holding $DATA_MIB MiB"
VOL=$SRC_POOL/volume-sparse
truncate -s "${SPARSE_GIB}G" "$VOL"
# The data in 64 MiB pieces spread evenly over the volume (the same places every run).
pieces=$((DATA_MIB / 64))
stride=$((SPARSE_GIB * 1024 / pieces))
for i in $(seq 0 $((pieces - 1))); do
    head -c 64M /dev/urandom | dd of="$VOL" bs=1M seek=$((i * stride)) conv=notrunc status=none
done
runs=()
for _ in $(seq "$RUNS"); do
    timed_backup "sparse"; runs+=("$LAST")
    stored=$(record_field "$BACKUP_ID" stored_bytes)
    rm "$MNT/backups/t/$BACKUP_ID.img"
done
m=$(median "${runs[@]}")
report "full backup, $SPARSE_GIB GiB sparse holding $DATA_MIB MiB (runs: ${runs[*]}; stored $((stored >> 20)) MiB)" \
    "${m}s, $(rate "$DATA_MIB" "$m") MiB/s of data"

# ---------------------------------------------------------------- incremental
runs=()
for r in $(seq "$RUNS"); do
    log "incremental run $r: full, $CHANGED_MIB MiB changed, incremental"
    backup "sparse incremental"
    full=$BACKUP_ID
    # 1 MiB pieces at scattered places inside the data (fixed per run).
    awk -v n="$CHANGED_MIB" -v p="$pieces" -v s="$stride" -v seed="$r" \
        'BEGIN{srand(seed); for (i = 0; i < n; i++) print int(rand() * p) * s + int(rand() * 64)}' |
        sort -un | while read -r at; do
            head -c 1M /dev/urandom | dd of="$VOL" bs=1M seek="$at" conv=notrunc status=none
        done
    timed_backup "sparse incremental"; runs+=("$LAST")
    inc=$BACKUP_ID
    [ "$(record_field "$inc" parent_id)" = "$full" ] || die "incremental $inc does not name $full as its parent"
    found=$(record_field "$inc" changes_found_by)
    changed=$(record_field "$inc" changed_bytes)
    if [ "$r" = "$RUNS" ]; then
        # Where the data is (a cmp of the whole 1 TiB would read it all), and the size.
        [ "$(stat -c %s "$DST_POOL/backup-$inc.img")" = "$(stat -c %s "$VOL")" ] || die "incremental backup $inc has another size"
        for i in $(seq 0 $((pieces - 1))); do
            cmp -s <(dd if="$DST_POOL/backup-$inc.img" bs=1M skip=$((i * stride)) count=64 status=none) \
                <(dd if="$VOL" bs=1M skip=$((i * stride)) count=64 status=none) ||
                die "incremental backup $inc differs from the volume in piece $i"
        done
    fi
    rm "$MNT/backups/t/$inc.img" "$MNT/backups/t/$full.img"
done
m=$(median "${runs[@]}")
report "incremental of the $SPARSE_GIB GiB volume after $CHANGED_MIB MiB changed (runs: ${runs[*]}; $found, changed $((changed >> 20)) MiB)" "${m}s"
rm -f "$VOL"

printf '\n'; printf '%s\n' "${ROWS[@]}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
