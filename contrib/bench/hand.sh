#!/usr/bin/env bash
# backupfs benchmark of the paths an operator takes by hand (project issue 28): warm
# `cat` of an image, a restore by `cp --sparse=always`, the daemon's peak RSS under
# concurrent backups, and `ls -l` of a target holding many backups. See
# contrib/bench/README.md, "hand.sh". `halves` (not in the default set) times the two
# halves of a restore apart: the image's cold read, and the writes from a warm source.
#
#   contrib/bench/hand.sh [--only warm,restore,halves,rss,ls] [--runs N] [--counts "5000 20000"]
#                         [--no-build] [--bin PATH] [--perf DIR]
#
# Run as root. Two XFS filesystems on loop devices (source pool, target pool), the daemon
# mounted over them, each section timed against the same operation on the backing files.
# Prints one ratio per row (peer time / backupfs time: >= 1 means backupfs is as fast).
# With --perf DIR, the daemon is recorded by `perf record -g` during each warm, restore
# and ls section (DIR/<section>.data) and a short report is printed.
set -euo pipefail
export LC_ALL=C

ONLY=warm,restore,rss,ls
RUNS=5
COUNTS="1000 5000 20000"
BUILD=1
BIN=
PERF_DIR=
IMG_MB=1024
CONC_N=8
CONC_MB=256
FS_MB=12288

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
    --only) ONLY=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --counts) COUNTS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --bin) BIN=$2; BUILD=0; shift 2 ;;
    --perf) PERF_DIR=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "hand.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

BENCH=hand
# shellcheck source=contrib/bench/sandbox.sh
. "$(dirname "$0")/sandbox.sh"

if wants warm || wants restore || wants halves; then
    log "writing a ${IMG_MB} MiB random volume and backing it up"
    head -c "${IMG_MB}M" /dev/urandom >"$SRC_POOL/volume-vol-rand"
    backup vol-rand
    IMG_ID=$BACKUP_ID
    IMG_MNT=$MNT/backups/t/$IMG_ID.img
    IMG_DIRECT=$DST_POOL/backup-$IMG_ID.img
fi

# ---------------------------------------------------------------- warm cat
if wants warm; then
    cat "$IMG_MNT" >/dev/null
    cat "$IMG_DIRECT" >/dev/null
    w_m=() w_d=()
    for _ in $(seq "$RUNS"); do
        timed cat "$IMG_MNT"; w_m+=("$LAST")
        timed cat "$IMG_DIRECT"; w_d+=("$LAST")
    done >/dev/null
    if [ -n "$PERF_DIR" ]; then
        # A warm read costs the reader, not the daemon: profile the reader.
        mkdir -p "$PERF_DIR"
        perf record -q -g -o "$PERF_DIR/warm-mount.data" -- cat "$IMG_MNT" >/dev/null 2>&1
        perf record -q -g -o "$PERF_DIR/warm-direct.data" -- cat "$IMG_DIRECT" >/dev/null 2>&1
        perf_summary warm-mount
        perf_summary warm-direct
    fi
    m=$(median "${w_m[@]}") d=$(median "${w_d[@]}")
    report "warm cat: mount ${m}s, backing file ${d}s (runs: ${w_m[*]} / ${w_d[*]})" "ratio $(ratio "$d" "$m")"
fi

# ---------------------------------------------------------------- restore
if wants restore; then
    r_m=() r_d=() r_cpu=()
    for r in $(seq "$RUNS"); do
        rm -f "$SRC_POOL"/volume-rest-*
        drop_caches
        [ "$r" = 1 ] && perf_start restore
        cpu0=$(daemon_cpu_ms)
        timed bash -c "cp --sparse=always '$IMG_MNT' '$MNT/volumes/src/rest-m-$r' && sync -f '$SRC_POOL'"
        r_m+=("$LAST")
        r_cpu+=("$(($(daemon_cpu_ms) - cpu0))")
        [ "$r" = 1 ] && perf_stop restore
        cmp -s "$SRC_POOL/volume-rest-m-$r" "$SRC_POOL/volume-vol-rand" || die "restore differs"
        drop_caches
        timed bash -c "cp --sparse=always '$IMG_DIRECT' '$SRC_POOL/volume-rest-d-$r' && sync -f '$SRC_POOL'"
        r_d+=("$LAST")
    done
    rm -f "$SRC_POOL"/volume-rest-*
    m=$(median "${r_m[@]}") d=$(median "${r_d[@]}")
    report "restore cp --sparse=always; sync -f: mount ${m}s, direct ${d}s (runs: ${r_m[*]} / ${r_d[*]}; daemon CPU ms: ${r_cpu[*]})" "ratio $(ratio "$d" "$m")"
fi

