#!/usr/bin/env bash
# backupfs benchmark (project issue 5): backupfs against the tools an operator would
# otherwise use, on one machine, in one run, side by side. See contrib/bench/README.md.
#
#   contrib/bench/bench.sh [--json FILE] [--runs N] [--fio-runtime S] [--no-build] [--bin PATH]
#
# Run as root on a Debian machine: it installs what it lacks, builds the release binary,
# makes two XFS filesystems on loop devices (source pool, target pool), mounts backupfs,
# measures, prints a table and writes the same as JSON. Everything it made is removed on
# exit, also on failure or Ctrl-C. A target that is missed is reported (MISS), never an
# error: the exit status is non-zero only when the benchmark itself could not run.
set -euo pipefail
export LC_ALL=C

JSON=/tmp/backupfs-bench.json
RUNS=3
FIO_RUNTIME=10
BUILD=1
BIN=
# Sizes (MiB). The sparse volume holds SPARSE_DATA_PCT % of its size as 1 MiB pieces.
RAND_MB=1024
SPARSE_MB=2048
SPARSE_DATA_PCT=10
CONC_N=8
CONC_MB=256
# The incremental volume (issue 13): dense, INC_PCT % of it rewritten in scattered 64 KiB
# pieces before each incremental backup.
INC_MB=2048
INC_PCT=1
FS_MB=16384
RSS_TARGET_MIB=64

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}
while [ $# -gt 0 ]; do
    case "$1" in
    --json) JSON=$2; shift 2 ;;
    --json=*) JSON=${1#*=}; shift ;;
    --runs) RUNS=$2; shift 2 ;;
    --fio-runtime) FIO_RUNTIME=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --bin) BIN=$2; BUILD=0; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
case "$RUNS" in '' | *[!0-9]* | 0) echo "bench.sh: --runs wants a positive number" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "$0")/../.." && pwd)
STARTED=$EPOCHREALTIME

