//! Several nodes, one RBD target: three daemons (own mountpoints, state directories and
//! runtime directories; one configuration but `node` and `state_dir`) serve one target in
//! a namespace of the test cluster, as three Cinder backup hosts would.

mod common;

use backupfs::ids::BackupId;
use backupfs::targets::BackupTarget;
use backupfs::targets::rbd::RbdTarget;
use backupfs::volume::rbd::{PoolSpec, Timeouts, connection};
use common::ceph::{self, CephCluster, POOL};
use common::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const LEASE: u64 = 3;
const NODES: [&str; 3] = ["a", "b", "c"];

fn namespace(cluster: &CephCluster, name: &str) -> String {
    cluster.rbd(&["namespace", "create", "--pool", POOL, "--namespace", name]);
    format!("{POOL}/{name}")
}

/// `rbd import` of a file as image `name` in `spec` (`pool/namespace`).
fn import(cluster: &CephCluster, spec: &str, name: &str, file: &std::path::Path) {
    cluster.rbd(&[
        "import",
        "--no-progress",
        &file.to_string_lossy(),
        &format!("{spec}/{name}"),
    ]);
}

fn split(spec: &str) -> (&str, &str) {
    spec.split_once('/').unwrap_or((spec, ""))
}

fn head(cluster: &CephCluster, spec: &str, image: &str) -> String {
    cluster
        .rbd(&[
            "image-meta",
            "get",
            &format!("{spec}/{image}"),
            "backupfs.head",
        ])
        .trim()
        .to_string()
}

fn objects(cluster: &CephCluster, spec: &str) -> Vec<String> {
    let (pool, namespace) = split(spec);
    let out = ceph::run(
        &cluster.conf,
        60,
        "rados",
        &["ls", "--pool", pool, "--namespace", namespace],
    );
    let mut names: Vec<String> = out.lines().map(str::to_string).collect();
    names.sort();
    names
}

