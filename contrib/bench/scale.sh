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

BENCH=scale
# shellcheck source=contrib/bench/sandbox.sh
. "$(dirname "$0")/sandbox.sh"
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
