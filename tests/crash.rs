//! Crashes and stops: `kill -9` mid-copy, SIGTERM, SIGINT, SIGHUP and SIGQUIT with open
//! files, umount, requests while stopping, a second daemon on the same target. Nothing
//! half-made may survive; the source never changes.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;

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

/// An interrupted backup as a restarted daemon shows it: an `error` record saying
/// "interrupted", no image, and nothing of it left in the target's pool but its record
/// (`stored` is what the pool held before the backup started).
#[track_caller]
fn assert_interrupted(d: &Daemon, pool: &Path, id: &str, stored: u64) {
    let record = d.record("hdd", id);
    assert_eq!(record["status"], "error", "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("interrupted"),
        "{record}"
    );
    assert_errno(
        std::fs::metadata(d.image("hdd", id)),
        libc::ENOENT,
        "the image of an interrupted backup",
    );
    assert_eq!(
        files_mentioning(pool, id),
        [record_file(pool, id)],
        "partial data left"
    );
    assert!(
        allocated_under(pool) < stored + (256 << 10),
        "partial data left: {} bytes allocated, {stored} before",
        allocated_under(pool)
    );
    let jobs = d.jobs("hdd");
    assert!(
        jobs.lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains(" error ")),
        "restarted jobs list the failure:\n{jobs}"
    );
}

#[test]
fn kill9_mid_copy_leaves_nothing_half_made_and_restart_records_the_error() {
    let mut sb = Sandbox::new("kill9");
    let l = layout(
        &mut sb,
        Some(Fs::Btrfs),
        Some(Fs::Xfs),
        "copy_bps_limit = 4000000",
    );
    let source = random_volume(&l.gold, "victim", 64);
    let earlier_source = random_volume(&l.gold, "earlier", 4);
    let before = sha256(&source);
    // In-use, so the job also has a temporary snapshot to leave behind.
    let holder = sb.hold_lock(&source);
    let d = sb.start_daemon(&l.config);
    let earlier = d.backup("hdd", "earlier wait");
    let stored = allocated_under(&l.backups);
    let id = d.backup("hdd", "victim");
    // The copy runs at 4 MB/s: 16 s for 64 MiB, and it is killed as soon as it has begun.
    wait_copying(&d, &id);
    assert_eq!(
        names_in(&l.gold).len(),
        3,
        "a temporary snapshot beside the two volumes: {:?}",
        names_in(&l.gold)
    );
    d.kill9();

    let d = sb.start_daemon(&l.config);
    assert_interrupted(&d, &l.backups, &id, stored);
    assert_eq!(
        names_in(&l.gold),
        ["volume-earlier", "volume-victim"],
        "the snapshot is gone"
    );
    sb.release(holder);
    assert_eq!(sha256(&source), before, "the source must be untouched");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &earlier).display(),
        earlier_source.display()
    ));
    // The failed record can be removed by the operator.
    std::fs::remove_file(d.target("hdd").join(format!("{id}.json"))).unwrap();
    assert_eq!(files_mentioning(&l.backups, &id), Vec::<PathBuf>::new());
}

#[test]
fn sigterm_with_an_open_image_and_a_running_job_stops_cleanly() {
    let mut sb = Sandbox::new("sigterm");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "small", 4);
    random_volume(&l.gold, "slow", 16);
    let d = sb.start_daemon(&l.config);
    let done = d.backup("hdd", "small wait");
    d.stop_clean();
    let stored = allocated_under(&l.backups);
    let mut d = sb.start_daemon_env(&l.config, &hold_env("finishing"));
    // A reader holding the image open, sitting inside the mount.
    let image = d.image("hdd", &done);
    let reader = sb.spawn_sh(&format!(
        "exec 4<'{}'; cd '{}' && exec sleep 300",
        image.display(),
        d.target("hdd").display()
    ));
    let reader_pid = sb.child_pid(reader);
    wait_for(
        || {
            std::fs::read_link(format!("/proc/{reader_pid}/cwd"))
                .is_ok_and(|c| c == d.target("hdd"))
                && std::fs::read_link(format!("/proc/{reader_pid}/fd/4")).is_ok_and(|f| f == image)
        },
        "the reader to be inside the mount with the image open",
    );
    let id = d.backup("hdd", "slow");
    d.wait_state("hdd", &id, "finishing");
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    assert!(!is_fuse_mount(&d.mnt), "the mount must be gone");
    assert!(
        std::fs::read_link(format!("/proc/{reader_pid}/cwd")).is_ok(),
        "the reader was still inside when the daemon stopped"
    );
    sb.release(reader);
    drop(d);

    let d = sb.start_daemon(&l.config);
    assert_interrupted(&d, &l.backups, &id, stored);
    ok(&format!(
        "cmp '{}' '{}/volume-small'",
        d.image("hdd", &done).display(),
        l.gold.display()
    ));
}