/// Every record in the pool, as RADOS holds it: id → status.
fn statuses(cluster: &CephCluster, spec: &str) -> HashMap<String, String> {
    let (pool, namespace) = split(spec);
    objects(cluster, spec)
        .iter()
        .filter_map(|name| name.strip_prefix("backupfs.record."))
        .map(|id| {
            let text = ceph::run(
                &cluster.conf,
                60,
                "rados",
                &[
                    "get",
                    "--pool",
                    pool,
                    "--namespace",
                    namespace,
                    &format!("backupfs.record.{id}"),
                    "/dev/stdout",
                ],
            );
            let record: serde_json::Value = serde_json::from_str(&text).expect("a record");
            (
                id.to_string(),
                record["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// What the target's namespace holds that no available record owns (series images,
/// snapshots, catalogue and coordination objects), once every node has stopped: must be
/// nothing. The records of failed backups stay (the operator's to remove), their data not.
fn unowned(cluster: &CephCluster, spec: &str) -> Vec<String> {
    let statuses = statuses(cluster, spec);
    let available = |id: &str| statuses.get(id).is_some_and(|s| s == "available");
    let mut found = Vec::new();
    for image in cluster.images(spec) {
        let mut held = 0;
        for snapshot in cluster.snapshots(spec, &image) {
            match snapshot.strip_prefix("backup-") {
                Some(id) if available(id) => held += 1,
                _ => found.push(format!("{image}@{snapshot}")),
            }
        }
        if held == 0 && !available(&head(cluster, spec, &image)) {
            found.push(format!("image {image}"));
        }
    }
    // Data objects of an image that is gone (a fenced writer's late writes) are data too.
    let prefixes: Vec<String> = cluster
        .images(spec)
        .iter()
        .map(|image| {
            let info = cluster.rbd(&["info", "--format", "json", &format!("{spec}/{image}")]);
            let info: serde_json::Value = serde_json::from_str(&info).expect("rbd info is JSON");
            format!("{}.", info["block_name_prefix"].as_str().unwrap())
        })
        .collect();
    for object in objects(cluster, spec) {
        if object.starts_with("rbd_data.") && !prefixes.iter().any(|p| object.starts_with(p)) {
            found.push(format!("object {object}"));
            continue;
        }
        let owned = if let Some(id) = object.strip_prefix("backupfs.record.") {
            statuses.contains_key(id) && statuses[id] != "creating"
        } else if let Some(id) = object.strip_prefix("backupfs.sums.") {
            available(id)
        } else if let Some(id) = object.strip_prefix("backupfs.end.") {
            statuses.contains_key(id)
        } else {
            // (A killed node's heartbeat stays: the node may come back.)
            object == "backupfs.target"
                || object == "backupfs.lock"
                || object == "backupfs.node.a"
                || object.starts_with("rbd_")
        };
        if !owned {
            found.push(format!("object {object}"));
        }
    }
    found
}

/// Writes random bytes at `offset` of image `spec/image` in place, as a VM would:
/// `rbd import-diff` of a diff in format v1 (doc/dev/rbd-diff.rst) of one write.
fn rbd_write(sb: &Sandbox, cluster: &CephCluster, spec: &str, image: &str, offset: u64, len: u64) {
    let size = cluster.rbd(&["info", "--format", "json", &format!("{spec}/{image}")]);
    let size: serde_json::Value = serde_json::from_str(&size).expect("rbd info is JSON");
    let size = size["size"].as_u64().expect("rbd info names the size");
    let random = sb.path(&format!("{image}-{offset}.data"));
    ok(&format!(
        "head -c {len} /dev/urandom > '{}'",
        random.display()
    ));
    let data = std::fs::read(&random).unwrap();
    let mut diff = b"rbd diff v1\n".to_vec();
    diff.push(b's');
    diff.extend_from_slice(&size.to_le_bytes());
    diff.push(b'w');
    diff.extend_from_slice(&offset.to_le_bytes());
    diff.extend_from_slice(&len.to_le_bytes());
    diff.extend_from_slice(&data);
    diff.push(b'e');
    let file = sb.path(&format!("{image}-{offset}.diff"));
    std::fs::write(&file, diff).unwrap();
    cluster.rbd(&[
        "import-diff",
        "--no-progress",
        &file.to_string_lossy(),
        &format!("{spec}/{image}"),
    ]);
}

/// A configuration per node, `<node>.toml`: the same but `node` and `state_dir`.
fn write_configs(sb: &Sandbox, cluster: &CephCluster, volumes: &str, backups: &str, extra: &str) {
    let client = cluster.client("cinder");
    for node in NODES {
        let state = sb.mkdir(&format!("state-{node}"));
        std::fs::write(
            sb.path(&format!("{node}.toml")),
            format!(
                "state_dir = \"{}\"\nnode = \"{node}\"\nlease_seconds = {LEASE}\n{extra}\n\
                 [backends.ceph]\ndriver = \"rbd\"\nceph_conf = \"{}\"\nclient = \"{}\"\ntimeout = 5\n\
                 pools = {{ volumes = \"{volumes}\", backups = \"{backups}\" }}\n\
                 [targets.rbd]\nbackend = \"ceph\"\npool = \"backups\"\n",
                state.display(),
                client.conf.display(),
                client.name,
            ),
        )
        .unwrap();
    }
}

/// `backupfs mount` as `node` (configuration `<node>.toml`): the command, the mountpoint,
/// the runtime directory.
fn mount_command(sb: &Sandbox, node: &str) -> (Command, PathBuf, PathBuf) {
    let mnt = sb.path(&format!("mnt-{node}"));
    let run = sb.path(&format!("run-{node}"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_backupfs"));
    command
        .arg("mount")
        .arg(&mnt)
        .arg("--config")
        .arg(sb.path(&format!("{node}.toml")))
        .env_remove("BACKUPFS_TEST_PAUSE")
        .env_remove("BACKUPFS_TEST_RELEASE")
        .env("RUNTIME_DIRECTORY", &run);
    (command, mnt, run)
}

#[test]
fn three_nodes_serve_one_rbd_target_and_take_over_a_killed_nodes_backup() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-nodes");
    let volumes = namespace(&cluster, "nodes-volumes");
    let backups = namespace(&cluster, "nodes-backups");
    let v1 = sb.path("v1.raw");
    ok(&format!("head -c 16M /dev/urandom > '{}'", v1.display()));
    import(&cluster, &volumes, "volume-v1", &v1);
    let v2 = sb.path("v2.raw");
    ok(&format!("head -c 4M /dev/urandom > '{}'", v2.display()));
    import(&cluster, &volumes, "volume-v2", &v2);
    write_configs(&sb, &cluster, &volumes, &backups, "");
    // All three start at the same moment on an empty target namespace.
    let mut starting = Vec::new();
    for node in NODES {
        let (command, mnt, run) = mount_command(&sb, node);
        starting.push(sb.spawn_daemon_command(command, &mnt, &run));
    }
    for d in &mut starting {
        d.wait_mounted();
    }
    let mut daemons = starting.into_iter();
    let (a, b, c) = (
        daemons.next().unwrap(),
        daemons.next().unwrap(),
        daemons.next().unwrap(),
    );
    assert!(objects(&cluster, &backups).contains(&"backupfs.target".to_string()));

    // Made on a, listed on b and c within 5 s, read byte-exact on c, restored by b.
    let v1_sum = sha256(&v1);
    let full = a.backup("rbd", "v1");
    assert_eq!(a.wait_job("rbd", &full), "available", "{}", a.log());
    let seen = wait_for_limit(
        Duration::from_secs(5),
        || b.lists("rbd", &full) && c.lists("rbd", &full),
        "b and c to list a's backup",
    );
    eprintln!("listed on the other nodes after {seen:?}");
    assert_eq!(sha256(&c.image("rbd", &full)), v1_sum);
    assert_eq!(b.record("rbd", &full)["node"], "a");
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        b.image("rbd", &full).display(),
        b.volume("ceph", "r1").display()
    ));
    assert_eq!(cluster.export_sha256(&volumes, "volume-r1"), v1_sum);

    // An incremental on b continues the series a began.
    rbd_write(&sb, &cluster, &volumes, "volume-v1", 3 << 20, 2 << 20);
    let v1_sum = cluster.export_sha256(&volumes, "volume-v1");
    let incremental = b.backup("rbd", "v1 incremental");
    assert_eq!(b.wait_job("rbd", &incremental), "available", "{}", b.log());
    let record = c.record("rbd", &incremental);
    assert_eq!(record["parent_id"], full.as_str(), "{record}");
    assert_eq!(record["node"], "b");
    let series = format!("backupfs-series-{full}");
    assert_eq!(cluster.images(&backups), std::slice::from_ref(&series));
    wait_for_limit(
        Duration::from_secs(5),
        || a.lists("rbd", &incremental),
        "a to list b's backup",
    );
    assert_eq!(sha256(&a.image("rbd", &incremental)), v1_sum);
    let other = c.backup("rbd", "v2");
    assert_eq!(c.wait_job("rbd", &other), "available", "{}", c.log());

    // a comes back slowed down (1 MB/s) and makes the next incremental into the series:
    // caught mid-copy (the head open for writing, its exclusive lock held), the volume
    // is EBUSY on the other nodes; the oldest backup of the series is deleted on c
    // meanwhile (gone everywhere within 5 s, a left writing), its parent is not.
    a.stop_clean();
    let text = std::fs::read_to_string(sb.path("a.toml")).unwrap();
    std::fs::write(
        sb.path("a.toml"),
        format!("copy_bps_limit = 1000000\n{text}"),
    )
    .unwrap();
    let (command, mnt, run) = mount_command(&sb, "a");
    let a = sb.start_daemon_command(command, &mnt, &run);
    rbd_write(&sb, &cluster, &volumes, "volume-v1", 2 << 20, 12 << 20);
    let held = a.backup("rbd", "v1 incremental");
    let copying = || {
        a.jobs("rbd")
            .lines()
            .any(|l| l.starts_with(&held) && l.contains(" copying ") && !l.contains(" 0/"))
    };
    wait_for_limit(Duration::from_secs(30), copying, "a's copy to start");
    assert_eq!(head(&cluster, &backups, &series), held);
    assert_eq!(b.request("rbd", "v1"), Some(libc::EBUSY), "{}", b.log());
    assert_eq!(c.request("rbd", "v1 incremental"), Some(libc::EBUSY));
    std::fs::remove_file(c.image("rbd", &full)).unwrap();
    wait_for_limit(
        Duration::from_secs(5),
        || !a.lists("rbd", &full) && !b.lists("rbd", &full),
        "the deletion to show everywhere",
    );
    assert_eq!(
        errno_of(std::fs::remove_file(c.image("rbd", &incremental))),
        Some(libc::EBUSY),
        "the parent of a backup in progress: {}",
        c.log()
    );
    assert!(
        !cluster
            .snapshots(&backups, &series)
            .contains(&format!("backup-{full}"))
    );
    assert_eq!(
        head(&cluster, &backups, &series),
        held,
        "a's head untouched"
    );
    assert!(copying(), "a still writes: {}", a.jobs("rbd"));

    let temporary = cluster.snapshots(&volumes, "volume-v1");
    assert!(
        temporary.iter().any(|s| s.contains(&held)),
        "a's job reads a snapshot of the source: {temporary:?}"
    );
    // a is killed mid-backup: once its lease lapses another node records the backup
    // `error`, rolls the head back and removes its source snapshot.
    a.kill9();
    let took = wait_for_limit(
        Duration::from_secs(120),
        || statuses(&cluster, &backups).get(&held).map(String::as_str) == Some("error"),
        "another node to take a's backup over",
    );
    eprintln!("taken over {took:?} after the kill (lease {LEASE} s)");
    let record = b.record("rbd", &held);
    let error = record["error"].as_str().unwrap_or_default();
    assert!(error.contains("node a stopped renewing"), "{record}");
    assert_eq!(
        head(&cluster, &backups, &series),
        incremental,
        "rolled back"
    );
    // a's client still held the head's exclusive lock: the taker broke it (which
    // blocklists a), and only then rolled the head back.
    assert!(
        b.log().contains("breaking the exclusive lock")
            || c.log().contains("breaking the exclusive lock"),
        "{}\n{}",
        b.log(),
        c.log()
    );
    assert!(
        !objects(&cluster, &backups).iter().any(|o| o.contains(&held)
            && !o.starts_with("backupfs.record.")
            && !o.starts_with("backupfs.end."))
            && !objects(&cluster, &backups)
                .iter()
                .any(|o| o.starts_with("backupfs.claim.")),
        "{:?}",
        objects(&cluster, &backups)
    );
    let source: Vec<String> = ["volume-v1", "volume-v2"]
        .iter()
        .flat_map(|v| cluster.snapshots(&volumes, v))
        .filter(|s| s.contains(&held))
        .collect();
    assert_eq!(
        source,
        Vec::<String>::new(),
        "the source snapshot of a's job"
    );

    // The volume is free again: the next incremental builds on the newest available
    // backup, whichever node made it.
    let v1_sum = cluster.export_sha256(&volumes, "volume-v1");
    let again = c.backup("rbd", "v1 incremental");
    assert_eq!(c.wait_job("rbd", &again), "available", "{}", c.log());
    assert_eq!(c.record("rbd", &again)["parent_id"], incremental.as_str());
    assert_eq!(sha256(&b.image("rbd", &again)), v1_sum);

    // The same volume asked of two nodes at the same moment: one backs it up, the other
    // is EBUSY.
    let answers: Vec<Option<i32>> = std::thread::scope(|s| {
        let on_b = s.spawn(|| b.request("rbd", "v2 incremental"));
        let on_c = s.spawn(|| c.request("rbd", "v2 incremental"));
        vec![on_b.join().unwrap(), on_c.join().unwrap()]
    });
    assert!(
        answers.contains(&None) && answers.contains(&Some(libc::EBUSY)),
        "{answers:?}"
    );
    let winner = if answers[0].is_none() { &b } else { &c };
    let v2_backup = winner
        .jobs("rbd")
        .lines()
        .find(|l| !l.starts_with(&other) && l.contains("v2"))
        .map(|l| l.split(' ').next().unwrap().to_string());
    let v2_backup = v2_backup.unwrap_or_else(|| panic!("{}", winner.jobs("rbd")));
    assert_eq!(winner.wait_job("rbd", &v2_backup), "available");
    assert_eq!(
        winner.record("rbd", &v2_backup)["parent_id"],
        other.as_str(),
        "c made the parent"
    );

    // Every available backup verifies, on any node.
    for id in [&incremental, &other, &again, &v2_backup] {
        assert_eq!(
            write_errno(&b.target("rbd").join("verify"), id.as_bytes()),
            None,
            "{}",
            b.log()
        );
        assert!(b.record("rbd", id)["verified_at"].is_string(), "{id}");
    }
    b.stop_clean();
    c.stop_clean();
    assert_eq!(unowned(&cluster, &backups), Vec::<String>::new());
}

#[test]
fn a_node_paused_past_its_lease_is_fenced_by_a_broken_lock_and_writes_nothing_after() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-nodes-pause");
    let volumes = namespace(&cluster, "pause-volumes");
    let backups = namespace(&cluster, "pause-backups");
    let v1 = sb.path("v1.raw");
    ok(&format!("head -c 12M /dev/urandom > '{}'", v1.display()));
    import(&cluster, &volumes, "volume-v1", &v1);
    // a copies at 1 MB/s: caught mid-copy, its new series image open for writing.
    write_configs(&sb, &cluster, &volumes, &backups, "");
    let text = std::fs::read_to_string(sb.path("a.toml")).unwrap();
    std::fs::write(
        sb.path("a.toml"),
        format!("copy_bps_limit = 1000000\n{text}"),
    )
    .unwrap();
    let (command, mnt, run) = mount_command(&sb, "a");
    let a = sb.start_daemon_command(command, &mnt, &run);
    let (command, mnt, run) = mount_command(&sb, "b");
    let b = sb.start_daemon_command(command, &mnt, &run);
    let id = a.backup("rbd", "v1");
    wait_for_limit(
        Duration::from_secs(30),
        || {
            a.jobs("rbd")
                .lines()
                .any(|l| l.starts_with(&id) && l.contains(" copying ") && !l.contains(" 0/"))
        },
        "a's copy to start",
    );
    let series = format!("backupfs-series-{id}");
    assert_eq!(cluster.images(&backups), std::slice::from_ref(&series));
    a.stop_all_threads();
    let took = wait_for_limit(
        Duration::from_secs(120),
        || statuses(&cluster, &backups).get(&id).map(String::as_str) == Some("error"),
        "b to take the paused node's backup over",
    );
    eprintln!("taken over {took:?} after the pause (lease {LEASE} s)");
    assert!(
        b.log().contains("breaking the exclusive lock"),
        "{}",
        b.log()
    );
    assert_eq!(cluster.images(&backups), Vec::<String>::new());
    // Resumed: a's client is blocklisted, so nothing it still sends lands; its job ends
    // `error`, and the image b removed stays gone.
    a.signal(libc::SIGCONT);
    assert_eq!(a.wait_job("rbd", &id), "error", "{}", a.log());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        cluster.images(&backups),
        Vec::<String>::new(),
        "{}",
        a.log()
    );
    assert_eq!(statuses(&cluster, &backups)[&id], "error");
    let record = b.record("rbd", &id);
    assert!(
        record["error"]
            .as_str()
            .unwrap_or_default()
            .contains("node a stopped renewing"),
        "{record}"
    );
    // The volume is free again, on the other node.
    let again = b.backup("rbd", "v1");
    assert_eq!(b.wait_job("rbd", &again), "available", "{}", b.log());
    assert_eq!(sha256(&b.image("rbd", &again)), sha256(&v1));
    // A fenced node's client stays blocklisted: it still stops cleanly, and, restarted
    // (a new client), serves again at once.
    a.stop_clean();
    let (command, mnt, run) = mount_command(&sb, "a");
    let a = sb.start_daemon_command(command, &mnt, &run);
    wait_for_limit(
        Duration::from_secs(5),
        || a.lists("rbd", &again),
        "the restarted node to list b's backup",
    );
    a.stop_clean();
    b.stop_clean();
    assert_eq!(unowned(&cluster, &backups), Vec::<String>::new());
}

/// A deterministic pattern: `len` bytes from `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut lcg = Lcg(seed);
    (0..len).map(|_| lcg.next() as u8).collect()
}

fn read_all(target: &RbdTarget, id: &BackupId, size: usize) -> Vec<u8> {
    let attachment = target.open_data(id).unwrap();
    let mut buf = vec![0u8; size];
    attachment.device.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn a_series_head_deleted_on_one_node_while_another_continues_the_series_keeps_both_right() {
    let cluster = ceph::cluster();
    let sb = Sandbox::new("rbd-nodes-series");
    let spec_text = namespace(&cluster, "nodes-series");
    let client = cluster.client("cinder");
    let timeouts = Timeouts {
        connect: Duration::from_secs(30),
        mon_op: Duration::from_secs(30),
        osd_op: Duration::from_secs(30),
    };
    let connection = connection::connect(&client.conf, &client.name, timeouts).unwrap();
    let spec = PoolSpec::parse(&spec_text).unwrap();
    let lease = Duration::from_secs(LEASE);
    let one = RbdTarget::open("series", connection.clone(), &spec, "one", lease).unwrap();
    let two = RbdTarget::open("series", connection.clone(), &spec, "two", lease).unwrap();
    let size = 8 << 20;
    let write = |target: &RbdTarget, id: &BackupId, base: Option<&BackupId>, data: &[u8], at| {
        let new = target.create_data(id, size as u64, base).unwrap();
        assert_eq!(new.shared, base.is_some());
        new.attachment.device.write_at(data, at).unwrap();
        new.attachment.device.flush().unwrap();
        drop(new);
        target.finish_data(id).unwrap();
        target.settle_data(id).unwrap();
    };
    let mut old = vec![0u8; size];
    old.copy_from_slice(&pattern(1, size));
    let w = BackupId::new();
    write(&one, &w, None, &old, 0);
    let series = format!("backupfs-series-{w}");
    // The series' lock is every node's: while another node holds it (its object planted
    // here), a removal waits; it goes on once the object goes.
    let doomed = BackupId::new();
    write(&one, &doomed, Some(&w), &pattern(5, 4096), 0);
    let (pool, ns) = split(&spec_text);
    let lock_object = format!("backupfs.lock.{series}");
    let holder = sb.path("holder.json");
    std::fs::write(
        &holder,
        "{\"node\":\"elsewhere\",\"holder\":\"other-boot.1.1.x\",\"beat\":1}\n",
    )
    .unwrap();
    let rados = |args: &[&str]| {
        let mut all = vec!["--pool", pool, "--namespace", ns];
        all.extend_from_slice(args);
        ceph::run(&cluster.conf, 60, "rados", &all)
    };
    rados(&["put", &lock_object, &holder.to_string_lossy()]);
    std::thread::scope(|s| {
        let removal = s.spawn(|| two.remove_data(&doomed).unwrap());
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            !removal.is_finished(),
            "the removal waits for the series' lock"
        );
        assert!(
            cluster
                .snapshots(&spec_text, &series)
                .contains(&format!("backup-{doomed}"))
        );
        rados(&["rm", &lock_object]);
        removal.join().unwrap();
    });
    assert!(
        !cluster
            .snapshots(&spec_text, &series)
            .contains(&format!("backup-{doomed}"))
    );
    assert_eq!(head(&cluster, &spec_text, &series), w.to_string());
    // Each round: the series' newest backup X (the head) is deleted on node two while
    // node one continues the series from the older W (the newest it still lists).
    for round in 0..2u64 {
        let x = BackupId::new();
        write(&one, &x, Some(&w), &pattern(10 + round, 1 << 20), 1 << 20);
        let y = BackupId::new();
        let changed = pattern(20 + round, 64 << 10);
        std::thread::scope(|s| {
            s.spawn(|| two.remove_data(&x).unwrap());
            s.spawn(|| write(&one, &y, Some(&w), &changed, 3 << 20));
        });
        let mut expected = old.clone();
        expected[3 << 20..(3 << 20) + changed.len()].copy_from_slice(&changed);
        assert!(read_all(&two, &y, size) == expected, "round {round}: Y");
        assert!(read_all(&two, &w, size) == old, "round {round}: W");
        assert!(two.open_data(&x).is_err(), "round {round}: X is gone");
        assert_eq!(head(&cluster, &spec_text, &series), y.to_string());
        // Y goes too (on node two): the head is W again for the next round.
        two.remove_data(&y).unwrap();
        assert_eq!(head(&cluster, &spec_text, &series), w.to_string());
    }
    assert_eq!(
        cluster.snapshots(&spec_text, &series),
        [format!("backup-{w}")]
    );
    one.remove_data(&w).unwrap();
    assert_eq!(cluster.images(&spec_text), Vec::<String>::new());
    drop((one, two));
    drop(connection);
    // librados must not outlive the cluster the harness stops at exit.
    connection::disconnect_all();
}