log() { printf '[%6.1fs] %s\n' "$(awk -v a="$STARTED" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')" "$*" >&2; }
die() { echo "bench.sh: $*" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
    die "run as root (it makes loop devices, filesystems and a FUSE mount, and drops caches)"
fi

# ---------------------------------------------------------------- tools
declare -A needs=(
    [fio]=fio [btrfs-progs]=mkfs.btrfs [xfsprogs]=mkfs.xfs [qemu-utils]=qemu-img
    [jq]=jq [time]=/usr/bin/time [fuse3]=fusermount3 [util-linux]=losetup
    [coreutils]=shuf
)
missing=()
for package in "${!needs[@]}"; do
    command -v "${needs[$package]}" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Optional: the chunking backup tools that section 5 compares with, where Debian has them.
optional=()
command -v restic >/dev/null 2>&1 || optional+=(restic)
command -v borg >/dev/null 2>&1 || optional+=(borgbackup)
if [ ${#optional[@]} -gt 0 ]; then
    log "installing if available: ${optional[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${optional[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq "${optional[@]}" >/dev/null 2>&1; } ||
        log "could not install ${optional[*]}: section 5 goes without them"
fi
modprobe -a loop fuse xfs 2>/dev/null || true

if [ -z "$BIN" ]; then
    BIN=$REPO/target/release/backupfs
fi
if [ "$BUILD" = 1 ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) or pass --bin PATH"
    log "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
fi
[ -x "$BIN" ] || die "$BIN is not an executable (build it, or pass --bin PATH)"
VERSION=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)

# ---------------------------------------------------------------- sandbox and cleanup
T=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-bench.XXXXXX")
MNT=$T/mnt
DAEMON_PID=
FS_MOUNTS=()
LOOPS=()
DAEMON_LOG_KEEP=${JSON%.json}.daemon.log

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID"
        wait "$DAEMON_PID" 2>/dev/null
    fi
    if grep -qs " $MNT " /proc/mounts; then umount -l "$MNT"; fi
    local i
    for ((i = ${#FS_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${FS_MOUNTS[$i]}" 2>/dev/null || umount -l "${FS_MOUNTS[$i]}"
    done
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do losetup -d "${LOOPS[$i]}" 2>/dev/null; done
    [ -f "$T/daemon.log" ] && cp "$T/daemon.log" "$DAEMON_LOG_KEEP" 2>/dev/null
    if ! grep -qs "$T" /proc/mounts; then rm -rf "$T"; else echo "bench.sh: left $T (still mounted)" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{if(NR%2) print a[(NR+1)/2]; else printf "%.3f\n",(a[NR/2]+a[NR/2+1])/2}'; }
maxof() { printf '%s\n' "$@" | sort -g | tail -n1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "0.00"; else printf "%.2f", a/b }'; }
mibps() { awk -v mb="$1" -v s="$2" 'BEGIN{ if (s+0 == 0) print "-"; else printf "%.0f", mb/s }'; }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
BACKING=$(df --output=source "$T" | tail -n1)
log "sandbox $T (on $BACKING)"

# Two XFS filesystems, each on its own loop device over its own image file.
LOOP_DIO=on
make_fs() { # name -> mountpoint
    local img=$T/$1.xfs mnt=$T/$1 dev
    truncate -s "${FS_MB}M" "$img"
    mkfs.xfs -q -f "$img" >/dev/null
    if ! dev=$(losetup -f --show --direct-io=on "$img" 2>/dev/null); then
        LOOP_DIO=off
        dev=$(losetup -f --show "$img")
    fi
    LOOPS+=("$dev")
    mkdir -p "$mnt"
    mount "$dev" "$mnt"
    FS_MOUNTS+=("$mnt")
}
make_fs srcfs
make_fs dstfs
SRC_POOL=$T/srcfs/vols
DST_POOL=$T/dstfs/backups
PEER_DIR=$T/dstfs/peer
mkdir -p "$SRC_POOL" "$DST_POOL" "$PEER_DIR" "$T/state" "$MNT"

# ---------------------------------------------------------------- volumes
log "writing volumes: ${RAND_MB} MiB random, ${SPARSE_MB} MiB with ${SPARSE_DATA_PCT}% data, ${CONC_N} x ${CONC_MB} MiB random, ${INC_MB} MiB random"
head -c "${RAND_MB}M" /dev/urandom >"$SRC_POOL/volume-vol-rand"
SPARSE=$SRC_POOL/volume-vol-sparse
truncate -s "${SPARSE_MB}M" "$SPARSE"
PIECES=$((SPARSE_MB * SPARSE_DATA_PCT / 100))
# The same spread every run: 1 MiB pieces at distinct random MiB offsets.
for slot in $(shuf -i 0-$((SPARSE_MB - 1)) -n "$PIECES" --random-source=<(yes backupfs)); do
    dd if=/dev/urandom of="$SPARSE" bs=1M count=1 seek="$slot" conv=notrunc status=none
done
for i in $(seq "$CONC_N"); do
    head -c "${CONC_MB}M" /dev/urandom >"$SRC_POOL/volume-vol-c$i"
done
head -c "${INC_MB}M" /dev/urandom >"$SRC_POOL/volume-vol-inc"
sync

# ---------------------------------------------------------------- daemon
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
BACKUPFS_LOG=${BACKUPFS_LOG:-info,fuser=warn} "$BIN" mount "$MNT" --config "$T/backupfs.toml" \
    </dev/null >"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
is_mounted() { awk -v m="$MNT" '$2 == m && $3 ~ /^fuse/ {f=1} END{exit !f}' /proc/mounts; }
for _ in $(seq 200); do
    is_mounted && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$T/daemon.log" >&2; die "backupfs exited before mounting"; }
    sleep 0.1
done
is_mounted || { cat "$T/daemon.log" >&2; die "backupfs did not mount $MNT within 20 s"; }
log "backupfs $VERSION mounted (pid $DAEMON_PID)"
REQ=$MNT/backups/t/request
JOBS=$MNT/backups/t/jobs

# A backup's data file in the target pool (issue 10 gave it a name no volume driver uses).
backing_of() { echo "$DST_POOL/backup-$1.img"; }

hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status"; }
reset_hwm() { echo 5 >"/proc/$DAEMON_PID/clear_refs"; }
kib_to_mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
RSS_IDLE_KIB=$(hwm_kib)

# A backup through the mount; sets BACKUP_ID. With `wait` the write returns once the job
# has ended (and fails with its errno if it failed); the id is read back from the same file.
backup_via_mount() { # volume [wait]
    local fd id line=$1${2:+ $2}
    exec {fd}<>"$REQ"
    if ! echo "$line" >&"$fd"; then exec {fd}>&-; die "backup request '$line' failed (log: $DAEMON_LOG_KEEP)"; fi
    read -r id <&"$fd" || true
    exec {fd}>&-
    [ -n "$id" ] || die "no backup id after '$line'"
    BACKUP_ID=$id
}

# ---------------------------------------------------------------- results
ROWS=()             # keys in print order
declare -A LABEL SECTION UNIT RUNS_OF MED RATE RSS_MIB CMP DETAIL
SECTIONS=()
declare -A SECTION_TITLE
TARGETS=()          # "name|measured|op|wanted|unit|result|detail"

section() { SECTIONS+=("$1"); SECTION_TITLE[$1]=$2; }
# row KEY SECTION LABEL UNIT RUNS...; the median lands in MED[KEY].
row() {
    local key=$1 sec=$2 label=$3 unit=$4
    shift 4
    ROWS+=("$key")
    SECTION[$key]=$sec LABEL[$key]=$label UNIT[$key]=$unit RUNS_OF[$key]="$*"
    MED[$key]=$(median "$@")
}
target() { # name measured op wanted unit detail [must-also-hold: 0 forces MISS]
    local result=MISS
    if [ "${7:-1}" = 1 ] && awk -v m="$2" -v w="$4" -v op="$3" 'BEGIN{exit !(op == ">=" ? m >= w : m <= w)}'; then result=PASS; fi
    TARGETS+=("$1|$2|$3|$4|$5|$result|$6")
}

# Times one command run by a shell (for the peers); appends to the named arrays.
PEER_RSS_KIB=0
time_peer() { # command-string -> LAST_SECS, LAST_RSS_KIB
    local t0 t1
    t0=$(now)
    /usr/bin/time -f %M -o "$T/time.out" bash -c "$1" || die "failed: $1"
    t1=$(now)
    LAST_SECS=$(elapsed "$t0" "$t1")
    LAST_RSS_KIB=$(tail -n1 "$T/time.out")
}
q() { printf '%q' "$1"; }

# ================================================================ 1. full backups
section backup "1. full backup, source pool and target pool on different XFS loop filesystems"
reset_hwm
declare -A KEEP_ID
TAG_RAND=random
TAG_SPARSE=sparse
# fio O_DIRECT sequential 2 MiB requests over `mb` MiB of a file, at a queue depth; prints
# the seconds that took (size / fio's bandwidth). A write ends with fsync, as a backup does.
fio_seconds() { # read|write depth file mb
    local rw=$1 depth=$2 file=$3 mb=$4 extra=(--readonly) field=read
    [ "$rw" = write ] && extra=(--fallocate=none --end_fsync=1) field=write
    fio --name=ceiling --filename="$file" --rw="$rw" --bs=2M --direct=1 --ioengine=libaio \
        --iodepth="$depth" --size="${mb}M" "${extra[@]}" --output-format=json 2>"$T/fio.err" |
        jq --arg f "$field" --argjson mb "$mb" '$mb * 1048576 / .jobs[0][$f].bw_bytes * 1000 | round / 1000' ||
        { cat "$T/fio.err" >&2; die "fio $rw on $file failed"; }
}
bench_backup() { # volume-id size-mb tag title
    local vol=$1 mb=$2 tag=$3 title=$4 src=$SRC_POOL/volume-$1 dst=$PEER_DIR/copy-$1 r prev=
    local -a t_bfs=() t_dd=() t_cp=() t_qemu=() c_r1=() c_r4=() c_w4=()
    local rss_dd=0 rss_cp=0 rss_qemu=0
    for r in $(seq "$RUNS"); do
        log "backup $vol: run $r/$RUNS"
        # backupfs: the previous run's backup is deleted through the mount first.
        if [ -n "$prev" ]; then rm "$MNT/backups/t/$prev.img"; fi
        drop_caches
        local t0 t1
        t0=$(now)
        backup_via_mount "$vol" wait
        t1=$(now)
        t_bfs+=("$(elapsed "$t0" "$t1")")
        prev=$BACKUP_ID
        # dd exactly as Cinder's copy_volume runs it (O_DIRECT both ways, no sync needed).
        # dd with Cinder's copy_volume flags; synced like the others (issue 11: "each synced").
        rm -f "$dst"; drop_caches
        time_peer "dd if=$(q "$src") of=$(q "$dst") bs=1M iflag=direct oflag=direct conv=sparse status=none && sync -f $(q "$dst")"
        t_dd+=("$LAST_SECS"); rss_dd=$(maxof "$rss_dd" "$LAST_RSS_KIB")
        rm -f "$dst"; drop_caches
        time_peer "cp --sparse=always --reflink=never $(q "$src") $(q "$dst") && sync -f $(q "$dst")"
        t_cp+=("$LAST_SECS"); rss_cp=$(maxof "$rss_cp" "$LAST_RSS_KIB")
        rm -f "$dst"; drop_caches
        time_peer "qemu-img convert -O raw $(q "$src") $(q "$dst") && sync -f $(q "$dst")"
        t_qemu+=("$LAST_SECS"); rss_qemu=$(maxof "$rss_qemu" "$LAST_RSS_KIB")
        rm -f "$dst"
        if [ "$tag" = "$TAG_RAND" ]; then
            # The device's ceiling, in the same turn as the copies (issue 11).
            drop_caches; c_r1+=("$(fio_seconds read 1 "$src" "$mb")")
            drop_caches; c_r4+=("$(fio_seconds read 4 "$src" "$mb")")
            drop_caches; c_w4+=("$(fio_seconds write 4 "$PEER_DIR/fio-ceiling" "$mb")")
            rm -f "$PEER_DIR/fio-ceiling"
        fi
    done
    KEEP_ID[$tag]=$prev
    row "backup.$tag.backupfs" backup "$title: backupfs  echo \"$vol wait\" > request" s "${t_bfs[@]}"
    row "backup.$tag.dd" backup "$title: dd bs=1M iflag=direct oflag=direct conv=sparse; sync -f" s "${t_dd[@]}"
    row "backup.$tag.cp" backup "$title: cp --sparse=always --reflink=never; sync -f" s "${t_cp[@]}"
    row "backup.$tag.qemu" backup "$title: qemu-img convert -O raw; sync -f" s "${t_qemu[@]}"
    local k peers="dd cp qemu"
    if [ "$tag" = "$TAG_RAND" ]; then
        row "backup.$tag.fio_read_qd1" backup "ceiling: fio O_DIRECT 2 MiB seq. reads, libaio QD1, source fs (s for ${mb} MiB)" s "${c_r1[@]}"
        row "backup.$tag.fio_read_qd4" backup "ceiling: fio O_DIRECT 2 MiB seq. reads, libaio QD4, source fs (s for ${mb} MiB)" s "${c_r4[@]}"
        row "backup.$tag.fio_write_qd4" backup "ceiling: fio O_DIRECT 2 MiB seq. writes, libaio QD4, target fs, fsync (s)" s "${c_w4[@]}"
        peers="$peers fio_read_qd1 fio_read_qd4 fio_write_qd4"
    fi
    for k in backupfs $peers; do RATE[backup.$tag.$k]=$(mibps "$mb" "${MED[backup.$tag.$k]}"); done
    RSS_MIB[backup.$tag.dd]=$(kib_to_mib "$rss_dd")
    RSS_MIB[backup.$tag.cp]=$(kib_to_mib "$rss_cp")
    RSS_MIB[backup.$tag.qemu]=$(kib_to_mib "$rss_qemu")
    for k in $peers; do CMP[backup.$tag.$k]=$(ratio "${MED[backup.$tag.$k]}" "${MED[backup.$tag.backupfs]}"); done
}
bench_backup vol-rand "$RAND_MB" "$TAG_RAND" "${RAND_MB} MiB random"
bench_backup vol-sparse "$SPARSE_MB" "$TAG_SPARSE" "${SPARSE_MB} MiB, ${SPARSE_DATA_PCT}% data"
RSS_BACKUP_KIB=$(hwm_kib)
# Fast but wrong would not count: the kept backups must equal their sources.
for tag in "$TAG_RAND" "$TAG_SPARSE"; do
    vol=vol-rand; [ "$tag" = "$TAG_SPARSE" ] && vol=vol-sparse
    cmp -s "$(backing_of "${KEEP_ID[$tag]}")" "$SRC_POOL/volume-$vol" || die "backup ${KEEP_ID[$tag]} differs from $vol"
done
RSS_MIB[backup.$TAG_RAND.backupfs]=$(kib_to_mib "$RSS_BACKUP_KIB")
RSS_MIB[backup.$TAG_SPARSE.backupfs]=$(kib_to_mib "$RSS_BACKUP_KIB")

# ================================================================ 2. image reads
section read "2. reading the backup image of the random volume: through the mount vs its backing file"
reset_hwm
IMG_ID=${KEEP_ID[$TAG_RAND]}
IMG_MNT=$MNT/backups/t/$IMG_ID.img
IMG_DIRECT=$(backing_of "$IMG_ID")
IMG_BYTES=$(stat -c %s "$IMG_DIRECT")
time_cat() { local t0 t1; t0=$(now); cat "$1" >/dev/null; t1=$(now); LAST_SECS=$(elapsed "$t0" "$t1"); }
# A cold read must find neither the image's pages (kept by FOPEN_KEEP_CACHE on the mount's
# inode) nor its backing file's in the page cache: both files are dropped explicitly
# (fadvise DONTNEED through dd), then everything else, and fincore checks what is left.
COLD_RESIDENT_MAX=0
drop_image_caches() {
    dd if="$IMG_MNT" iflag=nocache count=0 status=none
    dd if="$IMG_DIRECT" iflag=nocache count=0 status=none
    drop_caches
    local f bytes
    for f in "$IMG_MNT" "$IMG_DIRECT"; do
        bytes=$(fincore -b -n -o RES "$f" 2>/dev/null | tr -d ' ')
        COLD_RESIDENT_MAX=$(maxof "$COLD_RESIDENT_MAX" "${bytes:-0}")
    done
}
declare -a c_m=() c_d=() w_m=() w_d=() f_m=() f_d=()
for r in $(seq "$RUNS"); do
    log "cold cat: run $r/$RUNS"
    drop_image_caches; time_cat "$IMG_MNT"; c_m+=("$LAST_SECS")
    drop_image_caches; time_cat "$IMG_DIRECT"; c_d+=("$LAST_SECS")
done
# Warm reads are cheap: at least 5 turns, taken in turns like everything else.
log "warm cat"
cat "$IMG_MNT" >/dev/null
cat "$IMG_DIRECT" >/dev/null
WARM_RUNS=$((RUNS > 5 ? RUNS : 5))
for r in $(seq "$WARM_RUNS"); do
    time_cat "$IMG_MNT"; w_m+=("$LAST_SECS")
    time_cat "$IMG_DIRECT"; w_d+=("$LAST_SECS")
done
# A fresh fio process, so a fresh open of the image (a new FUSE file handle), and
# --invalidate=1, so fio itself drops the file's pages once more as it opens it. Both
# sides start cold and read the same offsets in the same order (fio's fixed random seed).
fio_iops() {
    fio --name=r --filename="$1" --rw=randread --bs=4k --size="$IMG_BYTES" --runtime="$FIO_RUNTIME" \
        --time_based --ioengine=psync --invalidate=1 --readonly --output-format=json 2>"$T/fio.err" |
        jq '.jobs[0].read.iops | floor' || { cat "$T/fio.err" >&2; die "fio on $1 failed"; }
}
for r in $(seq "$RUNS"); do
    log "fio 4k random reads, ${FIO_RUNTIME}s each: run $r/$RUNS"
    drop_image_caches; f_m+=("$(fio_iops "$IMG_MNT")")
    drop_image_caches; f_d+=("$(fio_iops "$IMG_DIRECT")")
done
row read.cold.mnt read "cat image > /dev/null, cold: through the mount" s "${c_m[@]}"
row read.cold.direct read "cat image > /dev/null, cold: backing file" s "${c_d[@]}"
row read.warm.mnt read "cat image > /dev/null, warm: through the mount" s "${w_m[@]}"
row read.warm.direct read "cat image > /dev/null, warm: backing file" s "${w_d[@]}"
row read.fio.mnt read "fio 4k randread psync --invalidate=1 ${FIO_RUNTIME}s, from cold: through the mount" IOPS "${f_m[@]}"
row read.fio.direct read "fio 4k randread psync --invalidate=1 ${FIO_RUNTIME}s, from cold: backing file" IOPS "${f_d[@]}"
IMG_MB=$((IMG_BYTES >> 20))
for k in read.cold.mnt read.cold.direct read.warm.mnt read.warm.direct; do RATE[$k]=$(mibps "$IMG_MB" "${MED[$k]}"); done
CMP[read.cold.direct]=$(ratio "${MED[read.cold.direct]}" "${MED[read.cold.mnt]}")
CMP[read.warm.direct]=$(ratio "${MED[read.warm.direct]}" "${MED[read.warm.mnt]}")
CMP[read.fio.direct]=$(ratio "${MED[read.fio.mnt]}" "${MED[read.fio.direct]}")

# ================================================================ 3. restore
section restore "3. restore of the random volume's backup to a new volume (on the source filesystem)"
declare -a r_m=() r_d=() r_c=()
prev_m= prev_d= prev_c=
for r in $(seq "$RUNS"); do
    log "restore: run $r/$RUNS"
    # A new name each run: the kernel may still cache the previous name's entry.
    [ -n "$prev_m" ] && rm -f "$SRC_POOL/volume-$prev_m"
    prev_m=rest-m-$r
    drop_caches
    time_peer "cp --sparse=always $(q "$IMG_MNT") $(q "$MNT/volumes/src/$prev_m") && sync -f $(q "$SRC_POOL")"
    r_m+=("$LAST_SECS")
    [ -n "$prev_d" ] && rm -f "$SRC_POOL/volume-$prev_d"
    prev_d=rest-d-$r
    drop_caches
    time_peer "cp --sparse=always $(q "$IMG_DIRECT") $(q "$SRC_POOL/volume-$prev_d") && sync -f $(q "$SRC_POOL")"
    r_d+=("$LAST_SECS")
    # Plain cp calls copy_file_range, which the daemon serves itself (server-side copy).
    [ -n "$prev_c" ] && rm -f "$SRC_POOL/volume-$prev_c"
    prev_c=rest-c-$r
    drop_caches
    time_peer "cp $(q "$IMG_MNT") $(q "$MNT/volumes/src/$prev_c") && sync -f $(q "$SRC_POOL")"
    r_c+=("$LAST_SECS")
done
cmp -s "$SRC_POOL/volume-$prev_c" "$SRC_POOL/volume-vol-rand" || die "the volume restored by server-side copy differs from its source"
cmp -s "$SRC_POOL/volume-$prev_m" "$SRC_POOL/volume-vol-rand" || die "the volume restored through the mount differs from its source"
row restore.mnt restore "cp --sparse=always image volumes/src/NEW; sync -f: through the mount" s "${r_m[@]}"
row restore.direct restore "cp --sparse=always backing file to pool; sync -f: direct" s "${r_d[@]}"
row restore.cfr restore "cp (copy_file_range, server-side) image volumes/src/NEW; sync -f: mount" s "${r_c[@]}"
RATE[restore.cfr]=$(mibps "$IMG_MB" "${MED[restore.cfr]}")
RATE[restore.mnt]=$(mibps "$IMG_MB" "${MED[restore.mnt]}")
RATE[restore.direct]=$(mibps "$IMG_MB" "${MED[restore.direct]}")
CMP[restore.direct]=$(ratio "${MED[restore.direct]}" "${MED[restore.mnt]}")
RSS_READ_RESTORE_KIB=$(hwm_kib)
RSS_MIB[restore.mnt]=$(kib_to_mib "$RSS_READ_RESTORE_KIB")
RSS_MIB[read.cold.mnt]=$(kib_to_mib "$RSS_READ_RESTORE_KIB")

# ================================================================ 4. concurrent backups
section concurrent "4. $CONC_N concurrent backups of ${CONC_MB} MiB volumes (requested without wait; max_parallel_jobs 4)"
declare -a t_conc=()
CONC_IDS=()
MAX_COPYING=0
RSS_CONC_KIB=0
for r in $(seq "$RUNS"); do
    log "$CONC_N concurrent backups: run $r/$RUNS"
    for id in "${CONC_IDS[@]}"; do rm "$MNT/backups/t/$id.img"; done
    CONC_IDS=()
    drop_caches
    reset_hwm
    t0=$(now)
    for i in $(seq "$CONC_N"); do
        backup_via_mount "vol-c$i"
        CONC_IDS+=("$BACKUP_ID")
    done
    deadline=$((SECONDS + 600))
    while :; do
        states=$(cat "$JOBS")
        avail=0 copying=0
        for id in "${CONC_IDS[@]}"; do
            state=$(awk -v id="$id" '$1 == id {print $3}' <<<"$states")
            case "$state" in
            available) avail=$((avail + 1)) ;;
            copying) copying=$((copying + 1)) ;;
            error) die "backup $id failed: $(grep "^$id " <<<"$states")" ;;
            esac
        done
        [ "$copying" -gt "$MAX_COPYING" ] && MAX_COPYING=$copying
        [ "$avail" = "$CONC_N" ] && break
        [ "$SECONDS" -lt "$deadline" ] || die "concurrent backups did not end within 600 s"
        sleep 0.05
    done
    t1=$(now)
    t_conc+=("$(elapsed "$t0" "$t1")")
    RSS_CONC_KIB=$(maxof "$RSS_CONC_KIB" "$(hwm_kib)")
done
row "concurrent" concurrent "backupfs: $CONC_N x ${CONC_MB} MiB, until all available (max $MAX_COPYING copying at once)" s "${t_conc[@]}"
RATE[concurrent]=$(mibps $((CONC_N * CONC_MB)) "${MED[concurrent]}")
RSS_MIB[concurrent]=$(kib_to_mib "$RSS_CONC_KIB")

# The restored volumes and the concurrent backups are not needed any more: room for 5.
rm -f "$SRC_POOL/volume-$prev_m" "$SRC_POOL/volume-$prev_d" "$SRC_POOL/volume-$prev_c"
for id in "${CONC_IDS[@]}"; do rm "$MNT/backups/t/$id.img"; done

# ================================================================ 5. incremental backups
section incremental "5. incremental backups of a ${INC_MB} MiB dense volume, ${INC_PCT}% rewritten in scattered 64 KiB pieces before each"
reset_hwm
INC_VOL=vol-inc
INC_SRC=$SRC_POOL/volume-$INC_VOL
INC_SLOTS=$((INC_MB * 16))                               # 64 KiB pieces in the volume
INC_WRITES=$(( (INC_MB * 1024 * INC_PCT + 6399) / 6400 )) # INC_PCT % of it, in 64 KiB pieces
INC_CHANGED=$((INC_WRITES * 65536))
TARGET_FS=$T/dstfs
# Bytes in use on a filesystem, once what was written is on disk (statfs).
fs_used() { sync -f "$1"; stat -f -c '%b %f %S' "$1" | awk '{printf "%.0f\n", ($1 - $2) * $3}'; }
dir_bytes() { sync -f "$1"; du -s -B1 "$1" | cut -f1; }
# Rewrites INC_WRITES distinct 64 KiB pieces of the volume at places drawn with `seed`
# (the same places on every run of the script); sets CHANGED_BLOCKS, the 1 MiB blocks
# they touch (a 64 KiB piece never straddles two).
change_volume() { # seed
    local slots
    slots=$(awk -v seed="$1" -v n="$INC_WRITES" -v max="$INC_SLOTS" \
        'BEGIN { srand(seed); while (c < n) { s = int(rand() * max); if (!(s in seen)) { seen[s]; c++; print s } } }')
    local slot
    for slot in $slots; do
        dd if=/dev/urandom of="$INC_SRC" bs=64K count=1 seek="$slot" conv=notrunc status=none
    done
    sync -f "$INC_SRC"
    CHANGED_BLOCKS=$(awk '{ b[int($1 / 16)] } END { print length(b) }' <<<"$slots")
}
record_field() { jq -r ".$2 // \"null\"" "$MNT/backups/t/$1.json"; }
# One timed backup through the mount with `incremental wait`; sets LAST_SECS, BACKUP_ID
# and LAST_GROWTH (bytes the target filesystem grew by, XFS preallocations included).
timed_incremental() {
    local u0 t0 t1
    u0=$(fs_used "$TARGET_FS")
    drop_caches
    t0=$(now)
    backup_via_mount "$INC_VOL incremental wait"
    t1=$(now)
    LAST_SECS=$(elapsed "$t0" "$t1")
    LAST_GROWTH=$(( $(fs_used "$TARGET_FS") - u0 ))
}
# What the target filesystem holds once XFS has dropped the speculative CoW
# preallocations it makes for writes into shared files (otherwise freed within 30 min).
growth_after_gc() { # bytes-used-before
    xfs_spaceman -c "prealloc -s" "$TARGET_FS" >/dev/null 2>&1 || true
    echo $(( $(fs_used "$TARGET_FS") - $1 ))
}

# The chunking peers keep their repositories on the target filesystem, and their caches
# and keys in the sandbox.
PEERS_INC=()
command -v restic >/dev/null 2>&1 && PEERS_INC+=(restic)
command -v borg >/dev/null 2>&1 && PEERS_INC+=(borg)
export RESTIC_PASSWORD=backupfs-bench RESTIC_CACHE_DIR=$T/restic-cache
export BORG_PASSPHRASE=backupfs-bench BORG_BASE_DIR=$T/borg-home
RESTIC_REPO=$PEER_DIR/restic
BORG_REPO_DIR=$PEER_DIR/borg
peer_command() { # restic|borg
    case "$1" in
    restic) echo "restic -q -r $(q "$RESTIC_REPO") backup --host bench $(q "$INC_SRC") && sync -f $(q "$RESTIC_REPO")" ;;
    borg) echo "borg create --chunker-params fixed,4194304 $(q "$BORG_REPO_DIR")::'run-{now:%Y%m%dT%H%M%S.%f}' $(q "$INC_SRC") && sync -f $(q "$BORG_REPO_DIR")" ;;
    esac
}
peer_repo() { case "$1" in restic) echo "$RESTIC_REPO" ;; borg) echo "$BORG_REPO_DIR" ;; esac; }
declare -A PEER_SECS PEER_GROWTH PEER_RSS_INC PEER_FIRST PEER_FIRST_GROWTH PEER_FIRST_RSS
run_chunker() { # peer -> appends to PEER_SECS/PEER_GROWTH
    local repo b0
    repo=$(peer_repo "$1")
    b0=$(dir_bytes "$repo")
    drop_caches
    time_peer "$(peer_command "$1")"
    PEER_SECS[$1]+="$LAST_SECS "
    PEER_GROWTH[$1]+="$(( $(dir_bytes "$repo") - b0 )) "
    PEER_RSS_INC[$1]=$(maxof "${PEER_RSS_INC[$1]:-0}" "$LAST_RSS_KIB")
}
if [[ " ${PEERS_INC[*]} " == *" restic "* ]]; then
    restic -q -r "$RESTIC_REPO" init >/dev/null 2>"$T/restic.err" || { cat "$T/restic.err" >&2; die "restic init failed"; }