# ---------------------------------------------------------------- a restore's halves
if wants halves; then
    h_rm=() h_rd=() h_wm=() h_wd=()
    for _ in $(seq "$RUNS"); do
        drop_caches
        timed cat "$IMG_MNT" >/dev/null; h_rm+=("$LAST")
        drop_caches
        timed cat "$IMG_DIRECT" >/dev/null; h_rd+=("$LAST")
        rm -f "$SRC_POOL"/volume-half-*
        drop_caches
        cat "$IMG_DIRECT" >/dev/null
        timed bash -c "cp --sparse=always '$IMG_DIRECT' '$MNT/volumes/src/half-m' && sync -f '$SRC_POOL'"
        h_wm+=("$LAST")
        rm -f "$SRC_POOL"/volume-half-*
        drop_caches
        cat "$IMG_DIRECT" >/dev/null
        timed bash -c "cp --sparse=always '$IMG_DIRECT' '$SRC_POOL/volume-half-d' && sync -f '$SRC_POOL'"
        h_wd+=("$LAST")
    done
    rm -f "$SRC_POOL"/volume-half-*
    report "restore's read half: cold cat, mount $(median "${h_rm[@]}")s, backing file $(median "${h_rd[@]}")s (runs: ${h_rm[*]} / ${h_rd[*]})" \
        "ratio $(ratio "$(median "${h_rd[@]}")" "$(median "${h_rm[@]}")")"
    report "restore's write half: cp from a warm source; sync -f, mount $(median "${h_wm[@]}")s, direct $(median "${h_wd[@]}")s (runs: ${h_wm[*]} / ${h_wd[*]})" \
        "ratio $(ratio "$(median "${h_wd[@]}")" "$(median "${h_wm[@]}")")"
fi

