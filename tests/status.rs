//! `backupfs status` and `backupfs wait` against a real daemon on a real mount (and, for
//! what the daemon does not serve yet, a directory laid out like one). Jobs are held with
//! the daemon's pause hook, so every state a test looks at lasts until the test lets go.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(60);

fn status(mnt: &Path) -> Output {
    run_timeout(
        Command::new(BIN).arg("status").arg("--mount").arg(mnt),
        RUN_LIMIT,
    )
}

/// The plain lines of a `status` that must succeed.
#[track_caller]
fn status_lines(mnt: &Path) -> Vec<String> {
    let out = status(mnt);
    assert_eq!(out.status.code(), Some(0), "status: {out:?}");
    assert!(out.stderr.is_empty(), "status: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The lines that start with `prefix`, each split into its fields.
fn lines_of<'a>(lines: &'a [String], prefix: &str) -> Vec<Vec<&'a str>> {
    lines
        .iter()
        .filter(|l| l.split(' ').next() == Some(prefix))
        .map(|l| l.split(' ').collect())
        .collect()
}

fn wait_command(mnt: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("wait").arg("--mount").arg(mnt).args(args);
    command
}

fn wait(mnt: &Path, args: &[&str]) -> Output {
    run_timeout(&mut wait_command(mnt, args), RUN_LIMIT)
}

