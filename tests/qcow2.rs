//! The qcow2 driver through a real mount: qcow2 volumes backed up, restored and created
//! with real tools (qemu-img, qemu-io, qemu-storage-daemon, cp, cmp), and nothing left
//! behind: no qemu-storage-daemon of the daemon's, no export mount, no snapshot.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        "state_dir = \"{}\"\n\
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

fn allocated(path: &Path) -> u64 {
    ok(&format!("stat -c %b '{}'", path.display()))
        .trim()
        .parse::<u64>()
        .expect("st_blocks")
        * 512
}

fn qcow2_compare(qcow2: &Path, raw: &Path) {
    ok(&format!(
        "qemu-img compare -U -f qcow2 -F raw '{}' '{}'",
        qcow2.display(),
        raw.display()
    ));
}

/// Where the daemon with `pid` mounts its exports.
fn export_dir(pid: u32) -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/backupfs"))
        .join("qcow2-exports")
        .join(pid.to_string())
}

/// The export mounts and the qemu-storage-daemon processes of the daemon with `pid`.
/// (A qsd that has exited but is not yet reaped has no command line: it is not counted,
/// which is why `assert_no_exports` also waits for the export files to go.)
fn exports_of(pid: u32) -> (Vec<String>, Vec<u32>) {
    let dir = format!("{}/", export_dir(pid).display());
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
fn export_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(export_dir(pid))
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
fn assert_no_exports(pid: u32) {
    let mut left = (Vec::new(), Vec::new(), Vec::new());
    let gone = (0..200).any(|_| {
        let (mounts, processes) = exports_of(pid);
        left = (mounts, processes, export_files(pid));
        let gone = left.0.is_empty() && left.1.is_empty() && left.2.is_empty();
        if !gone {
            std::thread::sleep(Duration::from_millis(50));
        }
        gone
    });
    assert!(gone, "exports left behind: {left:?}");
}

/// Ends the daemon with SIGTERM and checks it left nothing: no exports, no directory.
#[track_caller]
fn stop_clean(d: Daemon) {
    let pid = d.child.id();
    assert_no_exports(pid);
    let log = d.log.clone();
    let status = d.stop();
    assert!(
        status.success(),
        "{status:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    assert_no_exports(pid);
    assert!(!export_dir(pid).exists(), "the export directory is removed");
}

/// A qemu-storage-daemon of the test's own holding `image` writable (as a hypervisor
/// would) and serving it over NBD at `socket`; killed on Drop.
struct Holder {
    child: Child,
    socket: PathBuf,
}

impl Holder {
    fn start(image: &Path, socket: &Path) -> Holder {
        let child = Command::new("qemu-storage-daemon")
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
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon runs");
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

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let stored = l.backups.join(format!("backup-{id}.img"));
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
    let listing = ok(&format!("ls '{}'", d.mnt.join("volumes/qc").display()));
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
        ["plain", "sparse"]
    );
    assert_eq!(
        ok(&format!("ls -A '{}'", l.vols.display()))
            .split_whitespace()
            .count(),
        2,
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
    assert_no_exports(d.child.id());
    ok(&format!(
        "qemu-io -f qcow2 -c 'read -P 0x33 100M 1M' -c 'read -P 0x22 60M 4M' -c 'read -P 0 64M 36M' '{}' | grep -v -q Pattern",
        volume.display()
    ));

    // Truncating keeps the size and zeroes the tail, also from an unaligned offset.
    ok(&format!("truncate -s 5000000 '{}'", node.display()));
    assert_eq!(std::fs::metadata(&node).unwrap().len(), 101 << 20);
    assert_no_exports(d.child.id());
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
    let holder = Holder::start(&volume, &sb.path("nbd.sock"));
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
        ok(&format!("ls -A '{}'", l.vols.display())).trim(),
        "volume-busy",
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
    drop(holder);
}

#[test]
fn in_use_qcow2_volume_without_reflinks_is_refused() {
    let mut sb = Sandbox::new("q-inuse-ext4");
    let l = qlayout(&mut sb, Some(Fs::Ext4));
    let volume = qcow2_volume(&l.vols, "busy", "256M");
    let holder = Holder::start(&volume, &sb.path("nbd.sock"));
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.request("raw", "busy"), Some(libc::EBUSY));
    assert!(d.log().contains("cannot be snapshotted"), "{}", d.log());
    drop(holder);
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
    let stored = l.qbackups.join(format!("backup-{id}.img"));
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
    let image = d.image("q", &id);
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
    ok(&format!(
        "qemu-img compare -f qcow2 -F qcow2 '{}' '{}'",
        qvolume.display(),
        l.qbackups.join(format!("backup-{qid}.img")).display()
    ));

    ok(&format!("rm '{}'", image.display()));
    assert!(!stored.exists(), "deleting the backup removes its image");
    stop_clean(d);
}

#[test]
fn a_crashed_daemons_exports_are_stopped_and_removed() {
    let mut sb = Sandbox::new("q-crash");
    let l = qlayout(&mut sb, None);
    qcow2_volume(&l.vols, "a", "200M");
    qcow2_volume(&l.vols, "b", "200M");
    let d = sb.start_daemon(&l.config);
    let pid = d.child.id();
    // Two volumes open through the mount: two exports.
    let a = std::fs::File::open(d.volume("qc", "a")).unwrap();
    let b = std::fs::File::open(d.volume("qc", "b")).unwrap();
    let (mounts, processes) = exports_of(pid);
    assert_eq!((mounts.len(), processes.len()), (2, 2), "{mounts:?}");
    // One qsd is killed outright (its export mount stays, dead), then the daemon.
    ok(&format!("kill -9 {}", processes[0]));
    wait_for(
        || exports_of(pid).1.len() == 1,
        "the killed qemu-storage-daemon to go",
    );
    d.crash();
    // What the unit's ExecStopPost does; a quick restart could otherwise still see the
    // dead mount's cached attributes and not know it is dead.
    sh(&format!("umount -l '{}'", sb.path("mnt").display()));
    // The other one is told by the kernel that its daemon died, and stops.
    wait_for(|| exports_of(pid).1.is_empty(), "the orphaned qsd to stop");
    drop((a, b));
    assert!(export_dir(pid).exists(), "a crash leaves the directory");

    let d = sb.start_daemon(&l.config);
    wait_for(
        || !export_dir(pid).exists(),
        "the stale exports to be removed",
    );
    assert_no_exports(pid);
    assert!(
        d.log().contains("left by a backupfs that is gone"),
        "{}",
        d.log()
    );
    stop_clean(d);
}
