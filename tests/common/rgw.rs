//! A radosgw for the s3 tests (Debian's `radosgw`, started by contrib/ceph-cluster.sh on
//! ports each test binary names, once per binary, stopped at exit), and an S3 client on
//! it with the cluster's test user. `BACKUPFS_TEST_S3_DIR=DIR` reuses a cluster that
//! `contrib/ceph-cluster.sh start DIR --rgw-port N` started (faster when iterating); it
//! is left running.

use backupfs::targets::s3::client::{Client, Endpoint};
use backupfs::targets::s3::sigv4::Credentials;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Gateway {
    pub url: String,
    /// The cluster's directory (its `pids` file names the gateway's PID).
    pub dir: PathBuf,
}

static GATEWAY: OnceLock<Gateway> = OnceLock::new();

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ceph-cluster.sh")
}

extern "C" fn stop_cluster() {
    if let Some(gateway) = GATEWAY.get()
        && std::env::var_os("BACKUPFS_TEST_S3_DIR").is_none()
    {
        let _ = Command::new(script())
            .arg("stop")
            .arg(&gateway.dir)
            .status();
    }
}

/// This binary's gateway, started on first use: `tag` names its directory, `ports` are
/// the monitor's (v2, v1) and the gateway's, which no other test binary may use (so
/// that binaries can run at the same time).
pub fn gateway(tag: &str, ports: [u16; 3]) -> &'static Gateway {
    GATEWAY.get_or_init(|| {
        if let Some(dir) = std::env::var_os("BACKUPFS_TEST_S3_DIR") {
            let dir = PathBuf::from(dir);
            let conf = std::fs::read_to_string(dir.join("ceph.conf")).expect("ceph.conf");
            let port = conf
                .lines()
                .find_map(|l| l.split("endpoint=127.0.0.1:").nth(1))
                .expect("rgw frontends in ceph.conf")
                .trim()
                .to_string();
            return Gateway {
                url: format!("http://127.0.0.1:{port}"),
                dir,
            };
        }
        let dir = std::env::temp_dir().join(format!("backupfs-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = Instant::now();
        let [mon, mon_v1, rgw] = ports.map(|p| p.to_string());
        let status = Command::new(script())
            .arg("start")
            .arg(&dir)
            .args(["--mon-port", &mon, "--mon-port-v1", &mon_v1, "--rgw-port", &rgw])
            .status()
            .expect("contrib/ceph-cluster.sh runs");
        // SAFETY: registers a plain extern "C" function with no arguments.
        unsafe { libc::atexit(stop_cluster) };
        assert!(
            status.success(),
            "contrib/ceph-cluster.sh start failed (needs ceph-mon ceph-osd ceph-mgr ceph-common radosgw)"
        );
        eprintln!("radosgw up in {:.1}s", t0.elapsed().as_secs_f64());
        Gateway {
            url: format!("http://127.0.0.1:{rgw}"),
            dir,
        }
    })
}

/// A client of `bucket` on `gateway`, as the cluster's test user.
pub fn client(gateway: &Gateway, bucket: &str) -> Client {
    Client::new(
        Endpoint {
            url: gateway.url.clone(),
            bucket: bucket.to_string(),
            region: "us-east-1".to_string(),
        },
        Credentials {
            access_key: "TESTACCESSKEY".to_string(),
            secret_key: "TESTSECRETKEY".to_string(),
        },
        Duration::from_secs(30),
    )
    .unwrap()
}

/// A throw-away CA made with `openssl` in `dir`: `<name>.pem` (its certificate, which
/// is returned) and `<name>.key`.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (pem, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    openssl(&format!(
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
         -subj /CN=backupfs-test-{name} -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign -keyout {} -out {}",
        key.display(),
        pem.display()
    ));
    // As a ca_file must be (whatever the umask): not writable by group or others.
    std::fs::set_permissions(&pem, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    pem
}

/// Runs `openssl` with `args`, split at white space (the paths here have none).
fn openssl(args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .output()
        .expect("openssl runs (Debian: openssl)");
    assert!(out.status.success(), "openssl {args}: {out:?}");
}

