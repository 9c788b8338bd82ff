//! An operator's second week (issue 15): reasons at the shell, jobs that stay true,
//! damaged backups kept out of the way, restores that are visible and honest, metrics
//! a monitoring system can read, and the small things an operator hit.

mod common;

use common::*;
use std::process::Command;

#[test]
fn a_refused_request_leaves_its_reason_to_read_on_the_same_descriptor() {
    let mut sb = Sandbox::new("op-reason");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    let d = sb.start_daemon(&l.config);
    let request = d.target("hdd").join("request");
    let out = ok(&format!(
        "exec 3<>'{}'; echo vol-x >&3 || cat <&3",
        request.display()
    ));
    assert_eq!(out, "error: no volume vol-x on any backend (ENOENT)\n");
    let out = ok(&format!(
        "exec 3<>'{}'; echo 'vol-x frobnicate' >&3 || cat <&3",
        request.display()
    ));
    assert!(out.starts_with("error: unknown option"), "{out}");
    assert!(out.ends_with("(EINVAL)\n"), "{out}");
    let verify = d.target("hdd").join("verify");
    let out = ok(&format!(
        "exec 3<>'{}'; echo 0c1e2f3a-aaaa-4bbb-8ccc-123456789abc >&3 || cat <&3",
        verify.display()
    ));
    assert!(out.starts_with("error: backup 0c1e2f3a"), "{out}");
    assert!(out.ends_with("(ENOENT)\n"), "{out}");
}

#[test]
fn labels_with_spaces_are_quoted() {
    let mut sb = Sandbox::new("op-label");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 1);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", r#"v name="nightly db" wait"#);
    assert_eq!(d.record("hdd", &id)["name"], "nightly db");
    assert_eq!(d.request("hdd", r#"v name="unclosed"#), Some(libc::EINVAL));
}

#[test]
fn a_deleted_backup_leaves_jobs_at_once() {
    let mut sb = Sandbox::new("op-jobs");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 1);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    assert!(d.jobs("hdd").contains(&id));
    ok(&format!("rm '{}'", d.image("hdd", &id).display()));
    assert!(!d.jobs("hdd").contains(&id), "{}", d.jobs("hdd"));
}

/// Damages three bytes of a backup's stored data in the target pool.
fn damage(pool: &std::path::Path, id: &str) {
    damage_bytes(
        &pool.join(format!("backup-{id}.img")),
        1000,
        b"\xff\x00\xff",
    );
}

#[test]
fn a_damaged_backup_is_never_latest_nor_a_parent() {
    let mut sb = Sandbox::new("op-damaged");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Xfs), "");
    let volume = random_volume(&l.gold, "v", 4);
    let d = sb.start_daemon(&l.config);
    let older = d.backup("hdd", "v incremental wait");
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=64k count=1 seek=3 conv=notrunc status=none",
        volume.display()
    ));
    let newer = d.backup("hdd", "v incremental wait");
    let latest = d.target("hdd").join("by-volume/v/latest.img");
    assert_eq!(
        ok(&format!("readlink '{}'", latest.display())).trim(),
        format!("../../{newer}.img")
    );
    damage(&l.backups, &newer);
    assert_eq!(
        write_errno(
            &d.target("hdd").join("verify"),
            format!("{newer}\n").as_bytes()
        ),
        Some(libc::EIO)
    );
    assert_eq!(
        ok(&format!("readlink '{}'", latest.display())).trim(),
        format!("../../{older}.img"),
        "the damaged backup is not the latest"
    );
    let next = d.backup("hdd", "v incremental wait");
    assert_eq!(d.record("hdd", &next)["parent_id"], older.as_str());
    assert_eq!(sha256(&d.image("hdd", &next)), sha256(&volume));
}