/// A `backupfs wait` left running; the sandbox kills it on failure (its command line
/// names the sandbox's mount).
fn spawn_wait(mnt: &Path, backup_id: &str) -> Child {
    wait_command(mnt, &[backup_id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backupfs wait starts")
}

/// Waits (bounded) for a spawned `wait` to exit; its output.
#[track_caller]
fn finished(mut child: Child) -> Output {
    wait_for(
        || matches!(child.try_wait(), Ok(Some(_))),
        "backupfs wait to exit",
    );
    child.wait_with_output().expect("output of backupfs wait")
}

#[track_caller]
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: {out:?}");
}

#[test]
fn status_lists_queued_running_and_ended_jobs_the_newest_backup_per_volume_and_damaged_ones() {
    let mut sb = Sandbox::new("status");
    let l = layout(&mut sb, None, None, "max_parallel_jobs = 1");
    for volume_id in ["vol-a", "vol-b", "vol-d", "vol-e"] {
        random_volume(&l.gold, volume_id, 2);
    }
    random_volume(&l.gold, "vol-c", 3);

    // Ended jobs: a available, b failed (its volume went away while it was queued), c
    // available and then found damaged by a verify.
    let release = sb.path("release-1");
    let d = sb.start_daemon_env(&l.config, &pause_env("started", &release));
    let a = d.backup("hdd", "vol-a");
    let b = d.backup("hdd", "vol-b");
    d.wait_state("hdd", &b, "queued");
    std::fs::remove_file(l.gold.join("volume-vol-b")).expect("remove vol-b");
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &a), "available");
    assert_eq!(d.wait_job("hdd", &b), "error");
    let b_error = d.record("hdd", &b)["error"]
        .as_str()
        .expect("a failed backup's record has an error")
        .to_string();
    let c = d.backup("hdd", "vol-c wait");
    let stored = stored_data(&l.backups, &d.image("hdd", &c));
    damage_bytes(&stored, (1 << 20) + 99, b"\xde\xad");
    assert_eq!(
        write_errno(&d.target("hdd").join("verify"), format!("{c}\n").as_bytes()),
        Some(libc::EIO),
        "a verify of the damaged backup"
    );
    assert_eq!(
        d.record("hdd", &c)["damaged_blocks"],
        serde_json::json!([1])
    );
    d.stop_clean();

    // Running and queued jobs: d holds while finishing, e and a verify of a wait behind it.
    let release = sb.path("release-2");
    let d2 = sb.start_daemon_env(&l.config, &pause_env("finishing", &release));
    let d_id = d2.backup("hdd", "vol-d");
    d2.wait_state("hdd", &d_id, "finishing");
    let e = d2.backup("hdd", "vol-e");
    let verify = d2.target("hdd").join("verify");
    sb.spawn_sh(&format!("echo {a} > '{}'", verify.display()));
    wait_for(
        || {
            d2.jobs("hdd")
                .lines()
                .any(|l| l.starts_with(&format!("{a} vol-a verify-queued ")))
        },
        "the verify to be queued",
    );

    let lines = status_lines(&d2.mnt);
    assert_eq!(lines[0], "target hdd", "{lines:#?}");
    let jobs = lines_of(&lines, "job");
    let size = (2u64 << 20).to_string();
    let fields: Vec<Vec<&str>> = jobs.iter().map(|j| j[..7].to_vec()).collect();
    assert_eq!(
        fields,
        [
            ["job", "hdd", &d_id, "vol-d", "finishing", &size, &size],
            ["job", "hdd", &e, "vol-e", "queued", "0", &size],
            ["job", "hdd", &a, "vol-a", "verify-queued", "0", &size],
        ],
        "{lines:#?}"
    );
    // Held, it moves no byte: no rate and no ETA; nor have queued jobs.
    assert_eq!(jobs[0][7..], ["-", "-"], "{lines:#?}");
    assert_eq!(jobs[1][7..], ["-", "-"], "{lines:#?}");

    let ended = lines_of(&lines, "ended");
    let ended_ids: Vec<(&str, &str)> = ended.iter().map(|f| (f[2], f[4])).collect();
    assert_eq!(
        ended_ids,
        [
            (a.as_str(), "available"),
            (b.as_str(), "error"),
            (c.as_str(), "available")
        ],
        "newest last: {lines:#?}"
    );
    let completed = d2.record("hdd", &b)["completed_at"]
        .as_str()
        .expect("completed_at")
        .to_string();
    let b_line = lines
        .iter()
        .find(|l| l.starts_with(&format!("ended hdd {b} ")))
        .expect("b's ended line");
    assert_eq!(
        *b_line,
        format!("ended hdd {b} vol-b error {completed} {b_error}"),
        "the error text of a failed job"
    );

    let latest = lines_of(&lines, "latest");
    let newest: Vec<(&str, &str)> = latest.iter().map(|f| (f[2], f[3])).collect();
    assert_eq!(
        newest,
        [
            ("vol-a", a.as_str()),
            ("vol-b", "-"),
            ("vol-c", "-"),
            ("vol-d", "-"),
            ("vol-e", "-")
        ],
        "a damaged backup is nobody's newest: {lines:#?}"
    );
    let a_latest = &latest[0];
    assert_eq!(
        a_latest[4],
        d2.record("hdd", &a)["completed_at"].as_str().unwrap()
    );
    let age: u64 = a_latest[5].parse().expect("an age in seconds");
    assert!(age < 3600, "{lines:#?}");

    let verified_at = d2.record("hdd", &c)["verified_at"]
        .as_str()
        .expect("verified_at")
        .to_string();
    assert_eq!(
        lines_of(&lines, "damaged"),
        [["damaged", "hdd", &c, "vol-c", "1", &verified_at]],
        "{lines:#?}"
    );
    assert!(
        lines_of(&lines, "restore").is_empty(),
        "no restores file, no restore lines: {lines:#?}"
    );

    // Once let go, the held jobs end and are listed as ended.
    release_jobs(&release);
    assert_eq!(d2.wait_job("hdd", &d_id), "available");
    assert_eq!(d2.wait_job("hdd", &e), "available");
    wait_for(
        || !d2.jobs("hdd").contains("verif"),
        "the verify of a to end",
    );
    let lines = status_lines(&d2.mnt);
    assert!(lines_of(&lines, "job").is_empty(), "{lines:#?}");
    let ended: Vec<&str> = lines_of(&lines, "ended").iter().map(|f| f[2]).collect();
    assert_eq!(
        ended,
        [&a, &b, &c, &d_id, &e],
        "the last five, newest last: {lines:#?}"
    );
    d2.stop_clean();
}

