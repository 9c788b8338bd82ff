# Shared by contrib/bench/rbd.sh and rbd_backupfs.sh (sourced, not run): a throw-away
# single-node Ceph cluster (one monitor, manager and BlueStore OSD on a sparse file, on
# 127.0.0.1), the recipe of tests/common/ceph.rs, under the same machine-wide lock
# (/run/backupfs-test-ceph.lock), with its PIDs written where the test harness sweeps
# them if the script is killed. `start_cluster` sets CONF and exports CEPH_CONF;
# `stop_cluster` stops it (call it from the script's EXIT trap).

STATE=/run/backupfs-test-ceph
D=

stop_cluster() {
    if [ -n "$D" ]; then
        # Newest first: OSD, manager, monitor.
        tac "$STATE/pids" 2>/dev/null | while read -r name pid; do
            kill -TERM "$pid" 2>/dev/null || continue
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        done
        rm -f "$STATE/pids" "$STATE/dir"
        rm -rf "$D"
        D=
    fi
}

start_cluster() {
    exec 9>/run/backupfs-test-ceph.lock
    flock -w 1800 9 || { echo "ceph_cluster.sh: the test cluster lock stayed busy" >&2; exit 1; }
    # A run killed before its clean-up left these: stop them by PID (Ceph daemons only).
    if [ -f "$STATE/pids" ]; then
        tac "$STATE/pids" | while read -r name pid; do
            grep -q '^ceph-' "/proc/$pid/comm" 2>/dev/null && kill -KILL "$pid"
        done
        old=$(cat "$STATE/dir" 2>/dev/null || true)
        case "$old" in */backupfs-test-ceph-*|*/backupfs-rbd-bench-cluster.*) rm -rf "$old" ;; esac
    fi
    D=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-rbd-bench-cluster.XXXXXX")
    mkdir -p "$STATE" "$D"/{run,log,mon/ceph-a,mgr/ceph-x,osd/ceph-0}
    echo "$D" > "$STATE/dir"; : > "$STATE/pids"
    local fsid; fsid=$(uuidgen)
    cat > "$D/ceph.conf" <<EOF
[global]
fsid = $fsid
mon initial members = a
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
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
EOF
    export CEPH_CONF=$D/ceph.conf
    local t="timeout -k 5 60"
    $t ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    $t ceph-authtool --create-keyring "$D/ceph.client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    $t ceph-authtool "$D/mon.keyring" --import-keyring "$D/ceph.client.admin.keyring" >/dev/null
    $t monmaptool --create --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' --fsid "$fsid" "$D/monmap" >/dev/null
    $t ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring"
    ceph-mon -i a -f >"$D/log/mon.out" 2>&1 & echo "mon.a $!" >> "$STATE/pids"
    $t ceph --connect-timeout 45 mon stat >/dev/null
    $t ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' > "$D/mgr/ceph-x/keyring"
    ceph-mgr -i x -f >"$D/log/mgr.out" 2>&1 & echo "mgr.x $!" >> "$STATE/pids"
    local uuid key; uuid=$(uuidgen); key=$(ceph-authtool --gen-print-key)
    echo "{\"cephx_secret\": \"$key\"}" > "$D/osd-secret.json"
    $t ceph osd new "$uuid" -i "$D/osd-secret.json" >/dev/null
    $t ceph-authtool --create-keyring "$D/osd/ceph-0/keyring" --name osd.0 --add-key "$key" >/dev/null
    timeout -k 5 120 ceph-osd -i 0 --mkfs --osd-uuid "$uuid" >"$D/log/osd.mkfs.out" 2>&1
    ceph-osd -i 0 -f >"$D/log/osd.out" 2>&1 & echo "osd.0 $!" >> "$STATE/pids"
    for _ in $(seq 1 240); do
        $t ceph -s -f json 2>/dev/null | jq -e '.osdmap.num_up_osds == 1 and .mgrmap.available' \
            >/dev/null && break
        sleep 0.5
    done
    echo "cluster up in ${SECONDS}s: $D" >&2
    CONF=$CEPH_CONF
}

