//! Several nodes, one target: three daemons (own mountpoints, state directories and
//! runtime directories; one configuration but `node` and `state_dir`) serve one file
//! target in a directory on XFS that all three use, as three Cinder backup hosts would.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LEASE: u64 = 3;

struct Cluster {
    gold: PathBuf,
    backups: PathBuf,
    configs: Vec<PathBuf>,
}

const NODES: [&str; 3] = ["a", "b", "c"];

/// One XFS file system (reflinks) holding the volume pool and the target pool, and a
/// configuration per node.
fn cluster(sb: &mut Sandbox, extra: &str) -> Cluster {
    let shared = sb.loop_fs("shared", Fs::Xfs, 1024);
    let gold = shared.join("gold");
    let backups = shared.join("backups");
    for d in [&gold, &backups] {
        std::fs::create_dir_all(d).unwrap();
    }
    let configs = NODES
        .iter()
        .map(|node| {
            let state = sb.mkdir(&format!("state-{node}"));
            let path = sb.path(&format!("{node}.toml"));
            std::fs::write(
                &path,
                format!(
                    "state_dir = \"{}\"\nnode = \"{node}\"\nlease_seconds = {LEASE}\n{extra}\n\
                     [backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\", backups = \"{}\" }}\n\
                     [targets.hdd]\nbackend = \"ssd\"\npool = \"backups\"\n",
                    state.display(),
                    gold.display(),
                    backups.display()
                ),
            )
            .unwrap();
            path
        })
        .collect();
    Cluster {
        gold,
        backups,
        configs,
    }
}