#[test]
fn status_of_a_copying_job_shows_its_rate_and_eta_and_watch_redraws() {
    let mut sb = Sandbox::new("status-rate");
    // 128 MiB at 6 MB/s: the copy runs for 22 s, far longer than this test looks at it
    // (the stop at the end cancels it).
    let l = layout(&mut sb, None, None, "copy_bps_limit = 6000000");
    random_volume(&l.gold, "vol-a", 128);
    let d = sb.start_daemon(&l.config);
    let a = d.backup("hdd", "vol-a");
    wait_for(
        || {
            d.jobs("hdd").lines().any(|l| {
                l.starts_with(&format!("{a} vol-a copying ")) && !l.contains(" copying 0/")
            })
        },
        "the copy to be under way",
    );
    let lines = status_lines(&d.mnt);
    let job = &lines_of(&lines, "job")[0];
    assert_eq!(
        job[..5],
        ["job", "hdd", &a, "vol-a", "copying"],
        "{lines:#?}"
    );
    let rate: u64 = job[7].parse().expect("a rate in bytes/s");
    let eta: u64 = job[8].parse().expect("an ETA in seconds");
    assert!(
        (1..=24_000_000).contains(&rate),
        "a rate near the 6 MB/s limit: {rate}"
    );
    assert!(eta >= 1, "{eta}");

    // --watch, not on a terminal: a block of plain lines a second, each ended by an empty line.
    let mut watch = Command::new(BIN)
        .arg("status")
        .arg("--watch")
        .arg("--mount")
        .arg(&d.mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("status --watch starts");
    let stdout = watch.stdout.take().expect("stdout");
    let mut blocks = vec![Vec::new()];
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line of status --watch");
        if line.is_empty() {
            if blocks.len() == 3 {
                break;
            }
            blocks.push(Vec::new());
        } else if let Some(block) = blocks.last_mut() {
            block.push(line);
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(blocks.len(), 3, "{blocks:#?}");
    for block in &blocks {
        assert_eq!(block[0], "target hdd", "{blocks:#?}");
        assert!(
            block
                .iter()
                .any(|l| l.starts_with(&format!("job hdd {a} vol-a "))),
            "{blocks:#?}"
        );
    }
    // From the second frame on, the rate comes from the progress since the first.
    let second = lines_of(&blocks[1], "job");
    assert!(
        second[0][7].parse::<u64>().is_ok_and(|r| r > 0),
        "{blocks:#?}"
    );
    d.stop_clean();
}

#[test]
fn wait_exits_0_when_available_1_with_the_reason_when_failed_and_2_3_4_otherwise() {
    let mut sb = Sandbox::new("wait-cmd");
    let l = layout(&mut sb, None, None, "max_parallel_jobs = 1");
    random_volume(&l.gold, "vol-a", 2);
    random_volume(&l.gold, "vol-b", 2);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("started", &release));
    let a = d.backup("hdd", "vol-a");
    let b = d.backup("hdd", "vol-b");
    d.wait_state("hdd", &b, "queued");
    let wait_a = spawn_wait(&d.mnt, &a);
    let wait_b = spawn_wait(&d.mnt, &b);

    // While the jobs are held: a timeout, an unknown id, malformed ids.
    let out = wait(&d.mnt, &["--timeout", "1", &a]);
    assert_exit(&out, 4, "wait --timeout 1 for a held job");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out") && stderr.contains(&a),
        "{stderr}"
    );
    let unknown = "0c9e4a8e-5f7b-4d3a-9c1e-2b6f8d0a7e31";
    let out = wait(&d.mnt, &[unknown]);
    assert_exit(&out, 3, "wait for an unknown backup");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(unknown),
        "{out:?}"
    );
    for malformed in ["not-an-id", &a.to_uppercase(), "../../etc/passwd", ""] {
        let out = wait(&d.mnt, &[malformed]);
        assert_exit(&out, 2, &format!("wait {malformed:?}"));
        assert!(!out.stderr.is_empty());
    }

    // The volume of the queued job goes away; then the jobs may go on.
    std::fs::remove_file(l.gold.join("volume-vol-b")).expect("remove vol-b");
    release_jobs(&release);
    let out = finished(wait_a);
    assert_exit(&out, 0, "wait for a backup that becomes available");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{a} available\n")
    );
    assert_eq!(d.record("hdd", &a)["status"], "available");

    let out = finished(wait_b);
    assert_exit(&out, 1, "wait for a backup that fails");
    let reason = d.record("hdd", &b)["error"]
        .as_str()
        .expect("the record's error")
        .to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        format!("backupfs wait: backup {b} of vol-b failed: {reason}\n")
    );
    assert!(out.stdout.is_empty());

    // Ended jobs answer at once.
    assert_exit(&wait(&d.mnt, &[&a]), 0, "wait for an available backup");
    assert_exit(&wait(&d.mnt, &[&b]), 1, "wait for a failed backup");
    d.stop_clean();
}

