//! The RBD client against a real single-node Ceph cluster (tests/common/ceph.rs): every
//! call the rbd driver and RBD targets will make, checked with Ceph's own tools.

mod common;

use backupfs::volume::rbd::client::{
    AioQueue, Cluster, Extent, FEATURE_FAST_DIFF, FEATURE_OBJECT_MAP, FEATURES_DEFAULT,
    ImageOptions, Timeouts,
};
use common::ceph::{self, POOL};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn connect(client: &ceph::ClientConf) -> Cluster {
    Cluster::connect(&client.conf, &client.name, Timeouts::default()).expect("connect")
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_of(bytes: &[u8], scratch: &Path) -> String {
    std::fs::write(scratch, bytes).expect("scratch file");
    let sum = common::sha256(scratch);
    let _ = std::fs::remove_file(scratch);
    sum
}

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("backupfs-rbd-{name}-"))
        .tempdir()
        .expect("temp dir")
}

#[test]
fn connects_as_admin_and_as_a_cinder_user_and_reads_the_fsid() {
    let cluster = ceph::cluster();
    let admin = connect(&cluster.admin());
    assert_eq!(admin.fsid().unwrap(), cluster.fsid);
    let cinder = connect(&cluster.client("cinder"));
    assert_eq!(cinder.fsid().unwrap(), cluster.fsid);
    assert_ne!(admin.instance_id(), cinder.instance_id());
    // Pacific's default, what Cinder's driver reads from the cluster too.
    assert_eq!(cinder.default_features().unwrap(), FEATURES_DEFAULT);
    assert!(cinder.pool_exists(POOL).unwrap());
    let (rados, rbd) = backupfs::volume::rbd::ffi::versions().unwrap();
    eprintln!("librados {rados}, librbd {rbd}");
}

#[test]
fn bad_conf_unknown_client_bad_key_and_missing_pool_are_clear_errors() {
    let cluster = ceph::cluster();
    let dir = scratch("errors");
    let t0 = Instant::now();

    let missing = dir.path().join("no-such.conf");
    let err = Cluster::connect(&missing, "admin", Timeouts::default()).unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    assert!(err.to_string().contains("no-such.conf"), "{err}");

    // A user the cluster does not know, with a key of its own.
    let bogus_keyring = dir.path().join("client.nobody.keyring");
    let key = ceph::run(&cluster.conf, 30, "ceph-authtool", &["--gen-print-key"]);
    std::fs::write(
        &bogus_keyring,
        format!("[client.nobody]\n\tkey = {}\n", key.trim()),
    )
    .unwrap();
    let conf = dir.path().join("nobody.conf");
    let mon_host = "[v2:127.0.0.1:3300,v1:127.0.0.1:6789]";
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon host = {mon_host}\nkeyring = {}\n",
            bogus_keyring.display()
        ),
    )
    .unwrap();
    let err = Cluster::connect(&conf, "nobody", Timeouts::default()).unwrap_err();
    eprintln!("unknown client: {err}");
    assert!(matches!(err.errno(), libc::EACCES | libc::EPERM), "{err}");

    // A known user with the wrong key.
    let cinder = cluster.client("cinder");
    let wrong_keyring = dir.path().join("client.cinder.keyring");
    std::fs::write(
        &wrong_keyring,
        format!("[client.cinder]\n\tkey = {}\n", key.trim()),
    )
    .unwrap();
    let conf = dir.path().join("wrong-key.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon host = {mon_host}\nkeyring = {}\n",
            wrong_keyring.display()
        ),
    )
    .unwrap();
    let err = Cluster::connect(&conf, &cinder.name, Timeouts::default()).unwrap_err();
    eprintln!("bad key: {err}");
    assert!(matches!(err.errno(), libc::EACCES | libc::EPERM), "{err}");

    // No keyring at all for that client name.
    let err = Cluster::connect(&cluster.conf, "nokeyring", Timeouts::default()).unwrap_err();
    eprintln!("no keyring: {err}");
    assert_eq!(err.errno(), libc::ENOENT, "{err}");

    // No monitor answering: an error once the connect timeout has passed.
    let conf = dir.path().join("no-monitor.conf");
    std::fs::write(&conf, "[global]\nmon host = 127.0.0.1:6799\n").unwrap();
    let quick = Timeouts {
        connect: Duration::from_secs(2),
        ..Timeouts::default()
    };
    let t1 = Instant::now();
    let err = Cluster::connect(&conf, "admin", quick).unwrap_err();
    eprintln!("no monitor: {err} after {:?}", t1.elapsed());
    assert!(err.is_timeout(), "{err}");
    assert!(t1.elapsed() < Duration::from_secs(10));

    let client = connect(&cinder);
    assert!(!client.pool_exists("no-such-pool").unwrap());
    let err = client.ioctx("no-such-pool", None).unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    assert!(err.to_string().contains("no-such-pool"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "errors took {:?}",
        t0.elapsed()
    );
}

