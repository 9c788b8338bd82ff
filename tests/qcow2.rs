//! The qcow2 driver through a real mount: qcow2 volumes backed up, restored and created
//! with real tools (qemu-img, qemu-io, qemu-storage-daemon, cp, cmp), and nothing left
//! behind: no qemu-storage-daemon of the daemon's, no export mount, no snapshot. Images
//! whose header names another file of the host (made by the tests, never a real one) are
//! refused, and that file is never read or written.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Backend `qc` (qcow2: volume pool `vols`, pool `qbackups` for target `q`) on one loop
/// filesystem, backend `raw` (file: volume pool `main`, pool `backups` for target `raw`)
/// on another.
struct QLayout {
    vols: PathBuf,
    qbackups: PathBuf,
    main: PathBuf,
    backups: PathBuf,
    config: PathBuf,
}

fn qlayout(sb: &mut Sandbox, qcow2_fs: Option<Fs>) -> QLayout {
    qlayout_with(sb, qcow2_fs, "")
}

/// [`qlayout`], with `settings` (top-level keys) in the configuration.
fn qlayout_with(sb: &mut Sandbox, qcow2_fs: Option<Fs>, settings: &str) -> QLayout {
    let q = match qcow2_fs {
        Some(fs) => sb.loop_fs("q", fs, 512),
        None => sb.mkdir("q"),
    };
    let r = sb.loop_fs("r", Fs::Xfs, 1024);
    let (vols, qbackups) = (q.join("vols"), q.join("qbackups"));
    let (main, backups) = (r.join("main"), r.join("backups"));
    for d in [&vols, &qbackups, &main, &backups] {
        std::fs::create_dir_all(d).expect("pool dir");
    }
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n{settings}\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\", qbackups = \"{}\" }}\n\
         [backends.raw]\ndriver = \"file\"\npools = {{ main = \"{}\", backups = \"{}\" }}\n\
         [targets.raw]\nbackend = \"raw\"\npool = \"backups\"\n\
         [targets.q]\nbackend = \"qc\"\npool = \"qbackups\"\n",
        state.display(),
        vols.display(),
        qbackups.display(),
        main.display(),
        backups.display()
    ));
    QLayout {
        vols,
        qbackups,
        main,
        backups,
        config,
    }
}

/// A thin qcow2 volume of `size` with 3 MiB of 0xab at 100 MiB (when it is big enough).
fn qcow2_volume(pool: &Path, volume_id: &str, size: &str) -> PathBuf {
    let path = pool.join(format!("volume-{volume_id}"));
    ok(&format!(
        "qemu-img create -q -f qcow2 '{p}' {size} && qemu-io -f qcow2 -c 'write -P 0xab 100M 3M' '{p}' >/dev/null",
        p = path.display()
    ));
    path
}

fn qcow2_compare(qcow2: &Path, raw: &Path) {
    ok(&format!(
        "qemu-img compare -U -f qcow2 -F raw '{}' '{}'",
        qcow2.display(),
        raw.display()
    ));
}

/// Where a daemon mounts its exports: `qcow2-exports/<pid>` in its RUNTIME_DIRECTORY
/// (each test's daemons have their own, so no other test's daemon cleans it up).
#[derive(Clone)]
struct ExportDir(PathBuf);

impl ExportDir {
    fn of(d: &Daemon) -> ExportDir {
        ExportDir(
            d.runtime_dir
                .join("qcow2-exports")
                .join(d.pid().to_string()),
        )
    }

    fn exists(&self) -> bool {
        self.0.exists()
    }
}

/// The export mounts and the qemu-storage-daemon processes of a daemon.
/// (A qsd that has exited but is not yet reaped has no command line: it is not counted,
/// which is why `assert_no_exports` also waits for the export files to go.)
fn exports_of(export_dir: &ExportDir) -> (Vec<String>, Vec<u32>) {
    let dir = format!("{}/", export_dir.0.display());
    let mounts = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&dir)))
        .map(str::to_string)
        .collect();
    let mut processes = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(process) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-storage-daemon") && cmdline.contains(&dir) {
            processes.push(process);
        }
    }
    (mounts, processes)
}

/// The export files (mountpoints, logs, pidfiles) in the daemon's export directory.
fn export_files(export_dir: &ExportDir) -> Vec<String> {
    std::fs::read_dir(&export_dir.0)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("export-"))
                .collect()
        })
        .unwrap_or_default()
}