/// A second gateway of a cluster that speaks https alone, its server certificate (for
/// 127.0.0.1 and localhost) from a CA of its own; it also answers on 127.0.0.2, an
/// address its certificate does not name.
pub struct TlsGateway {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// `https://127.0.0.2:PORT`: the same gateway by an address its certificate lacks.
    pub unnamed_url: String,
    /// The CA's certificate (PEM): what `ca_file` names.
    pub ca: PathBuf,
    /// Its certificates, keys, keyring and log.
    pub dir: PathBuf,
}

static TLS_GATEWAY: OnceLock<TlsGateway> = OnceLock::new();

/// The https gateway's process: stopped (and waited for) at exit.
static TLS_CHILD: std::sync::Mutex<Option<std::process::Child>> = std::sync::Mutex::new(None);

/// Stops the https gateway: SIGTERM, SIGKILL after 10 s.
fn stop_child(mut child: std::process::Child) {
    // SAFETY: signals our own child, not yet waited for (its PID cannot be reused).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while matches!(child.try_wait(), Ok(None)) {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

extern "C" fn stop_tls_gateway() {
    let child = TLS_CHILD.lock().ok().and_then(|mut child| child.take());
    if let Some(child) = child {
        stop_child(child);
    }
    if let Some(tls) = TLS_GATEWAY.get() {
        let _ = std::fs::remove_dir_all(&tls.dir);
    }
}

/// This binary's https gateway on `gateway`'s cluster (its own cephx user, the same
/// buckets and users), started on first use on `port`, which no other test binary may
/// use; stopped at exit.
pub fn tls_gateway(gateway: &Gateway, port: u16) -> &'static TlsGateway {
    TLS_GATEWAY.get_or_init(|| {
        let t0 = Instant::now();
        let dir = gateway.dir.join(format!("tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let ca = make_ca(&dir, "ca");
        let path = |name: &str| dir.join(name).display().to_string();
        openssl(&format!(
            "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
             -keyout {} -out {}",
            path("server.key"),
            path("server.csr")
        ));
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&format!(
            "x509 -req -days 2 -in {} -CA {} -CAkey {} -CAcreateserial -extfile {} -out {}",
            path("server.csr"),
            path("ca.pem"),
            path("ca.key"),
            path("server.ext"),
            path("server.pem")
        ));
        // A name of its own: the first gateway's admin socket stays its own.
        let conf = gateway.dir.join("ceph.conf");
        let keyring = Command::new("ceph")
            .arg("-c")
            .arg(&conf)
            .args(["auth", "get-or-create", "client.rgw.tls"])
            .args(["mon", "allow rw", "osd", "allow rwx"])
            .output()
            .expect("ceph runs");
        assert!(keyring.status.success(), "{keyring:?}");
        std::fs::write(dir.join("keyring"), &keyring.stdout).unwrap();
        let log = std::fs::File::create(dir.join("rgw.out")).unwrap();
        let frontends = format!(
            "beast ssl_endpoint=127.0.0.1:{port} ssl_endpoint=127.0.0.2:{port} \
             ssl_certificate={} ssl_private_key={}",
            path("server.pem"),
            path("server.key")
        );
        let mut child = Command::new("radosgw")
            .args(["-n", "client.rgw.tls", "-f", "-c"])
            .arg(&conf)
            .args(["--keyring", &path("keyring"), "--rgw-data", &path("data")])
            .args(["--rgw-frontends", &frontends])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("radosgw runs");
        let mut listening = false;
        // Up to 30 s, unless it exits first (its port taken, say).
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                listening = true;
                break;
            }
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !listening {
            stop_child(child);
            panic!(
                "radosgw with TLS did not listen: see {}/rgw.out",
                dir.display()
            );
        }
        *TLS_CHILD.lock().unwrap() = Some(child);
        // SAFETY: registers a plain extern "C" function with no arguments; it runs
        // before the cluster's (registered earlier), which stops the cluster.
        unsafe { libc::atexit(stop_tls_gateway) };
        eprintln!("https radosgw up in {:.1}s", t0.elapsed().as_secs_f64());
        TlsGateway {
            url: format!("https://127.0.0.1:{port}"),
            unnamed_url: format!("https://127.0.0.2:{port}"),
            ca,
            dir,
        }
    })
}
