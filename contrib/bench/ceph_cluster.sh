# Shared by contrib/bench/rbd.sh and rbd_backupfs.sh (sourced, not run): a throw-away
# single-node Ceph cluster made by contrib/ceph-cluster.sh, on the default ports, under
# the test harness's machine-wide lock (/run/backupfs-test-ceph.lock) so that it never
# runs beside the tests' cluster. `start_cluster` sets CONF and exports CEPH_CONF;
# `stop_cluster` stops it (call it from the script's EXIT trap). A run killed before
# its trap left its directory in /run/backupfs-test-ceph/dir: the next run stops that
# cluster through the script, which signals only the daemons it started there.

STATE=/run/backupfs-test-ceph
CLUSTER_SCRIPT="$(dirname "${BASH_SOURCE[0]}")/../ceph-cluster.sh"
D=

stop_cluster() {
    if [ -n "$D" ]; then
        "$CLUSTER_SCRIPT" stop "$D" || true
        rm -f "$STATE/dir"
        D=
    fi
}

start_cluster() {
    exec 9>/run/backupfs-test-ceph.lock
    flock -w 1800 9 || { echo "ceph_cluster.sh: the test cluster lock stayed busy" >&2; exit 1; }
    local old; old=$(cat "$STATE/dir" 2>/dev/null || true)
    case "$old" in
        */backupfs-rbd-bench-cluster.*) "$CLUSTER_SCRIPT" stop "$old" || true ;;
    esac
    D=$(mktemp -d "${TMPDIR:-/var/tmp}/backupfs-rbd-bench-cluster.XXXXXX")
    mkdir -p "$STATE"
    echo "$D" > "$STATE/dir"
    "$CLUSTER_SCRIPT" start "$D" >&2
    export CEPH_CONF=$D/ceph.conf
    CONF=$CEPH_CONF
}
