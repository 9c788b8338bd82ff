//! Several nodes, one `s3` target: three daemons (own mountpoints, state directories and
//! runtime directories; one configuration but `node` and `state_dir`) serve one prefix of
//! a bucket on a real radosgw (contrib/ceph-cluster.sh, on ports of its own, stopped at
//! exit; `BACKUPFS_TEST_S3_DIR=DIR` reuses one started by hand, as in tests/s3.rs).

mod common;

use backupfs::targets::s3;
use backupfs::targets::s3::client::Client;
use common::rgw::{self, Gateway};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LEASE: u64 = 3;
const BUCKET: &str = "backupfs-test";
const NODES: [&str; 3] = ["a", "b", "c"];

/// The gateway: its own cluster, on ports neither tests/s3.rs (3397, 6797, 7497) nor the
/// RBD harness (3300, 6789) use, so those can run at the same time.
fn gateway() -> &'static Gateway {
    rgw::gateway("s3n", [3396, 6796, 7496])
}

fn client() -> Client {
    rgw::client(gateway(), BUCKET)
}

struct Cluster {
    gold: PathBuf,
    prefix: String,
    configs: Vec<PathBuf>,
}

/// A volume pool all three nodes share, one prefix of the test bucket, and a
/// configuration per node.
fn cluster(sb: &mut Sandbox) -> Cluster {
    gateway();
    client().create_bucket().unwrap();
    let gold = sb.mkdir("gold");
    let credentials = sb.path("credentials");
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = TESTACCESSKEY\naws_secret_access_key = TESTSECRETKEY\n",
    )
    .unwrap();
    std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = sb.path("key");
    s3::keygen(&key).unwrap();
    let prefix = format!("nodes-{}/", &uuid::Uuid::new_v4().to_string()[..8]);
    let configs = NODES
        .iter()
        .map(|node| {
            let state = sb.mkdir(&format!("state-{node}"));
            let path = sb.path(&format!("{node}.toml"));
            std::fs::write(
                &path,
                format!(
                    "state_dir = \"{}\"\nnode = \"{node}\"\nlease_seconds = {LEASE}\n\
                     [backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
                     [targets.off]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\n\
                     prefix = \"{prefix}\"\ncredentials = \"{}\"\nencryption_key = \"{}\"\n",
                    state.display(),
                    gold.display(),
                    gateway().url,
                    credentials.display(),
                    key.display(),
                ),
            )
            .unwrap();
            path
        })
        .collect();
    Cluster {
        gold,
        prefix,
        configs,
    }
}

impl Cluster {
    fn start(&self, sb: &mut Sandbox, i: usize, env: &[(&str, &str)]) -> Daemon {
        let node = NODES[i];
        let mnt = sb.path(&format!("mnt-{node}"));
        let run = sb.path(&format!("run-{node}"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_backupfs"));
        command
            .arg("mount")
            .arg(&mnt)
            .arg("--config")
            .arg(&self.configs[i])
            .env_remove("BACKUPFS_TEST_PAUSE")
            .env_remove("BACKUPFS_TEST_RELEASE")
            .env("RUNTIME_DIRECTORY", &run)
            .envs(env.iter().copied());
        sb.start_daemon_command(command, &mnt, &run)
    }

    /// The chunk objects under the prefix.
    fn chunks(&self) -> usize {
        client()
            .list(&format!("{}chunk.", self.prefix))
            .unwrap()
            .len()
    }

    /// `backupfs gc` with a's configuration (it joins as node `a-gc`): its exit status
    /// and what it printed.
    fn gc(&self) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_backupfs"))
            .args(["gc", "--config"])
            .arg(&self.configs[0])
            .arg("off")
            .output()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), printed)
    }
}

/// Every object under the prefix goes when the test ends, however it ends.
impl Drop for Cluster {
    fn drop(&mut self) {
        let client = client();
        for object in client.list(&self.prefix).unwrap_or_default() {
            let _ = client.delete(&object.key);
        }
    }
}

#[track_caller]
fn same(image: &Path, volume: &Path) {
    ok(&format!("cmp '{}' '{}'", image.display(), volume.display()));
}

