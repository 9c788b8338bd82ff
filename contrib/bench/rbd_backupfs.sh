#!/usr/bin/env bash
# backupfs with an `rbd` backend against Ceph's own tools, on a throw-away single-node
# cluster (contrib/bench/ceph_cluster.sh) or an existing one: a 1 GiB dense RBD volume
#   - backed up to a file target    vs  rbd export to a file + sync -f
#   - backed up to an RBD target    vs  rbd export - | rbd import -, and rbd deep cp
#     (librbd's own copy: the storage-assisted path the generic copy was measured against)
#   - an image restored by cp onto a new RBD volume node  vs  rbd import
# with the daemon's peak RSS (VmHWM) over all of it. Prints a table with the ratios
# (peer time / backupfs time: >= 1.0 means backupfs is at least as fast).
#
#   sudo contrib/bench/rbd_backupfs.sh [--runs N] [--size-mib N] [--no-build]
#   contrib/bench/rbd_backupfs.sh --conf /etc/ceph/ceph.conf --volumes rbd --backups backups
#
# Needs ceph-mon ceph-osd ceph-mgr ceph-common (contrib/test.sh installs them), jq, fuse3
# and GNU time. About 3 minutes on a 2-core VM (plus a release build).
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."

CONF= CLIENT=admin VOLUMES=bench-volumes BACKUPS=bench-backups SIZE_MIB=1024 RUNS=3 BUILD=1 BIN=
while [ $# -gt 0 ]; do
    case "$1" in
        --conf) CONF=$2; shift 2 ;;
        --client) CLIENT=$2; shift 2 ;;
        --volumes) VOLUMES=$2; shift 2 ;;
        --backups) BACKUPS=$2; shift 2 ;;
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --bin) BIN=$2; BUILD=0; shift 2 ;;
        *) echo "rbd_backupfs.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "rbd_backupfs.sh: run as root (FUSE mount, drop_caches)" >&2; exit 1; }
for tool in /usr/bin/time jq fusermount3 rbd; do
    command -v "$tool" >/dev/null || { echo "rbd_backupfs.sh: needs $tool" >&2; exit 1; }
done
[ "$BUILD" = 0 ] || cargo build --release --quiet
BIN=${BIN:-$PWD/target/release/backupfs}

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-rbd-backupfs.XXXXXX")
MNT=$WORK/mnt
DAEMON_PID=
# shellcheck source=contrib/bench/ceph_cluster.sh
. contrib/bench/ceph_cluster.sh

cleanup() {
    set +e
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    grep -qs " $MNT " /proc/mounts && umount -l "$MNT"
    stop_cluster
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[${SECONDS}s] $*" >&2; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

[ -n "$CONF" ] || start_cluster
export CEPH_CONF=$CONF
for pool in "$VOLUMES" "$BACKUPS"; do
    if ! timeout 60 ceph osd pool ls | grep -qx "$pool"; then
        timeout 60 ceph osd pool create "$pool" 8 >/dev/null
        timeout 60 rbd pool init "$pool"
    fi
done
log "pools $VOLUMES and $BACKUPS ready"

mkdir -p "$WORK"/{files,peer,state,mnt}
SOURCE=$WORK/source.raw
head -c "${SIZE_MIB}M" /dev/urandom >"$SOURCE"
timeout 300 rbd import --no-progress "$SOURCE" "$VOLUMES/volume-vol-dense"
SUM=$(sha256sum "$SOURCE" | cut -d' ' -f1)

cat >"$WORK/backupfs.toml" <<EOF
state_dir = "$WORK/state"

[backends.ceph]
driver = "rbd"
ceph_conf = "$CONF"
client = "$CLIENT"
pools = { volumes = "$VOLUMES", backups = "$BACKUPS" }

[backends.local]
driver = "file"
pools = { backups = "$WORK/files" }

[targets.rbd]
backend = "ceph"
pool = "backups"

[targets.files]
backend = "local"
pool = "backups"
EOF
# DAEMON_ENV: extra environment for the daemon (e.g. GLIBC_TUNABLES=...), for experiments.
env ${DAEMON_ENV:-} "$BIN" mount "$MNT" --config "$WORK/backupfs.toml" </dev/null >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 300); do
    grep -qs " $MNT fuse" /proc/mounts && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log" >&2; exit 1; }
    sleep 0.1
