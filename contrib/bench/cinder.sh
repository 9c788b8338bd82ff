#!/usr/bin/env bash
# Cinder's default backup driver against the backupfs Cinder driver (issue 14): the
# same volume of random data backed up and restored by Cinder's PosixBackupDriver
# (zlib, its defaults) and by backupfs_cinder, through Cinder's own objects.
#
#   contrib/bench/cinder.sh [--size-gb N] [--runs N] [--no-build] [--bin PATH]
#
# Run as root. It needs the virtualenv with Cinder that ./contrib/test.sh makes
# (target/cinder-venv), builds the release binary, makes two XFS filesystems on loop
# devices (volumes; backups), mounts backupfs, and prints time and peak RSS of each
# step (median of --runs, default 3; the largest RSS) and the ratios. Everything it
# made is removed on exit, also on failure.
set -euo pipefail
export LC_ALL=C

SIZE_GB=1
RUNS=3
BUILD=1
BIN=
usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}
while [ $# -gt 0 ]; do
    case "$1" in
    --size-gb) SIZE_GB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --bin) BIN=$2; BUILD=0; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "cinder.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
for n in "$SIZE_GB" "$RUNS"; do
    case "$n" in '' | *[!0-9]* | 0) echo "cinder.sh: --size-gb and --runs want a positive number" >&2; exit 2 ;; esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=$REPO/target/cinder-venv/bin/python
die() { echo "cinder.sh: $*" >&2; exit 1; }
log() { echo "cinder.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (loop devices, filesystems, a FUSE mount, drop_caches)"
[ -x "$PYTHON" ] || die "$PYTHON is missing: ./contrib/test.sh makes the virtualenv with Cinder"
[ -x /usr/bin/time ] || die "/usr/bin/time is missing: apt-get install time"
if [ -z "$BIN" ]; then BIN=$REPO/target/release/backupfs; fi
if [ "$BUILD" = 1 ]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
fi
[ -x "$BIN" ] || die "$BIN is not an executable (build it, or pass --bin PATH)"

T=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-cinder-bench.XXXXXX")
MNT=$T/mnt
DAEMON_PID=
MOUNTS=()
LOOPS=()
cleanup() {
    local rc=$? i
    set +e
    trap - EXIT INT TERM
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        wait "$DAEMON_PID" 2>/dev/null
    fi
    if grep -qs " $MNT " /proc/mounts; then umount -l "$MNT"; fi
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[$i]}" || umount -l "${MOUNTS[$i]}"; done
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do losetup -d "${LOOPS[$i]}"; done
    if ! grep -qs "$T" /proc/mounts; then rm -rf "$T"; else echo "cinder.sh: left $T (still mounted)" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

make_fs() { # name size-gb
    local img=$T/$1.xfs dev
    truncate -s "$2G" "$img"
    mkfs.xfs -q -f "$img" >/dev/null
    dev=$(losetup -f --show --direct-io=on "$img" 2>/dev/null || losetup -f --show "$img")
    LOOPS+=("$dev")
    mkdir -p "$T/$1"
    mount "$dev" "$T/$1"
    MOUNTS+=("$T/$1")
}
# Volumes: the source and two restores. Backups: the posix driver's and backupfs'.
make_fs volfs $((SIZE_GB * 3 + 2))
make_fs backupfs $((SIZE_GB * 3 + 2))
VOLUMES=$T/volfs/volumes
mkdir -p "$VOLUMES" "$T/backupfs/posix" "$T/backupfs/backupfs" "$T/state" "$MNT"

cat >"$T/backupfs.toml" <<EOF
state_dir = "$T/state"
[backends.cinder]
driver = "file"
pools = { volumes = "$VOLUMES" }
[backends.store]
driver = "file"
pools = { backups = "$T/backupfs/backupfs" }
[targets.t]
backend = "store"
pool = "backups"
EOF
"$BIN" mount "$MNT" --config "$T/backupfs.toml" </dev/null >"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 200); do
    grep -qs " $MNT fuse" /proc/mounts && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$T/daemon.log" >&2; die "backupfs exited"; }
    sleep 0.1
done
grep -qs " $MNT fuse" /proc/mounts || die "backupfs did not mount"

STATE=$T/state.json
cat >"$STATE" <<EOF
{"posix_path": "$T/backupfs/posix", "mountpoint": "$MNT", "target": "t"}
EOF
export PYTHONPATH=$REPO/contrib/cinder
run_py() { "$PYTHON" "$REPO/contrib/bench/cinder_bench.py" "$STATE" "$@"; }
step() { # step args... -> STEP_SECONDS (the driver call), STEP_RSS_KIB (the process)
    /usr/bin/time -f %M -o "$T/time.out" "$PYTHON" "$REPO/contrib/bench/cinder_bench.py" \
        "$STATE" "$@" >"$T/step.out" 2>"$T/step.err" || { cat "$T/step.err" >&2; die "step $* failed"; }
    STEP_SECONDS=$(awk '/^seconds / {print $2}' "$T/step.out")
    STEP_RSS_KIB=$(tail -n1 "$T/time.out")
}
state() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$STATE" "$1"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status"; }
mib() { awk -v k="$1" 'BEGIN{printf "%.0f", k/1024}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", a/b}'; }

