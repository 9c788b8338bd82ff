//! The `rbd` driver and RBD targets against a real single-node Ceph cluster, through a
//! real mount: backups idle and in-use, restores across every pair of drivers, refused
//! configurations, a crash and a stopped cluster mid-copy, and the target's series of
//! snapshots (what incremental backups build on).

mod common;

use backupfs::ids::BackupId;
use backupfs::targets::BackupTarget;
use backupfs::targets::rbd::RbdTarget;
use backupfs::volume::rbd::{PoolSpec, Timeouts, connection};
use common::ceph::{self, CephCluster, POOL};
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The backend's request timeout in these tests (seconds).
const TIMEOUT: u64 = 5;

/// A new RBD namespace of the shared test pool: `pool/namespace`, as a config names it.
fn namespace(cluster: &CephCluster, name: &str) -> String {
    cluster.rbd(&["namespace", "create", "--pool", POOL, "--namespace", name]);
    format!("{POOL}/{name}")
}

/// `rbd import` of a file as image `name` in `spec` (`pool[/namespace]`).
fn import(cluster: &CephCluster, spec: &str, name: &str, file: &Path) {
    cluster.rbd(&[
        "import",
        "--no-progress",
        &file.to_string_lossy(),
        &format!("{spec}/{name}"),
    ]);
}

/// The RADOS objects of `spec` whose names start with `backupfs.`.
fn catalogue_objects(cluster: &CephCluster, spec: &str) -> Vec<String> {
    let (pool, namespace) = spec.split_once('/').unwrap_or((spec, ""));
    let out = ceph::run(
        &cluster.conf,
        60,
        "rados",
        &["ls", "--pool", pool, "--namespace", namespace],
    );
    // (Not the heartbeat of the node that runs: it goes when the daemon stops.)
    let mut names: Vec<String> = out
        .lines()
        .filter(|n| n.starts_with("backupfs.") && !n.starts_with("backupfs.node."))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// A file of `mb` MiB: random data at `data` (MiB ranges), holes elsewhere.
fn sparse_file(path: &Path, mb: u64, data: &[(u64, u64)]) -> String {
    ok(&format!("truncate -s {mb}M '{}'", path.display()));
    for (at, len) in data {
        ok(&format!(
            "dd if=/dev/urandom of='{}' bs=1M seek={at} count={len} conv=notrunc status=none",
            path.display()
        ));
    }
    sha256(path)
}

/// The configuration of a backend `ceph` (volume pool `volumes`, target pool
/// `backups`, as client.cinder with `timeout` seconds) beside a `file` backend `files`
/// (volume pool `main`, target `files`), a `qcow2` backend `q`, and a target `rbd`.
struct Setup {
    volumes: String,
    backups: String,
    main: PathBuf,
    qcow2: PathBuf,
    config: PathBuf,
}

fn setup(sb: &mut Sandbox, cluster: &CephCluster, name: &str, extra: &str) -> Setup {
    let volumes = namespace(cluster, &format!("{name}-volumes"));
    let backups = namespace(cluster, &format!("{name}-backups"));
    setup_with(sb, cluster, &volumes, &backups, extra)
}

fn setup_with(
    sb: &mut Sandbox,
    cluster: &CephCluster,
    volumes: &str,
    backups: &str,
    extra: &str,
) -> Setup {
    let client = cluster.client("cinder");
    let main = sb.mkdir("files/main");
    let file_backups = sb.mkdir("files/backups");
    let qcow2 = sb.mkdir("q/vols");
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n{extra}\n\
         [backends.ceph]\ndriver = \"rbd\"\nceph_conf = \"{}\"\nclient = \"{}\"\ntimeout = {TIMEOUT}\n\
         pools = {{ volumes = \"{volumes}\", backups = \"{backups}\" }}\n\
         [backends.files]\ndriver = \"file\"\npools = {{ main = \"{}\", backups = \"{}\" }}\n\
         [backends.q]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\" }}\n\
         [targets.rbd]\nbackend = \"ceph\"\npool = \"backups\"\n\
         [targets.files]\nbackend = \"files\"\npool = \"backups\"\n",
        state.display(),
        client.conf.display(),
        client.name,
        main.display(),
        file_backups.display(),
        qcow2.display(),
    ));
    Setup {
        volumes: volumes.to_string(),
        backups: backups.to_string(),
        main,
        qcow2,
        config,
    }
}