fi
if [[ " ${PEERS_INC[*]} " == *" borg "* ]]; then
    borg init -e repokey-blake2 "$BORG_REPO_DIR" >/dev/null 2>"$T/borg.err" || { cat "$T/borg.err" >&2; die "borg init failed"; }
fi
for peer in "${PEERS_INC[@]}"; do
    # Their first run is a full one; each later run finds INC_PCT % changed since their last.
    log "$peer: first run (full) of $INC_VOL"
    repo=$(peer_repo "$peer")
    b0=$(dir_bytes "$repo")
    drop_caches
    time_peer "$(peer_command "$peer")"
    PEER_FIRST[$peer]=$LAST_SECS
    PEER_FIRST_GROWTH[$peer]=$(( $(dir_bytes "$repo") - b0 ))
    PEER_FIRST_RSS[$peer]=$LAST_RSS_KIB
done
# Every run starts from the same state: the volume as written, the chunkers' repositories
# (and their caches, which must match them) right after their first run. Reflink copies
# on the same filesystems cost no space; without the reset the repositories would grow by
# 1-2 GiB a run, and each run's changes would add up.
INC_ORIG=$T/srcfs/vol-inc.orig
cp --reflink=always "$INC_SRC" "$INC_ORIG"
PEER_STATE=("$RESTIC_REPO" "$BORG_REPO_DIR" "$RESTIC_CACHE_DIR" "$BORG_BASE_DIR")
for d in "${PEER_STATE[@]}"; do
    if [ -e "$d" ]; then cp -a --reflink=auto "$d" "$d.first"; fi
