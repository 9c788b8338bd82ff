#!/usr/bin/env bash
# A throw-away single-node Ceph cluster, to try backupfs' `rbd` backends and targets
# without a real one (and for the benchmarks): one monitor, manager and BlueStore OSD
# on a sparse file, on 127.0.0.1, all in one directory of its own.
#
#   contrib/ceph-cluster.sh start DIR [--mon-port PORT] [--mon-port-v1 PORT] [--rgw-port PORT]
#   contrib/ceph-cluster.sh stop DIR
#
# `start` needs DIR new or empty; it prints the ceph.conf to use (CEPH_CONF=DIR/ceph.conf,
# its admin keyring inside) once the OSD is up and pool `rbd` is ready. The monitor
# listens on 3300 (msgr2) and 6789 (v1) unless the options say otherwise: a second
# cluster on the machine needs other ports. `--rgw-port` also starts an S3 gateway
# (Debian's radosgw) on 127.0.0.1:PORT with a user `tester` (keys TESTACCESSKEY /
# TESTSECRETKEY). `stop` stops only the daemons this script started in DIR: by the PIDs
# it wrote down, and only after checking that each process is still the one it started
# (its command line names DIR/ceph.conf and its start time matches); then removes DIR.
# Packages: ceph-mon ceph-osd ceph-mgr ceph-common (and radosgw), jq, uuid-runtime.
set -euo pipefail

usage() {
    sed -n '6,7p' "$0" | sed 's/^# *//' >&2
    exit 2
}

# The process start time (clock ticks since boot, field 22 of /proc/PID/stat): with the
# PID it names one process for good, even after the PID is reused.
start_time() {
    sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20
}

# Whether PID is a daemon this script started in DIR with START_TIME.
ours() {
    local pid=$1 started=$2
    [ "$(start_time "$pid")" = "$started" ] || return 1
    tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$D/ceph.conf"
}

# Starts a daemon in the foreground of its own process, DIR/ceph.conf on its command
# line, and writes down its PID and start time at once.
spawn() {
    local name=$1; shift
    "$@" -f -c "$D/ceph.conf" >"$D/log/$name.out" 2>&1 &
    local pid=$!
    echo "$name $pid $(start_time "$pid")" >> "$D/pids"
}

stop() {
    [ -f "$D/.backupfs-ceph-cluster" ] || {
        echo "ceph-cluster.sh: $D was not made by this script; nothing stopped" >&2
        exit 1
    }
    # Newest first: gateway, OSD, manager, monitor.
    tac "$D/pids" 2>/dev/null | while read -r name pid started; do
        ours "$pid" "$started" || continue
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 1 100); do ours "$pid" "$started" || break; sleep 0.1; done
        if ours "$pid" "$started"; then
            echo "ceph-cluster.sh: $name (pid $pid) did not stop on SIGTERM: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$D"
}

start() {
    local p2=3300 p1=6789 rgw=
    while [ $# -gt 0 ]; do
        case "$1" in
            --mon-port) p2=$2; shift 2 ;;
            --mon-port-v1) p1=$2; shift 2 ;;
            --rgw-port) rgw=$2; shift 2 ;;
            *) usage ;;
        esac
    done
    for program in ceph-mon ceph-osd ceph-mgr ceph ceph-authtool monmaptool jq uuidgen \
        ${rgw:+radosgw radosgw-admin curl}; do
        command -v "$program" >/dev/null || {
            echo "ceph-cluster.sh: $program is missing (Debian: ceph-mon ceph-osd ceph-mgr" \
                "ceph-common radosgw jq uuid-runtime curl)" >&2
            exit 1
        }
    done
    mkdir -p "$D"
    if [ -n "$(ls -A "$D")" ]; then
        echo "ceph-cluster.sh: $D is not empty" >&2
        exit 1
    fi
    : > "$D/.backupfs-ceph-cluster"
    made=1
    : > "$D/pids"
    mkdir -p "$D"/{run,log,mon/ceph-a,mgr/ceph-x,osd/ceph-0,rgw/ceph-rgw.a}
    local fsid; fsid=$(uuidgen)
    local mon_host="[v2:127.0.0.1:$p2,v1:127.0.0.1:$p1]"
    cat > "$D/ceph.conf" <<EOF