/// No export mount, no qemu-storage-daemon and no export file of the daemon remain (a
/// closed handle is released a moment after close returns: that moment is waited for).
#[track_caller]
fn assert_no_exports(export_dir: &ExportDir) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (mounts, processes) = exports_of(export_dir);
        let files = export_files(export_dir);
        if mounts.is_empty() && processes.is_empty() && files.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exports left behind: {:?}",
            (mounts, processes, files)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ends the daemon with SIGTERM and checks it left nothing: no exports, no directory.
#[track_caller]
fn stop_clean(d: Daemon) {
    let export_dir = ExportDir::of(&d);
    assert_no_exports(&export_dir);
    d.stop_clean();
    assert_no_exports(&export_dir);
    assert!(!export_dir.exists(), "the export directory is removed");
}

/// A qemu-storage-daemon of the test's own holding `image` writable (as a hypervisor
/// would) and serving it over NBD at `socket`; owned by the sandbox.
struct Holder {
    child: usize,
    socket: PathBuf,
}

impl Holder {
    fn start(sb: &mut Sandbox, image: &Path, socket: &Path) -> Holder {
        let child = sb.spawn(
            Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=f",
                    image.display()
                ))
                .arg("--blockdev")
                .arg("driver=qcow2,file=f,node-name=q")
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", socket.display()))
                .arg("--export")
                .arg("type=nbd,id=e,node-name=q,name=q,writable=on")
                .stdin(Stdio::null()),
        );
        wait_for(|| socket.exists(), "the holder's NBD socket");
        Holder {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// Writes through the holder, as the guest would (qemu-io flushes before it exits).
    fn write(&self, command: &str) {
        ok(&format!(
            "qemu-io -f raw -c '{command}' 'nbd+unix:///q?socket={}' >/dev/null",
            self.socket.display()
        ));
    }
}

#[test]
fn backup_of_a_qcow2_volume_is_its_raw_contents_with_holes_kept() {
    let mut sb = Sandbox::new("q-backup");
    let l = qlayout(&mut sb, Some(Fs::Btrfs));
    let volume = qcow2_volume(&l.vols, "qv", "1G");
    let d = sb.start_daemon(&l.config);

    // The mount shows the guest-visible size, not the image file's.
    let node = d.volume("qc", "qv");
    assert_eq!(std::fs::metadata(&node).unwrap().len(), 1 << 30);
    assert!(allocated(&node) < 8 << 20, "allocated is the image file's");
    qcow2_compare(&volume, &node);

    let id = d.backup("raw", "qv wait");
    let image = d.image("raw", &id);
    let record = d.record("raw", &id);
    assert_eq!(record["status"], "available");
    assert_eq!(record["size"], 1u64 << 30);
    assert_eq!(record["backend"], "qc");
    assert_eq!(record["snapshot_used"], false);
    qcow2_compare(&volume, &image);
    let stored = stored_data(&l.backups, &image);
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), 1 << 30);
    assert!(
        allocated(&stored) < 8 << 20,
        "holes are kept: {} bytes allocated",
        allocated(&stored)
    );

    // That backup restores onto a raw volume of the file driver.
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        image.display(),
        d.volume("raw", "restored").display()
    ));
    let restored = l.main.join("volume-restored");
    qcow2_compare(&volume, &restored);
    assert!(allocated(&restored) < 8 << 20);
    stop_clean(d);
}

#[test]
fn cp_of_a_raw_backup_into_a_new_qcow2_volume_makes_a_thin_qcow2_image() {
    let mut sb = Sandbox::new("q-new");
    let l = qlayout(&mut sb, Some(Fs::Xfs));
    let source = sparse_volume(&l.main, "src", 256, 10, 3);
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=1M seek=255 count=1 conv=notrunc status=none",
        source.display()
    ));
    let d = sb.start_daemon(&l.config);
    let id = d.backup("raw", "src wait");
    let image = d.image("raw", &id);

    for (volume_id, cp) in [("plain", "cp"), ("sparse", "cp --sparse=always")] {
        ok(&format!(
            "{cp} '{}' '{}'",
            image.display(),
            d.volume("qc", volume_id).display()
        ));
        let made = l.vols.join(format!("volume-{volume_id}"));
        qcow2_compare(&made, &image);
        let info: serde_json::Value = serde_json::from_str(&ok(&format!(
            "qemu-img info --output=json '{}'",
            made.display()
        )))
        .unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 256u64 << 20);
        assert!(
            allocated(&made) < 16 << 20,
            "{cp}: holes stay holes: {} bytes",
            allocated(&made)
        );
        ok(&format!("qemu-img check -q '{}'", made.display()));
        assert_eq!(
            std::fs::metadata(d.volume("qc", volume_id)).unwrap().len(),
            256 << 20
        );
    }
    assert_eq!(names_in(&d.mnt.join("volumes/qc")), ["plain", "sparse"]);
    assert_eq!(
        names_in(&l.vols),
        ["volume-plain", "volume-sparse"],
        "no temporary file is left in the pool"
    );
    stop_clean(d);
}