#[test]
fn wait_exits_1_for_a_damaged_backup_and_3_for_one_deleted_while_waiting() {
    let mut sb = Sandbox::new("wait-damaged-deleted");
    let l = layout(&mut sb, None, None, "");
    random_volume(&l.gold, "vol-a", 3);
    random_volume(&l.gold, "vol-b", 2);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("started", &release));

    // Held: `wait` sees it pending, and is stopped (SIGSTOP) so that it cannot see the
    // backup end; meanwhile it becomes available and is deleted.
    let b = d.backup("hdd", "vol-b");
    let waiting = spawn_wait(&d.mnt, &b);
    wait_for(
        || d.log().contains("holding at started"),
        "the job to be held",
    );
    std::thread::sleep(Duration::from_millis(600));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(waiting.id() as i32, libc::SIGSTOP) };
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &b), "available");
    std::fs::remove_file(d.image("hdd", &b)).expect("rm the image");
    // SAFETY: as above.
    unsafe { libc::kill(waiting.id() as i32, libc::SIGCONT) };
    let out = finished(waiting);
    assert_exit(&out, 3, "wait for a backup deleted while waiting");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deleted while waiting"),
        "{out:?}"
    );

    // Available, then found damaged by a verify.
    let a = d.backup("hdd", "vol-a wait");
    assert_exit(&wait(&d.mnt, &[&a]), 0, "wait for a good backup");
    let stored = stored_data(&l.backups, &d.image("hdd", &a));
    damage_bytes(&stored, (1 << 20) + 99, b"\xde\xad");
    assert_eq!(
        write_errno(&d.target("hdd").join("verify"), format!("{a}\n").as_bytes()),
        Some(libc::EIO),
        "a verify of the damaged backup"
    );
    let out = wait(&d.mnt, &[&a]);
    assert_exit(&out, 1, "wait for a damaged backup");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("backupfs wait: backup {a} of vol-a is damaged: a verify found blocks 1 bad\n")
    );
    d.stop_clean();
}

#[test]
fn status_and_wait_on_what_is_not_a_live_backupfs_mount_exit_1_with_one_line() {
    let mut sb = Sandbox::new("status-nomount");
    let plain = sb.mkdir("plain");
    let file = sb.path("file");
    std::fs::write(&file, b"").expect("a file");
    for (path, says) in [
        (plain.clone(), "is not a backupfs mount"),
        (sb.path("missing"), "no such directory"),
        (file, "is not a backupfs mount"),
    ] {
        let out = status(&path);
        assert_exit(&out, 1, &format!("status of {}", path.display()));
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("backupfs status: ") && stderr.contains(says),
            "{stderr}"
        );
        let out = wait(&path, &["0c9e4a8e-5f7b-4d3a-9c1e-2b6f8d0a7e31"]);
        assert_exit(&out, 1, &format!("wait on {}", path.display()));
    }

    // The mount of a daemon that died: a stale mount (ENOTCONN), said so.
    let l = layout(&mut sb, None, None, "");
    let d = sb.start_daemon(&l.config);
    let mnt = d.mnt.clone();
    assert_exit(&status(&mnt), 0, "status of the live mount");
    d.crash();
    let out = status(&mnt);
    assert_exit(&out, 1, "status of a stale mount");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("daemon behind this mount is gone") && stderr.contains("umount -l"),
        "{stderr}"
    );
}