done
reset_incremental_state() {
    cp --reflink=always "$INC_ORIG" "$INC_SRC"
    local d
    for d in "${PEER_STATE[@]}"; do
        if [ -e "$d.first" ]; then rm -rf "$d"; cp -a --reflink=auto "$d.first" "$d"; fi
    done
    sync
}

declare -a t_full=() t_diff=() t_sums=() g_full=() g_diff=() g_sums=() gc_diff=() gc_sums=()
declare -a s_diff=() s_sums=() c_diff=() c_sums=() b_sums=() q_diff=() q_sums=() p_diff=() p_sums=()
declare -A FOUND_BY=()
INC_IDS=()
for r in $(seq "$RUNS"); do
    # The previous run's backups go, and their base snapshot with them: a full one next.
    for id in "${INC_IDS[@]}"; do rm "$MNT/backups/t/$id.img"; done
    INC_IDS=()
    if [ "$r" -gt 1 ]; then reset_incremental_state; fi
    log "incremental: run $r/$RUNS: full"
    timed_incremental
    full_id=$BACKUP_ID
    INC_IDS+=("$full_id")
    [ "$(record_field "$full_id" parent_id)" = null ] || die "the first incremental request of a run did not make a full backup ($full_id)"
    t_full+=("$LAST_SECS"); g_full+=("$LAST_GROWTH")

    # A: the base snapshot is there; the storage says what changed.
    change_volume $((2 * r - 1))
    log "incremental: run $r/$RUNS: $INC_WRITES x 64 KiB changed in $CHANGED_BLOCKS blocks, reflink base"
    used0=$(fs_used "$TARGET_FS")
    timed_incremental
    diff_id=$BACKUP_ID
    INC_IDS+=("$diff_id")
    [ "$(record_field "$diff_id" parent_id)" = "$full_id" ] || die "incremental $diff_id does not name $full_id as its parent"
    FOUND_BY[diff]+="$(record_field "$diff_id" changes_found_by) "
    t_diff+=("$LAST_SECS"); g_diff+=("$LAST_GROWTH")
    gc_diff+=("$(growth_after_gc "$used0")")
    s_diff+=("$(record_field "$diff_id" stored_bytes)"); c_diff+=("$(record_field "$diff_id" changed_bytes)")
    q_diff+=("$(ratio "$LAST_SECS" "${t_full[-1]}")")
    p_diff+=("$(ratio "$LAST_GROWTH" "$INC_CHANGED")")
    if [ "$r" = "$RUNS" ]; then
        cmp -s "$(backing_of "$diff_id")" "$INC_SRC" || die "incremental backup $diff_id differs from $INC_VOL"
    fi
    for peer in "${PEERS_INC[@]}"; do log "$peer: second run"; run_chunker "$peer"; done

    # B: the base snapshot is gone (removed behind backupfs' back): checksums only.
    change_volume $((2 * r))
    base=$(record_field "$diff_id" base_snapshot)
    [ "$base" != null ] || die "incremental $diff_id keeps no base snapshot"
    rm "$SRC_POOL/$base"
    log "incremental: run $r/$RUNS: $INC_WRITES x 64 KiB changed in $CHANGED_BLOCKS blocks, base snapshot removed"
    used0=$(fs_used "$TARGET_FS")
    timed_incremental
    sums_id=$BACKUP_ID
    INC_IDS+=("$sums_id")
    [ "$(record_field "$sums_id" parent_id)" = "$diff_id" ] || die "incremental $sums_id does not name $diff_id as its parent"
    FOUND_BY[sums]+="$(record_field "$sums_id" changes_found_by) "
    t_sums+=("$LAST_SECS"); g_sums+=("$LAST_GROWTH")
    gc_sums+=("$(growth_after_gc "$used0")")
    s_sums+=("$(record_field "$sums_id" stored_bytes)"); c_sums+=("$(record_field "$sums_id" changed_bytes)")
    b_sums+=("$CHANGED_BLOCKS")
    q_sums+=("$(ratio "$LAST_SECS" "${t_full[-1]}")")
    p_sums+=("$(ratio "$LAST_GROWTH" $((CHANGED_BLOCKS << 20)))")
    if [ "$r" = "$RUNS" ]; then
        cmp -s "$(backing_of "$sums_id")" "$INC_SRC" || die "incremental backup $sums_id differs from $INC_VOL"
    fi
    for peer in "${PEERS_INC[@]}"; do log "$peer: second run"; run_chunker "$peer"; done