/// `backupfs check-config`: (exit code, stderr).
fn check_config(config: &Path) -> (i32, String) {
    let out = run_timeout(
        std::process::Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(config),
        Duration::from_secs(90),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// SEEK_DATA and SEEK_HOLE of a file, from `offset`: None for ENXIO.
fn seek(path: &Path, offset: u64, whence: i32) -> Option<u64> {
    let file = std::fs::File::open(path).expect("open");
    // SAFETY: lseek on a descriptor we own.
    let at = unsafe {
        libc::lseek(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            offset as libc::off_t,
            whence,
        )
    };
    (at >= 0).then_some(at as u64)
}

#[test]
fn rbd_volumes_are_listed_read_sought_and_backed_up_to_file_and_rbd_targets() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-basic");
    let s = setup(&mut sb, &cluster, "basic", "");
    let source = sb.path("source.raw");
    // 64 MiB: data in objects 2-3 and 10, holes elsewhere.
    let sum = sparse_file(&source, 64, &[(9, 6), (40, 1)]);
    import(&cluster, &s.volumes, "volume-vol-a", &source);
    let d = sb.start_daemon(&s.config);

    assert_eq!(names_in(&d.mnt.join("volumes/ceph")), ["vol-a"]);
    let node = d.volume("ceph", "vol-a");
    assert_eq!(std::fs::metadata(&node).unwrap().len(), 64 * MIB);
    assert_eq!(sha256(&node), sum, "the volume reads as the image");
    // Holes at object (4 MiB) granularity, from the object map.
    assert_eq!(seek(&node, 0, libc::SEEK_DATA), Some(8 * MIB));
    assert_eq!(seek(&node, 8 * MIB, libc::SEEK_HOLE), Some(16 * MIB));
    assert_eq!(seek(&node, 16 * MIB, libc::SEEK_DATA), Some(40 * MIB));
    assert_eq!(seek(&node, 41 * MIB, libc::SEEK_HOLE), Some(44 * MIB));
    assert_eq!(seek(&node, 44 * MIB, libc::SEEK_DATA), None);

    let to_file = d.backup("files", "vol-a wait");
    assert_eq!(sha256(&d.image("files", &to_file)), sum);
    let to_rbd = d.backup("rbd", "vol-a wait name=nightly");
    let image = d.image("rbd", &to_rbd);
    assert_eq!(sha256(&image), sum);
    let record = d.record("rbd", &to_rbd);
    assert_eq!(record["status"], "available", "{record}");
    assert_eq!(record["backend"], "ceph");
    assert_eq!(record["snapshot_used"], false);
    assert_eq!(
        record["stored_bytes"].as_u64(),
        Some(7 * MIB),
        "holes are not stored: {record}"
    );
    // What the target's pool holds: a series image with the backup's snapshot, the
    // catalogue objects. Never `volume-<id>`.
    let series = format!("backupfs-series-{to_rbd}");
    assert_eq!(cluster.images(&s.backups), std::slice::from_ref(&series));
    // The snapshot is taken once the backup is available, after `wait` has answered.
    let snapshot = [format!("backup-{to_rbd}")];
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.snapshots(&s.backups, &series) != snapshot && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cluster.snapshots(&s.backups, &series), snapshot);
    assert_eq!(
        cluster.export_sha256(&s.backups, &format!("{series}@backup-{to_rbd}")),
        sum
    );
    assert_eq!(
        catalogue_objects(&cluster, &s.backups),
        [
            "backupfs.lock".to_string(),
            format!("backupfs.record.{to_rbd}"),
            format!("backupfs.sums.{to_rbd}"),
            "backupfs.target".to_string(),
        ]
    );
    // Images of RBD-stored backups: holes (from the checksums, in 1 MiB blocks), verify,
    // losetup.
    assert_eq!(seek(&image, 0, libc::SEEK_DATA), Some(9 * MIB));
    assert_eq!(seek(&image, 9 * MIB, libc::SEEK_HOLE), Some(15 * MIB));
    assert_eq!(
        write_errno(&d.target("rbd").join("verify"), to_rbd.as_bytes()),
        None
    );
    assert!(d.record("rbd", &to_rbd)["verified_at"].is_string());
    let loop_dev = sb.attach_loop_ro(&image);
    assert_eq!(sha256(Path::new(&loop_dev)), sum, "losetup -r of the image");
    sb.detach_loop(&loop_dev);

    // Deleting removes the snapshot, then the series image and the catalogue objects.
    std::fs::remove_file(&image).unwrap();
    assert_eq!(cluster.images(&s.backups), Vec::<String>::new());
    assert_eq!(
        catalogue_objects(&cluster, &s.backups),
        ["backupfs.lock", "backupfs.target"]
    );
    d.stop_clean();
    // A second start sees the same catalogue (another node would too).
    let d = sb.start_daemon(&s.config);
    assert_eq!(d.record("files", &to_file)["status"], "available");
    assert!(!d.image("rbd", &to_rbd).exists());
    d.stop_clean();
}

#[test]
fn restores_cross_every_pair_file_to_rbd_rbd_to_file_qcow2_to_rbd_rbd_to_rbd_and_rbd_to_qcow2() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-cross");
    let s = setup(&mut sb, &cluster, "cross", "");
    let raw = sb.path("r.raw");
    let rbd_sum = sparse_file(&raw, 48, &[(0, 3), (20, 5)]);
    import(&cluster, &s.volumes, "volume-from-rbd", &raw);
    let file_sum = {
        let volume = random_volume(&s.main, "from-file", 24);
        sha256(&volume)
    };
    let qcow2 = s.qcow2.join("volume-from-qcow2");
    ok(&format!(
        "qemu-img create -q -f qcow2 '{p}' 40M && qemu-io -f qcow2 -c 'write -P 0xcd 5M 7M' '{p}' >/dev/null",
        p = qcow2.display()
    ));
    let qcow2_raw = sb.path("q.raw");
    ok(&format!(
        "qemu-img convert -f qcow2 -O raw '{}' '{}'",
        qcow2.display(),
        qcow2_raw.display()
    ));
    let qcow2_sum = sha256(&qcow2_raw);
    let d = sb.start_daemon(&s.config);
    let rbd_on_files = d.backup("files", "from-rbd wait");
    let rbd_on_rbd = d.backup("rbd", "from-rbd wait");
    let file_on_files = d.backup("files", "from-file wait");
    let qcow2_on_files = d.backup("files", "from-qcow2 wait");
    let file_on_rbd = d.backup("rbd", "from-file wait");

    let restore = |image: PathBuf, backend: &str, volume: &str, sum: &str| {
        let node = d.volume(backend, volume);
        let t0 = Instant::now();
        let out = sh(&format!(
            "cp --sparse=always '{}' '{}'",
            image.display(),
            node.display()
        ));
        assert!(out.status.success(), "{out:?}; log:\n{}", d.log());
        eprintln!("restore onto {backend}/{volume} took {:?}", t0.elapsed());
        assert_eq!(sha256(&node), sum, "{backend}/{volume}");
    };
    // file → rbd, rbd → file, qcow2 → rbd, rbd → rbd (a backup stored on RBD, too).
    restore(
        d.image("files", &file_on_files),
        "ceph",
        "to-rbd-1",
        &file_sum,
    );
    restore(
        d.image("files", &rbd_on_files),
        "files",
        "to-file-1",
        &rbd_sum,
    );
    restore(
        d.image("files", &qcow2_on_files),
        "ceph",
        "to-rbd-2",
        &qcow2_sum,
    );
    restore(d.image("rbd", &rbd_on_rbd), "ceph", "to-rbd-3", &rbd_sum);
    restore(
        d.image("rbd", &file_on_rbd),
        "files",
        "to-file-2",
        &file_sum,
    );
    assert_eq!(
        cluster.export_sha256(&s.volumes, "volume-to-rbd-3"),
        rbd_sum,
        "what Ceph itself reads"
    );
    // rbd → qcow2: a backup stored on the RBD target onto a new qcow2 volume, which
    // qemu itself reads back byte for byte at the source's size.
    restore(d.image("rbd", &rbd_on_rbd), "q", "to-qcow2", &rbd_sum);
    let made = s.qcow2.join("volume-to-qcow2");
    let made_raw = sb.path("to-qcow2.raw");
    ok(&format!(
        "qemu-img check -q -U '{m}' && qemu-img convert -U -f qcow2 -O raw '{m}' '{}'",
        made_raw.display(),
        m = made.display(),
    ));
    assert_eq!(
        sha256(&made_raw),
        rbd_sum,
        "what qemu reads of the qcow2 volume"
    );
    // Restoring over an existing, larger image: O_TRUNC zeroes it (thin), the copy
    // writes the backup, and the tail past it reads as zeros.
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        d.image("files", &file_on_files).display(),
        d.volume("ceph", "to-rbd-3").display()
    ));
    assert_eq!(
        std::fs::metadata(d.volume("ceph", "to-rbd-3"))
            .unwrap()
            .len(),
        48 * MIB,
        "volumes never shrink"
    );
    ok(&format!(
        "cmp -n {} '{}' '{}'",
        24 * MIB,
        d.volume("ceph", "to-rbd-3").display(),
        d.image("files", &file_on_files).display()
    ));
    ok(&format!(
        "cmp -i {m}:0 -n {m} '{}' /dev/zero",
        d.volume("ceph", "to-rbd-3").display(),
        m = 24 * MIB
    ));
    // dd through the mount writes an image in place.
    ok(&format!(
        "dd if='{}' of='{}' bs=1M conv=notrunc status=none",
        d.image("files", &qcow2_on_files).display(),
        d.volume("ceph", "to-rbd-4").display()
    ));
    assert_eq!(sha256(&d.volume("ceph", "to-rbd-4")), qcow2_sum);
    d.stop_clean();
}