#[test]
fn writes_past_the_end_extend_an_attached_qcow2_volume_and_truncate_zeroes_the_tail() {
    let mut sb = Sandbox::new("q-extend");
    let l = qlayout(&mut sb, None);
    let volume = l.vols.join("volume-grow");
    ok(&format!(
        "qemu-img create -q -f qcow2 '{}' 64M",
        volume.display()
    ));
    ok(&format!(
        "qemu-io -f qcow2 -c 'write -P 0x11 0 8M' -c 'write -P 0x22 60M 4M' '{}' >/dev/null",
        volume.display()
    ));
    let d = sb.start_daemon(&l.config);
    let node = d.volume("qc", "grow");

    // dd writes at 100 MiB of a 64 MiB volume: the restore grows it through its export.
    ok(&format!(
        "head -c 1M /dev/zero | tr '\\0' '\\063' | dd of='{}' bs=1M seek=100 conv=notrunc status=none",
        node.display()
    ));
    assert_eq!(std::fs::metadata(&node).unwrap().len(), 101 << 20);
    // The restore has ended once its export is gone (the kernel releases the handle a
    // moment after close); until then our qsd holds the image.
    assert_no_exports(&ExportDir::of(&d));
    ok(&format!(
        "qemu-io -f qcow2 -c 'read -P 0x33 100M 1M' -c 'read -P 0x22 60M 4M' -c 'read -P 0 64M 36M' '{}' | grep -v -q Pattern",
        volume.display()
    ));

    // Truncating keeps the size and zeroes the tail, also from an unaligned offset.
    ok(&format!("truncate -s 5000000 '{}'", node.display()));
    assert_eq!(std::fs::metadata(&node).unwrap().len(), 101 << 20);
    assert_no_exports(&ExportDir::of(&d));
    let expected = sb.path("expected");
    ok(&format!(
        "head -c 5000000 /dev/zero | tr '\\0' '\\021' > '{e}' && truncate -s 101M '{e}'",
        e = expected.display()
    ));
    qcow2_compare(&volume, &expected);
    ok(&format!("qemu-img check -q '{}'", volume.display()));
    assert!(
        allocated(&volume) < 12 << 20,
        "the discarded tail is freed: {} bytes",
        allocated(&volume)
    );

    // An unaligned size grows to whole sectors.
    ok(&format!("truncate -s 110000001 '{}'", node.display()));
    let size = std::fs::metadata(&node).unwrap().len();
    assert!((110000001..110000001 + 512).contains(&size), "{size}");
    stop_clean(d);
}

#[test]
fn in_use_qcow2_volume_is_backed_up_from_a_reflink_snapshot_that_is_then_gone() {
    let mut sb = Sandbox::new("q-inuse");
    let l = qlayout(&mut sb, Some(Fs::Btrfs));
    let volume = qcow2_volume(&l.vols, "busy", "512M");
    let socket = sb.path("nbd.sock");
    let holder = Holder::start(&mut sb, &volume, &socket);
    // The guest writes while it runs: what it flushed must be in the backup.
    holder.write("write -P 0xcd 200M 1M");
    let before = sb.path("before.raw");
    ok(&format!(
        "qemu-img convert -U -f qcow2 -O raw '{}' '{}'",
        volume.display(),
        before.display()
    ));
    let d = sb.start_daemon(&l.config);

    let id = d.backup("raw", "busy wait");
    let record = d.record("raw", &id);
    assert_eq!(record["status"], "available", "{record}");
    assert_eq!(record["snapshot_used"], true);
    let image = d.image("raw", &id);
    qcow2_compare(&volume, &image);
    ok(&format!("cmp '{}' '{}'", image.display(), before.display()));
    assert!(
        d.log().contains("backing up from a temporary snapshot"),
        "{}",
        d.log()
    );

    assert_eq!(
        names_in(&l.vols),
        ["volume-busy"],
        "no snapshot lingers beside the image"
    );
    let snapshots = ok(&format!("qemu-img snapshot -U -l '{}'", volume.display()));
    assert!(snapshots.trim().is_empty(), "none inside it: {snapshots}");
    // The hypervisor was not disturbed: it still has the image and goes on writing.
    holder.write("write -P 0xef 300M 1M");
    ok(&format!("qemu-img check -U -q '{}'", volume.display()));

    // Restoring into it stays refused while it is held.
    assert_eq!(
        write_errno(&d.volume("qc", "busy"), b"x"),
        Some(libc::EBUSY)
    );
    stop_clean(d);
    sb.release(holder.child);
}

