//! Crashes and stops: `kill -9` mid-copy, SIGTERM with open files, umount, a second
//! daemon on the same target. Nothing half-made may survive; the source never changes.

mod common;

use common::*;
use std::process::{Command, Stdio};

/// Waits until the job has copied something; the jobs line.
fn wait_copying(d: &Daemon, id: &str) -> String {
    let mut line = String::new();
    wait_for(
        || {
            line = d
                .jobs("hdd")
                .lines()
                .find(|l| l.starts_with(id))
                .unwrap_or("")
                .to_string();
            line.contains(" copying ") && !line.contains(" copying 0/")
        },
        "the copy to start",
    );
    line
}

#[test]
fn kill9_mid_copy_leaves_nothing_half_made_and_restart_records_the_error() {
    let mut sb = Sandbox::new("kill9");
    let l = layout(
        &mut sb,
        Some(Fs::Btrfs),
        Some(Fs::Xfs),
        "copy_bps_limit = 8000000",
    );
    let source = random_volume(&l.gold, "victim", 64);
    let earlier_source = random_volume(&l.gold, "earlier", 4);
    let before = sha256(&source);
    // In-use, so the job also has a temporary snapshot to leave behind.
    let holder = sb.hold_lock(&source);
    let d = sb.start_daemon(&l.config);
    let earlier = d.backup("hdd", "earlier wait");
    let id = d.backup("hdd", "victim");
    wait_copying(&d, &id);
    assert!(l.gold.join(format!("snapshot-backupfs-{id}")).exists());
    d.kill9();

    let d = sb.start_daemon(&l.config);
    let record = d.record("hdd", &id);
    assert_eq!(record["status"], "error");
    assert!(
        record["error"].as_str().unwrap().contains("interrupted"),
        "{record}"
    );
    assert!(!d.image("hdd", &id).exists());
    let pool = ok(&format!("ls -A '{}'", l.backups.display()));
    assert!(
        !pool.contains(&format!("backup-{id}.img")),
        "partial data left: {pool}"
    );
    let gold = ok(&format!("ls -A '{}'", l.gold.display()));
    assert!(!gold.contains("snapshot-backupfs"), "snapshot left: {gold}");
    sb.release(holder);
    assert_eq!(sha256(&source), before, "the source must be untouched");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &earlier).display(),
        earlier_source.display()
    ));
    // The failed record can be removed by the operator.
    ok(&format!("rm '{}/{id}.json'", d.target("hdd").display()));
}

#[test]
fn sigterm_with_an_open_image_and_a_running_job_stops_cleanly() {
    let mut sb = Sandbox::new("sigterm");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "copy_bps_limit = 8000000");
    random_volume(&l.gold, "small", 4);
    random_volume(&l.gold, "slow", 64);
    let d = sb.start_daemon(&l.config);
    let done = d.backup("hdd", "small wait");
    // A reader holding the image open and a shell sitting inside the mount.
    let mut reader = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 4<'{}'; cd '{}' && exec sleep 300",
            d.image("hdd", &done).display(),
            d.target("hdd").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = d.backup("hdd", "slow");
    wait_copying(&d, &id);
    let mnt = d.mnt.clone();
    let status = d.stop();
    let _ = reader.kill();
    let _ = reader.wait();
    assert!(status.success(), "exit status {status}");
    assert!(!is_fuse_mount(&mnt), "the mount must be gone");
    let left = ok(&format!("ls -A '{}'", l.backups.display()));
    assert!(
        !left.contains(&format!("backup-{id}.img")),
        "partial data left: {left}"
    );
    let record = std::fs::read_to_string(l.backups.join(format!("backup-{id}.json"))).unwrap();
    assert!(record.contains("\"status\": \"error\""), "{record}");
    assert!(record.contains("interrupted"), "{record}");
}

#[test]
fn umount_stops_the_daemon() {
    let mut sb = Sandbox::new("umount");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let mut d = sb.start_daemon(&l.config);
    ok(&format!("umount '{}'", d.mnt.display()));
    wait_for(
        || matches!(d.child.try_wait(), Ok(Some(_))),
        "the daemon to exit",
    );
    assert!(d.child.try_wait().unwrap().unwrap().success());
}

#[test]
fn second_daemon_on_the_same_target_is_refused() {
    let mut sb = Sandbox::new("twice");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let _d = sb.start_daemon(&l.config);
    let other = sb.mkdir("mnt2");
    let out = Command::new(BIN)
        .arg("mount")
        .arg(&other)
        .arg("--config")
        .arg(&l.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another backupfs"), "{stderr}");
    assert!(!is_fuse_mount(&other));
}

#[test]
fn stale_mount_of_a_killed_daemon_is_replaced_at_start() {
    let mut sb = Sandbox::new("stale");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 1);
    let d = sb.start_daemon(&l.config);
    let mnt = d.mnt.clone();
    d.crash();
    // The mountpoint now answers ENOTCONN.
    let err = std::fs::read_dir(&mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));
    let d = sb.start_daemon(&l.config);
    assert!(ok(&format!("ls '{}'", d.mnt.join("volumes/ssd").display())).contains('v'));
}

#[test]
fn restart_keeps_the_data_of_a_record_it_cannot_read_and_removes_temporaries() {
    let mut sb = Sandbox::new("badrecord");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    assert!(d.stop().success());
    // A record from a newer backupfs (or damaged) is not understood, but still owns data.
    let record = l.backups.join(format!("backup-{id}.json"));
    let text = std::fs::read_to_string(&record).unwrap();
    std::fs::write(&record, text.replace("\"format\": 1", "\"format\": 99")).unwrap();
    let leftover = l.backups.join(format!(".backup-{id}.json.1234.0.tmp"));
    std::fs::write(&leftover, b"half a record").unwrap();
    let d = sb.start_daemon(&l.config);
    assert!(
        l.backups.join(format!("backup-{id}.img")).exists(),
        "{}",
        d.log()
    );
    assert!(
        !leftover.exists(),
        "a crashed write's temporary file is removed"
    );
    assert!(
        d.log().contains("skipping unreadable record"),
        "{}",
        d.log()
    );
}