#[test]
fn sigint_sighup_and_sigquit_stop_the_daemon_and_interrupt_its_jobs() {
    let mut sb = Sandbox::new("signals");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 4);
    let stored = allocated_under(&l.backups);
    let mut interrupted = Vec::new();
    for signal in [libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        let mut d = sb.start_daemon_env(&l.config, &hold_env("finishing"));
        let id = d.backup("hdd", "v");
        d.wait_state("hdd", &id, "finishing");
        d.signal(signal);
        let status = d.wait_exit();
        assert!(
            status.success(),
            "signal {signal}: exit status {status}; log:\n{}",
            d.log()
        );
        assert!(!is_fuse_mount(&d.mnt), "signal {signal}: the mount is gone");
        assert!(
            d.log().contains(&format!("stopping (signal {signal})")),
            "{}",
            d.log()
        );
        interrupted.push(id);
    }
    let d = sb.start_daemon(&l.config);
    for id in &interrupted {
        assert_interrupted(&d, &l.backups, id, stored);
    }
}

#[test]
fn umount_stops_the_daemon() {
    let mut sb = Sandbox::new("umount");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let mut d = sb.start_daemon(&l.config);
    ok(&format!("umount '{}'", d.mnt.display()));
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
}

#[test]
fn umount_with_a_job_running_stops_the_daemon_and_interrupts_the_job() {
    let mut sb = Sandbox::new("umount-job");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "v", 8);
    let before = sha256(&source);
    let stored = allocated_under(&l.backups);
    let mut d = sb.start_daemon_env(&l.config, &hold_env("finishing"));
    let id = d.backup("hdd", "v");
    d.wait_state("hdd", &id, "finishing");
    ok(&format!("umount '{}'", d.mnt.display()));
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    assert!(!is_fuse_mount(&d.mnt));
    drop(d);
    let d = sb.start_daemon(&l.config);
    assert_interrupted(&d, &l.backups, &id, stored);
    assert_eq!(sha256(&source), before);
}

#[test]
fn requests_while_the_daemon_is_stopping_are_refused_with_ebusy() {
    let mut sb = Sandbox::new("stopping");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "held", 4);
    for i in 0..8 {
        random_volume(&l.gold, &format!("late-{i}"), 1);
    }
    let release = sb.path("release");
    let mut d = sb.start_daemon_env(&l.config, &pause_env("finishing", &release));
    let held = d.backup("hdd", "held");
    d.wait_state("hdd", &held, "finishing");
    // The held job keeps the daemon stopping (not stopped) until it is released.
    d.signal(libc::SIGTERM);
    wait_for(
        || d.log().contains("stopping ("),
        "the daemon to begin stopping",
    );
    // Each volume is asked for once and is not in use: EBUSY can only mean "stopping".
    // (One asked for in the instant between the log line and the stop is still taken.)
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..8 {
        let volume_id = format!("late-{i}");
        match d.request("hdd", &volume_id) {
            None => accepted.push(volume_id),
            Some(libc::EBUSY) => {
                refused = Some(volume_id);
                break;
            }
            Some(other) => panic!("request of {volume_id}: {}", errno_name(other)),
        }
    }
    let refused = refused.expect("a request while stopping is refused");
    assert!(accepted.len() <= 1, "accepted while stopping: {accepted:?}");
    assert_eq!(d.request("hdd", "late-7 wait"), Some(libc::EBUSY));
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains(&format!("backup of {refused} refused")) && l.contains("stopping")),
        "the refusal is logged with its reason:\n{}",
        d.log()
    );
    assert!(is_fuse_mount(&d.mnt), "still serving while stopping");
    release_jobs(&release);
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    drop(d);
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &held)["status"], "error");
    let records = names_in(&d.target("hdd"))
        .into_iter()
        .filter(|n| n.ends_with(".json"))
        .count();
    assert_eq!(records, 1 + accepted.len(), "refusals made no record");
}