#[test]
fn in_use_qcow2_volume_without_reflinks_is_refused() {
    let mut sb = Sandbox::new("q-inuse-ext4");
    let l = qlayout(&mut sb, Some(Fs::Ext4));
    let volume = qcow2_volume(&l.vols, "busy", "256M");
    let socket = sb.path("nbd.sock");
    let holder = Holder::start(&mut sb, &volume, &socket);
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.request("raw", "busy"), Some(libc::EBUSY));
    assert!(d.log().contains("cannot be snapshotted"), "{}", d.log());
    sb.release(holder.child);
    // Once the hypervisor let go, the volume is backed up directly.
    let id = d.backup("raw", "busy wait");
    assert_eq!(d.record("raw", &id)["snapshot_used"], false);
    qcow2_compare(&volume, &d.image("raw", &id));
    stop_clean(d);
}

#[test]
fn backups_can_be_stored_as_qcow2_images() {
    let mut sb = Sandbox::new("q-target");
    let l = qlayout(&mut sb, Some(Fs::Xfs));
    let source = sparse_volume(&l.main, "src", 200, 50, 4);
    let d = sb.start_daemon(&l.config);

    let id = d.backup("q", "src wait");
    let image = d.image("q", &id);
    let stored = stored_data(&l.qbackups, &image);
    let info: serde_json::Value = serde_json::from_str(&ok(&format!(
        "qemu-img info --output=json '{}'",
        stored.display()
    )))
    .unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 200u64 << 20);
    assert!(allocated(&stored) < 8 << 20, "the qcow2 backup is thin");
    ok(&format!("qemu-img check -q '{}'", stored.display()));
    qcow2_compare(&stored, &source);

    // Its image reads back as raw, and restores onto a raw volume.
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 200 << 20);
    ok(&format!("cmp '{}' '{}'", image.display(), source.display()));
    ok(&format!(
        "cp '{}' '{}'",
        image.display(),
        d.volume("raw", "back").display()
    ));
    ok(&format!(
        "cmp '{}' '{}'",
        source.display(),
        l.main.join("volume-back").display()
    ));
    // A qcow2 volume backed up to the qcow2 target.
    let qvolume = qcow2_volume(&l.vols, "qv", "300M");
    let qid = d.backup("q", "qv wait");
    let qstored = stored_data(&l.qbackups, &d.image("q", &qid));
    ok(&format!(
        "qemu-img compare -f qcow2 -F qcow2 '{}' '{}'",
        qvolume.display(),
        qstored.display()
    ));

    // With backups stored in it, the target's pool is still no volume pool of backend qc.
    assert_eq!(names_in(&d.mnt.join("volumes/qc")), ["qv"]);
    for backup_id in [&id, &qid] {
        assert_errno(
            std::fs::metadata(d.volume("qc", backup_id)),
            libc::ENOENT,
            "a backup looked up as a volume",
        );
        assert_eq!(d.request("q", backup_id), Some(libc::ENOENT));
    }
    let files_before = files_under(&l.qbackups);
    ok(&format!(
        "cp '{}' '{}'",
        image.display(),
        d.volume("qc", "fresh").display()
    ));
    assert_eq!(names_in(&l.vols), ["volume-fresh", "volume-qv"]);
    assert_eq!(files_under(&l.qbackups), files_before);
    assert_eq!(names_in(&d.mnt.join("volumes/qc")), ["fresh", "qv"]);

    std::fs::remove_file(&image).unwrap();
    assert!(!stored.exists(), "deleting the backup removes its image");
    assert_eq!(files_mentioning(&l.qbackups, &id), Vec::<PathBuf>::new());
    stop_clean(d);
}