#[test]
fn restores_are_listed_from_a_tree_laid_out_like_a_mount_and_malformed_lines_skipped() {
    let sb = Sandbox::new("status-tree");
    let mnt = sb.mkdir("tree");
    let target = mnt.join("backups/hdd");
    std::fs::create_dir_all(&target).expect("backups/hdd");
    std::fs::create_dir_all(mnt.join("volumes/ssd")).expect("volumes/ssd");
    let (a, b) = (
        "11111111-1111-4111-8111-111111111111",
        "22222222-2222-4222-8222-222222222222",
    );
    std::fs::write(
        target.join("jobs"),
        format!(
            "{a} vol-a copying 1048576/4194304\n\
             garbage\n\
             {b} vol-b queued 1/x\n\
             \n\
             {b} vol-b error 0/10 no volume vol-b (ENOENT)\n"
        ),
    )
    .expect("jobs");
    std::fs::write(
        target.join(format!("{b}.json")),
        // No error in it: the one its line in jobs gives.
        format!(r#"{{"id":"{b}","volume_id":"vol-b","status":"error"}}"#),
    )
    .expect("record");
    std::fs::write(target.join(format!("{a}.json")), "{ not json").expect("record");
    // A record whose id is not its name, and one that is not a backup's.
    std::fs::write(
        target.join("33333333-3333-4333-8333-333333333333.json"),
        format!(r#"{{"id":"{a}","volume_id":"vol-a","status":"available"}}"#),
    )
    .expect("record");
    std::fs::write(target.join("notes.json"), "{}").expect("a file");

    let lines = status_lines(&mnt);
    assert_eq!(
        lines,
        [
            "target hdd".to_string(),
            // It moved no byte while status looked: no rate, no ETA.
            format!("job hdd {a} vol-a copying 1048576 4194304 - -"),
            format!("ended hdd {b} vol-b error - no volume vol-b (ENOENT)"),
            "latest hdd vol-b - - -".to_string(),
        ],
        "no restores file: no restores section"
    );

    std::fs::write(
        mnt.join("restores"),
        "ssd vol-x restoring 1048576/4194304\n\
         ssd vol-y restored 4194304/4194304\n\
         ssd vol-z failed 1048576/0 No space left on device (ENOSPC): vol-z is incomplete\n\
         ssd vol-w restoring\n\
         \x01 \x02 restoring 1/2\n",
    )
    .expect("restores");
    let lines = status_lines(&mnt);
    assert_eq!(
        lines_of(&lines, "restore")
            .iter()
            .map(|f| f.join(" "))
            .collect::<Vec<_>>(),
        [
            "restore ssd vol-x restoring 1048576 4194304 - -",
            "restore ssd vol-y restored 4194304 4194304 - -",
            "restore ssd vol-z failed 1048576 0 - - No space left on device (ENOSPC): vol-z is incomplete",
        ]
    );

    // On a terminal: sections, a progress bar, no wider than the terminal.
    let out = ok(&format!(
        "script -qec \"stty rows 40 cols 72; '{BIN}' status --mount '{}'\" /dev/null",
        mnt.display()
    ));
    assert!(out.contains("target hdd"), "{out}");
    assert!(out.contains("restores"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("ssd/vol-x") && l.contains('[') && l.contains("25%")),
        "{out}"
    );
    assert!(out.contains("no volume vol-b (ENOENT)"), "{out}");
    assert!(
        out.lines()
            .all(|l| l.trim_end_matches('\r').chars().count() <= 72),
        "{out}"
    );
}