# ---------------------------------------------------------------- peak RSS
if wants rss; then
    [ -n "${IMG_ID:-}" ] || { head -c 64M /dev/urandom >"$SRC_POOL/volume-vol-rand"; backup vol-rand; IMG_ID=$BACKUP_ID; }
    IMG_MNT=$MNT/backups/t/$IMG_ID.img
    for i in $(seq "$CONC_N"); do head -c "${CONC_MB}M" /dev/urandom >"$SRC_POOL/volume-vol-c$i"; done
    peaks=() before=()
    for r in $(seq "$RUNS"); do
        # A fresh daemon per run, which first does what bench.sh does before its
        # concurrent backups: random 4 KiB reads of an image from cold (fio, as in
        # bench.sh section 2) and a restore through the mount. What that leaves resident
        # counts in the peak, as it does for an operator.
        stop_daemon; start_daemon
        dd if="$IMG_MNT" iflag=nocache count=0 status=none
        drop_caches
        if command -v fio >/dev/null; then
            fio --name=r --filename="$IMG_MNT" --rw=randread --bs=4k --runtime=3 --time_based \
                --ioengine=psync --invalidate=1 --readonly --output-format=terse >/dev/null
        fi
        cp --sparse=always "$IMG_MNT" "$MNT/volumes/src/rss-$r"
        rm -f "$SRC_POOL/volume-rss-$r"
        before+=("$(awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$DAEMON_PID/status")")
        echo 5 >"/proc/$DAEMON_PID/clear_refs"
        drop_caches
        pids=()
        for i in $(seq "$CONC_N"); do (backup "vol-c$i") & pids+=($!); done
        for p in "${pids[@]}"; do wait "$p" || die "a concurrent backup failed"; done
        peaks+=("$(awk '/^VmHWM:/ {printf "%.1f", $2/1024}' "/proc/$DAEMON_PID/status")")
        for f in "$MNT"/backups/t/*.img; do
            [ "$f" = "$IMG_MNT" ] || rm "$f"
        done
    done
    worst=$(printf '%s\n' "${peaks[@]}" | sort -g | tail -n1)
    report "peak RSS, $CONC_N concurrent backups of ${CONC_MB} MiB (resident before: ${before[*]}; peaks: ${peaks[*]} MiB)" "max ${worst} MiB"
fi

# ---------------------------------------------------------------- ls -l
if wants ls; then
    # Records written directly (measurement only): copies of one real backup's record
    # with new ids and times; the target has no key, so they read as any record does.
    head -c 4M /dev/urandom >"$SRC_POOL/volume-vol-small"
    backup vol-small
    SEED=$BACKUP_ID
    # Backups already there (earlier sections, the seed) count towards each total.
    have=$(($(find "$DST_POOL" -maxdepth 1 -name 'backup-*.json' | wc -l) - 1))
    for n in $COUNTS; do
        log "ls -l with $n backups"
        stop_daemon
        python3 - "$DST_POOL" "$SEED" "$have" "$n" <<'PY'
import datetime, json, os, sys, uuid
pool, seed, have, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(f"{pool}/backup-{seed}.json").read()
times = json.loads(text)
# Made one a minute, the newest 3 hours ago: none is among the recent jobs that `jobs`
# keeps after a restart (2 hours), as with backups that accumulated over months.
now = datetime.datetime.now(datetime.timezone.utc)
def stamp(i):
    at = now - datetime.timedelta(hours=3, minutes=want - i)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
for i in range(have, want - 1):
    new = str(uuid.UUID(int=i + 1))
    when = stamp(i)
    with open(f"{pool}/backup-{new}.json", "w") as f:
        f.write(text.replace(seed, new)
                .replace(times["created_at"], when)
                .replace(times["completed_at"], when))
    for ext in ("img", "sums", "leaves"):
        if os.path.exists(f"{pool}/backup-{seed}.{ext}"):
            os.link(f"{pool}/backup-{seed}.{ext}", f"{pool}/backup-{new}.{ext}")
PY
        have=$((n - 1))
        # Restart to the first listing: the daemon's start-up (recovery reads every
        # record), the mount, one plain `ls` (the pool's pages cached, as after a restart
        # of the daemon alone).
        t0=$(now)
        start_daemon
        ls "$MNT/backups/t" >/dev/null
        restart=$(elapsed "$t0" "$(now)")
        # The peak of start-up and the first listing, before any `ls -l`.
        start_peak=$(awk '/^VmHWM:/ {printf "%.1f", $2/1024}' "/proc/$DAEMON_PID/status")
        pls=()
        for _ in 1 2 3; do timed ls "$MNT/backups/t"; pls+=("$LAST"); done >/dev/null
        drop_caches
        timed ls -l "$MNT/backups/t"; first=$LAST
        # Warm, again: wall time, the CPU it cost the daemon and ls, and (with perf) the
        # requests the mount answered, which a busy machine does not change.
        [ "$n" = "${COUNTS##* }" ] && perf_start ls
        cpu0=$(daemon_cpu_ms)
        /usr/bin/time -f '%e %U %S' -o "$T/ls.time" ls -l "$MNT/backups/t" >/dev/null
        cpu=$(($(daemon_cpu_ms) - cpu0))
        [ "$n" = "${COUNTS##* }" ] && perf_stop ls
        read -r second ls_user ls_sys <"$T/ls.time"
        requests=
        if command -v perf >/dev/null; then
            conn=$(mountpoint -d "$MNT" | cut -d: -f2)
            perf record -q -e fuse:fuse_request_send -a -o "$T/req.data" -- ls -l "$MNT/backups/t" >/dev/null 2>&1
            perf script -i "$T/req.data" 2>/dev/null | grep "connection $conn req" >"$T/req.txt" || true
            requests=$(wc -l <"$T/req.txt")
            # By kind: LOOKUP, GETATTR, GETXATTR, READDIR(PLUS), ...
            kinds=$(grep -o '(FUSE_[A-Z_]*)' "$T/req.txt" | tr -d '()' | sed 's/^FUSE_//' | sort | uniq -c |
                sort -rn | awk '{printf "%s%s %d", (NR>1?", ":""), $2, $1}')
            requests=" requests/backup $(awk -v r="$requests" -v n="$n" 'BEGIN{printf "%.1f", r/n}') ($kinds)"
        fi
        lines=$(ls -l "$MNT/backups/t" | grep -c '\.img$')
        [ "$lines" = "$n" ] || die "ls -l shows $lines images of $n"
        # The operator's way to the newest backup of a volume (README): `ls by-volume`,
        # then `readlink` of its latest.img (a lookup of the volume and of latest.img).
        timed ls "$MNT/backups/t/by-volume"; byvol_ls=$LAST
        timed readlink "$MNT/backups/t/by-volume/vol-small/latest.img"; byvol_latest=$LAST
        rss=$(awk '/^VmRSS:/ {r=$2} /^VmHWM:/ {h=$2} END{printf "%.1f MiB (peak %.1f)", r/1024, h/1024}' "/proc/$DAEMON_PID/status")
        # One more backup of the volume (an incremental: its parent is found among the
        # n): its time, and the daemon's peak during it alone.
        echo 5 >"/proc/$DAEMON_PID/clear_refs"
        timed backup "vol-small incremental"; one_backup=$LAST
        have=$((have + 1))
        one_peak=$(awk '/^VmHWM:/ {printf "%.1f", $2/1024}' "/proc/$DAEMON_PID/status")
        report "ls -l of $n backups: cold, warm; daemon CPU, ls CPU (user+sys)" \
            "${first}s ${second}s; ${cpu}ms, $(awk -v u="$ls_user" -v s="$ls_sys" 'BEGIN{printf "%.0f", (u+s)*1000}')ms;$requests"
        report "  $n backups: restart to first ls; plain ls (3 warm runs); daemon RSS" \
            "${restart}s; $(median "${pls[@]}")s (${pls[*]}); $rss; peak by the first ls ${start_peak} MiB"
        report "  $n backups of one volume: ls by-volume; readlink by-volume/VOL/latest.img" \
            "${byvol_ls}s; ${byvol_latest}s"
        report "  $n backups: one more backup of the volume (4 MiB, incremental); the daemon's peak during it" \
            "${one_backup}s; ${one_peak} MiB"
    done >/dev/null
fi
printf '\n'; printf '%s\n' "${ROWS[@]}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