#[test]
fn an_in_use_rbd_volume_is_backed_up_from_a_snapshot_that_is_removed_and_refuses_restores() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-in-use");
    let s = setup(&mut sb, &cluster, "inuse", "");
    let raw = sb.path("v.raw");
    let sum = sparse_file(&raw, 32, &[(1, 10)]);
    import(&cluster, &s.volumes, "volume-busy", &raw);
    let d = sb.start_daemon(&s.config);
    let watch = cluster.hold_watch(&s.volumes, "volume-busy");

    for target in ["rbd", "files"] {
        let id = d.backup(target, "busy wait");
        let record = d.record(target, &id);
        assert_eq!(record["snapshot_used"], true, "{record}");
        assert!(record["temporary_snapshot"].is_null(), "{record}");
        assert_eq!(sha256(&d.image(target, &id)), sum);
        assert_eq!(
            cluster.snapshots(&s.volumes, "volume-busy"),
            Vec::<String>::new(),
            "the temporary snapshot is removed"
        );
    }
    assert!(
        d.log().contains("backing up from a temporary snapshot"),
        "{}",
        d.log()
    );
    // A restore into a volume a client watches is refused, and changes nothing.
    let node = d.volume("ceph", "busy");
    assert_errno(
        std::fs::OpenOptions::new().write(true).open(&node),
        libc::EBUSY,
        "opening an in-use rbd volume for writing",
    );
    assert!(d.log().contains("watched by client."), "{}", d.log());
    drop(watch);
    // Free again: restoring works.
    ok(&format!(
        "dd if=/dev/zero of='{}' bs=1M seek=2 count=1 conv=notrunc status=none",
        node.display()
    ));
    assert_ne!(cluster.export_sha256(&s.volumes, "volume-busy"), sum);
    d.stop_clean();
}

#[test]
fn target_pools_shared_with_volumes_holding_foreign_images_or_missing_are_refused() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-refuse");
    let volumes = namespace(&cluster, "refuse-volumes");
    // The target's pool is the volume pool: same cluster, pool and namespace.
    let s = setup_with(&mut sb, &cluster, &volumes, &volumes, "");
    let (code, err) = check_config(&s.config);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("targets.rbd") && err.contains("backends.ceph.pools.volumes"),
        "names both keys: {err}"
    );
    assert!(err.contains("must not share storage"), "{err}");
    let mut mount = std::process::Command::new(BIN);
    mount
        .arg("mount")
        .arg(sb.mkdir("mnt-refused"))
        .arg("--config")
        .arg(&s.config);
    let out = run_timeout(&mut mount, Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(2), "mount refuses too");

    // Another pool of the same cluster is fine; one holding someone's image is not.
    let other = namespace(&cluster, "refuse-foreign");
    let raw = sb.path("x.raw");
    sparse_file(&raw, 4, &[(0, 1)]);
    import(&cluster, &other, "someones-disk", &raw);
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        &format!("backups = \"{volumes}\""),
        &format!("backups = \"{other}\""),
    );
    std::fs::write(&s.config, &text).unwrap();
    let (code, err) = check_config(&s.config);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("targets.rbd.pool") && err.contains("someones-disk"),
        "names the key and the image: {err}"
    );
    assert_eq!(cluster.images(&other), ["someones-disk"], "nothing written");
    assert_eq!(catalogue_objects(&cluster, &other), Vec::<String>::new());

    let empty = namespace(&cluster, "refuse-empty");
    let text = text.replace(
        &format!("backups = \"{other}\""),
        &format!("backups = \"{empty}\""),
    );
    std::fs::write(&s.config, &text).unwrap();
    let (code, err) = check_config(&s.config);
    assert_eq!(code, 0, "an empty namespace of the same pool: {err}");
    assert_eq!(
        catalogue_objects(&cluster, &empty),
        Vec::<String>::new(),
        "check-config writes nothing"
    );

    // A pool that does not exist, and one whose namespace does not.
    let missing = text.replace(
        &format!("volumes = \"{volumes}\""),
        "volumes = \"no-such-pool\"",
    );
    std::fs::write(&s.config, &missing).unwrap();
    let (code, err) = check_config(&s.config);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("backends.ceph.pools.volumes") && err.contains("no-such-pool"),
        "{err}"
    );
    let missing = text.replace(
        &format!("volumes = \"{volumes}\""),
        &format!("volumes = \"{POOL}/no-such-namespace\""),
    );
    std::fs::write(&s.config, &missing).unwrap();
    let (code, err) = check_config(&s.config);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("backends.ceph.pools.volumes"), "{err}");

    // A user the cluster does not know.
    let bad_user = text.replace("client = \"cinder\"", "client = \"nobody\"");
    std::fs::write(&s.config, &bad_user).unwrap();
    let (code, err) = check_config(&s.config);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("backends.ceph.client"), "{err}");
}

#[test]
fn check_config_without_librbd_names_the_debian_package() {
    // librbd1 "missing": an empty file over the library, in a mount namespace of this
    // command only; the binary itself never links against Ceph.
    let library = ok("ldconfig -p | awk '/librbd.so.1 / {print $NF; exit}'")
        .trim()
        .to_string();
    assert!(!library.is_empty(), "librbd1 is installed for the tests");
    let sb = Sandbox::new("rbd-nolib");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n[backends.ceph]\ndriver = \"rbd\"\npools = {{ volumes = \"volumes\" }}\n",
        sb.mkdir("state").display()
    ));
    let out = sh(&format!(
        "unshare -m sh -c \"mount --bind /dev/null '{library}' && '{BIN}' check-config --config '{}'\"",
        config.display()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("backends.ceph.driver") && err.contains("librbd1"),
        "names the key and the Debian package: {err}"
    );
}