#[test]
fn three_nodes_share_one_s3_target_and_no_collection_breaks_another_nodes_backup() {
    let mut sb = Sandbox::new("s3-nodes");
    let c = cluster(&mut sb);
    let v1 = random_volume(&c.gold, "v1", 12);
    let v2 = random_volume(&c.gold, "v2", 8);
    random_volume(&c.gold, "v3", 8);
    let release_b = sb.path("release-b");
    let never = sb.path("never");
    let a = c.start(&mut sb, 0, &[]);
    // b and c hold their backups before the index is written until told.
    let b = c.start(&mut sb, 1, &pause_env("finishing", &release_b));
    let c_node = c.start(&mut sb, 2, &pause_env("finishing", &never));

    // Made on a: listed on b within 5 s, read byte-exact on c.
    let full = a.backup("off", "v1");
    assert_eq!(a.wait_job("off", &full), "available", "{}", a.log());
    let seen = wait_for_limit(
        Duration::from_secs(5),
        || b.lists("off", &full) && c_node.lists("off", &full),
        "b and c to list a's backup",
    );
    eprintln!("listed on the other nodes after {seen:?}");
    same(&c_node.image("off", &full), &v1);
    assert_eq!(b.record("off", &full)["node"], "a");

    // b backs v2 up while a's backup of the same bytes is the only one naming them: every
    // chunk is deduplicated against it. a deletes that backup and collects meanwhile.
    let x = a.backup("off", "v2");
    assert_eq!(a.wait_job("off", &x), "available", "{}", a.log());
    let y = b.backup("off", "v2");
    b.wait_state("off", &y, "finishing");
    // The same volume on two nodes at once: one of them is EBUSY.
    assert_eq!(a.request("off", "v2"), Some(libc::EBUSY), "{}", a.log());
    let before = c.chunks();
    let collections = || a.log().matches("garbage collection: ").count();
    let earlier = collections();
    std::fs::remove_file(a.image("off", &x)).unwrap();
    wait_for_limit(
        Duration::from_secs(10),
        || collections() > earlier,
        "a's collection after the deletion",
    );
    assert_eq!(
        c.chunks(),
        before,
        "a's collection deleted chunks b's backup names"
    );
    assert!(a.log().contains("(node b is backing up: nothing deleted"));
    // And so does one by hand.
    let (status, printed) = c.gc();
    assert_eq!(status, 3, "{printed}");
    assert!(
        printed.contains("node b is backing up: run again later"),
        "{printed}"
    );
    assert_eq!(
        c.chunks(),
        before,
        "backupfs gc deleted chunks b's backup names"
    );
    release_jobs(&release_b);
    assert_eq!(b.wait_job("off", &y), "available", "{}", b.log());
    same(&a.image("off", &y), &v2);

    // An incremental on b whose parent a made.
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=64K count=2 seek=7 conv=notrunc status=none",
        v1.display()
    ));
    let incremental = b.backup("off", "v1 incremental");
    assert_eq!(b.wait_job("off", &incremental), "available", "{}", b.log());
    wait_for_limit(
        Duration::from_secs(5),
        || a.lists("off", &incremental) && c_node.lists("off", &incremental),
        "a and c to list b's incremental",
    );
    let record = a.record("off", &incremental);
    assert_eq!(record["parent_id"], full.as_str(), "{record}");
    assert_eq!(record["node"], "b");
    same(&c_node.image("off", &incremental), &v1);

    // Deleted on b: gone from a within 5 s.
    std::fs::remove_file(b.image("off", &y)).unwrap();
    wait_for_limit(
        Duration::from_secs(5),
        || !a.lists("off", &y) && !c_node.lists("off", &y),
        "b's deletion to show on a and c",
    );

    // c is killed mid-backup: another node records it error, a collection frees its
    // chunks.
    wait_for_limit(
        Duration::from_secs(10),
        || {
            let (status, printed) = c.gc();
            status == 0 && printed.contains(" 0 deleted (0 bytes), 0 kept")
        },
        "the collections of the deletions to end",
    );
    let idle = c.chunks();
    let doomed = c_node.backup("off", "v3");
    c_node.wait_state("off", &doomed, "finishing");
    assert!(c.chunks() > idle, "c uploaded chunks of v3");
    c_node.kill9();
    let took = wait_for_limit(
        Duration::from_secs(60),
        || a.record("off", &doomed)["status"] == "error",
        "another node to take c's backup over",
    );
    eprintln!("taken over {took:?} after the kill (lease {LEASE} s)");
    wait_for_limit(
        Duration::from_secs(15),
        || c.chunks() == idle,
        "a collection to free the chunks of c's backup",
    );
    let (status, printed) = c.gc();
    assert_eq!(status, 0, "{printed}");
    assert!(
        printed.contains(" 0 deleted (0 bytes), 0 kept"),
        "{printed}"
    );

    // Every available backup verifies, on any node.
    for (d, id) in [(&a, &full), (&b, &incremental)] {
        assert_eq!(
            write_errno(&d.target("off").join("verify"), id.as_bytes()),
            None,
            "{}",
            d.log()
        );
    }
    // (Each node's record of the other's verify is read again within about a second.)
    wait_for_limit(
        Duration::from_secs(5),
        || {
            b.record("off", &full)["verified_at"].is_string()
                && a.record("off", &incremental)["verified_at"].is_string()
        },
        "the verifies to show on the other nodes",
    );
    a.stop_clean();
    b.stop_clean();
    // Nothing of the coordination is left but the heartbeat of c (which may come back)
    // and, beside its record, how c's backup ended.
    let left: Vec<String> = client()
        .list(&c.prefix)
        .unwrap()
        .into_iter()
        .map(|o| o.key[c.prefix.len()..].to_string())
        .filter(|n| {
            n.starts_with("backupfs.") && n != "backupfs.target" && n != "backupfs.keycheck"
        })
        .collect();
    assert_eq!(
        left,
        [
            format!("backupfs.end.{doomed}"),
            "backupfs.node.c".to_string()
        ]
    );
}