/// `backupfs mount` of `config` on `mountpoint`, in the foreground; its output.
fn second_daemon(config: &Path, mountpoint: &Path) -> std::process::Output {
    timed(std::time::Duration::from_secs(60), BIN)
        .arg("mount")
        .arg(mountpoint)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn second_daemon_on_the_same_target_is_refused() {
    let mut sb = Sandbox::new("twice");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 1);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    // The same configuration: the same state directory and the same target.
    let other = sb.mkdir("mnt2");
    let started = std::time::Instant::now();
    let out = second_daemon(&l.config, &other);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A holder that serves its mount is not waited for (issue 23): refused at once,
    // naming the mount.
    assert!(
        stderr.contains(&format!(
            "in use by the backupfs serving {}",
            d.mnt.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("waiting up to"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "refused after {:?}",
        started.elapsed()
    );
    assert!(!is_fuse_mount(&other));
    // Another state directory, the same target: the target's own lock refuses it.
    let text = std::fs::read_to_string(&l.config).unwrap();
    let state2 = sb.mkdir("state2");
    let config2 = sb.path("second.toml");
    let first_state = text
        .lines()
        .next()
        .unwrap()
        .split('"')
        .nth(1)
        .unwrap()
        .to_string();
    std::fs::write(
        &config2,
        text.replacen(&first_state, state2.to_str().unwrap(), 1),
    )
    .unwrap();
    let out = second_daemon(&config2, &other);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("target hdd is in use by another backupfs as node")
            && stderr.contains("backupfs.node."),
        "{stderr}"
    );
    assert!(!is_fuse_mount(&other));
    // The first daemon goes on serving, untouched.
    assert_eq!(d.record("hdd", &id)["status"], "available");
    d.stop_clean();
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
    assert_errno(std::fs::read_dir(&mnt), libc::ENOTCONN, "the stale mount");
    let d = sb.start_daemon(&l.config);
    assert!(
        d.log().contains("is a stale mount of a dead daemon"),
        "{}",
        d.log()
    );
    assert_eq!(names_in(&d.mnt.join("volumes/ssd")), ["v"]);
    d.stop_clean();
}

#[test]
fn restart_keeps_the_data_of_a_record_it_cannot_read_and_removes_temporaries() {
    let mut sb = Sandbox::new("badrecord");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let data = stored_data(&l.backups, &d.image("hdd", &id));
    let sum = sha256(&data);
    d.stop_clean();
    // A record from a newer backupfs (or damaged) is not understood, but still owns data.
    let record = record_file(&l.backups, &id);
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains("\"format\": 1"), "{text}");
    std::fs::write(&record, text.replace("\"format\": 1", "\"format\": 99")).unwrap();
    // What a crash in the middle of a record write leaves (the daemon's temporary name).
    let leftover = record.with_file_name(format!(
        ".{}.1234.0.tmp",
        record.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&leftover, b"half a record").unwrap();
    let d = sb.start_daemon(&l.config);
    assert_eq!(sha256(&data), sum, "the data is kept; log:\n{}", d.log());
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

#[test]
fn a_wedged_daemon_fails_the_test_instead_of_hanging_the_suite() {
    // The suite's own safety net: a request the daemon never answers would block the
    // test forever. The watchdog kills what the test started, and the call returns.
    // (The deadline counts from here: set-up must fit in it, even on a loaded machine.)
    let mut sb = Sandbox::with_deadline("wedged", std::time::Duration::from_secs(15));
    let l = layout(&mut sb, None, None, "");
    random_volume(&l.gold, "v", 1);
    let d = sb.start_daemon(&l.config);
    let started = std::time::Instant::now();
    d.stop_all_threads();
    let result = std::fs::read_to_string(d.volume("ssd", "v"));
    // The request in flight is aborted (ECONNABORTED); a later one finds no daemon.
    let errno = errno_of(result);
    assert!(
        errno == Some(libc::ECONNABORTED) || errno == Some(libc::ENOTCONN),
        "a read from a wedged daemon: {errno:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "returned after {:?}",
        started.elapsed()
    );
    // And a shell command that hangs is stopped by its timeout.
    let out = sh_limit(std::time::Duration::from_secs(1), "sleep 30");
    assert!(describe(out.status).starts_with("timed out"), "{out:?}");
}

#[test]
fn clean_up_never_detaches_a_loop_device_another_test_took_since() {
    // `a` let go of its loop device (a lazy unmount finishing, an autoclear) and `b` took
    // it: a's clean-up, which saw the device as its own a moment before, leaves it alone
    // (detached by name, b's mount right after mkfs failed: "can't read superblock").
    let a = Sandbox::new("loops-a");
    let b = Sandbox::new("loops-b");
    let (file_a, file_b) = (a.path("a.img"), b.path("b.img"));
    for file in [&file_a, &file_b] {
        std::fs::File::create(file)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    // The same device for both, by number: retried if another test takes it between.
    let mut taken = None;
    for _ in 0..20 {
        let dev = ok(&format!("losetup -f --show '{}'", file_a.display()))
            .trim()
            .to_string();
        assert_eq!(loops_under(&a.dir), vec![dev.clone()]);
        ok(&format!("losetup -d {dev}"));
        if sh(&format!("losetup {dev} '{}'", file_b.display()))
            .status
            .success()
        {
            taken = Some(dev);
            break;
        }
    }
    let dev = taken.expect("a loop device taken twice in a row");
    detach_loop_device(&dev, &a.dir);
    undo_everything_under(&a.dir);
    assert_eq!(loops_under(&b.dir), vec![dev.clone()], "b's device is b's");
    detach_loop_device(&dev, &b.dir);
    wait_for(|| loops_under(&b.dir).is_empty(), "b's device to be let go");
}

#[test]
fn what_a_dead_run_left_is_swept_by_the_next() {
    // This process's own sweep has run (and is not running) once a sandbox exists.
    let _sb = Sandbox::new("sweeper");
    // A run that died (here: a pid that has exited) left a sandbox with a mounted loop
    // filesystem, a process inside it and an account.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let dead_pid = gone.id();
    let left = sandboxes_root().join(format!("leftover-{dead_pid}-0"));
    std::fs::create_dir_all(left.join("fs")).unwrap();
    ok(&format!(
        "truncate -s 64M '{l}/fs.img' && mkfs.ext4 -q -F '{l}/fs.img' && mount -o loop '{l}/fs.img' '{l}/fs'",
        l = left.display()
    ));
    let mut stray = std::process::Command::new("sleep")
        .arg("600")
        .arg(left.join("fs"))
        .spawn()
        .unwrap();
    let account = format!("{}{dead_pid}zg", account_prefix());
    ok(&format!("groupadd {account}"));
    assert_eq!(loops_under(&left).len(), 1);

    sweep_dead_runs();

    assert!(
        stray.try_wait().unwrap().is_some(),
        "the process it left is killed"
    );
    assert_eq!(mounts_under(&left), Vec::<PathBuf>::new());
    assert_eq!(loops_under(&left), Vec::<String>::new());
    assert!(!left.exists(), "its directory is removed");
    assert!(
        !sh(&format!("getent group {account}")).status.success(),
        "its account is removed"
    );
}

#[test]
fn kill9_during_a_verify_leaves_the_backup_available_and_unverified() {
    let mut sb = Sandbox::new("crash-verify");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    let source = random_volume(&l.gold, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    d.stop_clean();
    let d = sb.start_daemon_env(&l.config, &hold_env("verifying"));
    sb.spawn_sh(&format!(
        "echo {id} > '{}'",
        d.target("hdd").join("verify").display()
    ));
    wait_for(
        || d.log().contains("holding at verifying"),
        "the verify to be held",
    );
    d.kill9();

    let d = sb.start_daemon(&l.config);
    let record = d.record("hdd", &id);
    assert_eq!(record["status"], "available", "{record}");
    assert!(record["verified_at"].is_null(), "no verify ended: {record}");
    assert!(record["damaged_blocks"].is_null(), "{record}");
    assert_eq!(sha256(&d.image("hdd", &id)), sha256(&source));
    assert_eq!(
        write_errno(&d.target("hdd").join("verify"), id.as_bytes()),
        None,
        "a verify after the crash"
    );
    let record = d.record("hdd", &id);
    assert!(record["verified_at"].is_string(), "{record}");
    assert_eq!(record["damaged_blocks"], serde_json::json!([]), "{record}");
    d.stop_clean();
}

/// The status in a backup's record file in the pool (no daemon needed).
fn record_status(pool: &Path, id: &str) -> String {
    let text = std::fs::read_to_string(record_file(pool, id)).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|record| record["status"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn kill9_during_a_deletion_is_finished_at_the_next_start() {
    let mut sb = Sandbox::new("kill9-delete");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    let source = random_volume(&l.gold, "a", 8);
    let d = sb.start_daemon(&l.config);
    let doomed = d.backup("hdd", "a wait");
    let kept = d.backup("hdd", "a wait");
    d.stop_clean();

    let d = sb.start_daemon_env(&l.config, &hold_env("deleting"));
    let image = d.image("hdd", &doomed);
    sb.spawn_sh(&format!("exec rm -f '{}'", image.display()));
    wait_for(
        || record_status(&l.backups, &doomed) == "deleting",
        "the deletion to begin",
    );
    // (Its record's lock, `backupfs.lock.<id>`, is held meanwhile: not the backup's.)
    let backup_files = |pool: &Path| {
        files_mentioning(pool, &doomed)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("backup-")
            })
            .count()
    };
    assert_eq!(backup_files(&l.backups), 4, "nothing removed yet");
    d.kill9();

    let d = sb.start_daemon(&l.config);
    assert_errno(std::fs::metadata(&image), libc::ENOENT, "the deleted image");
    assert_eq!(
        files_mentioning(&l.backups, &doomed),
        Vec::<PathBuf>::new(),
        "the deletion is finished"
    );
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &kept).display(),
        source.display()
    ));
    d.stop_clean();
}

#[test]
fn kill9_during_a_retention_deletion_is_finished_at_the_next_start() {
    let mut sb = Sandbox::new("kill9-retention");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    // The last table of the configuration is the target's.
    let config = std::fs::read_to_string(&l.config).unwrap() + "keep_last = 1\n";
    std::fs::write(&l.config, config).unwrap();
    let source = random_volume(&l.gold, "a", 8);
    let d = sb.start_daemon(&l.config);
    let old = d.backup("hdd", "a wait");
    d.stop_clean();

    let d = sb.start_daemon_env(&l.config, &hold_env("deleting"));
    let new = d.backup("hdd", "a");
    wait_for(
        || record_status(&l.backups, &old) == "deleting",
        "retention to begin deleting the older backup",
    );
    assert_eq!(record_status(&l.backups, &new), "available");
    d.kill9();

    let d = sb.start_daemon(&l.config);
    assert_eq!(
        files_mentioning(&l.backups, &old),
        Vec::<PathBuf>::new(),
        "the older backup is gone"
    );
    assert_eq!(d.record("hdd", &new)["status"], "available");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &new).display(),
        source.display()
    ));
    d.stop_clean();
}