#[test]
fn a_crashed_daemons_exports_are_stopped_and_removed() {
    let mut sb = Sandbox::new("q-crash");
    let l = qlayout(&mut sb, None);
    qcow2_volume(&l.vols, "a", "200M");
    qcow2_volume(&l.vols, "b", "200M");
    let d = sb.start_daemon(&l.config);
    let crashed = ExportDir::of(&d);
    // Two volumes open through the mount: two exports.
    let a = std::fs::File::open(d.volume("qc", "a")).unwrap();
    let b = std::fs::File::open(d.volume("qc", "b")).unwrap();
    let (mounts, processes) = exports_of(&crashed);
    assert_eq!((mounts.len(), processes.len()), (2, 2), "{mounts:?}");
    // One qsd is killed outright (its export mount stays, dead), then the daemon.
    ok(&format!("kill -9 {}", processes[0]));
    wait_for(
        || exports_of(&crashed).1.len() == 1,
        "the killed qemu-storage-daemon to go",
    );
    d.crash();
    // What the unit's ExecStopPost does; a quick restart could otherwise still see the
    // dead mount's cached attributes and not know it is dead.
    ok(&format!("umount -l '{}'", sb.path("mnt").display()));
    // The other one is told by the kernel that its daemon died, and stops.
    wait_for(
        || exports_of(&crashed).1.is_empty(),
        "the orphaned qsd to stop",
    );
    drop((a, b));
    assert!(crashed.exists(), "a crash leaves the directory");

    let d = sb.start_daemon(&l.config);
    wait_for(|| !crashed.exists(), "the stale exports to be removed");
    assert_no_exports(&crashed);
    // This daemon, and no other test's, cleaned the crashed daemon's directory.
    assert!(
        d.log().contains(&format!(
            "removed {} left by a backupfs that is gone",
            crashed.0.display()
        )),
        "{}",
        d.log()
    );
    stop_clean(d);
}

#[test]
fn kill9_mid_copy_of_a_qcow2_volume_to_a_qcow2_target_leaves_no_backup_and_no_export() {
    let mut sb = Sandbox::new("q-kill9");
    let l = qlayout_with(&mut sb, None, "copy_bps_limit = 2000000");
    let volume = qcow2_volume(&l.vols, "qv", "200M");
    ok(&format!(
        "qemu-io -f qcow2 -c 'write -P 0xcd 0 16M' '{}' >/dev/null",
        volume.display()
    ));
    let before = sha256(&volume);
    let d = sb.start_daemon(&l.config);
    let crashed = ExportDir::of(&d);
    // 19 MiB of data at 2 MB/s: about ten seconds, killed as soon as it has begun.
    let id = d.backup("q", "qv");
    wait_for(
        || {
            d.jobs("q").lines().any(|line| {
                line.starts_with(&id) && line.contains(" copying ") && !line.contains(" copying 0/")
            })
        },
        "the copy to start",
    );
    let (mounts, processes) = exports_of(&crashed);
    assert_eq!(
        (mounts.len(), processes.len()),
        (2, 2),
        "the source and the new backup are exported while copying: {mounts:?}"
    );
    d.kill9();
    // The kernel tells the exports their daemon died: they stop.
    wait_for(
        || exports_of(&crashed).1.is_empty(),
        "the orphaned exports to stop",
    );

    let d = sb.start_daemon(&l.config);
    wait_for(|| !crashed.exists(), "the stale exports to be removed");
    assert_no_exports(&crashed);
    let record = d.record("q", &id);
    assert_eq!(record["status"], "error", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap_or("")
            .contains("interrupted"),
        "{record}"
    );
    assert_errno(
        std::fs::metadata(d.image("q", &id)),
        libc::ENOENT,
        "the image of an interrupted backup",
    );
    assert_eq!(
        files_mentioning(&l.qbackups, &id),
        [record_file(&l.qbackups, &id)],
        "the partial qcow2 image is gone"
    );
    assert_eq!(sha256(&volume), before, "the source is untouched");
    // A new backup of the same volume is whole.
    let again = d.backup("q", "qv wait");
    ok(&format!(
        "qemu-img compare -U -f raw -F qcow2 '{}' '{}'",
        d.image("q", &again).display(),
        volume.display()
    ));
    stop_clean(d);
}