#[test]
fn restores_are_listed_and_one_that_fails_marks_the_volume_incomplete_until_one_succeeds() {
    let mut sb = Sandbox::new("op-restores");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    let small = sb.loop_fs("small", Fs::Ext4, 32);
    let tiny = small.join("pool");
    std::fs::create_dir_all(&tiny).unwrap();
    let config = std::fs::read_to_string(&l.config).unwrap().replace(
        "[targets.hdd]",
        &format!(
            "[backends.tiny]\ndriver = \"file\"\npools = {{ p = \"{}\" }}\n[targets.hdd]",
            tiny.display()
        ),
    );
    std::fs::write(&l.config, config).unwrap();
    random_volume(&l.gold, "big", 48);
    random_volume(&l.gold, "fits", 2);
    let small_volume = random_volume(&tiny, "victim", 4);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "big wait");
    let restores = d.mnt.join("restores");

    // A restore into a new volume that cannot fit fails before it writes anything.
    let out = sh(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("tiny", "new").display()
    ));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{out:?}"
    );
    let size = ok(&format!("stat -c %s '{}/volume-new'", tiny.display()));
    assert_eq!(size.trim(), "0", "nothing was written");
    // Refused before it wrote: a failed restore all the same, its new volume marked (the
    // note's xattr block is all it holds).
    assert!(
        std::fs::read_to_string(&restores)
            .unwrap()
            .lines()
            .any(|l| l.starts_with("tiny new failed ")),
        "{}",
        std::fs::read_to_string(&restores).unwrap()
    );
    let note = getxattr(&d.volume("tiny", "new"), "user.backupfs.restore").unwrap();
    assert!(String::from_utf8_lossy(&note).starts_with("incomplete: "));

    // One that fails on the way (written, not copied: the size is not known ahead).
    let out = sh(&format!(
        "dd if='{}' of='{}' bs=1M status=none",
        d.image("hdd", &id).display(),
        d.volume("tiny", "victim").display()
    ));
    assert!(!out.status.success(), "{out:?}");
    let listed = std::fs::read_to_string(&restores).unwrap();
    let line = listed
        .lines()
        .find(|l| l.starts_with("tiny victim "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.starts_with("tiny victim failed "), "{line}");
    assert!(line.contains("No space left"), "{line}");
    let note = getxattr(&d.volume("tiny", "victim"), "user.backupfs.restore").unwrap();
    let note = String::from_utf8_lossy(&note).into_owned();
    assert!(note.starts_with("incomplete: "), "{note}");
    assert!(d.log().contains("the volume is incomplete"), "{}", d.log());

    // A later restore that succeeds clears it.
    std::fs::remove_file(tiny.join("volume-new")).unwrap();
    let fits = d.backup("hdd", "fits wait");
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &fits).display(),
        d.volume("tiny", "victim").display()
    ));
    assert_errno(
        getxattr(&d.volume("tiny", "victim"), "user.backupfs.restore"),
        libc::ENODATA,
        "the note after a good restore",
    );
    let listed = std::fs::read_to_string(&restores).unwrap();
    assert!(
        listed
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("tiny victim restored ")),
        "{listed}"
    );
    drop(small_volume);
}

#[test]
fn a_restore_cut_off_by_a_crash_is_noted_incomplete_after_the_restart() {
    let mut sb = Sandbox::new("op-cutoff");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    // A restore in progress: a writer that wrote a piece and holds the volume open.
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(
            "import os,sys,time\n\
             fd=os.open(sys.argv[1], os.O_RDWR)\n\
             os.pwrite(fd, b'x' * 65536, 0)\n\
             open(sys.argv[2], 'w').close()\n\
             time.sleep(600)\n",
        )
        .arg(d.volume("ssd", "v"))
        .arg(sb.path("wrote"))
        .spawn()
        .unwrap();
    wait_for(|| sb.path("wrote").exists(), "the writer");
    assert!(
        std::fs::read_to_string(d.mnt.join("restores"))
            .unwrap()
            .contains("ssd v restoring 65536/0")
    );
    d.kill9();
    let _ = writer.kill();
    let _ = writer.wait();
    let d = sb.start_daemon(&l.config);
    let note = getxattr(&d.volume("ssd", "v"), "user.backupfs.restore").unwrap();
    let note = String::from_utf8_lossy(&note).into_owned();
    assert!(note.starts_with("incomplete: interrupted"), "{note}");
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("ssd", "v").display()
    ));
    assert_errno(
        getxattr(&d.volume("ssd", "v"), "user.backupfs.restore"),
        libc::ENODATA,
        "the note after a good restore",
    );
}