#[test]
fn images_are_created_grown_listed_and_removed() {
    let cluster = ceph::cluster();
    let client = connect(&cluster.client("cinder"));
    let io = client.ioctx(POOL, None).unwrap();
    let name = "lifecycle-volume-1";
    io.create_image(name, 64 * MIB, &ImageOptions::default())
        .unwrap();
    assert!(io.list_images().unwrap().contains(&name.to_string()));
    assert!(
        io.create_image(name, MIB, &ImageOptions::default())
            .unwrap_err()
            .is_exists()
    );

    let stat = io.stat_image(name).unwrap();
    assert_eq!(
        (stat.size, stat.order, stat.object_size),
        (64 * MIB, 22, 4 * MIB)
    );
    let image = io.open_image(name).unwrap();
    assert_eq!(image.features().unwrap(), FEATURES_DEFAULT);
    assert!(image.has_valid_fast_diff().unwrap());
    image.resize(100 * MIB).unwrap();
    assert_eq!(image.size().unwrap(), 100 * MIB);
    assert_eq!(image.resize(10 * MIB).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(image.size().unwrap(), 100 * MIB);
    let info = cluster.rbd(&["info", "--format", "json", &format!("{POOL}/{name}")]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["size"], 100 * MIB);

    // Explicit features and order are honoured (a backup image without object map).
    let plain = "lifecycle-volume-2";
    let options = ImageOptions {
        features: Some(1),
        order: Some(23),
    };
    io.create_image(plain, 16 * MIB, &options).unwrap();
    let other = io.open_image_read_only(plain, None).unwrap();
    assert_eq!(other.features().unwrap(), 1);
    assert_eq!(other.stat().unwrap().order, 23);
    assert!(!other.has_valid_fast_diff().unwrap());
    drop(other);

    drop(image);
    io.remove_image(name).unwrap();
    io.remove_image(plain).unwrap();
    assert!(io.remove_image(name).unwrap_err().is_not_found());
    assert!(io.open_image(name).unwrap_err().is_not_found());
    assert!(!io.list_images().unwrap().contains(&name.to_string()));
}

#[test]
fn reads_and_queued_writes_round_trip_and_match_rbd_export() {
    let cluster = ceph::cluster();
    let dir = scratch("io");
    let client = connect(&cluster.client("cinder"));
    let io = client.ioctx(POOL, None).unwrap();
    let name = "io-volume-1";
    let size = 40 * MIB;
    io.create_image(name, size, &ImageOptions::default())
        .unwrap();
    let image = io.open_image(name).unwrap();
    let mut expected = vec![0u8; size as usize];

    // Positioned writes, unaligned.
    let small = pattern(1, 12345);
    image.write_at(&small, 3 * MIB + 17).unwrap();
    expected[(3 * MIB + 17) as usize..][..small.len()].copy_from_slice(&small);
    // Queued 4 MiB writes, 4 in flight, over the last 32 MiB.
    let mut queue = AioQueue::new(&image, 4);
    let mut finished = 0;
    for block in 0..8u64 {
        let offset = 8 * MIB + block * 4 * MIB;
        let data = pattern(100 + block, (4 * MIB) as usize);
        expected[offset as usize..][..data.len()].copy_from_slice(&data);
        if let Some(done) = queue.write(offset, data).unwrap() {
            assert_eq!(done.bytes, 4 * MIB);
            finished += 1;
        }
        assert!(queue.len() <= 4);
    }
    finished += queue.drain().unwrap().len();
    assert_eq!(finished, 8);
    // Zeroes and discards through the queue too.
    queue.write_zeroes(8 * MIB, 4096).unwrap();
    queue.discard(36 * MIB, 4 * MIB).unwrap();
    queue.drain().unwrap();
    drop(queue);
    expected[(8 * MIB) as usize..][..4096].fill(0);
    expected[(36 * MIB) as usize..].fill(0);
    image.flush().unwrap();

    let want = sha256_of(&expected, &dir.path().join("expected"));
    assert_eq!(cluster.export_sha256(POOL, name), want);

    // Queued reads (as a backup makes them) give the same bytes; a read past the end
    // is short.
    let mut queue = AioQueue::new(&image, 8).sequential();
    let mut read = vec![0u8; size as usize];
    let mut place = |done: backupfs::volume::rbd::AioDone| {
        read[done.offset as usize..][..done.bytes as usize]
            .copy_from_slice(&done.buffer[..done.bytes as usize]);
    };
    for block in 0..size / (4 * MIB) {
        if let Some(done) = queue
            .read(block * 4 * MIB, vec![0; (4 * MIB) as usize])
            .unwrap()
        {
            place(done);
        }
    }
    for done in queue.drain().unwrap() {
        place(done);
    }
    let done = {
        queue.read(size - 4096, vec![0; 8192]).unwrap();
        queue.wait_oldest().unwrap().unwrap()
    };
    assert_eq!(done.bytes, 4096);
    drop(queue);
    assert!(
        read == expected,
        "queued reads differ from what was written"
    );

    let mut buf = vec![0u8; small.len()];
    assert_eq!(image.read_at(&mut buf, 3 * MIB + 17).unwrap(), small.len());
    assert_eq!(buf, small);
    assert_eq!(
        image.write_at(b"x", size).unwrap_err().errno(),
        libc::EINVAL
    );

    // An image made by `rbd import` reads back byte for byte.
    let source = dir.path().join("import.raw");
    let content = pattern(7, (5 * MIB + 3) as usize);
    std::fs::write(&source, &content).unwrap();
    cluster.import(POOL, "io-imported", &source);
    let imported = io.open_image_read_only("io-imported", None).unwrap();
    let mut back = vec![0u8; content.len()];
    assert_eq!(imported.read_at(&mut back, 0).unwrap(), content.len());
    assert!(back == content);

    drop(imported);
    drop(image);
    io.remove_image(name).unwrap();
    io.remove_image("io-imported").unwrap();
}

#[test]
fn a_pending_write_keeps_its_image_open_after_the_caller_lets_go() {
    let cluster = ceph::cluster();
    let dir = scratch("pending");
    let client = connect(&cluster.client("cinder"));
    let io = client.ioctx(POOL, None).unwrap();
    let name = "pending-volume-1";
    let size = 8 * MIB;
    io.create_image(name, size, &ImageOptions::default())
        .unwrap();
    let image = Arc::new(io.open_image(name).unwrap());
    let data = pattern(3, (4 * MIB) as usize);
    let write = image.submit_write(MIB, data.clone()).unwrap();
    assert_eq!(write.range(), MIB..5 * MIB);
    // The caller's handle goes first: the write still holds the image open.
    drop(image);
    assert_eq!(write.wait().unwrap(), data);

    let mut expected = vec![0u8; size as usize];
    expected[MIB as usize..][..data.len()].copy_from_slice(&data);
    let want = sha256_of(&expected, &dir.path().join("expected"));
    assert_eq!(cluster.export_sha256(POOL, name), want);
    io.remove_image(name).unwrap();
}

#[test]
fn diff_iterate_finds_exactly_the_written_extents_and_the_changes_since_a_snapshot() {
    let cluster = ceph::cluster();
    let client = connect(&cluster.client("cinder"));
    let io = client.ioctx(POOL, None).unwrap();
    let name = "diff-volume-1";
    io.create_image(name, 64 * MIB, &ImageOptions::default())
        .unwrap();
    let image = io.open_image(name).unwrap();
    let e = |offset: u64, len: u64, exists: bool| Extent {
        offset,
        len,
        exists,
    };

    assert_eq!(image.extents(None, 0..64 * MIB, false).unwrap(), []);
    image.write_at(&pattern(1, MIB as usize), 0).unwrap();
    image.write_at(&pattern(2, 4096), 10 * MIB).unwrap();
    image
        .write_at(&pattern(3, (8 * MIB) as usize), 40 * MIB)
        .unwrap();
    image.flush().unwrap();
    // Without snapshots RADOS knows no holes inside an object: each object is
    // reported from its start to its end (its size), so a write into the middle of an
    // object shows from the object's start. Within that, exact.
    let exact = image.extents(None, 0..64 * MIB, false).unwrap();
    assert_eq!(
        exact,
        [
            e(0, MIB, true),
            e(8 * MIB, 2 * MIB + 4096, true),
            e(40 * MIB, 8 * MIB, true)
        ]
    );
    // Whole objects, from the object map: the 4 MiB objects that hold data.
    assert!(image.has_valid_fast_diff().unwrap());
    let whole = image.extents(None, 0..64 * MIB, true).unwrap();
    assert_eq!(
        whole,
        [
            e(0, 4 * MIB, true),
            e(8 * MIB, 4 * MIB, true),
            e(40 * MIB, 8 * MIB, true)
        ]
    );
    // A range is honoured, and the callback may stop early.
    assert_eq!(
        image.extents(None, 10 * MIB..64 * MIB, false).unwrap()[0],
        e(10 * MIB, 4096, true)
    );
    let mut seen = 0;
    image
        .diff_iterate(None, 0..64 * MIB, false, false, |_| {
            seen += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(seen, 1);

    image.create_snapshot("diff-base").unwrap();
    image.write_at(&pattern(4, 65536), 20 * MIB).unwrap();
    image.discard(40 * MIB, 4 * MIB).unwrap();
    image.flush().unwrap();
    let changed = image
        .extents(Some("diff-base"), 0..64 * MIB, false)
        .unwrap();
    eprintln!("changed since diff-base (exact): {changed:?}");
    assert_eq!(
        changed,
        [e(20 * MIB, 65536, true), e(40 * MIB, 4 * MIB, false)]
    );
    let changed_whole = image.extents(Some("diff-base"), 0..64 * MIB, true).unwrap();
    eprintln!("changed since diff-base (whole objects): {changed_whole:?}");
    assert_eq!(
        changed_whole,
        [e(20 * MIB, 4 * MIB, true), e(40 * MIB, 4 * MIB, false)]
    );

    // The snapshot itself, opened read-only, still has the old data and extents.
    let at_base = io.open_image_read_only(name, Some("diff-base")).unwrap();
    assert_eq!(at_base.extents(None, 0..64 * MIB, false).unwrap(), exact);
    assert!(at_base.write_at(b"x", 0).is_err());
    drop(at_base);

    assert!(
        image
            .extents(Some("no-such-snapshot"), 0..MIB, false)
            .unwrap_err()
            .is_not_found()
    );
    image.remove_snapshot("diff-base").unwrap();
    drop(image);
    io.remove_image(name).unwrap();
}

#[test]
fn snapshots_are_made_listed_read_and_removed() {
    let cluster = ceph::cluster();
    let client = connect(&cluster.client("cinder"));
    let io = client.ioctx(POOL, None).unwrap();
    let name = "snap-volume-1";
    io.create_image(name, 8 * MIB, &ImageOptions::default())
        .unwrap();
    let image = io.open_image(name).unwrap();
    let before = pattern(1, 4096);
    image.write_at(&before, 0).unwrap();
    image.create_snapshot("backup-1").unwrap();
    assert!(image.create_snapshot("backup-1").unwrap_err().is_exists());
    image.write_at(&pattern(2, 4096), 0).unwrap();
    image.create_snapshot("backup-2").unwrap();

    let names: Vec<String> = image
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["backup-1", "backup-2"]);
    assert!(image.snapshot_exists("backup-1").unwrap());
    assert!(!image.snapshot_exists("backup-3").unwrap());
    let listed = cluster.rbd(&["snap", "ls", "--format", "json", &format!("{POOL}/{name}")]);
    assert!(
        listed.contains("backup-1") && listed.contains("backup-2"),
        "{listed}"
    );

    let snap = io.open_image_read_only(name, Some("backup-1")).unwrap();
    assert_eq!(snap.snapshot(), Some("backup-1"));
    let mut buf = vec![0u8; 4096];
    snap.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, before);
    drop(snap);

    // An image with snapshots cannot be removed.
    drop(image);
    assert_eq!(io.remove_image(name).unwrap_err().errno(), libc::ENOTEMPTY);
    let image = io.open_image(name).unwrap();
    image.remove_snapshot("backup-1").unwrap();
    image.remove_snapshot("backup-2").unwrap();
    assert!(
        image
            .remove_snapshot("backup-2")
            .unwrap_err()
            .is_not_found()
    );
    assert!(image.snapshots().unwrap().is_empty());
    drop(image);
    io.remove_image(name).unwrap();
}

#[test]
fn watchers_are_seen_while_rbd_watch_runs_and_not_after() {
    let cluster = ceph::cluster();
    let client = connect(&cluster.client("cinder"));
    let io = client.ioctx(POOL, None).unwrap();
    let name = "watch-volume-1";
    io.create_image(name, 4 * MIB, &ImageOptions::default())
        .unwrap();

    // Our own read-write open is a watcher, with our instance id; it is not foreign.
    let image = io.open_image(name).unwrap();
    let watchers = image.watchers().unwrap();
    eprintln!("watchers of our own read-write open: {watchers:?}");
    assert_eq!(watchers.len(), 1);
    assert_eq!(watchers[0].client_id, client.instance_id());
    assert!(image.foreign_watchers().unwrap().is_empty());
    // A read-only open (at the head or at a snapshot) takes no watch.
    let read_only = io.open_image_read_only(name, None).unwrap();
    assert_eq!(image.watchers().unwrap().len(), 1);
    drop(read_only);

    {
        let _watch = cluster.hold_watch(POOL, name);
        let foreign = image.foreign_watchers().unwrap();
        assert_eq!(foreign.len(), 1, "{foreign:?}");
        assert!(
            cluster
                .watcher_ids(POOL, name)
                .contains(&foreign[0].client_id)
        );
        // Another connection of ours counts as foreign too: it is another client.
        let other = connect(&cluster.client("cinder"));
        let seen_by_other = other
            .ioctx(POOL, None)
            .unwrap()
            .open_image_read_only(name, None)
            .unwrap();
        assert_eq!(seen_by_other.foreign_watchers().unwrap().len(), 2);
        // A watched image cannot be removed.
        drop(image);
        assert!(io.remove_image(name).unwrap_err().is_busy());
    }
    let image = io.open_image_read_only(name, None).unwrap();
    assert!(image.foreign_watchers().unwrap().is_empty());
    drop(image);
    io.remove_image(name).unwrap();
}

#[test]
fn image_metadata_is_set_read_listed_and_removed() {
    let cluster = ceph::cluster();
    let client = connect(&cluster.client("cinder"));
    let io = client.ioctx(POOL, None).unwrap();
    let name = "meta-volume-1";
    io.create_image(name, 4 * MIB, &ImageOptions::default())
        .unwrap();
    let image = io.open_image(name).unwrap();
    assert_eq!(image.metadata_get("backupfs.record").unwrap(), None);
    let record = format!("{{\"id\":\"x\",\"pad\":\"{}\"}}", "a".repeat(1000));
    image.metadata_set("backupfs.record", &record).unwrap();
    image.metadata_set("backupfs.empty", "").unwrap();
    image.metadata_set("backupfs.status", "available").unwrap();
    assert_eq!(
        image.metadata_get("backupfs.record").unwrap().as_deref(),
        Some(record.as_str())
    );
    let all = image.metadata_list().unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all["backupfs.empty"], "");
    assert_eq!(all["backupfs.status"], "available");
    let shown = cluster.rbd(&[
        "image-meta",
        "get",
        &format!("{POOL}/{name}"),
        "backupfs.status",
    ]);
    assert_eq!(shown.trim(), "available");
    image.metadata_remove("backupfs.status").unwrap();
    assert!(
        image
            .metadata_remove("backupfs.status")
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(image.metadata_list().unwrap().len(), 2);
    drop(image);
    io.remove_image(name).unwrap();
}

#[test]
fn objects_are_written_whole_read_listed_and_removed_in_a_namespace() {
    let cluster = ceph::cluster();
    let client = connect(&cluster.client("cinder"));
    let catalogue = client.ioctx(POOL, Some("objects-test")).unwrap();
    let elsewhere = client.ioctx(POOL, None).unwrap();
    assert_eq!(catalogue.location(), format!("{POOL}/objects-test"));

    let big = pattern(9, 300_000);
    catalogue.write_object("record.a", &big).unwrap();
    assert_eq!(catalogue.read_object("record.a").unwrap(), big);
    catalogue.write_object("record.a", b"short").unwrap();
    assert_eq!(catalogue.read_object("record.a").unwrap(), b"short");
    assert_eq!(catalogue.stat_object("record.a").unwrap().size, 5);
    catalogue.write_object("record.b", b"").unwrap();
    assert_eq!(catalogue.read_object("record.b").unwrap(), b"");
    catalogue.write_object("checksums.a", b"sums").unwrap();

    catalogue.create_object("claim", b"backupfs").unwrap();
    assert!(
        catalogue
            .create_object("claim", b"other")
            .unwrap_err()
            .is_exists()
    );
    assert_eq!(catalogue.read_object("claim").unwrap(), b"backupfs");

    assert_eq!(
        catalogue.list_objects("record.").unwrap(),
        ["record.a", "record.b"]
    );
    assert_eq!(catalogue.list_objects("").unwrap().len(), 4);
    // Namespaces keep objects apart.
    assert!(
        elsewhere
            .read_object("record.a")
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        !elsewhere
            .list_objects("record.")
            .unwrap()
            .contains(&"record.a".to_string())
    );

    for oid in ["record.a", "record.b", "checksums.a", "claim"] {
        catalogue.remove_object(oid).unwrap();
    }
    assert!(
        catalogue
            .remove_object("record.a")
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        catalogue
            .read_object("record.a")
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        catalogue
            .stat_object("record.a")
            .unwrap_err()
            .is_not_found()
    );
    assert!(catalogue.list_objects("").unwrap().is_empty());
}

#[test]
fn an_exclusive_lock_is_refused_to_a_second_holder_until_released() {
    let cluster = ceph::cluster();
    let first = connect(&cluster.client("cinder"));
    let second = connect(&cluster.client("cinder"));
    let io_first = first.ioctx(POOL, Some("lock-test")).unwrap();
    let io_second = second.ioctx(POOL, Some("lock-test")).unwrap();
    let duration = Duration::from_secs(2);

    let held = io_first
        .lock_exclusive("target.lock", "backupfs", "node a", duration)
        .unwrap();
    assert!(held.is_held());
    let err = io_second
        .lock_exclusive("target.lock", "backupfs", "node b", duration)
        .unwrap_err();
    assert!(err.is_busy(), "{err}");
    // Another holder in the same process is refused as well (its own cookie).
    assert!(
        io_first
            .lock_exclusive("target.lock", "backupfs", "again", duration)
            .unwrap_err()
            .is_busy()
    );
    // Renewal keeps it past its duration.
    std::thread::sleep(duration * 2);
    assert!(held.is_held());
    assert!(
        io_second
            .lock_exclusive("target.lock", "backupfs", "node b", duration)
            .unwrap_err()
            .is_busy()
    );
    drop(held);
    let taken = io_second
        .lock_exclusive("target.lock", "backupfs", "node b", duration)
        .unwrap();
    drop(taken);
    io_first.remove_object("target.lock").unwrap();
}

#[test]
fn deep_copy_copies_an_image_at_a_snapshot_inside_the_cluster() {
    let cluster = ceph::cluster();
    let dir = scratch("deep-copy");
    let backups = cluster.pool("backupfs-test-backups");
    let client = connect(&cluster.client("cinder"));
    let volumes = client.ioctx(POOL, None).unwrap();
    let target = client.ioctx(&backups, None).unwrap();
    let name = "copy-volume-1";
    let source = dir.path().join("source.raw");
    let mut content = vec![0u8; (12 * MIB) as usize];
    content[..MIB as usize].copy_from_slice(&pattern(1, MIB as usize));
    content[(9 * MIB) as usize..][..4096].copy_from_slice(&pattern(2, 4096));
    std::fs::write(&source, &content).unwrap();
    cluster.import(POOL, name, &source);
    let want = common::sha256(&source);

    let image = volumes.open_image(name).unwrap();
    image.create_snapshot("backup-x").unwrap();
    image.write_at(&pattern(3, 4096), 0).unwrap();
    let at_snapshot = volumes
        .open_image_read_only(name, Some("backup-x"))
        .unwrap();
    let mut last = (0, 0);
    at_snapshot
        .deep_copy(
            &target,
            "backup-x",
            &ImageOptions::default(),
            |done, total| last = (done, total),
        )
        .unwrap();
    eprintln!("deep copy progress at the end: {last:?}");
    assert_eq!(cluster.export_sha256(&backups, "backup-x"), want);
    let copy = target.open_image("backup-x").unwrap();
    let copied_snapshots: Vec<String> = copy
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    eprintln!("snapshots of the copy: {copied_snapshots:?}");
    // Thin: only the objects that hold data were written.
    let extents = copy.extents(None, 0..12 * MIB, false).unwrap();
    let allocated: u64 = extents.iter().map(|e| e.len).sum();
    assert!(allocated <= 2 * 4 * MIB, "{extents:?}");
    assert_eq!(
        copy.features().unwrap() & (FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF),
        FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF
    );
    for snapshot in copied_snapshots {
        copy.remove_snapshot(&snapshot).unwrap();
    }
    drop(copy);
    target.remove_image("backup-x").unwrap();
    drop(at_snapshot);
    image.remove_snapshot("backup-x").unwrap();
    drop(image);
    volumes.remove_image(name).unwrap();
}

#[test]
fn a_stopped_osd_turns_io_into_errors_within_the_timeout() {
    let cluster = ceph::cluster_exclusive();
    let admin = cluster.admin();
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        mon_op: Duration::from_secs(5),
        osd_op: Duration::from_secs(5),
    };
    let setup = Instant::now();
    let client = Cluster::connect(&admin.conf, &admin.name, timeouts).unwrap();
    let io = client.ioctx(POOL, None).unwrap();
    let name = "outage-volume-1";
    io.create_image(name, 16 * MIB, &ImageOptions::default())
        .unwrap();
    let image = io.open_image(name).unwrap();
    image.write_at(&pattern(1, MIB as usize), 0).unwrap();
    image.flush().unwrap();

    eprintln!("set-up took {:?}", setup.elapsed());
    cluster.stop_osd();
    let t0 = Instant::now();
    let mut buf = vec![0u8; MIB as usize];
    let err = image.read_at(&mut buf, 0).unwrap_err();
    let read_took = t0.elapsed();
    eprintln!("read with the OSD stopped: {err} after {read_took:?}");
    assert!(err.is_timeout(), "{err}");

    let t1 = Instant::now();
    let mut queue = AioQueue::new(&image, 4);
    for block in 0..4u64 {
        queue
            .write(block * 4 * MIB, pattern(block, (4 * MIB) as usize))
            .unwrap();
    }
    let err = queue.drain().unwrap_err();
    let write_took = t1.elapsed();
    eprintln!("queued writes with the OSD stopped: {err} after {write_took:?}");
    assert!(err.is_timeout(), "{err}");
    drop(queue);

    let t2 = Instant::now();
    let err = io.read_object("nothing-here").unwrap_err();
    eprintln!(
        "object read with the OSD stopped: {err} after {:?}",
        t2.elapsed()
    );
    let t3 = Instant::now();
    drop(image);
    eprintln!(
        "closing the image with the OSD stopped took {:?}",
        t3.elapsed()
    );
    let t4 = Instant::now();
    drop(io);
    drop(client);
    eprintln!("shutting the connection down took {:?}", t4.elapsed());
    for took in [read_took, write_took] {
        assert!(
            took < Duration::from_secs(30),
            "an I/O took {took:?} with a 5 s timeout"
        );
    }

    cluster.start_osd();
    let t5 = Instant::now();
    let client = connect(&admin);
    let io = client.ioctx(POOL, None).unwrap();
    let image = io.open_image_read_only(name, None).unwrap();
    assert_eq!(image.read_at(&mut buf, 0).unwrap(), MIB as usize);
    assert_eq!(buf, pattern(1, MIB as usize));
    drop(image);
    eprintln!("reading again after the restart took {:?}", t5.elapsed());
    // The image stays: removing it would wait ~30 s for the dead connection's watch
    // and exclusive lock to expire (osd_client_watch_timeout), and the cluster is
    // thrown away at exit anyway.
}