#[test]
fn kill9_mid_copy_to_an_rbd_target_leaves_no_image_snapshot_or_half_made_record() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-kill9");
    let s = setup(&mut sb, &cluster, "kill9", "copy_bps_limit = 4000000");
    let raw = sb.path("v.raw");
    let sum = ok(&format!(
        "head -c 48M /dev/urandom > '{p}' && sha256sum '{p}' | cut -d' ' -f1",
        p = raw.display()
    ))
    .trim()
    .to_string();
    import(&cluster, &s.volumes, "volume-victim", &raw);
    let small = sb.path("small.raw");
    let small_sum = sparse_file(&small, 8, &[(0, 2)]);
    import(&cluster, &s.volumes, "volume-earlier", &small);
    let d = sb.start_daemon(&s.config);
    let earlier = d.backup("rbd", "earlier wait");
    // In-use, so the job also has a temporary snapshot on the source to leave behind.
    let watch = cluster.hold_watch(&s.volumes, "volume-victim");
    let id = d.backup("rbd", "victim");
    wait_for(
        || {
            let jobs = d.jobs("rbd");
            jobs.lines()
                .any(|l| l.starts_with(&id) && l.contains(" copying ") && !l.contains(" 0/"))
        },
        "the copy to start",
    );
    let series = format!("backupfs-series-{id}");
    assert!(cluster.images(&s.backups).contains(&series));
    // The temporary snapshot, named as Cinder's RBD driver deletes with its volume.
    let temporary = cluster.snapshots(&s.volumes, "volume-victim");
    assert_eq!(temporary.len(), 1, "{temporary:?}");
    assert!(
        temporary[0].starts_with(&format!("backup.{id}.snap.")),
        "{temporary:?}"
    );
    d.kill9();
    drop(watch);

    let t0 = Instant::now();
    let d = sb.start_daemon(&s.config);
    eprintln!("restart after kill -9 took {:?}", t0.elapsed());
    let record = d.record("rbd", &id);
    assert_eq!(record["status"], "error", "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("interrupted"),
        "{record}"
    );
    assert!(!d.image("rbd", &id).exists());
    assert_eq!(
        cluster.images(&s.backups),
        [format!("backupfs-series-{earlier}")],
        "the half-made image is gone, the earlier backup stays"
    );
    assert_eq!(
        cluster.snapshots(&s.volumes, "volume-victim"),
        Vec::<String>::new(),
        "the source's temporary snapshot is gone"
    );
    assert!(
        !catalogue_objects(&cluster, &s.backups).contains(&format!("backupfs.sums.{id}")),
        "no checksums of the failed backup"
    );
    assert_eq!(sha256(&d.image("rbd", &earlier)), small_sum);
    assert_eq!(cluster.export_sha256(&s.volumes, "volume-victim"), sum);
    // The failed record is the operator's to remove; then nothing of it is left.
    std::fs::remove_file(d.target("rbd").join(format!("{id}.json"))).unwrap();
    assert!(
        !catalogue_objects(&cluster, &s.backups)
            .iter()
            .any(|o| o.contains(&id))
    );
    d.stop_clean();
}

#[test]
fn kill9_after_available_before_the_snapshot_keeps_the_backup_and_its_first_reader_snapshots_it() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-settle");
    let s = setup(&mut sb, &cluster, "settle", "");
    let raw = sb.path("v.raw");
    let sum = sparse_file(&raw, 12, &[(0, 3), (8, 2)]);
    import(&cluster, &s.volumes, "volume-vol", &raw);
    let d = sb.start_daemon_env(&s.config, &hold_env("settling"));
    let id = d.backup("rbd", "vol wait");
    assert_eq!(d.record("rbd", &id)["status"], "available");
    let series = format!("backupfs-series-{id}");
    wait_for(
        || d.log().contains("job holding at settling"),
        "the job to hold before the snapshot",
    );
    assert_eq!(cluster.snapshots(&s.backups, &series), Vec::<String>::new());
    d.kill9();

    let d = sb.start_daemon(&s.config);
    assert_eq!(d.record("rbd", &id)["status"], "available");
    assert_eq!(
        cluster.snapshots(&s.backups, &series),
        Vec::<String>::new(),
        "the head holds the backup"
    );
    assert_eq!(
        sha256(&d.image("rbd", &id)),
        sum,
        "read whole after the crash"
    );
    assert_eq!(
        cluster.snapshots(&s.backups, &series),
        [format!("backup-{id}")],
        "the first reader took the snapshot"
    );
    // An incremental continues the series from it, and both read as they should. (The
    // volume is written in place: one deleted and made again would be another volume,
    // backed up full.)
    cluster.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "1M",
        "--io-total",
        "2M",
        "--io-pattern",
        "rand",
        &format!("{}/volume-vol", s.volumes),
    ]);
    let sum2 = cluster.export_sha256(&s.volumes, "volume-vol");
    assert_ne!(sum2, sum);
    let next = d.backup("rbd", "vol incremental wait");
    assert_eq!(
        d.record("rbd", &next)["parent_id"].as_str(),
        Some(id.as_str())
    );
    assert_eq!(sha256(&d.image("rbd", &next)), sum2);
    assert_eq!(sha256(&d.image("rbd", &id)), sum);
    d.stop_clean();
}