#[test]
fn metrics_pass_promtool_and_count_what_happened() {
    let mut sb = Sandbox::new("op-metrics");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    assert_eq!(d.request("hdd", "v wait"), None);
    ok(&format!(
        "echo {id} > '{}'",
        d.target("hdd").join("verify").display()
    ));
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("ssd", "copy").display()
    ));
    let file = d.mnt.join("metrics/backupfs.prom");
    // A restore ends when its file is released, a moment after cp returns.
    wait_for(
        || {
            std::fs::read_to_string(&file)
                .unwrap_or_default()
                .contains("backupfs_restores_total{result=\"restored\"} 1")
        },
        "the restore to be counted",
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let out = sh(&format!(
        "timeout 30 promtool check metrics < '{}'",
        file.display()
    ));
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "backupfs_backups{target=\"hdd\",status=\"available\"} 2",
        "backupfs_backups_completed_total{target=\"hdd\",result=\"available\"} 2",
        "backupfs_verifies_total{target=\"hdd\",result=\"good\"} 1",
        "backupfs_restores_total{result=\"restored\"} 1",
        "backupfs_restores_running 0",
        "backupfs_jobs{target=\"hdd\",kind=\"backup\",state=\"running\"} 0",
        "backupfs_damaged_backups{target=\"hdd\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    let last = text
        .lines()
        .find(|l| {
            l.starts_with("backupfs_last_success_timestamp_seconds{target=\"hdd\",volume_id=\"v\"}")
        })
        .unwrap_or_else(|| panic!("{text}"));
    let at: f64 = last.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - at).abs() < 600.0, "{last}");
}

/// The value of each sample line of `metrics/backupfs.prom` whose name and labels are
/// `key` (as written there), or None when it has no such line.
fn metric(d: &Daemon, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(d.mnt.join("metrics/backupfs.prom")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_failures_damage_and_failed_verifies_and_byte_gauges_follow_backups() {
    let mut sb = Sandbox::new("op-metrics-move");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "max_parallel_jobs = 1");
    for volume_id in ["a", "b", "gone"] {
        random_volume(&l.gold, volume_id, 2);
    }
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("started", &release));
    let m = |key: &str| metric(&d, key).unwrap_or_else(|| panic!("no {key}"));
    let (completed, stored, written, backups) = (
        "backupfs_backups_completed_total{target=\"hdd\",result=",
        "backupfs_stored_bytes{target=\"hdd\"}",
        "backupfs_written_bytes_total{target=\"hdd\"}",
        "backupfs_backups{target=\"hdd\",status=",
    );
    assert_eq!(m(stored), 0.0);
    assert_eq!(m(written), 0.0);

    // Two backups of 2 MiB, and one whose volume goes away while it is queued.
    let a = d.backup("hdd", "a");
    let b = d.backup("hdd", "b");
    let gone = d.backup("hdd", "gone");
    d.wait_state("hdd", &gone, "queued");
    std::fs::remove_file(l.gold.join("volume-gone")).unwrap();
    release_jobs(&release);
    for id in [&a, &b] {
        assert_eq!(d.wait_job("hdd", id), "available");
    }
    assert_eq!(d.wait_job("hdd", &gone), "error");
    assert_eq!(m(&format!("{completed}\"available\"}}")), 2.0);
    assert_eq!(m(&format!("{completed}\"error\"}}")), 1.0);
    assert_eq!(m(&format!("{backups}\"available\"}}")), 2.0);
    assert_eq!(m(&format!("{backups}\"error\"}}")), 1.0);
    assert_eq!(m(stored), (4 << 20) as f64);
    assert_eq!(m(written), (4 << 20) as f64);

    // a damaged, found by a verify; b's data gone behind the daemon's back: its verify
    // fails (neither good nor damaged).
    let a_data = stored_data(&l.backups, &d.image("hdd", &a));
    let b_data = stored_data(&l.backups, &d.image("hdd", &b));
    damage_bytes(&a_data, 4096, b"\xde\xad");
    let verify = d.target("hdd").join("verify");
    assert_eq!(write_errno(&verify, a.as_bytes()), Some(libc::EIO));
    std::fs::remove_file(&b_data).unwrap();
    assert!(
        write_errno(&verify, b.as_bytes()).is_some(),
        "verify of b fails"
    );
    let verifies = "backupfs_verifies_total{target=\"hdd\",result=";
    assert_eq!(m(&format!("{verifies}\"damaged\"}}")), 1.0);
    assert_eq!(m(&format!("{verifies}\"failed\"}}")), 1.0);
    assert_eq!(m(&format!("{verifies}\"good\"}}")), 0.0);
    assert_eq!(m("backupfs_damaged_backups{target=\"hdd\"}"), 1.0);

    // Deleting a backup takes its bytes off the gauge; the counter stays.
    std::fs::remove_file(d.image("hdd", &a)).unwrap();
    assert_eq!(m(stored), (2 << 20) as f64, "{}", d.log());
    assert_eq!(m(written), (4 << 20) as f64);
    assert_eq!(m(&format!("{backups}\"available\"}}")), 1.0);
    assert_eq!(m("backupfs_damaged_backups{target=\"hdd\"}"), 0.0);
    d.stop_clean();
}

