//! A real single-node Ceph cluster (monitor, manager, BlueStore OSD on a sparse file, on
//! 127.0.0.1), started once per test binary, shared by its tests, stopped by PID at exit.
//! It never touches a cluster it did not start (one per machine: a lock, a PID sweep).

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Held (flock) by the test process whose cluster is running; released by the kernel
/// when that process ends, however it ends.
const LOCK_PATH: &str = "/run/backupfs-test-ceph.lock";
/// What the running cluster's owner wrote down, for the next owner to sweep if it died:
/// `pids` (one `name pid` a line) and `dir` (the cluster's directory).
const STATE_DIR: &str = "/run/backupfs-test-ceph";
const MON_HOST: &str = "[v2:127.0.0.1:3300,v1:127.0.0.1:6789]";
const MON_PORTS: [u16; 2] = [3300, 6789];
/// The packages that bring each program the harness runs.
const PROGRAMS: [(&str, &str); 7] = [
    ("ceph-mon", "ceph-mon"),
    ("ceph-osd", "ceph-osd"),
    ("ceph-mgr", "ceph-mgr"),
    ("ceph", "ceph-common"),
    ("rbd", "ceph-common"),
    ("ceph-authtool", "ceph-common"),
    ("monmaptool", "ceph-common"),
];
/// The pool every test may use for its images (names prefixed by the test).
pub const POOL: &str = "backupfs-test";

pub struct CephCluster {
    pub dir: PathBuf,
    /// The admin's ceph.conf (with the path of client.admin's keyring).
    pub conf: PathBuf,
    pub fsid: String,
    daemons: Mutex<Vec<(String, Child)>>,
    pools: Mutex<HashSet<String>>,
    clients: Mutex<HashSet<String>>,
    _lock: File,
}

static CLUSTER: OnceLock<CephCluster> = OnceLock::new();
/// Tests share the cluster (read); a test that stops a daemon has it alone (write).
static ACCESS: RwLock<()> = RwLock::new(());

/// The shared cluster, started on first use; hold the guard for the whole test.
pub fn cluster() -> Shared {
    let guard = ACCESS.read();
    Shared {
        _guard: guard,
        cluster: started(),
    }
}

/// The cluster for a test that stops and starts daemons: no other test of this binary
/// runs against it meanwhile.
pub fn cluster_exclusive() -> Exclusive {
    let guard = ACCESS.write();
    Exclusive {
        _guard: guard,
        cluster: started(),
    }
}

pub struct Shared {
    _guard: RwLockReadGuard<'static, ()>,
    cluster: &'static CephCluster,
}

impl std::ops::Deref for Shared {
    type Target = CephCluster;
    fn deref(&self) -> &CephCluster {
        self.cluster
    }
}

pub struct Exclusive {
    _guard: RwLockWriteGuard<'static, ()>,
    cluster: &'static CephCluster,
}

impl std::ops::Deref for Exclusive {
    type Target = CephCluster;
    fn deref(&self) -> &CephCluster {
        self.cluster
    }
}

impl Drop for Exclusive {
    /// A test that failed with the OSD stopped must not leave it stopped for the rest.
    fn drop(&mut self) {
        if !self.running("mon.a") {
            spawn_daemon(&self.dir, &self.daemons, "mon.a", "ceph-mon", &["-i", "a"]);
        }
        if !self.osd_running() {
            spawn_daemon(&self.dir, &self.daemons, "osd.0", "ceph-osd", &["-i", "0"]);
            if let Err(last) = try_wait_healthy(&self.conf, Duration::from_secs(120)) {
                eprintln!("the OSD did not come back: {last}");
            }
        }
    }
}

impl Exclusive {
    fn osd_running(&self) -> bool {
        self.running("osd.0")
    }

    fn running(&self, daemon: &str) -> bool {
        self.daemons.lock().iter().any(|(name, _)| name == daemon)
    }