#[test]
fn a_cluster_stopped_mid_copy_fails_the_job_with_etimedout_and_the_mount_keeps_answering() {
    let cluster = ceph::cluster_exclusive();
    let mut sb = Sandbox::new("rbd-outage");
    let (d, waiting) = copying_from_the_cluster(&mut sb, &cluster, "outage");
    cluster.stop_osd();
    let stopped = Instant::now();
    // The mount answers at once while the job waits on the cluster.
    for (what, script) in [
        ("ls", format!("ls '{}'", d.mnt.display())),
        (
            "cat jobs",
            format!("cat '{}'", d.target("files").join("jobs").display()),
        ),
        ("ls target", format!("ls '{}'", d.target("rbd").display())),
    ] {
        let t0 = Instant::now();
        ok(&script);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{what} took {:?} with the cluster stopped",
            t0.elapsed()
        );
    }
    assert!(
        d.jobs("files").contains(" far copying "),
        "the job still waits on the cluster: {}",
        d.jobs("files")
    );
    // Listing the stalled backend itself is bounded too: it fails, it does not hang.
    let t0 = Instant::now();
    let listing = sh(&format!("ls '{}'", d.mnt.join("volumes/ceph").display()));
    assert!(
        t0.elapsed() < Duration::from_secs(TIMEOUT + 2),
        "ls of the stalled backend took {:?}",
        t0.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&listing.stderr).contains("timed out"),
        "{listing:?}"
    );
    // The next one fails too, bounded the same way. (Not "at once": with `timeout` at
    // most 10 s, librados ends the first call as the mount gives up on it, so no
    // request stays unanswered past the limit; measured 5.0 s here.)
    let t0 = Instant::now();
    let again = sh(&format!("ls '{}'", d.mnt.join("volumes/ceph").display()));
    let second = t0.elapsed();
    eprintln!("a second ls of the stalled backend failed in {second:?}");
    assert!(!again.status.success(), "{again:?}");
    assert!(
        second < Duration::from_secs(TIMEOUT + 2),
        "the second ls took {second:?}"
    );
    let (errno, took) = waiting.join().expect("the waiting request");
    let failed_after = stopped.elapsed();
    eprintln!("the job failed {failed_after:?} after the OSD stopped ({took:?} in all)");
    assert_eq!(errno, Some(libc::ETIMEDOUT), "log:\n{}", d.log());
    // docs/ceph.md: "a running backup within about three `timeout`s" (one more for slack).
    assert!(
        failed_after < Duration::from_secs(4 * TIMEOUT),
        "the job failed {failed_after:?} after the OSD stopped, timeout = {TIMEOUT} s"
    );
    let jobs = d.jobs("files");
    assert!(
        jobs.lines()
            .any(|l| l.contains(" far error ") && l.contains("timed out")),
        "{jobs}"
    );
    cluster.start_osd();
    // Once the cluster answers again, so does the backend.
    wait_for(
        || {
            sh(&format!("ls '{}'", d.mnt.join("volumes/ceph").display()))
                .status
                .success()
        },
        "the backend to answer again",
    );
    d.stop_clean();
}

/// A daemon backing up a 64 MiB RBD volume (`far`, slowed to 4 MB/s) to a file target,
/// its copy under way: the daemon, and the `wait` request's errno and time, once it ends.
fn copying_from_the_cluster(
    sb: &mut Sandbox,
    cluster: &CephCluster,
    name: &str,
) -> (Daemon, std::thread::JoinHandle<(Option<i32>, Duration)>) {
    let s = setup(sb, cluster, name, "copy_bps_limit = 4000000");
    let raw = sb.path("v.raw");
    ok(&format!("head -c 64M /dev/urandom > '{}'", raw.display()));
    import(cluster, &s.volumes, "volume-far", &raw);
    let d = sb.start_daemon(&s.config);
    let request = d.target("files").join("request");
    let waiting = std::thread::spawn(move || {
        let t0 = Instant::now();
        let errno = write_errno(&request, b"far wait\n");
        (errno, t0.elapsed())
    });
    wait_for(
        || {
            d.jobs("files")
                .lines()
                .any(|l| l.contains(" far copying ") && !l.contains(" 0/"))
        },
        "the copy to start",
    );
    (d, waiting)
}

/// Issue 27, item 10: the whole cluster gone (its monitor too, not only the OSD) while a
/// backup copies from it: the job fails with ETIMEDOUT within the documented bound
/// (docs/ceph.md: about three `timeout`s), the mount answers at once meanwhile, and
/// requests to the gone backend fail within `timeout`; once the cluster is back, the
/// backend answers again.
#[test]
fn a_cluster_gone_monitor_and_osd_mid_copy_fails_the_job_within_the_bound() {
    let cluster = ceph::cluster_exclusive();
    let mut sb = Sandbox::new("rbd-gone");
    let (d, waiting) = copying_from_the_cluster(&mut sb, &cluster, "gone");
    cluster.stop_osd();
    cluster.stop_mon();
    let stopped = Instant::now();
    for (what, script) in [
        ("ls", format!("ls '{}'", d.mnt.display())),
        (
            "cat jobs",
            format!("cat '{}'", d.target("files").join("jobs").display()),
        ),
    ] {
        let t0 = Instant::now();
        ok(&script);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{what} took {:?} with the cluster gone",
            t0.elapsed()
        );
    }
    let t0 = Instant::now();
    let listing = sh(&format!("ls '{}'", d.mnt.join("volumes/ceph").display()));
    let first = t0.elapsed();
    assert!(!listing.status.success(), "{listing:?}");
    assert!(
        first < Duration::from_secs(TIMEOUT + 2),
        "ls of the gone backend took {first:?}"
    );
    let (errno, _) = waiting.join().expect("the waiting request");
    let failed_after = stopped.elapsed();
    eprintln!("the job failed {failed_after:?} after the cluster went; ls failed in {first:?}");
    assert_eq!(errno, Some(libc::ETIMEDOUT), "log:\n{}", d.log());
    assert!(
        failed_after < Duration::from_secs(4 * TIMEOUT),
        "the job failed {failed_after:?} after the cluster went, timeout = {TIMEOUT} s"
    );
    cluster.start_mon();
    cluster.start_osd();
    wait_for(
        || {
            sh(&format!("ls '{}'", d.mnt.join("volumes/ceph").display()))
                .status
                .success()
        },
        "the backend to answer again",
    );
    d.stop_clean();
}

/// Deterministic bytes, different for each seed.
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

fn read_all(target: &RbdTarget, id: &BackupId) -> Vec<u8> {
    let data = target.open_data(id).expect("open_data");
    let size = data.device.size().unwrap() as usize;
    let mut buf = vec![0u8; size];
    assert_eq!(data.device.read_at(&mut buf, 0).unwrap(), size);
    buf
}