#[test]
fn nodes_that_open_an_empty_prefix_at_the_same_moment_all_join_it() {
    let mut sb = Sandbox::new("s3-nodes-start");
    let c = cluster(&mut sb);
    let config = |prefix: &str| s3::S3TargetConfig {
        kind: Some("s3".to_string()),
        endpoint: gateway().url.clone(),
        ca_file: None,
        bucket: BUCKET.to_string(),
        prefix: prefix.to_string(),
        region: "us-east-1".to_string(),
        credentials: sb.path("credentials"),
        profile: "default".to_string(),
        encryption_key: Some(sb.path("key")),
        encryption: "aes-256-gcm".to_string(),
        compression: "zstd".to_string(),
        timeout: 30,
        keep_last: 0,
    };
    // Rounds, each on an empty prefix of its own (under the cluster's, removed with it):
    // the claim's emptiness check must take the others' objects for theirs.
    // Starts a few milliseconds apart: one node's look falls between another's creates.
    for round in 0..4u64 {
        let config = config(&format!("{}{round}-", c.prefix));
        std::thread::scope(|scope| {
            let opened: Vec<_> = NODES
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let config = &config;
                    let delay = Duration::from_micros(i as u64 * round * 500);
                    scope.spawn(move || {
                        std::thread::sleep(delay);
                        s3::open_as("off", config, node, Duration::from_secs(LEASE))
                            .map(drop)
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            for (node, opened) in NODES.iter().zip(opened) {
                let opened = opened.join().unwrap();
                assert!(opened.is_ok(), "round {round}, node {node}: {opened:?}");
            }
        });
    }
}

#[test]
fn a_node_paused_past_its_lease_writes_no_index_and_collects_again_once_resumed() {
    let mut sb = Sandbox::new("s3-nodes-pause");
    let c = cluster(&mut sb);
    random_volume(&c.gold, "v1", 8);
    random_volume(&c.gold, "v2", 8);
    let release = sb.path("release");
    let a = c.start(&mut sb, 0, &pause_env("finishing", &release));
    let b = c.start(&mut sb, 1, &[]);
    let other = b.backup("off", "v2");
    assert_eq!(b.wait_job("off", &other), "available", "{}", b.log());
    let before = c.chunks();
    let id = a.backup("off", "v1");
    a.wait_state("off", &id, "finishing");
    assert!(c.chunks() > before, "a uploaded chunks of v1");
    a.signal(libc::SIGSTOP);
    let took = wait_for_limit(
        Duration::from_secs(60),
        || b.record("off", &id)["status"] == "error",
        "b to take a's backup over",
    );
    eprintln!("taken over {took:?} after the pause (lease {LEASE} s)");
    wait_for_limit(
        Duration::from_secs(15),
        || c.chunks() == before,
        "b's collection to free a's chunks",
    );
    // Resumed with its job free to finish: it finds its claim lapsed, stops, and writes
    // no index naming the chunks that went.
    release_jobs(&release);
    a.signal(libc::SIGCONT);
    assert_eq!(a.wait_job("off", &id), "error", "{}", a.log());
    let index = client().list(&format!("{}index.{id}", c.prefix)).unwrap();
    assert!(index.is_empty(), "{index:?}");
    // Its own collections are not held back by the backup it lost: a deletion on a
    // frees the chunks.
    std::fs::remove_file(a.image("off", &other)).unwrap();
    wait_for_limit(
        Duration::from_secs(15),
        || c.chunks() == 0,
        "a's collection to free the deleted backup's chunks",
    );
    a.stop_clean();
    b.stop_clean();
}