fn command(
    sb: &Sandbox,
    config: &Path,
    node: &str,
    env: &[(&str, &str)],
) -> (Command, PathBuf, PathBuf) {
    let mnt = sb.path(&format!("mnt-{node}"));
    let run = sb.path(&format!("run-{node}"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_backupfs"));
    command
        .arg("mount")
        .arg(&mnt)
        .arg("--config")
        .arg(config)
        .env_remove("BACKUPFS_TEST_PAUSE")
        .env_remove("BACKUPFS_TEST_RELEASE")
        .env("RUNTIME_DIRECTORY", &run)
        .envs(env.iter().copied());
    (command, mnt, run)
}

fn start(sb: &mut Sandbox, c: &Cluster, i: usize, env: &[(&str, &str)]) -> Daemon {
    let (command, mnt, run) = command(sb, &c.configs[i], NODES[i], env);
    sb.start_daemon_command(command, &mnt, &run)
}

/// What the target pool holds besides records, sums and images that available records
/// own, and the marker: must be nothing once every node is idle.
fn unowned(backups: &Path) -> Vec<String> {
    let names = names_in(backups);
    let available: Vec<String> = names
        .iter()
        .filter(|n| n.ends_with(".json"))
        .filter(|n| {
            let text = std::fs::read_to_string(backups.join(n)).unwrap_or_default();
            text.contains("\"status\": \"available\"")
        })
        .map(|n| {
            n.trim_start_matches("backup-")
                .trim_end_matches(".json")
                .to_string()
        })
        .collect();
    names
        .into_iter()
        .filter(|n| {
            let owned = available.iter().any(|id| n.contains(id.as_str()));
            // How a backup taken over ended stays beside its record.
            let end_of_record = n
                .strip_prefix("backupfs.end.")
                .is_some_and(|id| names_in(backups).contains(&format!("backup-{id}.json")));
            // A node's heartbeat (and its spare) stay while the node may come back.
            let heartbeat = n.trim_start_matches('.').starts_with("backupfs.node.");
            let ours = n == ".backupfs-target" || heartbeat || end_of_record;
            let error_record = n.ends_with(".json")
                && std::fs::read_to_string(backups.join(n))
                    .unwrap_or_default()
                    .contains("\"status\": \"error\"");
            !(owned || ours || error_record)
        })
        .collect()
}

#[test]
fn three_nodes_serve_one_target_every_backup_from_every_node() {
    let mut sb = Sandbox::new("nodes");
    let c = cluster(&mut sb, "");
    let volume = random_volume(&c.gold, "v1", 16);
    let other = random_volume(&c.gold, "v2", 4);
    // All three start at the same moment on an empty target pool.
    let spawned: Vec<(Command, PathBuf, PathBuf)> = (0..3)
        .map(|i| command(&sb, &c.configs[i], NODES[i], &[]))
        .collect();
    let mut children: Vec<Daemon> = spawned
        .into_iter()
        .map(|(command, mnt, run)| sb.spawn_daemon_command(command, &mnt, &run))
        .collect();
    for d in &mut children {
        d.wait_mounted();
    }
    let [a, b, c_node] = [&children[0], &children[1], &children[2]];
    let marker = std::fs::read_to_string(c.backups.join(".backupfs-target")).unwrap();
    assert!(marker.contains("\"target\": \"hdd\""), "{marker}");

    // Made on a, listed on b and c within 5 s, read and restored there.
    let full = a.backup("hdd", "v1");
    assert_eq!(a.wait_job("hdd", &full), "available", "{}", a.log());
    let seen = wait_for_limit(
        Duration::from_secs(5),
        || b.lists("hdd", &full) && c_node.lists("hdd", &full),
        "b and c to list a's backup",
    );
    eprintln!("listed on the other nodes after {seen:?}");
    assert_eq!(sha256(&c_node.image("hdd", &full)), sha256(&volume));
    assert_eq!(b.record("hdd", &full)["node"], "a");
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        b.image("hdd", &full).display(),
        b.volume("ssd", "r1").display()
    ));
    assert_eq!(sha256(&c.gold.join("volume-r1")), sha256(&volume));

    // An incremental on b builds on a's backup.
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=1M count=2 seek=3 conv=notrunc status=none",
        volume.display()
    ));
    let incremental = b.backup("hdd", "v1 incremental");
    assert_eq!(b.wait_job("hdd", &incremental), "available", "{}", b.log());
    let record = c_node.record("hdd", &incremental);
    assert_eq!(record["parent_id"], full.as_str(), "{record}");
    assert_eq!(record["node"], "b");
    assert_eq!(sha256(&a.image("hdd", &incremental)), sha256(&volume));

    // The same volume asked of two nodes at once: one backs it up, the other is EBUSY.
    let release = sb.path("release");
    drop(children);
    let a = start(&mut sb, &c, 0, &pause_env("finishing", &release));
    let b = start(&mut sb, &c, 1, &[]);
    let c_node = start(&mut sb, &c, 2, &[]);
    let held = a.backup("hdd", "v1 incremental");
    a.wait_state("hdd", &held, "finishing");
    assert_eq!(b.request("hdd", "v1"), Some(libc::EBUSY), "{}", b.log());
    assert_eq!(c_node.request("hdd", "v1 incremental"), Some(libc::EBUSY));
    // Another volume is not held up.
    let second = b.backup("hdd", "v2");
    assert_eq!(b.wait_job("hdd", &second), "available", "{}", b.log());
    // The parent of a's backup in progress is not deleted elsewhere; another backup is.
    assert_eq!(
        errno_of(std::fs::remove_file(c_node.image("hdd", &incremental))),
        Some(libc::EBUSY),
        "{}",
        c_node.log()
    );
    assert!(b.lists("hdd", &incremental));
    release_jobs(&release);
    assert_eq!(a.wait_job("hdd", &held), "available", "{}", a.log());
    assert_eq!(a.record("hdd", &held)["parent_id"], incremental.as_str());
    assert_eq!(sha256(&b.image("hdd", &held)), sha256(&volume));

    // Deleted on c: gone from every node within 5 s; a backup built on it still reads.
    // (Looked up on a and b first, as a Cinder host looks for an image: their kernels
    // then hold its name.)
    assert!(a.image("hdd", &full).exists() && b.image("hdd", &full).exists());
    std::fs::remove_file(c_node.image("hdd", &full)).unwrap();
    wait_for_limit(
        Duration::from_secs(5),
        // Not listed, and not there to `stat` either: names a node listed (and so
        // holds in its kernel) go too.
        || {
            !a.lists("hdd", &full)
                && !b.lists("hdd", &full)
                && !a.image("hdd", &full).exists()
                && !b.image("hdd", &full).exists()
        },
        "the deletion to show everywhere",
    );
    // (The volume has not changed since the incremental was made.)
    assert_eq!(sha256(&a.image("hdd", &incremental)), sha256(&volume));
    std::fs::remove_file(b.image("hdd", &second)).unwrap();
    a.stop_clean();
    b.stop_clean();
    c_node.stop_clean();
    assert_eq!(unowned(&c.backups), Vec::<String>::new());
    assert!(other.exists());
}