done
RSS_INC_KIB=$(hwm_kib)
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
found_diff=$(tr ' ' '\n' <<<"${FOUND_BY[diff]}" | sort -u | paste -sd, | sed 's/^,//')
found_sums=$(tr ' ' '\n' <<<"${FOUND_BY[sums]}" | sort -u | paste -sd, | sed 's/^,//')
row inc.full incremental "backupfs: first \"$INC_VOL incremental wait\" = full (parent_id null)" s "${t_full[@]}"
row inc.diff incremental "backupfs: incremental, reflink base (changes_found_by: $found_diff)" s "${t_diff[@]}"
row inc.sums incremental "backupfs: incremental, base snapshot removed (changes_found_by: $found_sums)" s "${t_sums[@]}"
for k in full diff sums; do RATE[inc.$k]=$(mibps "$INC_MB" "${MED[inc.$k]}"); RSS_MIB[inc.$k]=$(kib_to_mib "$RSS_INC_KIB"); done
DETAIL[inc.full]="target fs +$(mib "$(median "${g_full[@]}")") MiB"
DETAIL[inc.diff]="$(ratio "${MED[inc.diff]}" "${MED[inc.full]}")x the full's time; target fs +$(mib "$(median "${g_diff[@]}")") MiB, $(mib "$(median "${gc_diff[@]}")") MiB once XFS CoW prealloc is freed; record: stored $(mib "$(median "${s_diff[@]}")") MiB, changed $(mib "$(median "${c_diff[@]}")") MiB"
DETAIL[inc.sums]="$(ratio "${MED[inc.sums]}" "${MED[inc.full]}")x the full's time; target fs +$(mib "$(median "${g_sums[@]}")") MiB, $(mib "$(median "${gc_sums[@]}")") MiB once XFS CoW prealloc is freed; record: stored $(mib "$(median "${s_sums[@]}")") MiB, changed $(mib "$(median "${c_sums[@]}")") MiB"
declare -A CHUNKER_LABEL=([restic]="restic backup" [borg]="borg create --chunker-params fixed,4194304")
for peer in "${PEERS_INC[@]}"; do
    # shellcheck disable=SC2086
    row "inc.$peer.first" incremental "${CHUNKER_LABEL[$peer]}: first run (full)" s "${PEER_FIRST[$peer]}"
    # shellcheck disable=SC2086
    row "inc.$peer" incremental "${CHUNKER_LABEL[$peer]}: next run (${INC_PCT}% changed)" s ${PEER_SECS[$peer]}
    RATE[inc.$peer.first]=$(mibps "$INC_MB" "${MED[inc.$peer.first]}")
    RATE[inc.$peer]=$(mibps "$INC_MB" "${MED[inc.$peer]}")
    CMP[inc.$peer.first]=$(ratio "${MED[inc.$peer.first]}" "${MED[inc.full]}")
    CMP[inc.$peer]=$(ratio "${MED[inc.$peer]}" "${MED[inc.diff]}")
    RSS_MIB[inc.$peer.first]=$(kib_to_mib "${PEER_FIRST_RSS[$peer]}")
    RSS_MIB[inc.$peer]=$(kib_to_mib "${PEER_RSS_INC[$peer]}")
    DETAIL[inc.$peer.first]="repository +$(mib "${PEER_FIRST_GROWTH[$peer]}") MiB"
    # shellcheck disable=SC2086
    DETAIL[inc.$peer]="repository +$(mib "$(median ${PEER_GROWTH[$peer]})") MiB per run"