done
grep -qs " $MNT fuse" /proc/mounts || { cat "$WORK/daemon.log" >&2; exit 1; }
echo 5 >"/proc/$DAEMON_PID/clear_refs"
IDLE_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON_PID/status")

# backup TARGET: a backup of vol-dense through the mount (`wait`); sets ID.
backup() {
    local fd
    exec {fd}<>"$MNT/backups/$1/request"
    echo "vol-dense wait" >&"$fd" || { cat "$WORK/daemon.log" >&2; exit 1; }
    read -r ID <&"$fd"
    exec {fd}>&-
}
RESULTS=$WORK/results
# Each group's first row is backupfs; the others are compared with it.
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "${3:-0}" "${4:-}" >>"$RESULTS"; }
# CPU seconds the daemon has used so far (user + system).
daemon_cpu() { awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / hz}' "/proc/$DAEMON_PID/stat"; }
cpu_since() { awk -v a="$1" -v b="$(daemon_cpu)" 'BEGIN{printf "%.2f", b-a}'; }
timed() { # label command...: the time, and the CPU time of the command's processes
    local t0 t1
    t0=$(now)
    /usr/bin/time -f '%U %S' -o "$WORK/cpu" "${@:2}" >/dev/null 2>"$WORK/err" ||
        { cat "$WORK/err" >&2; exit 1; }
    t1=$(now)
    record "$1" "$(elapsed "$t0" "$t1")" "$(awk '{printf "%.2f", $1 + $2}' "$WORK/cpu")"
}
# A backupfs row: the time, the daemon's CPU time and its peak RSS meanwhile.
hwm_mib() { awk '/^VmHWM:/ {printf "%d", $2 / 1024}' "/proc/$DAEMON_PID/status"; }
timed_daemon() { # label command...
    local t0 t1 c0
    echo 5 >"/proc/$DAEMON_PID/clear_refs"
    c0=$(daemon_cpu); t0=$(now)
    "${@:2}" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
    t1=$(now)
    record "$1" "$(elapsed "$t0" "$t1")" "$(cpu_since "$c0")" "$(hwm_mib)"
}
# Deletions leave the OSD busy for a moment (trimming, freeing): let it finish, so the
# next row is not charged for the last one's clean-up.
settle() { sync; sleep 4; }
# Runs the given steps in turn, in the opposite order on even runs, so that neither side
# always goes first.
in_turn() {
    local steps=("$@") i
    if [ $((run % 2)) = 0 ]; then
        for ((i = ${#steps[@]} - 1; i >= 0; i--)); do "${steps[$i]}"; done
    else
        for i in "${steps[@]}"; do "$i"; done
    fi
}
FILE_IMG= FILE_ID= RBD_IMG=
file_backupfs() {
    drop_caches
    timed_daemon "backup to a file target: backupfs" backup files
    [ -z "$FILE_IMG" ] || rm "$FILE_IMG"
    FILE_ID=$ID FILE_IMG=$MNT/backups/files/$ID.img
}
file_export() {
    drop_caches
    timed "backup to a file target: rbd export FILE; sync -f" \
        bash -c "rbd export --no-progress $VOLUMES/volume-vol-dense $WORK/peer/export.raw && sync -f $WORK/peer/export.raw"
    rm -f "$WORK/peer/export.raw"
}
rbd_backupfs() {
    timed_daemon "backup to an RBD target: backupfs" backup rbd
    RBD_IMG=$MNT/backups/rbd/$ID.img
}
rbd_pipe() {
    timed "backup to an RBD target: rbd export - | rbd import -" \
        bash -c "set -o pipefail; rbd export --no-progress $VOLUMES/volume-vol-dense - | rbd import --no-progress - $BACKUPS/peer-copy"
}
rbd_deep() {
    timed "backup to an RBD target: rbd deep cp (librbd's copy)" \
        rbd deep cp --no-progress "$VOLUMES/volume-vol-dense" "$BACKUPS/peer-deep"
}
restore_cp() {
    drop_caches
    timed_daemon "restore onto an RBD volume: backupfs, cp image volumes/ceph/<new>" \
        cp "$FILE_IMG" "$MNT/volumes/ceph/restored-$run"
}
restore_import() {
    drop_caches
    timed "restore onto an RBD volume: rbd import" \
        rbd import --no-progress "$WORK/files/backup-$FILE_ID.img" "$VOLUMES/volume-imported-$run"
}
for run in $(seq "$RUNS"); do
    log "run $run/$RUNS"
    # 1. to a file target vs rbd export to a file
    in_turn file_backupfs file_export
    # 2. to an RBD target vs export | import, and librbd's deep copy
    in_turn rbd_backupfs rbd_pipe rbd_deep
    [ "$run" != "$RUNS" ] || [ "$(sha256sum <"$RBD_IMG" | cut -d' ' -f1)" = "$SUM" ] ||
        { echo "the RBD-stored backup differs from its volume" >&2; exit 1; }
    rm "$RBD_IMG"
    timeout 300 rbd rm --no-progress "$BACKUPS/peer-copy" >/dev/null 2>&1
    timeout 300 rbd rm --no-progress "$BACKUPS/peer-deep" >/dev/null 2>&1
    settle
    # 3. restore an image onto a new RBD volume node vs rbd import
    in_turn restore_cp restore_import
    [ "$run" != "$RUNS" ] || [ "$(sha256sum <"$MNT/volumes/ceph/restored-$run" | cut -d' ' -f1)" = "$SUM" ] ||
        { echo "the restored volume differs from its source" >&2; exit 1; }
    timeout 300 rbd rm --no-progress "$VOLUMES/volume-restored-$run" >/dev/null 2>&1
    timeout 300 rbd rm --no-progress "$VOLUMES/volume-imported-$run" >/dev/null 2>&1
    settle
done
# The largest of the rows' peaks (each row resets the daemon's VmHWM before it starts).
PEAK_MIB=$(awk -F'\t' '$4 != "" && $4 + 0 > m { m = $4 + 0 } END { print m + 0 }' "$RESULTS")

echo "${SIZE_MIB} MiB dense RBD volume, median of $RUNS runs; ratio = peer / backupfs (>= 1.0: backupfs at least as fast);"
echo "CPU s = mean CPU time of the process(es) (backupfs: the daemon's), the cluster's own not counted;"
echo "peak RSS = the daemon's VmHWM during that row (largest of the runs)"
awk -F'\t' -v size="$SIZE_MIB" '
    !($1 in n) { order[++rows] = $1 }
    { n[$1]++; t[$1, n[$1]] = $2; cpu[$1] += $3; if ($4 != "" && $4 > rss[$1]) rss[$1] = $4 }
    END {
        for (r = 1; r <= rows; r++) {
            k = order[r]; m = n[k]
            for (i = 1; i <= m; i++) v[i] = t[k, i]
            for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { x = v[i]; v[i] = v[j]; v[j] = x }
            med[k] = (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
            runs[k] = ""; for (i = 1; i <= m; i++) runs[k] = runs[k] sprintf(" %.2f", t[k, i])
        }
        printf "%-62s %8s %8s %6s %6s %8s   %s\n", "", "median s", "MiB/s", "ratio", "CPU s", "peak RSS", "runs (s)"
        for (r = 1; r <= rows; r++) {
            k = order[r]; group = substr(k, 1, index(k, ": ") - 1)
            if (group != last) { base = k; last = group }
            ratio = (k == base) ? "" : sprintf("%.2f", med[k] / med[base])
            peak = (k in rss) ? sprintf("%d MiB", rss[k]) : ""
            printf "%-62s %8.2f %8.1f %6s %6.2f %8s  %s\n", k, med[k], size / med[k], ratio, cpu[k] / n[k], peak, runs[k]
        }
    }' "$RESULTS"
printf 'daemon RSS after start %d MiB; peak RSS (VmHWM) over all of it: %d MiB (target <= 128 MiB)\n' \
    $((IDLE_KIB / 1024)) "$PEAK_MIB"