/// A file of the test's own that no volume may reach: `size` bytes of `byte`.
fn host_file(sb: &Sandbox, name: &str, byte: u8, size: usize) -> (PathBuf, String) {
    let path = sb.path(name);
    std::fs::write(&path, vec![byte; size]).unwrap();
    let sum = sha256(&path);
    (path, sum)
}

/// Every way of using a volume through the mount is refused with `errno`: its attributes,
/// a read, a backup request, a restore (an open for writing) and a grow (a truncate).
#[track_caller]
fn assert_every_use_refused(d: &Daemon, volume_id: &str, errno: i32) {
    let node = d.volume("qc", volume_id);
    assert_errno(std::fs::metadata(&node), errno, "stat");
    assert_errno(std::fs::read(&node), errno, "read");
    assert_eq!(d.request("raw", volume_id), Some(errno), "backup request");
    assert_eq!(d.request("q", volume_id), Some(errno), "backup request");
    assert_eq!(write_errno(&node, b"restored"), Some(errno), "restore");
    assert_errno(truncate(&node, 8 << 20), errno, "grow");
}

#[test]
fn qcow2_volume_with_a_backing_file_is_refused_and_never_read() {
    let mut sb = Sandbox::new("q-backing");
    let l = qlayout(&mut sb, None);
    let (secret, secret_sum) = host_file(&sb, "secret", b's', 1 << 20);
    let volume = l.vols.join("volume-leaky");
    ok(&format!(
        "qemu-img create -q -f qcow2 -b '{}' -F raw '{}' 1M",
        secret.display(),
        volume.display()
    ));
    let volume_sum = sha256(&volume);
    qcow2_volume(&l.vols, "fine", "200M");
    let d = sb.start_daemon(&l.config);

    // Listed, so the operator sees it is there; everything else says EPERM.
    assert_eq!(names_in(&d.mnt.join("volumes/qc")), ["fine", "leaky"]);
    assert_every_use_refused(&d, "leaky", libc::EPERM);
    assert!(
        d.log().contains("names a backing file"),
        "the log says why: {}",
        d.log()
    );
    assert_eq!(sha256(&volume), volume_sum, "the image is untouched");
    assert_eq!(sha256(&secret), secret_sum);
    assert!(
        files_mentioning(&l.backups, "leaky").is_empty()
            && files_mentioning(&l.qbackups, "leaky").is_empty(),
        "no backup of it was made"
    );
    // The other volume of the pool is served as before.
    let id = d.backup("raw", "fine wait");
    assert_eq!(d.record("raw", &id)["status"], "available");
    stop_clean(d);
}

#[test]
fn qcow2_volume_with_an_external_data_file_is_refused_and_the_file_untouched() {
    let mut sb = Sandbox::new("q-datafile");
    let l = qlayout(&mut sb, None);
    let victim = sb.path("victim");
    let volume = l.vols.join("volume-df");
    ok(&format!(
        "qemu-img create -q -f qcow2 -o data_file='{}',data_file_raw=on '{}' 1M",
        victim.display(),
        volume.display()
    ));
    // Written after qemu-img create, which empties the data file.
    let (victim, victim_sum) = host_file(&sb, "victim", b'v', 1 << 20);
    let d = sb.start_daemon(&l.config);

    assert_every_use_refused(&d, "df", libc::EPERM);
    let dd = sh(&format!(
        "head -c 1M /dev/zero | dd of='{}' bs=64k conv=notrunc status=none",
        d.volume("qc", "df").display()
    ));
    assert!(!dd.status.success(), "dd into it is refused");
    assert_eq!(sha256(&victim), victim_sum, "the data file is untouched");
    assert!(
        d.log().contains("names an external data file"),
        "{}",
        d.log()
    );
    stop_clean(d);
}

#[test]
fn qcow2_volume_with_unknown_incompatible_features_or_version_is_refused() {
    let mut sb = Sandbox::new("q-features");
    let l = qlayout(&mut sb, None);
    // Bit 5 of the incompatible features (big-endian at 72): no QEMU defines it yet.
    let future = qcow2_volume(&l.vols, "future", "200M");
    damage_bytes(&future, 79, &[0x20]);
    let v4 = qcow2_volume(&l.vols, "four", "200M");
    damage_bytes(&v4, 7, &[4]);
    let d = sb.start_daemon(&l.config);

    assert_eq!(names_in(&d.mnt.join("volumes/qc")), ["four", "future"]);
    assert_every_use_refused(&d, "future", libc::EPERM);
    assert_every_use_refused(&d, "four", libc::EPERM);
    let log = d.log();
    assert!(
        log.contains("features 0x20 that backupfs does not know"),
        "{log}"
    );
    assert!(log.contains("qcow2 version 4"), "{log}");
    stop_clean(d);
}