/// Starts this binary's `kill9_writer` (a child of `sb`; its command line names `dir`),
/// which writes what `mode` says over and over; once `ready` exists it has written once.
fn start_writer(sb: &mut Sandbox, mode: &str, dir: &Path, id: &str, ready: &Path) -> usize {
    let mut writer = std::process::Command::new(std::env::current_exe().unwrap());
    writer
        .args(["--ignored", "--exact", "kill9_writer", "--nocapture"])
        .arg(dir)
        .env("BACKUPFS_KILL9_WRITER", format!("{mode}:{id}"))
        .env("BACKUPFS_KILL9_READY", ready)
        .stdout(Stdio::null());
    let child = sb.spawn(&mut writer);
    wait_for(|| ready.exists(), "the writer's first write");
    child
}

#[test]
#[ignore = "the writer that the kill9_during_*_writes tests start and kill -9"]
fn kill9_writer() {
    use backupfs::targets::{catalogue::DIR_NAMES, claim, records::StoreRecords};
    let Ok(job) = std::env::var("BACKUPFS_KILL9_WRITER") else {
        return;
    };
    let (mode, id) = job.split_once(':').unwrap();
    let ready = PathBuf::from(std::env::var("BACKUPFS_KILL9_READY").unwrap());
    let dir = PathBuf::from(std::env::args().next_back().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for n in 0.. {
        if mode == "records" {
            let store = backupfs::targets::store::DirStore::open(&dir).unwrap();
            let records = StoreRecords {
                store: std::sync::Arc::new(store),
                names: DIR_NAMES,
                key: None,
            };
            let mut record = records
                .record(&backupfs::ids::BackupId::parse(id).unwrap())
                .unwrap();
            record.name = Some(format!("kill9-{id}-{n}"));
            records.write_record(&record).unwrap();
        } else {
            let pool = dir.join(n.to_string());
            std::fs::create_dir(&pool).unwrap();
            claim::claim(&pool, "hdd").unwrap();
        }
        if n == 0 {
            std::fs::write(&ready, b"").unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "never killed");
    }
}

#[test]
fn kill9_during_record_writes_leaves_the_old_or_the_new_record_never_a_torn_one() {
    use backupfs::targets::{catalogue::DIR_NAMES, claim, records::StoreRecords};
    let mut sb = Sandbox::new("kill9-record");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 4);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let sum = sha256(&d.image("hdd", &id));
    d.stop_clean();
    let records = StoreRecords {
        store: std::sync::Arc::new(backupfs::targets::store::DirStore::open(&l.backups).unwrap()),
        names: DIR_NAMES,
        key: None,
    };
    let backup = backupfs::ids::BackupId::parse(&id).unwrap();
    let as_made = serde_json::to_value(records.record(&backup).unwrap()).unwrap();
    let mut lcg = Lcg(27);
    let mut name = String::new();
    for round in 0..12 {
        let ready = sb.path(&format!("ready-{round}"));
        let writer = start_writer(&mut sb, "records", &l.backups, &id, &ready);
        std::thread::sleep(std::time::Duration::from_micros(lcg.below(20_000)));
        sb.release(writer);
        // A whole record, the writer's last or the one before it: never a part of one.
        let record = records
            .record(&backup)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            record.defect.is_none(),
            "round {round}: {:?}",
            record.defect
        );
        name = record.name.clone().unwrap();
        assert!(name.starts_with(&format!("kill9-{id}-")), "{name}");
        let mut read = serde_json::to_value(&record).unwrap();
        read["name"] = as_made["name"].clone();
        assert_eq!(read, as_made, "round {round}: only the name changes");
    }
    let temporaries = || -> Vec<String> {
        let mut names = names_in(&l.backups);
        names.retain(|n| n.starts_with(".backup-") && claim::is_temporary(n));
        names
    };
    eprintln!("temporaries the kills left: {:?}", temporaries());
    // The daemon starts clean: the record as last written, its data, no temporary.
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &id)["status"], "available");
    assert_eq!(d.record("hdd", &id)["name"], name.as_str());
    assert_eq!(sha256(&d.image("hdd", &id)), sum);
    assert_eq!(temporaries(), Vec::<String>::new(), "log:\n{}", d.log());
    d.stop_clean();
}