    /// Stops the monitor (SIGTERM) and waits for the process to end: with the OSD
    /// stopped too, the whole cluster is gone for its clients.
    pub fn stop_mon(&self) {
        let t0 = Instant::now();
        let mut daemons = self.daemons.lock();
        if let Some(index) = daemons.iter().position(|(name, _)| name == "mon.a") {
            let (name, child) = daemons.remove(index);
            stop_child(&name, child);
        }
        drop(daemons);
        write_pids(&self.daemons.lock());
        eprintln!("mon.a stopped in {:.1}s", t0.elapsed().as_secs_f64());
    }

    /// Starts the monitor again (the OSD, if stopped, with `start_osd`).
    pub fn start_mon(&self) {
        if !self.running("mon.a") {
            spawn_daemon(&self.dir, &self.daemons, "mon.a", "ceph-mon", &["-i", "a"]);
        }
    }

    /// Stops the OSD (SIGTERM, as a crash of its host would look to clients once the
    /// monitor marks it down) and waits for the process to end.
    pub fn stop_osd(&self) {
        let t0 = Instant::now();
        let mut daemons = self.daemons.lock();
        if let Some(index) = daemons
            .iter()
            .position(|(name, _)| name.starts_with("osd."))
        {
            let (name, child) = daemons.remove(index);
            stop_child(&name, child);
        }
        drop(daemons);
        write_pids(&self.daemons.lock());
        eprintln!("osd.0 stopped in {:.1}s", t0.elapsed().as_secs_f64());
    }

    /// Starts the OSD again and waits until every placement group is active+clean.
    pub fn start_osd(&self) {
        let t0 = Instant::now();
        if !self.osd_running() {
            spawn_daemon(&self.dir, &self.daemons, "osd.0", "ceph-osd", &["-i", "0"]);
        }
        wait_healthy(&self.conf, Duration::from_secs(120));
        eprintln!(
            "osd.0 up and all PGs active+clean in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
    }
}

/// The cluster (started once; later calls wait for the first to finish).
fn started() -> &'static CephCluster {
    CLUSTER.get_or_init(start)
}