#[test]
fn qcow2_volume_marked_corrupt_is_backed_up_but_not_written() {
    let mut sb = Sandbox::new("q-corrupt");
    let l = qlayout(&mut sb, None);
    let volume = qcow2_volume(&l.vols, "bad", "200M");
    // Bit 1 of the incompatible features: QEMU found the metadata inconsistent.
    damage_bytes(&volume, 79, &[0x02]);
    let d = sb.start_daemon(&l.config);

    // A copy of what QEMU reads is the best an operator can have before repairing it.
    let id = d.backup("raw", "bad wait");
    assert_eq!(d.record("raw", &id)["status"], "available");
    qcow2_compare(&volume, &d.image("raw", &id));
    // Writing is what QEMU refuses for such an image: refused up front, with the repair.
    let node = d.volume("qc", "bad");
    assert_eq!(write_errno(&node, b"x"), Some(libc::EPERM));
    assert_errno(truncate(&node, 300 << 20), libc::EPERM, "grow");
    assert!(d.log().contains("qemu-img check -r all"), "{}", d.log());
    stop_clean(d);
}

#[test]
fn creating_a_qcow2_volume_follows_no_link_planted_at_a_temporary_name() {
    let mut sb = Sandbox::new("q-create-link");
    let l = qlayout(&mut sb, None);
    let (victim, victim_sum) = host_file(&sb, "victim", b'v', 1 << 20);
    let d = sb.start_daemon(&l.config);
    // The names an earlier backupfs made its temporary image under: pool writers could
    // plant links there to have qemu-img write a qcow2 header through them.
    let planted: Vec<PathBuf> = (0..8)
        .map(|n| l.vols.join(format!(".volume-new.creating-{}-{n}", d.pid())))
        .collect();
    for link in &planted {
        std::os::unix::fs::symlink(&victim, link).unwrap();
    }
    let raw = sb.path("raw");
    ok(&format!(
        "head -c 4M /dev/urandom > '{r}' && cp '{r}' '{}'",
        d.volume("qc", "new").display(),
        r = raw.display()
    ));
    assert_eq!(
        sha256(&victim),
        victim_sum,
        "the link's target is untouched"
    );
    let made = l.vols.join("volume-new");
    qcow2_compare(&made, &raw);
    let info: serde_json::Value = serde_json::from_str(&ok(&format!(
        "qemu-img info --output=json '{}'",
        made.display()
    )))
    .unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert!(
        info["format-specific"]["data"].get("data-file").is_none(),
        "{info}"
    );
    assert_eq!(
        std::fs::symlink_metadata(&made)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    for link in &planted {
        std::fs::remove_file(link).unwrap();
    }
    assert_eq!(names_in(&l.vols), ["volume-new"], "no temporary is left");
    stop_clean(d);
}

#[test]
fn qcow2_backup_image_whose_header_was_changed_to_name_a_file_is_refused() {
    let mut sb = Sandbox::new("q-target-backing");
    let l = qlayout(&mut sb, None);
    let (secret, secret_sum) = host_file(&sb, "secret", b's', 8 << 20);
    sparse_volume(&l.main, "src", 8, 2, 1);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("q", "src wait");
    let image = d.image("q", &id);
    let stored = stored_data(&l.qbackups, &image);
    // A writer of the target's storage points the stored image at a file of the host.
    ok(&format!(
        "qemu-img rebase -q -u -f qcow2 -b '{}' -F raw '{}'",
        secret.display(),
        stored.display()
    ));

    assert_errno(std::fs::metadata(&image), libc::EPERM, "stat of the image");
    assert_errno(std::fs::read(&image), libc::EPERM, "read of the image");
    let restore = sh(&format!(
        "cp '{}' '{}'",
        image.display(),
        d.volume("raw", "back").display()
    ));
    assert!(!restore.status.success(), "a restore from it is refused");
    assert_eq!(sha256(&secret), secret_sum);
    assert!(d.log().contains("names a backing file"), "{}", d.log());
    stop_clean(d);
}
