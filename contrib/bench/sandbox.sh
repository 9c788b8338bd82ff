# The sandbox hand.sh and scale.sh share, sourced by them with BENCH set to the script's
# name (and FS_MB, BUILD, BIN, PERF_DIR as their options set them): the release build,
# two XFS loop filesystems (source and target pools), the daemon and its mount, clean-up
# at exit of everything made here and nothing else, and the helpers `backup`, `log`,
# `die`, `drop_caches`, `now`. Not meant to be run on its own.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
die() { echo "$BENCH.sh: $*" >&2; exit 1; }
log() { echo "[$(date -u +%T)] $*" >&2; }
[ "$(id -u)" = 0 ] || die "run as root"
for tool in mkfs.xfs losetup jq /usr/bin/time; do
    command -v "$tool" >/dev/null || die "needs $tool"
done
[ -z "$PERF_DIR" ] || command -v perf >/dev/null || die "--perf needs perf (linux-perf)"
[ -n "$BIN" ] || BIN=$REPO/target/release/backupfs
if [ "$BUILD" = 1 ]; then (cd "$REPO" && cargo build --release --quiet) || die "build failed"; fi
[ -x "$BIN" ] || die "$BIN is not an executable"

T=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-$BENCH.XXXXXX")
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