fn start() -> CephCluster {
    let t0 = Instant::now();
    for (program, package) in PROGRAMS {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {program}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{program} is missing: apt-get install {package} (contrib/test.sh installs \
             ceph-mon ceph-osd ceph-mgr ceph-common)"
        );
    }
    let lock = take_machine_lock();
    sweep_stale();
    wait_for_free_ports();

    let dir = std::env::temp_dir().join(format!("backupfs-test-ceph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["run", "log", "mon/ceph-a", "mgr/ceph-x", "osd/ceph-0"] {
        std::fs::create_dir_all(dir.join(sub)).expect("cluster directory");
    }
    std::fs::create_dir_all(STATE_DIR).expect("state directory");
    std::fs::write(
        Path::new(STATE_DIR).join("dir"),
        dir.to_string_lossy().as_bytes(),
    )
    .expect("state file");
    write_pids(&[]);
    // From here on, whatever happens, the daemons go at exit.
    // SAFETY: registers a plain extern "C" function with no arguments.
    unsafe { libc::atexit(stop_at_exit) };

    let fsid = uuid::Uuid::new_v4().to_string();
    let conf = dir.join("ceph.conf");
    std::fs::write(&conf, cluster_conf(&dir, &fsid)).expect("ceph.conf");
    let d = |rel: &str| dir.join(rel).to_string_lossy().into_owned();
    let daemons = Mutex::new(Vec::new());

    // Monitor: keys, a monmap, mkfs, start, wait for quorum.
    let mon_keyring = d("mon.keyring");
    let admin_keyring = d("ceph.client.admin.keyring");
    run(
        &conf,
        30,
        "ceph-authtool",
        &[
            "--create-keyring",
            &mon_keyring,
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        ],
    );
    run(
        &conf,
        30,
        "ceph-authtool",
        &[
            "--create-keyring",
            &admin_keyring,
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mds",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        ],
    );
    run(
        &conf,
        30,
        "ceph-authtool",
        &[&mon_keyring, "--import-keyring", &admin_keyring],
    );
    run(
        &conf,
        30,
        "monmaptool",
        &[
            "--create",
            "--addv",
            "a",
            MON_HOST,
            "--fsid",
            &fsid,
            &d("monmap"),
        ],
    );
    run(
        &conf,
        60,
        "ceph-mon",
        &[
            "--mkfs",
            "-i",
            "a",
            "--monmap",
            &d("monmap"),
            "--keyring",
            &mon_keyring,
        ],
    );
    spawn_daemon(&dir, &daemons, "mon.a", "ceph-mon", &["-i", "a"]);
    run(
        &conf,
        60,
        "ceph",
        &["--connect-timeout", "45", "mon", "stat"],
    );

    // Manager: without one the cluster reports no placement group states.
    let mgr_key = run(
        &conf,
        30,
        "ceph",
        &[
            "auth",
            "get-or-create",
            "mgr.x",
            "mon",
            "allow profile mgr",
            "osd",
            "allow *",
            "mds",
            "allow *",
        ],
    );
    std::fs::write(dir.join("mgr/ceph-x/keyring"), mgr_key).expect("mgr keyring");
    spawn_daemon(&dir, &daemons, "mgr.x", "ceph-mgr", &["-i", "x"]);

    // OSD: BlueStore on a sparse file (no LVM, no loop device).
    let osd_uuid = uuid::Uuid::new_v4().to_string();
    let osd_key = run(&conf, 30, "ceph-authtool", &["--gen-print-key"])
        .trim()
        .to_string();
    std::fs::write(
        dir.join("osd-secret.json"),
        format!("{{\"cephx_secret\": \"{osd_key}\"}}"),
    )
    .expect("osd secret");
    let osd_id = run(
        &conf,
        60,
        "ceph",
        &["osd", "new", &osd_uuid, "-i", &d("osd-secret.json")],
    );
    assert_eq!(
        osd_id.trim(),
        "0",
        "the first OSD of a new cluster is osd.0"
    );
    run(
        &conf,
        30,
        "ceph-authtool",
        &[
            "--create-keyring",
            &d("osd/ceph-0/keyring"),
            "--name",
            "osd.0",
            "--add-key",
            &osd_key,
        ],
    );
    run(
        &conf,
        120,
        "ceph-osd",
        &["-i", "0", "--mkfs", "--osd-uuid", &osd_uuid],
    );
    spawn_daemon(&dir, &daemons, "osd.0", "ceph-osd", &["-i", "0"]);
    wait_healthy(&conf, Duration::from_secs(120));

    let cluster = CephCluster {
        dir,
        conf,
        fsid,
        daemons,
        pools: Mutex::new(HashSet::new()),
        clients: Mutex::new(HashSet::new()),
        _lock: lock,
    };
    cluster.pool(POOL);
    eprintln!(
        "ceph test cluster up in {:.1}s ({})",
        t0.elapsed().as_secs_f64(),
        cluster.dir.display()
    );
    cluster
}

fn cluster_conf(dir: &Path, fsid: &str) -> String {
    let d = dir.display();
    format!(
        "[global]
fsid = {fsid}
mon initial members = a
mon host = {MON_HOST}
public network = 127.0.0.0/8
ms bind ipv6 = false
run dir = {d}/run
pid file = {d}/run/$cluster-$name.pid
admin socket = {d}/run/$cluster-$name.$pid.asok
log file = {d}/log/$name.log
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
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
keyring = {d}/ceph.client.admin.keyring
[mon]
mon data = {d}/mon/$cluster-$id
[mgr]
mgr data = {d}/mgr/$cluster-$id
[osd]
osd data = {d}/osd/$cluster-$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 4G
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
osd memory target = 1G
bluestore cache autotune = false
bluestore cache size = 128M
osd op num shards = 2
osd op num threads per shard = 1
"
    )
}

/// Runs a Ceph program with `CEPH_CONF`, killed after `timeout_secs`; its stdout.
/// Panics (failing the test) when it fails.
#[track_caller]
pub fn run(conf: &Path, timeout_secs: u64, program: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(timeout_secs.to_string())
        .arg(program)
        .args(args)
        .env("CEPH_CONF", conf)
        .stdin(Stdio::null())
        .output()
        .expect("timeout(1) runs");
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts a daemon in the foreground of its own process (`-f`), output to its log
/// directory, and writes its PID down at once for a later sweep.
fn spawn_daemon(
    dir: &Path,
    daemons: &Mutex<Vec<(String, Child)>>,
    name: &str,
    program: &str,
    args: &[&str],
) {
    let log = File::create(dir.join("log").join(format!("{name}.out"))).expect("daemon log");
    // `-c` puts the cluster's own directory on the daemon's command line: the sweep of
    // a later run signals only processes that name it (a PID may have been reused).
    let child = Command::new(program)
        .args(args)
        .arg("-f")
        .arg("-c")
        .arg(dir.join("ceph.conf"))
        .env("CEPH_CONF", dir.join("ceph.conf"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("daemon log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} does not start: {e}"));
    let mut daemons = daemons.lock();
    daemons.push((name.to_string(), child));
    write_pids(&daemons);
}

fn write_pids(daemons: &[(String, Child)]) {
    let text: String = daemons
        .iter()
        .map(|(name, child)| format!("{name} {}\n", child.id()))
        .collect();
    let path = Path::new(STATE_DIR).join("pids");
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// SIGTERM, up to 10 s to exit, then SIGKILL.
fn stop_child(name: &str, mut child: Child) {
    // SAFETY: kill(2) on our own child, which has not been reaped (no PID reuse).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{name} did not stop on SIGTERM: SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
}

extern "C" fn stop_at_exit() {
    let Some(cluster) = CLUSTER.get() else {
        // Start-up failed half-way: the PIDs are only in the state file.
        sweep_stale();
        return;
    };
    // A thread that panicked while holding this lock is gone; don't wait forever on it.
    if let Some(mut daemons) = cluster.daemons.try_lock_for(Duration::from_secs(5)) {
        // Clients and OSD before the monitor, as they started.
        while let Some((name, child)) = daemons.pop() {
            stop_child(&name, child);
        }
    }
    sweep_stale();
}

/// Stops daemons a previous owner of the lock left running (killed before its exit
/// handler ran) and removes its directory. Only Ceph daemons whose command line names
/// that cluster's directory are signalled: a PID may have been reused since, even by
/// another Ceph daemon of a real cluster on this machine.
fn sweep_stale() {
    let state = Path::new(STATE_DIR);
    let dir = std::fs::read_to_string(state.join("dir"))
        .map(|d| PathBuf::from(d.trim()))
        .ok()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("backupfs-test-ceph-"))
        });
    let pids = match &dir {
        Some(_) => std::fs::read_to_string(state.join("pids")).unwrap_or_default(),
        None => String::new(),
    };
    for line in pids.lines().rev() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(pid)) = (
            fields.next(),
            fields.next().and_then(|p| p.parse::<i32>().ok()),
        ) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let conf = dir.as_ref().map(|d| d.join("ceph.conf"));
        let names_our_dir = conf.is_some_and(|conf| {
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == conf.as_os_str().as_encoded_bytes())
        });
        if !comm.trim().starts_with("ceph-") || !names_our_dir {
            continue;
        }
        eprintln!("stopping {name} (pid {pid}) left by an earlier test run");
        // SAFETY: kill(2) with a PID checked above to be a Ceph daemon of our cluster.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // A directory that is not the harness's (a benchmark's cluster, made by
    // contrib/ceph-cluster.sh) stays named for its own script to stop.
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(state.join("dir"));
    }
    let _ = std::fs::remove_file(state.join("pids"));
}