[global]
fsid = $fsid
mon initial members = a
mon host = $mon_host
public network = 127.0.0.0/8
ms bind ipv6 = false
run dir = $D/run
log file = $D/log/\$name.log
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
[client.admin]
keyring = $D/ceph.client.admin.keyring
[mon]
mon data = $D/mon/\$cluster-\$id
[mgr]
mgr data = $D/mgr/\$cluster-\$id
[osd]
osd data = $D/osd/\$cluster-\$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 8G
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
osd memory target = 1G
bluestore cache autotune = false
bluestore cache size = 128M
osd op num shards = 2
osd op num threads per shard = 1
[client.rgw.a]
rgw data = $D/rgw/ceph-rgw.a
keyring = $D/rgw/ceph-rgw.a/keyring
rgw frontends = beast endpoint=127.0.0.1:${rgw:-7480}
EOF
    export CEPH_CONF=$D/ceph.conf
    local t="timeout -k 5 60"
    $t ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    $t ceph-authtool --create-keyring "$D/ceph.client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    $t ceph-authtool "$D/mon.keyring" --import-keyring "$D/ceph.client.admin.keyring" >/dev/null
    $t monmaptool --create --addv a "$mon_host" --fsid "$fsid" "$D/monmap" >/dev/null
    $t ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" -c "$D/ceph.conf"
    spawn mon.a ceph-mon -i a
    $t ceph --connect-timeout 45 mon stat >/dev/null
    $t ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        > "$D/mgr/ceph-x/keyring"
    spawn mgr.x ceph-mgr -i x
    local uuid key; uuid=$(uuidgen); key=$(ceph-authtool --gen-print-key)
    echo "{\"cephx_secret\": \"$key\"}" > "$D/osd-secret.json"
    $t ceph osd new "$uuid" -i "$D/osd-secret.json" >/dev/null
    $t ceph-authtool --create-keyring "$D/osd/ceph-0/keyring" --name osd.0 --add-key "$key" >/dev/null
    timeout -k 5 120 ceph-osd -i 0 --mkfs --osd-uuid "$uuid" -c "$D/ceph.conf" \
        >"$D/log/osd.mkfs.out" 2>&1
    spawn osd.0 ceph-osd -i 0
    local up=
    for _ in $(seq 1 240); do
        if $t ceph -s -f json 2>/dev/null \
            | jq -e '.osdmap.num_up_osds == 1 and .mgrmap.available' >/dev/null; then
            up=1
            break
        fi
        sleep 0.5
    done
    [ -n "$up" ] || { echo "ceph-cluster.sh: the OSD did not come up (logs: $D/log)" >&2; exit 1; }
    $t ceph osd pool create rbd 8 >/dev/null
    $t rbd pool init rbd
    if [ -n "$rgw" ]; then
        $t ceph auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' \
            > "$D/rgw/ceph-rgw.a/keyring"
        spawn rgw.a radosgw -n client.rgw.a
        for _ in $(seq 1 240); do
            curl -s -o /dev/null "http://127.0.0.1:$rgw/" && break
            sleep 0.5
        done
        $t radosgw-admin user create --uid=tester --display-name=Tester \
            --access-key=TESTACCESSKEY --secret-key=TESTSECRETKEY >/dev/null
    fi
    echo "cluster up in ${SECONDS}s: CEPH_CONF=$D/ceph.conf"
}

[ $# -ge 2 ] || usage
command=$1
D=$(realpath -m "$2")
shift 2
case "$command" in
    start)
        # A start that fails half-way stops what it started (once DIR is its own).
        made=
        trap 'status=$?; [ $status -eq 0 ] || [ -z "$made" ] || stop; exit $status' EXIT
        start "$@"
        trap - EXIT
        ;;
    stop) [ $# -eq 0 ] || usage; stop ;;
    *) usage ;;
esac
