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