#[test]
fn kill9_during_claim_writes_leaves_a_pool_claimed_or_claimable_and_the_daemon_starts() {
    use backupfs::targets::claim::{self, PoolState};
    let mut sb = Sandbox::new("kill9-claim");
    let l = layout(&mut sb, None, None, "");
    let pools = sb.mkdir("hdd/claims");
    let mut lcg = Lcg(28);
    // The daemon starts on the first pool whose claim a kill cut short, else the last.
    let (mut unfinished, mut first_cut, mut last) = (0, None, None);
    for round in 0..8 {
        let dir = pools.join(round.to_string());
        std::fs::create_dir(&dir).unwrap();
        let ready = sb.path(&format!("ready-{round}"));
        let writer = start_writer(&mut sb, "claims", &dir, "", &ready);
        std::thread::sleep(std::time::Duration::from_micros(lcg.below(20_000)));
        sb.release(writer);
        let mut made = names_in(&dir);
        made.sort_by_key(|n| n.parse::<u64>().unwrap());
        let (cut, done) = made.split_last().unwrap();
        // Every claim before the kill is whole; the one it cut is not made yet (no
        // marker, at most its temporary) or whole: never a marker that cannot be read.
        for name in done {
            let state = claim::inspect(&dir.join(name), "hdd").unwrap();
            assert!(matches!(state, PoolState::Claimed(_)), "{name}: {state:?}");
        }
        let cut = dir.join(cut);
        match claim::inspect(&cut, "hdd") {
            Ok(PoolState::Claimed(_)) => {}
            // Nothing, or the marker's temporary (an earlier backupfs's file, to claim).
            Ok(PoolState::Empty | PoolState::Legacy { backups: 0 }) if first_cut.is_none() => {
                unfinished += 1;
                first_cut = Some(cut);
                continue;
            }
            Ok(PoolState::Empty | PoolState::Legacy { backups: 0 }) => unfinished += 1,
            other => panic!("round {round}: {other:?}: {:?}", names_in(&cut)),
        }
        assert!(claim::claim(&cut, "hdd").is_ok(), "{:?}", names_in(&cut));
        last = Some(cut);
    }
    eprintln!("kills that found a claim unfinished: {unfinished} of 8");
    let cut = first_cut.or(last).unwrap();
    std::fs::remove_dir(&l.backups).unwrap();
    std::fs::rename(&cut, &l.backups).unwrap();
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    assert_eq!(d.record("hdd", &id)["status"], "available");
    assert!(matches!(
        claim::inspect(&l.backups, "hdd"),
        Ok(PoolState::Claimed(_))
    ));
    assert!(
        claim::foreign_files(&l.backups).is_empty(),
        "{:?}",
        names_in(&l.backups)
    );
    d.stop_clean();
}