done
INC_NOTE="Section 5: $INC_WRITES pieces of 64 KiB rewritten before each incremental = $(mib "$INC_CHANGED") MiB changed, in $(median "${b_sums[@]}") of $INC_MB 1 MiB blocks (median). The chunkers' 'backupfs speed' compares their next run with backupfs' reflink-base incremental, their first run with backupfs' full; each chunker run ends with sync -f of its repository. Chunkers installed: ${PEERS_INC[*]:-none} (of restic, borg)."

# ================================================================ targets
fastest=dd
for k in cp qemu; do
    if awk -v a="${MED[backup.$TAG_RAND.$k]}" -v b="${MED[backup.$TAG_RAND.$fastest]}" 'BEGIN{exit !(a < b)}'; then fastest=$k; fi
done
declare -A PEER_NAME=([dd]=dd [cp]=cp [qemu]=qemu-img)
target "backup, random, cold: speed vs fastest synced peer (${PEER_NAME[$fastest]})" "${CMP[backup.$TAG_RAND.$fastest]}" ">=" 1.0 x \
    "${MED[backup.$TAG_RAND.$fastest]} s / ${MED[backup.$TAG_RAND.backupfs]} s; fio ceiling: read QD1 ${MED[backup.$TAG_RAND.fio_read_qd1]} s, read QD4 ${MED[backup.$TAG_RAND.fio_read_qd4]} s, write QD4 ${MED[backup.$TAG_RAND.fio_write_qd4]} s"
target "backup, sparse: speed vs dd" "${CMP[backup.$TAG_SPARSE.dd]}" ">=" 5.0 x \
    "${MED[backup.$TAG_SPARSE.dd]} s / ${MED[backup.$TAG_SPARSE.backupfs]} s"
target "image read, cold cat: mount vs direct" "${CMP[read.cold.direct]}" ">=" 0.9 x \
    "${MED[read.cold.direct]} s / ${MED[read.cold.mnt]} s"
target "image read, warm cat: mount vs direct" "${CMP[read.warm.direct]}" ">=" 0.95 x \
    "${MED[read.warm.direct]} s / ${MED[read.warm.mnt]} s"
target "image read, 4k random IOPS: mount vs direct" "${CMP[read.fio.direct]}" ">=" 0.8 x \
    "${MED[read.fio.mnt]} / ${MED[read.fio.direct]} IOPS"