#[test]
fn a_snapshot_is_made_and_removed_while_another_client_writes_the_image() {
    let cluster = ceph::cluster();
    let name = "in-use-volume-1";
    // The "hypervisor": another connection that writes, so it owns the exclusive lock.
    let hypervisor = connect(&cluster.client("cinder"));
    let vm_io = hypervisor.ioctx(POOL, None).unwrap();
    vm_io
        .create_image(name, 8 * MIB, &ImageOptions::default())
        .unwrap();
    let vm_disk = vm_io.open_image(name).unwrap();
    vm_disk.write_at(&pattern(1, 4096), 0).unwrap();

    let backupfs = connect(&cluster.client("cinder"));
    let io = backupfs.ioctx(POOL, None).unwrap();
    let volume = io.open_image_read_only(name, None).unwrap();
    assert_eq!(volume.foreign_watchers().unwrap().len(), 1);
    drop(volume);
    // Snapshots need a read-write handle; librbd asks the lock owner to make them.
    let volume = io.open_image(name).unwrap();
    let t0 = Instant::now();
    volume.create_snapshot("backup-tmp").unwrap();
    eprintln!("snapshot of a written image took {:?}", t0.elapsed());
    // The VM keeps writing, and still can.
    vm_disk.write_at(&pattern(2, 4096), 0).unwrap();
    let at_snapshot = io.open_image_read_only(name, Some("backup-tmp")).unwrap();
    let mut buf = vec![0u8; 4096];
    at_snapshot.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(1, 4096));
    drop(at_snapshot);
    volume.remove_snapshot("backup-tmp").unwrap();
    vm_disk.write_at(&pattern(3, 4096), 4096).unwrap();
    assert!(volume.snapshots().unwrap().is_empty());
    drop(volume);
    drop(vm_disk);
    io.remove_image(name).unwrap();
}