#[test]
fn a_new_daemon_waits_for_the_state_lock_of_one_that_is_still_stopping() {
    let mut sb = Sandbox::new("op-relock");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    // Hold the state_dir lock as a stopping daemon would, for two seconds (the holder says
    // when it has it).
    let state = sb.path("state");
    let ready = sb.path("lock-held");
    sb.spawn_sh(&format!(
        "exec flock '{}/backupfs.lock' sh -c 'touch \"$0\"; sleep 2' '{}'",
        state.display(),
        ready.display()
    ));
    wait_for(|| ready.exists(), "the lock holder to hold the lock");
    let d = sb.start_daemon(&l.config);
    assert!(
        d.log().contains("waiting up to 10 s"),
        "said it waits: {}",
        d.log()
    );
}

#[test]
fn a_waiting_request_keeps_umount_busy_and_sigterm_stops_the_daemon_answering_ecanceled() {
    // Issue 23: `umount` of a mount with a `wait` writer fails "target is busy"; the
    // docs/troubleshooting.md says what stops backupfs then.
    let mut sb = Sandbox::new("op-umount-busy");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 4);
    let d = sb.start_daemon_env(&l.config, &hold_env("started"));
    let request = d.target("hdd").join("request");
    let answer = sb.path("answer");
    let writer = sb.spawn_sh(&format!(
        "echo 'v wait' > '{}' 2> '{}'; echo \"exit $?\" >> '{}'",
        request.display(),
        answer.display(),
        answer.display()
    ));
    wait_for(
        || d.jobs("hdd").lines().any(|l| l.contains(" v ")),
        "the job to be listed",
    );
    let umount = Command::new("umount").arg(&d.mnt).output().expect("umount");
    assert!(!umount.status.success(), "umount with a waiting writer");
    assert!(
        String::from_utf8_lossy(&umount.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&umount.stderr)
    );
    d.stop_clean();
    wait_for(
        || {
            std::fs::read_to_string(&answer)
                .unwrap_or_default()
                .contains("exit ")
        },
        "the waiting writer to be answered",
    );
    let text = std::fs::read_to_string(&answer).unwrap_or_default();
    assert!(text.contains("Operation canceled"), "{text}");
    assert!(text.contains("exit 1"), "{text}");
    sb.release(writer);
}