target "restore: mount vs direct" "${CMP[restore.direct]}" ">=" 0.9 x \
    "${MED[restore.direct]} s / ${MED[restore.mnt]} s"
target "restore, plain cp (server-side copy): mount vs direct" "$(ratio "${MED[restore.direct]}" "${MED[restore.cfr]}")" ">=" 0.9 x \
    "${MED[restore.direct]} s / ${MED[restore.cfr]} s"
# Issue 13. Times: median incremental / median full, each run's pair in the detail. Space:
# what the target filesystem grew by right after the backup (what df shows), per run.
# 1 when every run's record said `$2` (found_* is the runs' answers, sorted, unique).
only() { [ "$1" = "$2" ] && echo 1 || echo 0; }
target "incremental, reflink base: time vs full" "$(ratio "${MED[inc.diff]}" "${MED[inc.full]}")" "<=" 0.05 x \
    "${MED[inc.diff]} s / ${MED[inc.full]} s; per run ${q_diff[*]}; records say ${found_diff}" "$(only "$found_diff" snapshot-diff)"
target "incremental, checksums: time vs full" "$(ratio "${MED[inc.sums]}" "${MED[inc.full]}")" "<=" 0.60 x \
    "${MED[inc.sums]} s / ${MED[inc.full]} s; per run ${q_sums[*]}; records say ${found_sums}" "$(only "$found_sums" checksums)"
target "incremental, reflink base: target fs growth vs bytes changed" "$(median "${p_diff[@]}")" "<=" 2.0 x \
    "per run ${p_diff[*]} of $(mib "$INC_CHANGED") MiB; once XFS CoW preallocations are freed $(ratio "$(median "${gc_diff[@]}")" "$INC_CHANGED")x; record stored_bytes $(ratio "$(median "${s_diff[@]}")" "$INC_CHANGED")x"
target "incremental, checksums: target fs growth vs changed 1 MiB blocks" "$(median "${p_sums[@]}")" "<=" 1.0 x \
    "per run ${p_sums[*]} of ${b_sums[*]} MiB blocks; record stored_bytes $(mib "$(median "${s_sums[@]}")") MiB"
target "daemon peak RSS during the full backups (1)" "$(kib_to_mib "$RSS_BACKUP_KIB")" "<=" "$RSS_TARGET_MIB" MiB "VmHWM"
target "daemon peak RSS during $CONC_N concurrent backups (4)" "$(kib_to_mib "$RSS_CONC_KIB")" "<=" "$RSS_TARGET_MIB" MiB "VmHWM"

# ================================================================ stop the daemon
# What the daemon still holds once every job has ended (memory it did not give back).
RSS_END_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON_PID/status")
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
kill -TERM "$DAEMON_PID"
for _ in $(seq 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
DAEMON_STOPPED=yes
kill -0 "$DAEMON_PID" 2>/dev/null && DAEMON_STOPPED="no (killed by the cleanup)"
wait "$DAEMON_PID" 2>/dev/null || true
TOTAL_SECS=$(elapsed "$STARTED" "$(now)")

# ================================================================ report
CAVEATS=(
    "The result is the RATIOS between rows measured in the same run, not the absolute times: the disk is a shared virtual disk whose speed varies by 2-4x from minute to minute. The methods compared take turns in every run (A B C, A B C, ...) so that noise spreads over all of them."
    "Both loop image files live in $T on $BACKING: source and destination are different filesystems but the SAME disk (reads and writes compete for it)."
    "Loop devices use direct I/O: $LOOP_DIO. Page cache dropped (sync; echo 3 > drop_caches) before every timed run except the warm reads."
    "dd, cp and qemu-img are followed by 'sync -f DST' (syncfs of the destination filesystem, so their data is on disk like backupfs' fdatasync'ed copy, without waiting for other processes' dirty data elsewhere). dd uses Cinder's copy_volume flags (O_DIRECT both ways); its sync only commits the file's metadata."
    "The fio 'ceiling' rows are the disk's own speed under these filesystems: a backup reads the source AND writes the target on this one disk, so it cannot beat the read ceiling and usually needs about read + write time."
    "Load average before: $LOAD_BEFORE, after: $LOAD_AFTER on $(nproc) CPUs; anything else running on the machine makes the numbers noisy."
    "Medians of $RUNS runs; 'runs' lists every run."
    "$INC_NOTE"
    "Section 5 space: 'target fs +' is the growth of the target filesystem's used blocks (statfs, after syncfs) across the backup, what df shows; XFS adds speculative copy-on-write preallocations (its default CoW extent size hint, 128 KiB) to writes into shared files and frees them after up to 30 minutes, so the figure 'once XFS CoW prealloc is freed' (after xfs_spaceman prealloc -s) is what stays."
    "Image reads from cold (section 2): both the image (through the mount) and its backing file were dropped (dd iflag=nocache count=0, then drop_caches) before every cold cat and fio run; the most fincore found still resident right before one was $COLD_RESIDENT_MAX bytes."
)

{
    printf '\nbackupfs benchmark, %s, backupfs %s, %s CPUs, %s MiB RAM, kernel %s, whole run %.0f s\n' \
        "$(date -u +%FT%TZ)" "$VERSION" "$(nproc)" "$(awk '/MemTotal/ {printf "%d", $2/1024}' /proc/meminfo)" "$(uname -r)" "$TOTAL_SECS"
    printf 'load average before: %s, after: %s. Read the ratios, not the absolute times (see caveats).\n' "$LOAD_BEFORE" "$LOAD_AFTER"
    fmt='  %-76s %10s  %-26s %8s  %-15s %s\n'
    for sec in "${SECTIONS[@]}"; do
        printf '\n%s\n' "${SECTION_TITLE[$sec]}"
        printf "$fmt" "" median "runs" "MiB/s" "backupfs speed" "peak RSS"
        for key in "${ROWS[@]}"; do
            [ "${SECTION[$key]}" = "$sec" ] || continue
            if [ "${UNIT[$key]}" = s ]; then m="${MED[$key]} s"; else m=$(printf '%.0f' "${MED[$key]}"); fi
            runs=$(for v in ${RUNS_OF[$key]}; do printf '%.2f ' "$v"; done)
            [ "${UNIT[$key]}" = IOPS ] && runs=$(for v in ${RUNS_OF[$key]}; do printf '%.0f ' "$v"; done)
            printf "$fmt" "${LABEL[$key]}" "$m" "$runs" "${RATE[$key]:--}" \
                "${CMP[$key]:+${CMP[$key]}x}" "${RSS_MIB[$key]:+${RSS_MIB[$key]} MiB}"
            if [ -n "${DETAIL[$key]:-}" ]; then printf '      %s\n' "${DETAIL[$key]}"; fi
        done
    done
    printf '\n  "backupfs speed" = backupfs speed / that row'"'"'s speed (> 1: backupfs is faster). Peak RSS of backupfs = the daemon'"'"'s VmHWM\n'
    printf '  over the section (reset at its start; idle after mount: %s MiB, still resident after the last section: %s MiB);\n' \
        "$(kib_to_mib "$RSS_IDLE_KIB")" "$(kib_to_mib "$RSS_END_KIB")"
    printf '  of the others = /usr/bin/time max RSS. Sections 2 and 3 share one backupfs figure.\n'
    printf '\ntargets\n'
    for t in "${TARGETS[@]}"; do
        IFS='|' read -r name measured op wanted unit result detail <<<"$t"
        printf '  %-58s %8s %-3s  %s %-4s %s   %s\n' "$name" "$measured" "$unit" "$op" "$wanted" "$result" "($detail)"
    done
    printf '\ncaveats\n'
    for c in "${CAVEATS[@]}"; do printf '  - %s\n' "$c"; done
    printf '\nJSON: %s   daemon log: %s\n' "$JSON" "$DAEMON_LOG_KEEP"
} | tee "$T/table.txt"

# ---------------------------------------------------------------- JSON
{
    for key in "${ROWS[@]}"; do
        # shellcheck disable=SC2086
        jq -nc --arg key "$key" --arg section "${SECTION[$key]}" --arg lbl "${LABEL[$key]}" \
            --arg unit "${UNIT[$key]}" --arg median "${MED[$key]}" --arg runs "${RUNS_OF[$key]}" \
            --arg rate "${RATE[$key]:-}" --arg cmp "${CMP[$key]:-}" --arg rss "${RSS_MIB[$key]:-}" \
            --arg detail "${DETAIL[$key]:-}" \
            '{"key": $key, "section": $section, "label": $lbl, "unit": $unit, "median": ($median | tonumber),
              "runs": ($runs | split(" ") | map(tonumber)),
              "mib_per_s": (if $rate == "" or $rate == "-" then null else ($rate | tonumber) end),
              "backupfs_speed_ratio": (if $cmp == "" then null else ($cmp | tonumber) end),
              "peak_rss_mib": (if $rss == "" then null else ($rss | tonumber) end),
              "detail": (if $detail == "" then null else $detail end)}'
    done
} >"$T/rows.jsonl"
{
    for t in "${TARGETS[@]}"; do
        IFS='|' read -r name measured op wanted unit result detail <<<"$t"
        jq -nc --arg name "$name" --arg measured "$measured" --arg op "$op" --arg wanted "$wanted" \
            --arg unit "$unit" --arg result "$result" --arg detail "$detail" \
            '{"name": $name, "measured": ($measured | tonumber), "op": $op, "target": ($wanted | tonumber),
              "unit": $unit, "result": $result, "detail": $detail}'
    done
} >"$T/targets.jsonl"
printf '%s\n' "${CAVEATS[@]}" | jq -R . | jq -s . >"$T/caveats.json"
# Section 5, run by run (bytes; the arrays have one entry per run, the chunkers two).
nums() { printf '%s\n' "$@" | jq -R 'select(length > 0) | tonumber' | jq -sc .; }
strs() { printf '%s\n' "$@" | jq -R 'select(length > 0)' | jq -sc .; }
chunkers='{}'
for peer in "${PEERS_INC[@]}"; do
    # shellcheck disable=SC2086
    chunkers=$(jq -c --arg p "$peer" --argjson first "${PEER_FIRST[$peer]}" --argjson first_growth "${PEER_FIRST_GROWTH[$peer]}" \
        --argjson secs "$(nums ${PEER_SECS[$peer]})" --argjson growth "$(nums ${PEER_GROWTH[$peer]})" \
        '. + {($p): {first_run_seconds: $first, first_run_repository_growth: $first_growth,
                     next_run_seconds: $secs, next_run_repository_growth: $growth}}' <<<"$chunkers")