/// The record of `id` as the pool holds it (read without any daemon).
fn stored_record(backups: &Path, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(backups.join(format!("backup-{id}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn data_of(backups: &Path, id: &str) -> Vec<String> {
    names_in(backups)
        .into_iter()
        .filter(|n| n.contains(id) && !n.ends_with(".json") && !n.starts_with("backupfs.end."))
        .collect()
}

fn claims(backups: &Path) -> Vec<String> {
    names_in(backups)
        .into_iter()
        .filter(|n| n.starts_with("backupfs.claim."))
        .collect()
}

#[test]
fn a_node_killed_mid_backup_is_taken_over_by_another_once_its_claim_lapses() {
    let mut sb = Sandbox::new("nodes-kill");
    let c = cluster(&mut sb, "");
    let volume = random_volume(&c.gold, "v1", 16);
    let release = sb.path("release");
    let a = start(&mut sb, &c, 0, &pause_env("finishing", &release));
    let b = start(&mut sb, &c, 1, &[]);
    let c_node = start(&mut sb, &c, 2, &[]);
    let id = a.backup("hdd", "v1");
    a.wait_state("hdd", &id, "finishing");
    assert!(
        !data_of(&c.backups, &id).is_empty(),
        "the copy wrote its data"
    );
    assert_eq!(claims(&c.backups).len(), 1);
    a.kill9();
    let took = wait_for_limit(
        Duration::from_secs(120),
        || stored_record(&c.backups, &id)["status"] == "error",
        "another node to take the backup over",
    );
    eprintln!("taken over {took:?} after the kill (lease {LEASE} s)");
    let record = stored_record(&c.backups, &id);
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("node a stopped renewing its claim") && error.contains("took it over"),
        "{error}"
    );
    wait_for_limit(
        Duration::from_secs(5),
        || data_of(&c.backups, &id).is_empty() && claims(&c.backups).is_empty(),
        "the partial data and the claim to go",
    );
    // The volume is free again, on any node.
    let again = b.backup("hdd", "v1");
    assert_eq!(b.wait_job("hdd", &again), "available", "{}", b.log());
    assert_eq!(sha256(&c_node.image("hdd", &again)), sha256(&volume));
    b.stop_clean();
    c_node.stop_clean();
    assert_eq!(unowned(&c.backups), Vec::<String>::new());
}

#[test]
fn a_node_paused_past_its_lease_is_fenced_and_writes_nothing_the_others_cleaned_up() {
    let mut sb = Sandbox::new("nodes-pause");
    let c = cluster(&mut sb, "");
    random_volume(&c.gold, "v1", 16);
    let small = random_volume(&c.gold, "v2", 2);
    let release = sb.path("release");
    let a = start(&mut sb, &c, 0, &pause_env("finishing", &release));
    let b = start(&mut sb, &c, 1, &[]);
    let c_node = start(&mut sb, &c, 2, &[]);
    let id = a.backup("hdd", "v1");
    a.wait_state("hdd", &id, "finishing");
    a.signal(libc::SIGSTOP);
    // A frozen node blocks nobody: another volume is backed up meanwhile.
    let other = b.backup("hdd", "v2");
    assert_eq!(b.wait_job("hdd", &other), "available", "{}", b.log());
    wait_for_limit(
        Duration::from_secs(120),
        || stored_record(&c.backups, &id)["status"] == "error",
        "another node to take the backup over",
    );
    wait_for_limit(
        Duration::from_secs(5),
        || data_of(&c.backups, &id).is_empty(),
        "the partial data to go",
    );
    // Resumed with its job free to finish: it finds its claim lapsed and stops.
    release_jobs(&release);
    a.signal(libc::SIGCONT);
    assert_eq!(a.wait_job("hdd", &id), "error", "{}", a.log());
    assert!(a.log().contains("took this backup over"), "{}", a.log());
    std::thread::sleep(Duration::from_secs(1));
    let record = stored_record(&c.backups, &id);
    assert_eq!(record["status"], "error", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("node a stopped renewing")
    );
    assert!(
        data_of(&c.backups, &id).is_empty(),
        "nothing written after the fence"
    );
    assert!(claims(&c.backups).is_empty());
    // It serves on: its next backup is its own.
    let next = a.backup("hdd", "v2");
    assert_eq!(a.wait_job("hdd", &next), "available", "{}", a.log());
    assert_eq!(sha256(&c_node.image("hdd", &next)), sha256(&small));
    for d in [a, b, c_node] {
        d.stop_clean();
    }
    assert_eq!(unowned(&c.backups), Vec::<String>::new());
}

#[test]
fn two_daemons_with_one_node_name_are_refused_and_a_node_name_is_checked() {
    let mut sb = Sandbox::new("nodes-name");
    let c = cluster(&mut sb, "");
    let a = start(&mut sb, &c, 0, &[]);
    // b's configuration under a's name: refused, a serves on.
    let text = std::fs::read_to_string(&c.configs[1])
        .unwrap()
        .replace("node = \"b\"", "node = \"a\"");
    let twin = sb.path("twin.toml");
    std::fs::write(&twin, text).unwrap();
    let (mut command, mnt, _) = command(&sb, &twin, "twin", &[]);
    std::fs::create_dir_all(&mnt).unwrap();
    let out = run_timeout(&mut command, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another backupfs as node a")
            && stderr.contains("backupfs.node.a"),
        "{stderr}"
    );
    assert!(!is_fuse_mount(&mnt));
    assert!(std::fs::read_dir(a.target("hdd")).is_ok());
    // A node name that is not a host name is a configuration error naming the key.
    let bad = sb.path("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&c.configs[1])
            .unwrap()
            .replace("node = \"b\"", "node = \"b/../a\""),
    )
    .unwrap();
    let out = run_timeout(
        Command::new(env!("CARGO_BIN_EXE_backupfs"))
            .args(["check-config", "--config"])
            .arg(&bad),
        Duration::from_secs(30),
    );
    assert_ne!(out.status.code(), Some(0));
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node"), "{text}");
    a.stop_clean();
    // A clean stop leaves the target: no heartbeat is left to wait for.
    assert!(!names_in(&c.backups).iter().any(|n| n == "backupfs.node.a"));
}

#[test]
fn xattrs_set_on_every_node_at_once_are_all_kept() {
    let mut sb = Sandbox::new("nodes-xattr");
    let c = cluster(&mut sb, "");
    random_volume(&c.gold, "v1", 1);
    let daemons: Vec<Daemon> = (0..3).map(|i| start(&mut sb, &c, i, &[])).collect();
    let id = daemons[0].backup("hdd", "v1");
    assert_eq!(daemons[0].wait_job("hdd", &id), "available");
    wait_for_limit(
        Duration::from_secs(5),
        || daemons.iter().all(|d| d.lists("hdd", &id)),
        "every node to list the backup",
    );
    // A read-change-write of one record from three nodes at once: none writes back a
    // record another has just changed.
    std::thread::scope(|s| {
        for (n, d) in daemons.iter().enumerate() {
            let image = d.image("hdd", &id);
            s.spawn(move || {
                for i in 0..10 {
                    setxattr(&image, &format!("user.n{n}.k{i}"), b"v").unwrap();
                }
            });
        }
    });
    let names = listxattr(&daemons[2].image("hdd", &id)).unwrap();
    for n in 0..3 {
        for i in 0..10 {
            let name = format!("user.n{n}.k{i}");
            assert!(names.contains(&name), "{name} lost: {names:?}");
        }
    }
    assert!(
        !names_in(&c.backups)
            .iter()
            .any(|n| n.contains("backupfs.lock.")),
        "no record lock is left"
    );
    for d in daemons {
        d.stop_clean();
    }
}

#[test]
fn a_planted_claim_never_makes_a_live_nodes_backup_go() {
    let mut sb = Sandbox::new("nodes-planted");
    let c = cluster(&mut sb, "");
    let volume = random_volume(&c.gold, "v1", 8);
    let release = sb.path("release");
    let a = start(&mut sb, &c, 0, &pause_env("finishing", &release));
    let b = start(&mut sb, &c, 1, &[]);
    let id = a.backup("hdd", "v1");
    a.wait_state("hdd", &id, "finishing");
    // Whoever can write the pool plants a claim of another volume naming a's backup,
    // from a "node" that never renews it.
    std::fs::write(
        c.backups.join("backupfs.claim.ssd.elsewhere"),
        format!(
            "{{\"node\":\"x\",\"holder\":\"other-boot.1.1.x\",\"backup_id\":\"{id}\",\"beat\":0}}\n"
        ),
    )
    .unwrap();
    // Well past a lease: b found it stale, and left a's backup alone.
    std::thread::sleep(Duration::from_secs(2 * LEASE + 2));
    assert_eq!(stored_record(&c.backups, &id)["status"], "creating");
    assert!(!data_of(&c.backups, &id).is_empty(), "{}", b.log());
    // (Whichever node found it stale first said so, and removed the planted claim.)
    assert!(
        a.log().contains("left alone") || b.log().contains("left alone"),
        "{}\n{}",
        a.log(),
        b.log()
    );
    assert!(!c.backups.join("backupfs.claim.ssd.elsewhere").exists());
    release_jobs(&release);
    assert_eq!(a.wait_job("hdd", &id), "available", "{}", a.log());
    assert_eq!(sha256(&b.image("hdd", &id)), sha256(&volume));
    a.stop_clean();
    b.stop_clean();
}
