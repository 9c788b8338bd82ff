#!/usr/bin/env bash
# The RBD client's queued I/O against Ceph's own tools, on a throw-away single-node
# cluster (or an existing one): 1 GiB written and read with 4 MiB requests at queue
# depths 1, 4, 8 and 16 (contrib/bench/rbd_aio.rs) next to `rbd import` and
# `rbd export` to /dev/null, with each process's peak RSS. Prints a table.
# --hints "none sequential" also measures the AioQueue's fadvise hints; --malloc glibc
# leaves glibc's sliding mmap threshold alone (faster reads, far more RSS).
#
#   sudo contrib/bench/rbd.sh                       # starts and stops its own cluster
#   contrib/bench/rbd.sh --conf /etc/ceph/ceph.conf --pool rbd   # an existing cluster
#
# Its own cluster (contrib/bench/ceph_cluster.sh): one monitor, manager and BlueStore OSD
# (8 GiB sparse file) on 127.0.0.1, under $TMPDIR, the same recipe as
# tests/common/ceph.rs and under the same machine-wide lock. Needs ceph-mon ceph-osd ceph-mgr
# ceph-common (contrib/test.sh installs them) and GNU time.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONF= POOL=backupfs-bench CLIENT=admin SIZE_MIB=1024 BLOCK_MIB=4 DEPTHS="1 4 8 16" RUNS=3 HINTS=none MALLOC=fixed
while [ $# -gt 0 ]; do
    case "$1" in
        --conf) CONF=$2; shift 2 ;;
        --pool) POOL=$2; shift 2 ;;
        --client) CLIENT=$2; shift 2 ;;
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --depths) DEPTHS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --hints) HINTS=$2; shift 2 ;;
        --malloc) MALLOC=$2; shift 2 ;;
        *) echo "rbd.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -x /usr/bin/time ] || { echo "rbd.sh: needs GNU time (apt-get install time)" >&2; exit 1; }

cargo build --release --quiet --example rbd_aio
BENCH=target/release/examples/rbd_aio
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-rbd-bench.XXXXXX")
# shellcheck source=contrib/bench/ceph_cluster.sh
. contrib/bench/ceph_cluster.sh

cleanup() {
    stop_cluster
    rm -rf "$WORK"
}
trap cleanup EXIT

[ -n "$CONF" ] || start_cluster
export CEPH_CONF=$CONF
if ! timeout 60 ceph osd pool ls | grep -qx "$POOL"; then
    timeout 60 ceph osd pool create "$POOL" 8 >/dev/null
    timeout 60 rbd pool init "$POOL"
fi

echo "pool $POOL ready at ${SECONDS}s" >&2
SOURCE=$WORK/source.raw
head -c "${SIZE_MIB}M" /dev/urandom > "$SOURCE"
RESULTS=$WORK/results

# Runs a command under GNU time; appends "<what>|<seconds>|<peak RSS MiB>" to RESULTS.
measure() {
    local what=$1; shift
    /usr/bin/time -f '%e %M' -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" ||
        { cat "$WORK/err" >&2; exit 1; }
    read -r secs kib < "$WORK/time"
    echo "$what|$secs|$((kib / 1024))" >> "$RESULTS"
}

# Interleaved runs, so a busy moment on the machine hits every row alike.
for run in $(seq 1 "$RUNS"); do
    measure "rbd import (file on disk)" rbd import --no-progress --dest-pool "$POOL" "$SOURCE" ref-import
    measure "rbd export to /dev/null" bash -c "rbd export --no-progress '$POOL/ref-import' - >/dev/null"
    timeout 120 rbd rm --no-progress "$POOL/ref-import" 2>/dev/null
    for hint in $HINTS; do
        for depth in $DEPTHS; do
            label="depth $depth"; [ "$hint" = none ] || label="$label, $hint"
            args=(--conf "$CONF" --client "$CLIENT" --pool "$POOL" --image "aio-$depth"
                  --size-mib "$SIZE_MIB" --block-mib "$BLOCK_MIB" --depth "$depth" --hint "$hint" --malloc "$MALLOC")
            measure "AioQueue write, $label" $BENCH "${args[@]}" --mode write
            measure "AioQueue read, $label" $BENCH "${args[@]}" --mode read
            timeout 120 rbd rm --no-progress "$POOL/aio-$depth" 2>/dev/null
        done
    done
    echo "run $run done at ${SECONDS}s" >&2
done

echo "${SIZE_MIB} MiB dense image, ${BLOCK_MIB} MiB requests, median of $RUNS runs (whole process:"
echo "connect, open, I/O, flush, close); peak RSS is the largest of the runs"
awk -F'|' -v size="$SIZE_MIB" '
    !($1 in n) { order[++rows] = $1 }
    { n[$1]++; t[$1, n[$1]] = $2; if ($3 > rss[$1]) rss[$1] = $3 }
    END {
        printf "%-38s %9s %11s %9s   %s\n", "", "median s", "MiB/s", "peak RSS", "runs (s)"
        for (r = 1; r <= rows; r++) {
            k = order[r]; m = n[k]
            for (i = 1; i <= m; i++) v[i] = t[k, i]
            for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { x = v[i]; v[i] = v[j]; v[j] = x }
            med = (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
            runs = ""; for (i = 1; i <= m; i++) runs = runs sprintf(" %.2f", t[k, i])
            printf "%-38s %9.2f %11.1f %5d MiB  %s\n", k, med, size / med, rss[k], runs
        }
    }' "$RESULTS"