done
# shellcheck disable=SC2086
jq -n --argjson volume_mib "$INC_MB" --argjson pct "$INC_PCT" --argjson writes "$INC_WRITES" \
    --argjson changed "$INC_CHANGED" --argjson blocks "$(nums "${b_sums[@]}")" \
    --argjson full_growth "$(nums "${g_full[@]}")" \
    --argjson diff_growth "$(nums "${g_diff[@]}")" --argjson diff_gc "$(nums "${gc_diff[@]}")" \
    --argjson diff_stored "$(nums "${s_diff[@]}")" --argjson diff_changed "$(nums "${c_diff[@]}")" \
    --argjson diff_found "$(strs ${FOUND_BY[diff]})" \
    --argjson sums_growth "$(nums "${g_sums[@]}")" --argjson sums_gc "$(nums "${gc_sums[@]}")" \
    --argjson sums_stored "$(nums "${s_sums[@]}")" --argjson sums_changed "$(nums "${c_sums[@]}")" \
    --argjson sums_found "$(strs ${FOUND_BY[sums]})" --argjson chunkers "$chunkers" \
    '{volume_mib: $volume_mib, changed_percent: $pct, writes_of_64k: $writes, changed_bytes: $changed,
      reflink_base: {target_fs_growth: $diff_growth, after_cow_prealloc_freed: $diff_gc,
                     record_stored_bytes: $diff_stored, record_changed_bytes: $diff_changed,
                     changes_found_by: $diff_found},
      checksums: {changed_1mib_blocks: $blocks, target_fs_growth: $sums_growth,
                  after_cow_prealloc_freed: $sums_gc, record_stored_bytes: $sums_stored,
                  record_changed_bytes: $sums_changed, changes_found_by: $sums_found},
      full_target_fs_growth: $full_growth, chunkers: $chunkers}' >"$T/incremental.json"
jq -n --slurpfile rows "$T/rows.jsonl" --slurpfile targets "$T/targets.jsonl" \
    --slurpfile caveats "$T/caveats.json" \
    --arg date "$(date -u +%FT%TZ)" --arg version "$VERSION" --arg kernel "$(uname -r)" \
    --argjson cpus "$(nproc)" --argjson runs "$RUNS" --argjson fio_runtime "$FIO_RUNTIME" \
    --arg load_before "$LOAD_BEFORE" --arg load_after "$LOAD_AFTER" --arg backing "$BACKING" \
    --arg loop_dio "$LOOP_DIO" --argjson rss_idle "$(kib_to_mib "$RSS_IDLE_KIB")" \
    --argjson rss_backup "$(kib_to_mib "$RSS_BACKUP_KIB")" --argjson rss_conc "$(kib_to_mib "$RSS_CONC_KIB")" \
    --argjson rss_rr "$(kib_to_mib "$RSS_READ_RESTORE_KIB")" --argjson rss_end "$(kib_to_mib "$RSS_END_KIB")" --argjson max_copying "$MAX_COPYING" \
    --arg stopped "$DAEMON_STOPPED" --argjson total "$TOTAL_SECS" \
    --argjson rss_inc "$(kib_to_mib "$RSS_INC_KIB")" --argjson cold_resident "$COLD_RESIDENT_MAX" \
    --slurpfile incremental "$T/incremental.json" \
    '{date: $date, backupfs_version: $version, kernel: $kernel, cpus: $cpus, runs: $runs,
      fio_runtime_s: $fio_runtime, total_seconds: $total,
      load_average_before: $load_before, load_average_after: $load_after,
      loop_files_device: $backing, loop_direct_io: $loop_dio,
      daemon: {peak_rss_mib: {idle: $rss_idle, full_backups: $rss_backup, concurrent: $rss_conc,
                              reads_and_restore: $rss_rr, incremental: $rss_inc, resident_at_end: $rss_end},
               max_jobs_copying_at_once: $max_copying, stopped_on_sigterm: $stopped},
      cold_resident_bytes_max: $cold_resident,
      incremental: $incremental[0],
      results: $rows, targets: $targets, caveats: $caveats[0]}' >"$JSON"
log "wrote $JSON"