#[test]
fn an_rbd_target_shares_a_series_between_backups_and_deletes_any_of_them_in_any_order() {
    let cluster = ceph::cluster();
    let spec_text = namespace(&cluster, "series");
    let client = cluster.client("cinder");
    let timeouts = Timeouts {
        connect: Duration::from_secs(30),
        mon_op: Duration::from_secs(30),
        osd_op: Duration::from_secs(30),
    };
    let connection = connection::connect(&client.conf, &client.name, timeouts).unwrap();
    let spec = PoolSpec::parse(&spec_text).unwrap();
    let lease = Duration::from_secs(30);
    let target = RbdTarget::open("series", connection.clone(), &spec, "n1", lease).unwrap();
    // Another node serves it alongside; a daemon of an earlier version (which held the
    // lock `backupfs` on `backupfs.lock` exclusively, to serve it alone) is refused.
    let second = RbdTarget::open("series", connection.clone(), &spec, "n2", lease).unwrap();
    let io = spec.open(&connection).unwrap();
    let old = io.lock_exclusive("backupfs.lock", "backupfs", "earlier", lease);
    assert!(old.unwrap_err().is_busy());
    drop(second);

    let size = 24 * MIB as usize;
    let mut volume = vec![0u8; size];
    volume[..3 * MIB as usize].copy_from_slice(&pattern(1, 3 * MIB as usize));
    let mut expected: Vec<(BackupId, Vec<u8>)> = Vec::new();
    // A full backup, then incrementals that write only what changed.
    let write =
        |id: &BackupId, base: Option<&BackupId>, volume: &[u8], changed: &[(usize, usize)]| {
            let new = target.create_data(id, volume.len() as u64, base).unwrap();
            assert_eq!(new.shared, base.is_some(), "shared with its base");
            for (at, len) in changed {
                new.attachment
                    .device
                    .write_at(&volume[*at..at + len], *at as u64)
                    .unwrap();
            }
            new.attachment.device.flush().unwrap();
            drop(new);
            target.finish_data(id).unwrap();
        };
    let first = BackupId::new();
    write(&first, None, &volume, &[(0, size)]);
    // Sealed, not snapshotted yet (the engine settles it after answering): the head holds
    // it, and the first reader takes the snapshot, so that it never reads a head that a
    // later backup writes.
    let series = format!("backupfs-series-{first}");
    assert_eq!(cluster.snapshots(&spec_text, &series), Vec::<String>::new());
    assert!(read_all(&target, &first) == volume, "read from the head");
    assert_eq!(
        cluster.snapshots(&spec_text, &series),
        [format!("backup-{first}")],
        "the reader took the snapshot"
    );
    target.settle_data(&first).unwrap();
    expected.push((first.clone(), volume.clone()));
    let mut base = first.clone();
    for round in 0..3u64 {
        let at = (round as usize * 5 + 4) * MIB as usize + 4096 * round as usize;
        let len = 64 << 10;
        volume[at..at + len].copy_from_slice(&pattern(10 + round, len));
        let id = BackupId::new();
        write(&id, Some(&base), &volume, &[(at, len)]);
        expected.push((id.clone(), volume.clone()));
        base = id;
    }
    // An incremental from an older backup: the head is rolled back to it first.
    let mut branch = expected[1].1.clone();
    branch[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(99, 4096));
    let from_old = BackupId::new();
    let new = target
        .create_data(&from_old, size as u64, Some(&expected[1].0))
        .unwrap();
    assert!(new.shared);
    let mut head = vec![0u8; size];
    new.attachment.device.read_at(&mut head, 0).unwrap();
    assert!(head == expected[1].1, "the head reads as the base");
    new.attachment
        .device
        .write_at(&branch[MIB as usize..MIB as usize + 4096], MIB)
        .unwrap();
    drop(new);
    target.finish_data(&from_old).unwrap();
    expected.push((from_old.clone(), branch));
    // An incremental cut short (never sealed) is removed, and its base is untouched.
    let cut = BackupId::new();
    let new = target
        .create_data(&cut, size as u64, Some(&from_old))
        .unwrap();
    new.attachment.device.write_at(&[0xee; 8192], 0).unwrap();
    drop(new);
    target.remove_data(&cut).unwrap();

    assert_eq!(
        cluster.images(&spec_text),
        std::slice::from_ref(&series),
        "one image"
    );
    assert_eq!(cluster.snapshots(&spec_text, &series).len(), expected.len());
    for (id, data) in &expected {
        assert!(
            read_all(&target, id) == *data,
            "backup {id} reads as its volume"
        );
    }
    // Any order: a middle one, the newest (the head's), the first, then the rest. Every
    // survivor must still open and read exactly as its volume did; a removed one is gone.
    let mut removed: Vec<&BackupId> = Vec::new();
    for index in [2, 4, 0, 1, 3] {
        let (id, _) = &expected[index];
        target.remove_data(id).unwrap();
        removed.push(id);
        for (other, data) in &expected {
            if removed.contains(&other) {
                assert!(
                    target.open_data(other).is_err(),
                    "backup {other} opens after its removal"
                );
                continue;
            }
            assert!(
                read_all(&target, other) == *data,
                "backup {other} reads as its volume after removing {id}"
            );
        }
        let mut ids = target.data_ids().unwrap();
        ids.sort();
        let mut left: Vec<String> = expected
            .iter()
            .filter(|(other, _)| !removed.contains(&other))
            .map(|(other, _)| other.to_string())
            .collect();
        left.sort();
        assert_eq!(ids, left, "the target lists exactly the survivors");
    }
    assert_eq!(
        cluster.images(&spec_text),
        Vec::<String>::new(),
        "the last one takes the image"
    );
    assert_eq!(target.data_ids().unwrap(), Vec::<String>::new());
    drop(target);
    // The lock went with it; a daemon of an earlier version that holds it now keeps
    // this one out, with a message that says so.
    let old = io
        .lock_exclusive("backupfs.lock", "backupfs", "earlier", lease)
        .unwrap();
    let refused = RbdTarget::open("series", connection.clone(), &spec, "n1", lease)
        .err()
        .unwrap();
    assert!(
        matches!(refused, backupfs::targets::TargetError::ServedAlone { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("earlier version"), "{refused}");
    drop(old);
    let again = RbdTarget::open("series", connection.clone(), &spec, "n1", lease).unwrap();
    drop(again);
    drop(io);
    drop(connection);
    // librados must not outlive the cluster the harness stops at exit.
    connection::disconnect_all();
}

/// Writes `data` at `offset` of image `spec/image` in place, as a VM would (no new
/// image, no snapshot): `rbd import-diff` of a diff in format v1 (doc/dev/rbd-diff.rst)
/// holding one write record.
fn rbd_write(
    sb: &Sandbox,
    cluster: &CephCluster,
    spec: &str,
    image: &str,
    offset: u64,
    data: &[u8],
) {
    let size = cluster.rbd(&["info", "--format", "json", &format!("{spec}/{image}")]);
    let size: serde_json::Value = serde_json::from_str(&size).expect("rbd info is JSON");
    let size = size["size"].as_u64().expect("rbd info names the size");
    let mut diff = b"rbd diff v1\n".to_vec();
    diff.push(b's');
    diff.extend_from_slice(&size.to_le_bytes());
    diff.push(b'w');
    diff.extend_from_slice(&offset.to_le_bytes());
    diff.extend_from_slice(&(data.len() as u64).to_le_bytes());
    diff.extend_from_slice(data);
    diff.push(b'e');
    let file = sb.path(&format!("{image}.diff"));
    std::fs::write(&file, diff).unwrap();
    cluster.rbd(&[
        "import-diff",
        "--no-progress",
        &file.to_string_lossy(),
        &format!("{spec}/{image}"),
    ]);
}

#[test]
fn deleting_the_oldest_middle_or_newest_of_an_rbd_series_keeps_every_other_backup_exact() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-delete-position");
    let s = setup(&mut sb, &cluster, "delpos", "");
    let d = sb.start_daemon(&s.config);
    // One volume per position: three incremental backups of it share one series image,
    // with the volume written between them; then the one in that position is deleted.
    for (position, doomed) in [("oldest", 0), ("middle", 1), ("newest", 2)] {
        let volume_id = format!("vol-{position}");
        let image = format!("volume-{volume_id}");
        let raw = sb.path(&format!("{volume_id}.raw"));
        sparse_file(&raw, 16, &[(1, 2)]);
        import(&cluster, &s.volumes, &image, &raw);
        let series_before = cluster.images(&s.backups).len();
        let mut made: Vec<(String, String)> = Vec::new();
        for round in 0..3u64 {
            if round > 0 {
                let data = pattern(100 * doomed + round, 64 << 10);
                rbd_write(
                    &sb,
                    &cluster,
                    &s.volumes,
                    &image,
                    round * 5 * MIB + 4096,
                    &data,
                );
            }
            let sum = cluster.export_sha256(&s.volumes, &image);
            let id = d.backup("rbd", &format!("{volume_id} incremental wait"));
            let record = d.record("rbd", &id);
            assert_eq!(record["status"], "available", "{record}");
            if let Some((parent, _)) = made.last() {
                assert_eq!(record["parent_id"], parent.as_str(), "{record}");
            }
            assert_eq!(
                sha256(&d.image("rbd", &id)),
                sum,
                "{position}: round {round}"
            );
            made.push((id, sum));
        }
        assert_eq!(
            cluster.images(&s.backups).len(),
            series_before + 1,
            "{position}: the three backups share one series image"
        );
        let (gone, _) = &made[doomed as usize];
        std::fs::remove_file(d.image("rbd", gone)).unwrap();
        assert!(!d.image("rbd", gone).exists(), "{position}: deleted");
        for (id, sum) in made.iter().filter(|(id, _)| id != gone) {
            assert_eq!(d.record("rbd", id)["status"], "available");
            let opened = std::fs::File::open(d.image("rbd", id));
            assert!(opened.is_ok(), "{position} deleted: open {id}: {opened:?}");
            evict(&d.image("rbd", id));
            assert_eq!(
                sha256(&d.image("rbd", id)),
                *sum,
                "{position} deleted: backup {id} reads as its volume did"
            );
        }
    }
    assert!(!d.log().contains("ERROR"), "{}", d.log());
    d.stop_clean();
}

#[test]
fn an_rbd_volumes_snapshots_go_with_the_backup_holding_the_base_and_with_a_failed_backup() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-snap-leaks");
    let s = setup(&mut sb, &cluster, "snapleak", "");
    let raw = sb.path("v.raw");
    sparse_file(&raw, 16, &[(1, 2)]);
    import(&cluster, &s.volumes, "volume-v", &raw);

    // The base snapshot goes with the backup that holds it.
    let d = sb.start_daemon(&s.config);
    let first = d.backup("rbd", "v incremental wait");
    rbd_write(
        &sb,
        &cluster,
        &s.volumes,
        "volume-v",
        6 * MIB,
        &pattern(7, 64 << 10),
    );
    let second = d.backup("rbd", "v incremental wait");
    let record = d.record("rbd", &second);
    assert_eq!(record["parent_id"], first.as_str(), "{record}");
    let base = record["base_snapshot"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        cluster.snapshots(&s.volumes, "volume-v"),
        std::slice::from_ref(&base),
        "{record}"
    );
    std::fs::remove_file(d.image("rbd", &second)).unwrap();
    assert_eq!(
        cluster.snapshots(&s.volumes, "volume-v"),
        Vec::<String>::new(),
        "the base went with its backup: {}",
        d.log()
    );
    d.stop_clean();

    // An in-use backup cut off while it holds its temporary snapshot: gone with it.
    let watch = cluster.hold_watch(&s.volumes, "volume-v");
    let d = sb.start_daemon_env(&s.config, &hold_env("snapshotting"));
    let failed = d.backup("files", "v");
    wait_for(
        || d.log().contains("holding at snapshotting"),
        "the snapshot to be taken",
    );
    assert_eq!(cluster.snapshots(&s.volumes, "volume-v").len(), 1);
    assert!(d.stop().success());
    assert_eq!(
        cluster.snapshots(&s.volumes, "volume-v"),
        Vec::<String>::new(),
        "the temporary snapshot went with the failure"
    );
    drop(watch);
    let d = sb.start_daemon(&s.config);
    let record = d.record("files", &failed);
    assert_eq!(record["status"], "error", "{record}");
    assert!(record["temporary_snapshot"].is_null(), "{record}");
    d.stop_clean();
}