/// The machine-wide lock: another test binary's cluster runs until it exits, so wait.
fn take_machine_lock() -> File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .expect("cluster lock file");
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    let mut told = false;
    loop {
        // SAFETY: flock on a descriptor we own (closed on exec, so daemons don't keep it).
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return file;
        }
        assert!(
            Instant::now() < deadline,
            "{LOCK_PATH} held for 30 minutes by another test run"
        );
        if !told {
            eprintln!("waiting for another test run's Ceph cluster to finish ({LOCK_PATH})");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A cluster nobody here started (a developer's by hand) may hold the monitor's ports:
/// wait for it rather than kill it.
fn wait_for_free_ports() {
    let deadline = Instant::now() + Duration::from_secs(10 * 60);
    let mut told = false;
    while MON_PORTS
        .iter()
        .any(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_err())
    {
        assert!(
            Instant::now() < deadline,
            "ports 3300/6789 stayed busy for 10 minutes: another Ceph monitor runs on this machine"
        );
        if !told {
            eprintln!(
                "ports 3300/6789 are busy (a Ceph monitor this harness did not start): waiting"
            );
            told = true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits until the OSD is up, the manager available and every PG active+clean.
#[track_caller]
fn wait_healthy(conf: &Path, timeout: Duration) {
    if let Err(last) = try_wait_healthy(conf, timeout) {
        panic!("the Ceph test cluster did not become healthy: {last}");
    }
}

fn try_wait_healthy(conf: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = Command::new("timeout")
            .args([
                "-k",
                "5",
                "20",
                "ceph",
                "--connect-timeout",
                "15",
                "-s",
                "-f",
                "json",
            ])
            .env("CEPH_CONF", conf)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out
            && let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            let pgs = status["pgmap"]["num_pgs"].as_u64().unwrap_or(0);
            let clean: u64 = status["pgmap"]["pgs_by_state"]
                .as_array()
                .map(|states| {
                    states
                        .iter()
                        .filter(|s| s["state_name"] == "active+clean")
                        .filter_map(|s| s["count"].as_u64())
                        .sum()
                })
                .unwrap_or(0);
            let ok = status["osdmap"]["num_up_osds"] == 1
                && status["mgrmap"]["available"] == true
                && clean == pgs
                && status["health"]["status"] == "HEALTH_OK";
            // A new cluster has no pool yet (0 PGs): that counts as clean.
            if ok {
                return Ok(());
            }
            last = format!(
                "{} pgs, {clean} active+clean, health {}",
                pgs, status["health"]["status"]
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(last)
}

/// A client's identity and configuration, as a backupfs config would name them.
#[derive(Debug, Clone)]
pub struct ClientConf {
    pub conf: PathBuf,
    pub name: String,
}

impl CephCluster {
    /// The admin client (all rights).
    pub fn admin(&self) -> ClientConf {
        ClientConf {
            conf: self.conf.clone(),
            name: "admin".to_string(),
        }
    }

    /// A cephx user `client.<name>` with Cinder's rights (`profile rbd` on every pool)
    /// and a ceph.conf of its own that names only the monitors and its keyring.
    pub fn client(&self, name: &str) -> ClientConf {
        let conf = self.dir.join(format!("client.{name}.conf"));
        let mut clients = self.clients.lock();
        if clients.insert(name.to_string()) {
            let keyring = self.dir.join(format!("client.{name}.keyring"));
            let key = self.ceph(&[
                "auth",
                "get-or-create",
                &format!("client.{name}"),
                "mon",
                "profile rbd",
                "osd",
                "profile rbd",
                "mgr",
                "profile rbd",
            ]);
            std::fs::write(&keyring, key).expect("client keyring");
            std::fs::write(
                &conf,
                format!(
                    "[global]\nfsid = {}\nmon host = {MON_HOST}\nkeyring = {}\n",
                    self.fsid,
                    keyring.display()
                ),
            )
            .expect("client conf");
        }
        ClientConf {
            conf,
            name: name.to_string(),
        }
    }

    /// Creates the pool (8 PGs, initialised for RBD) unless this run has already.
    pub fn pool(&self, name: &str) -> String {
        let mut pools = self.pools.lock();
        if pools.insert(name.to_string()) {
            self.ceph(&["osd", "pool", "create", name, "8"]);
            run(&self.conf, 60, "rbd", &["pool", "init", name]);
        }
        name.to_string()
    }

    #[track_caller]
    pub fn ceph(&self, args: &[&str]) -> String {
        let mut all = vec!["--connect-timeout", "30"];
        all.extend_from_slice(args);
        run(&self.conf, 60, "ceph", &all)
    }

    #[track_caller]
    pub fn rbd(&self, args: &[&str]) -> String {
        run(&self.conf, 120, "rbd", args)
    }

    /// The image names of `spec` (`pool` or `pool/namespace`), sorted.
    pub fn images(&self, spec: &str) -> Vec<String> {
        let (pool, namespace) = spec.split_once('/').unwrap_or((spec, ""));
        let out = self.rbd(&["ls", "--pool", pool, "--namespace", namespace]);
        let mut names: Vec<String> = out.lines().map(str::to_string).collect();
        names.sort();
        names
    }

    /// The snapshot names of image `image` of `spec`.
    pub fn snapshots(&self, spec: &str, image: &str) -> Vec<String> {
        let out = self.rbd(&["snap", "ls", "--format", "json", &format!("{spec}/{image}")]);
        json_names(&out)
    }

    /// `rbd import` of a file as a new image.
    pub fn import(&self, pool: &str, image: &str, file: &Path) {
        self.rbd(&[
            "import",
            "--dest-pool",
            pool,
            &file.to_string_lossy(),
            image,
        ]);
    }

    /// sha256 of the image's contents as `rbd export` reads them.
    pub fn export_sha256(&self, pool: &str, image: &str) -> String {
        let out = Command::new("timeout")
            .args(["-k", "5", "120", "bash", "-c"])
            .arg(format!(
                "set -o pipefail; rbd export --no-progress '{pool}/{image}' - | sha256sum"
            ))
            .env("CEPH_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "rbd export {pool}/{image} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    }

    /// The client ids of the image's watchers, as `rbd status` lists them.
    pub fn watcher_ids(&self, pool: &str, image: &str) -> Vec<u64> {
        let out = self.rbd(&["status", "--format", "json", &format!("{pool}/{image}")]);
        let status: serde_json::Value = serde_json::from_str(&out).expect("rbd status is JSON");
        status["watchers"]
            .as_array()
            .map(|ws| ws.iter().filter_map(|w| w["client"].as_u64()).collect())
            .unwrap_or_default()
    }

    /// Another client holding a watch on the image, as QEMU does while a VM uses it
    /// (`rbd watch` until its standard input closes). Stopped when the guard drops.
    pub fn hold_watch(&self, pool: &str, image: &str) -> Watch {
        let before = self.watcher_ids(pool, image).len();
        let mut child = Command::new("rbd")
            .args(["watch", &format!("{pool}/{image}")])
            .env("CEPH_CONF", &self.conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rbd watch starts");
        let stdin = child.stdin.take();
        let watch = Watch { child, stdin };
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.watcher_ids(pool, image).len() <= before {
            assert!(
                Instant::now() < deadline,
                "rbd watch {pool}/{image} never registered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        watch
    }
}

/// A running `rbd watch`; closing its input ends it, and Drop makes sure it has.
pub struct Watch {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `name` of each object of a JSON array, as `rbd ... --format json` lists them.
pub fn json_names(out: &str) -> Vec<String> {
    let list: serde_json::Value = serde_json::from_str(out).expect("rbd lists in JSON");
    list.as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