log "writing a $SIZE_GB GiB volume of random data"
run_py init "$VOLUMES" "$SIZE_GB" 2>"$T/step.err" || { cat "$T/step.err" >&2; die "init failed"; }
SOURCE=$VOLUMES/volume-$(state volume_id)
step idle
IDLE_RSS_KIB=$STEP_RSS_KIB

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{if(NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
maxof() { printf '%s\n' "$@" | sort -g | tail -n1; }
declare -A SECS RSS DAEMON RUNS_OF STORED
for run in $(seq "$RUNS"); do
    # The drivers take turns, so that noise on the machine spreads over both.
    for driver in posix backupfs; do
        for what in backup restore; do
            log "run $run/$RUNS, $driver: $what"
            drop_caches
            echo 5 >"/proc/$DAEMON_PID/clear_refs"
            step "$what" "$driver"
            SECS[$driver.$what]+="$STEP_SECONDS "
            RSS[$driver.$what]=$(maxof "${RSS[$driver.$what]:-0}" "$STEP_RSS_KIB")
            DAEMON[$driver.$what]=$(maxof "${DAEMON[$driver.$what]:-0}" "$(hwm_kib)")
        done
        restored=$(state "restored_$driver")
        cmp -s "$SOURCE" "$restored" || die "the $driver driver's restore differs from the volume"
        rm "$restored"
        if [ "$run" = "$RUNS" ]; then
            STORED[$driver]=$(du -sm "$T/backupfs/$driver" | cut -f1)
        fi
        step delete "$driver"
    done
done
for key in "${!SECS[@]}"; do
    # shellcheck disable=SC2086 # one word per run
    RUNS_OF[$key]=${SECS[$key]% }
    SECS[$key]=$(median ${SECS[$key]})
done

echo "Cinder backup drivers, one $SIZE_GB GiB volume of random data; volumes and backups"
echo "on two XFS loop filesystems; page cache dropped before each step; restores checked."
echo
printf '%-8s %-22s %8s %7s %14s %14s  %s\n' step driver seconds MiB/s "process RSS" "daemon RSS" runs
for what in backup restore; do
    for driver in posix backupfs; do
        label=$driver
        [ "$driver" = posix ] && label="posix (zlib, defaults)"
        daemon=-
        [ "$driver" = backupfs ] && daemon="$(mib "${DAEMON[$driver.$what]}") MiB"
        printf '%-8s %-22s %8.2f %7.0f %10s MiB %14s  %s\n' "$what" "$label" "${SECS[$driver.$what]}" \
            "$(awk -v s="${SECS[$driver.$what]}" -v g="$SIZE_GB" 'BEGIN{print g*1024/s}')" \
            "$(mib "${RSS[$driver.$what]}")" "$daemon" "${RUNS_OF[$driver.$what]}"
    done
done
echo
for what in backup restore; do
    posix_mem=${RSS[posix.$what]}
    backupfs_mem=$((RSS[backupfs.$what] + DAEMON[backupfs.$what]))
    echo "$what: backupfs $(ratio "${SECS[posix.$what]}" "${SECS[backupfs.$what]}")x faster;" \
        "peak memory $(mib "$posix_mem") MiB (posix) against $(mib "$backupfs_mem") MiB" \
        "(backupfs driver process + daemon), $(ratio "$posix_mem" "$backupfs_mem")x less"
done
echo "A Python process with Cinder imported and nothing done: $(mib "$IDLE_RSS_KIB") MiB."
echo "Stored: posix ${STORED[posix]} MiB, backupfs ${STORED[backupfs]} MiB (random data does not compress)."
echo "Seconds are the driver call alone (Cinder's imports excluded), the median of $RUNS runs;"
echo "process RSS is the largest peak of a step's process (/usr/bin/time), daemon RSS the"
echo "largest VmHWM of backupfs during the step."