/// Cinder's own RBD volume driver (cinder==29.0.0, in the virtualenv contrib/test.sh
/// makes) deletes `volume-<volume_id>` of `pool` as `cinder-volume` would, as
/// client.cinder. The venv sees Debian's rados and rbd bindings and nothing else of the
/// system's Python. Fails, never skips, without the virtualenv.
fn cinder_delete_volume(sb: &Sandbox, cluster: &CephCluster, pool: &str, volume_id: &str) {
    const SCRIPT: &str = r#"
import sys, types
from oslo_config import cfg
from cinder.volume import configuration
from cinder.volume.drivers import rbd
pool, conf, user, name = sys.argv[1:5]
cfg.CONF([], project='cinder', default_config_files=[])
config = configuration.Configuration(rbd.RBD_OPTS, config_group='ceph')
for key, value in (('rbd_pool', pool), ('rbd_ceph_conf', conf), ('rbd_user', user),
                   ('rados_connect_timeout', 30)):
    cfg.CONF.set_override(key, value, group='ceph')
driver = rbd.RBDDriver(configuration=config)
assert driver.rbd is not None, 'the rbd bindings are not importable'
driver.do_setup(None)
driver.delete_volume(types.SimpleNamespace(name=name))
print('deleted', name)
"#;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cinder-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./contrib/test.sh, which makes the virtualenv with \
         cinder==29.0.0 for this test",
        python.display()
    );
    let bindings = sb.mkdir("python-ceph");
    for entry in std::fs::read_dir("/usr/lib/python3/dist-packages").expect("dist-packages") {
        let entry = entry.expect("dist-packages entry");
        let file = entry.file_name().to_string_lossy().into_owned();
        if (file.starts_with("rados.") || file.starts_with("rbd.")) && file.ends_with(".so") {
            let link = bindings.join(&file);
            if !link.exists() {
                std::os::unix::fs::symlink(entry.path(), link).expect("link a binding");
            }
        }
    }
    let client = cluster.client("cinder");
    let out = run_timeout(
        std::process::Command::new(&python)
            .arg("-c")
            .arg(SCRIPT)
            .args([pool, &client.conf.to_string_lossy(), &client.name])
            .arg(format!("volume-{volume_id}"))
            .env("PYTHONPATH", &bindings),
        Duration::from_secs(180),
    );
    assert!(
        out.status.success(),
        "Cinder's RBDDriver.delete_volume failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The names in `rbd trash ls` of a pool.
fn trash(cluster: &CephCluster, pool: &str) -> Vec<String> {
    common::ceph::json_names(&cluster.rbd(&["trash", "ls", "--format", "json", "--pool", pool]))
}

/// Whether `name` is `backup.<backup_id>.snap.<unix seconds>`.
fn is_cinder_style(name: &str, backup_id: &str) -> bool {
    name.strip_prefix(&format!("backup.{backup_id}.snap."))
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn cinders_rbd_driver_deletes_an_incrementally_backed_up_volume_whole_and_one_made_again_backs_up_full()
 {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-cinder-delete");
    // Cinder's RBD driver knows pools, not namespaces: a pool of its own.
    let pool = cluster.pool("backupfs-cinder");
    let backups = namespace(&cluster, "cinderdel-backups");
    let s = setup_with(&mut sb, &cluster, &pool, &backups, "");
    let volume_id = uuid::Uuid::new_v4().to_string();
    let image = format!("volume-{volume_id}");
    let raw = sb.path("v.raw");
    sparse_file(&raw, 16, &[(1, 3)]);
    import(&cluster, &pool, &image, &raw);
    let d = sb.start_daemon(&s.config);

    let first = d.backup("rbd", &format!("{volume_id} incremental wait"));
    let second = d.backup("rbd", &format!("{volume_id} incremental wait"));
    let record = d.record("rbd", &second);
    assert_eq!(record["status"], "available", "{record}");
    assert_eq!(record["parent_id"], first.as_str(), "{record}");
    let base = record["base_snapshot"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(is_cinder_style(&base, &second), "{record}");
    assert_eq!(
        cluster.snapshots(&pool, &image),
        std::slice::from_ref(&base),
        "one base per volume, named as Cinder's backup snapshots are"
    );

    cinder_delete_volume(&sb, &cluster, &pool, &volume_id);
    assert!(!cluster.images(&pool).contains(&image), "the image is gone");
    assert!(
        !trash(&cluster, &pool).contains(&image),
        "nothing of the volume is left in the RBD trash"
    );

    // A volume made again with that ID is another volume: a full backup.
    let raw = sb.path("v2.raw");
    let sum = sparse_file(&raw, 16, &[(5, 2)]);
    import(&cluster, &pool, &image, &raw);
    let third = d.backup("rbd", &format!("{volume_id} incremental wait"));
    let record = d.record("rbd", &third);
    assert_eq!(record["status"], "available", "{record}");
    assert!(record["parent_id"].is_null(), "a full backup: {record}");
    assert_eq!(sha256(&d.image("rbd", &third)), sum);
    assert!(
        d.log()
            .contains("the volume was made after its newest backup began"),
        "the log says why: {}",
        d.log()
    );
    // The old base is no longer named by any record: records stay true.
    for id in [&first, &second] {
        let record = d.record("rbd", id);
        assert!(record["base_snapshot"].is_null(), "{record}");
        assert!(record["temporary_snapshot"].is_null(), "{record}");
    }
    let base = d.record("rbd", &third)["base_snapshot"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(cluster.snapshots(&pool, &image), [base]);
    d.stop_clean();
    cinder_delete_volume(&sb, &cluster, &pool, &volume_id);
    assert!(!cluster.images(&pool).contains(&image));
    assert!(!trash(&cluster, &pool).contains(&image));
    // With the volume gone for good, the record forgets its base at the next start, once.
    let d = sb.start_daemon(&s.config);
    let record = d.record("rbd", &third);
    assert!(record["base_snapshot"].is_null(), "{record}");
    assert!(record["temporary_snapshot"].is_null(), "{record}");
    assert!(d.log().contains("the volume is gone"), "{}", d.log());
    assert!(!d.log().contains("ERROR"), "{}", d.log());
    d.stop_clean();
}

#[test]
fn a_planted_record_never_makes_backupfs_delete_another_images_or_a_foreign_snapshot() {
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("rbd-planted");
    let s = setup(&mut sb, &cluster, "planted", "");
    let raw = sb.path("v.raw");
    sparse_file(&raw, 8, &[(1, 1)]);
    import(&cluster, &s.volumes, "volume-victim", &raw);
    import(&cluster, &s.volumes, "volume-other", &raw);
    let (ours, cinders) = (BackupId::new().to_string(), BackupId::new().to_string());
    let planted_snapshots = [
        // Of our own form, but on another image than the record names.
        format!("snapshot-backupfs-{ours}"),
        // A Cinder snapshot of the volume the record names.
        format!("snapshot-{}", BackupId::new()),
        // Cinder's Ceph backup driver's (time.time(), a float).
        format!("backup.{cinders}.snap.1733550000.25"),
    ];
    for name in &planted_snapshots {
        cluster.rbd(&[
            "snap",
            "create",
            &format!("{}/volume-victim@{name}", s.volumes),
        ]);
    }
    let d = sb.start_daemon(&s.config);
    let template = d.backup("files", "other wait");
    d.stop_clean();
    let template_file = record_file(&sb.path("files/backups"), &template);
    let mut template: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&template_file).unwrap()).unwrap();
    template["status"] = "error".into();
    template["checksums"] = serde_json::Value::Null;
    template["error"] = "planted".into();
    let plant = |id: &str, volume: &str, snapshot: &str| {
        let mut record = template.clone();
        record["id"] = id.into();
        record["volume_id"] = volume.into();
        record["temporary_snapshot"] = snapshot.into();
        std::fs::write(
            template_file.with_file_name(format!("backup-{id}.json")),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
    };
    plant(&ours, "other", &planted_snapshots[0]);
    let stranger = BackupId::new();
    plant(&stranger, "victim", &planted_snapshots[1]);
    plant(&cinders, "victim", &planted_snapshots[2]);
    // Of our form, on the volume it names, but another backup's.
    let thief = BackupId::new();
    plant(&thief, "victim", &planted_snapshots[0]);

    // Start-up removes the temporary snapshots records name.
    let d = sb.start_daemon(&s.config);
    let mut left = cluster.snapshots(&s.volumes, "volume-victim");
    left.sort();
    let mut planted = planted_snapshots.to_vec();
    planted.sort();
    assert_eq!(left, planted, "{}", d.log());
    assert!(
        d.log().contains("not deleting snapshot"),
        "each refusal is logged: {}",
        d.log()
    );
    d.stop_clean();
}
