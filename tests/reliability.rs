//! Reliability: crashes at every step, full storage, bad input, corruption and
//! concurrency, with real processes and real storage.

mod common;

use common::*;
use std::path::Path;

/// After a crash and a restart: the interrupted backup is an `error` record with a
/// reason, has no image, nothing of it is left in the target's pool but its record
/// (`stored`: what the pool held before it started), no snapshot is left, and its source
/// is unchanged.
#[track_caller]
fn assert_cleaned_up(d: &Daemon, l: &Layout, id: &str, stored: u64, source: &Path, before: &str) {
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
        files_mentioning(&l.backups, id),
        [record_file(&l.backups, id)],
        "partial data left"
    );
    assert!(
        allocated_under(&l.backups) < stored + (256 << 10),
        "partial data left: {} bytes allocated, {stored} before",
        allocated_under(&l.backups)
    );
    let volumes: Vec<String> = names_in(&l.gold)
        .into_iter()
        .filter(|n| !n.starts_with("volume-"))
        .collect();
    assert_eq!(volumes, Vec::<String>::new(), "snapshot left");
    assert_eq!(sha256(source), before, "the source must be untouched");
    let jobs = d.jobs("hdd");
    assert!(
        jobs.lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains(" error ")),
        "restarted jobs list the failure:\n{jobs}"
    );
}

#[test]
fn kill9_while_queued_snapshotting_and_finishing_leaves_nothing_half_made() {
    for point in ["queued", "snapshotting", "finishing"] {
        let mut sb = Sandbox::new(&format!("crash-{point}"));
        let l = layout(
            &mut sb,
            Some(Fs::Btrfs),
            Some(Fs::Xfs),
            "max_parallel_jobs = 1",
        );
        let earlier_source = random_volume(&l.gold, "earlier", 2);
        let source = random_volume(&l.gold, "victim", 16);
        let blocker_source = random_volume(&l.gold, "blocker", 4);
        let before = sha256(&source);
        let blocker_before = sha256(&blocker_source);
        // In-use, so every point has a snapshot to clean up.
        let holder = sb.hold_lock(&source);
        let release = sb.path("release");
        let hold_at = if point == "queued" {
            "finishing"
        } else {
            point
        };
        let d = sb.start_daemon_env(&l.config, &pause_env(hold_at, &release));
        // An earlier backup goes through (released), then jobs hold again.
        release_jobs(&release);
        let earlier = d.backup("hdd", "earlier wait");
        std::fs::remove_file(&release).unwrap();
        let stored = allocated_under(&l.backups);
        let blocker = (point == "queued").then(|| {
            // Held by the one worker: ours stays queued behind it.
            let blocker = d.backup("hdd", "blocker");
            d.wait_state("hdd", &blocker, "finishing");
            blocker
        });
        let id = d.backup("hdd", "victim");
        d.wait_state("hdd", &id, point);
        if point == "snapshotting" {
            // Held once the snapshot is made.
            wait_for(
                || d.log().contains("holding at snapshotting"),
                "the pause point",
            );
            assert_eq!(
                names_in(&l.gold).len(),
                4,
                "a snapshot beside the three volumes: {:?}",
                names_in(&l.gold)
            );
        }
        d.kill9();
        let d = sb.start_daemon(&l.config);
        assert_cleaned_up(&d, &l, &id, stored, &source, &before);
        if let Some(blocker) = blocker {
            assert_cleaned_up(&d, &l, &blocker, stored, &blocker_source, &blocker_before);
        }
        ok(&format!(
            "cmp '{}' '{}'",
            d.image("hdd", &earlier).display(),
            earlier_source.display()
        ));
        sb.release(holder);
        d.stop_clean();
    }
}

#[test]
fn kill9_during_a_restore_keeps_the_backup_and_allows_a_new_restore() {
    let mut sb = Sandbox::new("crash-restore");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Btrfs), "");
    let source = random_volume(&l.main, "src", 128);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "src wait");
    let image_sum = sha256(&d.image("hdd", &id));
    ok(&format!(
        "truncate -s 128M '{}/volume-target-vol'",
        l.gold.display()
    ));
    // A restore in progress: 1 MiB at a time into the volume node.
    let writer = sb.spawn_sh(&format!(
        "for i in $(seq 0 200); do dd if='{img}' of='{vol}' bs=1M skip=$i seek=$i count=1 conv=notrunc status=none; done",
        img = d.image("hdd", &id).display(),
        vol = d.volume("ssd", "target-vol").display()
    ));
    wait_for(
        || d.log().contains("restore into volume ended"),
        "the first pieces of the restore",
    );
    d.kill9();
    sb.release(writer);
    let d = sb.start_daemon(&l.config);
    assert_eq!(
        sha256(&d.image("hdd", &id)),
        image_sum,
        "the backup is intact"
    );
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("ssd", "target-vol").display()
    ));
    ok(&format!(
        "cmp '{}' '{}/volume-target-vol'",
        source.display(),
        l.gold.display()
    ));
}

#[test]
fn full_target_fails_the_waiting_write_with_enospc_and_leaves_nothing() {
    let mut sb = Sandbox::new("full");
    let (ssd, backups, config) = small_target_with(&mut sb, "hdd", 48, "max_parallel_jobs = 1");
    random_volume(&ssd, "blocker", 1);
    let one = random_volume(&ssd, "one", 30);
    random_volume(&ssd, "two", 30);
    random_volume(&ssd, "small", 2);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&config, &pause_env("started", &release));
    let empty = allocated_under(&backups);
    // Each fits alone; together they do not: the second is refused at the door, since
    // the first holds its share of the free space (issue 23), and nothing is recorded.
    let blocker = d.backup("hdd", "blocker");
    let one_id = d.backup("hdd", "one");
    assert_eq!(
        d.request("hdd", "two wait").map(errno_name),
        Some(errno_name(libc::ENOSPC))
    );
    assert!(!d.jobs("hdd").contains(" two "), "{}", d.jobs("hdd"));
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &blocker), "available");
    assert_eq!(d.wait_job("hdd", &one_id), "available");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &one_id).display(),
        one.display()
    ));
    for id in [&blocker, &one_id] {
        std::fs::remove_file(d.image("hdd", id)).unwrap();
    }
    // Accepted while it fits, then the filesystem fills (another writer of it) before
    // the copy: the copy fails mid-way with ENOSPC, deterministically.
    std::fs::remove_file(&release).unwrap();
    let two_result = std::thread::scope(|s| {
        let two = s.spawn(|| d.request("hdd", "two wait"));
        wait_for(
            || d.jobs("hdd").lines().any(|l| l.contains(" two ")),
            "the second request to be accepted",
        );
        let filler = backups.parent().unwrap().join("filler");
        let _ = sh(&format!(
            "dd if=/dev/zero of='{}' bs=1M status=none; sync",
            filler.display()
        ));
        release_jobs(&release);
        let result = two.join().unwrap();
        std::fs::remove_file(&filler).unwrap();
        result
    });
    assert_eq!(two_result.map(errno_name), Some(errno_name(libc::ENOSPC)));
    let two_id = d
        .jobs("hdd")
        .lines()
        .find(|l| l.contains(" two "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_string();
    // The failure happened during the copy, not at the door: a record says so.
    let record = d.record("hdd", &two_id);
    assert_eq!(record["status"], "error", "{record}");
    let reason = record["error"].as_str().unwrap_or("");
    assert!(
        reason.to_lowercase().contains("no space"),
        "the record names the reason: {record}"
    );
    assert!(
        d.jobs("hdd")
            .lines()
            .any(|l| l.starts_with(&format!("{two_id} two error ")) && l.contains(reason)),
        "{}",
        d.jobs("hdd")
    );
    assert_errno(
        std::fs::metadata(d.image("hdd", &two_id)),
        libc::ENOENT,
        "the image of a failed backup",
    );
    assert!(d.log().contains(&two_id), "{}", d.log());
    // Nothing of the failed copy is left: only its record mentions it, and the pool
    // holds no more than records.
    assert_eq!(
        files_mentioning(&backups, &two_id),
        [record_file(&backups, &two_id)]
    );
    assert!(
        allocated_under(&backups) < empty + (256 << 10),
        "{} bytes allocated, {empty} when empty",
        allocated_under(&backups)
    );
    // A smaller backup then works.
    assert_eq!(d.request("hdd", "small wait"), None);
}

/// The manual's rule (docs/operating.md, "names"), written down here: "1 to 128 characters of ASCII letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit".
fn readme_volume_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[test]
fn hundreds_of_malformed_requests_are_refused_and_change_nothing() {
    let mut sb = Sandbox::new("fuzz");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "real", 1);
    let d = sb.start_daemon(&l.config);
    let request = d.target("hdd").join("request");
    let long_label = format!("real name={}\n", "n".repeat(256));
    let mut lines: Vec<(Vec<u8>, i32)> = vec![
        (b"\n".to_vec(), libc::EINVAL),
        (b"   \n".to_vec(), libc::EINVAL),
        (vec![b'a'; 5000], libc::EINVAL),
        (vec![b'a'; 129], libc::EINVAL),
        (b"real\nreal\n".to_vec(), libc::EINVAL),
        (b"real name\n".to_vec(), libc::EINVAL),
        (b"real name=\n".to_vec(), libc::EINVAL),
        (long_label.into_bytes(), libc::EINVAL),
        (b"real wait=1\n".to_vec(), libc::EINVAL),
        (b"real WAIT\n".to_vec(), libc::EINVAL),
        (b"real incremental incremental\n".to_vec(), libc::EINVAL),
        (b"real wait wait\n".to_vec(), libc::EINVAL),
        (b"real name=a name=b\n".to_vec(), libc::EINVAL),
        (b"\0\0\0".to_vec(), libc::EINVAL),
        (b"re\0al\n".to_vec(), libc::EINVAL),
        (b"\treal\n".to_vec(), libc::EINVAL),
        (b"_real\n".to_vec(), libc::EINVAL),
        (b"-real\n".to_vec(), libc::EINVAL),
        (b".real\n".to_vec(), libc::EINVAL),
        (b"re/al\n".to_vec(), libc::EINVAL),
        ("r\u{e9}al\n".as_bytes().to_vec(), libc::EINVAL),
        ("\u{202e}real\n".as_bytes().to_vec(), libc::EINVAL),
        (b"\xff\xfe\n".to_vec(), libc::EINVAL),
        (b"no-such-volume\n".to_vec(), libc::ENOENT),
        (b"no-such-volume wait\n".to_vec(), libc::ENOENT),
        (b"no-such-volume name=x wait\n".to_vec(), libc::ENOENT),
        (b"No_Such.Volume-1\n".to_vec(), libc::ENOENT),
        (vec![b'a'; 128], libc::ENOENT),
        (
            format!("9real name={}\n", "n".repeat(255)).into_bytes(),
            libc::ENOENT,
        ),
    ];
    // Random lines from pieces whose effect the manual states: the volume ID part is
    // judged by the manual's rule above, each option piece says whether it is valid.
    let prefixes = [
        "", "", "a", "a", "9", "Vol_", "../", "/", ".", "-", "_", "\t", "\u{ff}", "real/", "~",
    ];
    let bodies = [
        "real",
        "x",
        "vol-1.b_c",
        "../etc/passwd",
        "..",
        "v\u{0}x",
        "v\u{1b}[31m",
        "%s%n",
        "a\\b",
    ];
    let options: [(&str, bool); 12] = [
        ("", true),
        (" wait", true),
        (" name=x", true),
        (" wait name=nightly", true),
        (" name=", false),
        (" nam=x", false),
        (" incremental incremental", false),
        (" wait wait", false),
        (" \u{7f}", false),
        (" name=a name=b", false),
        (" WAIT", false),
        (" b", false),
    ];
    let mut rng = Lcg(0x5eed);
    while lines.len() < 250 {
        let (prefix, body) = (*rng.pick(&prefixes), *rng.pick(&bodies));
        let &(option, option_valid) = rng.pick(&options);
        let volume_id = format!("{prefix}{body}");
        let expected = if !(readme_volume_id(&volume_id) && option_valid) {
            libc::EINVAL
        } else if volume_id == "real" {
            continue; // a valid request for a real volume: it would start a backup
        } else {
            libc::ENOENT
        };
        lines.push((format!("{volume_id}{option}\n").into_bytes(), expected));
    }
    let count = |errno| lines.iter().filter(|(_, e)| *e == errno).count();
    assert!(
        count(libc::EINVAL) > 100 && count(libc::ENOENT) > 15,
        "EINVAL {}, ENOENT {}",
        count(libc::EINVAL),
        count(libc::ENOENT)
    );
    for (i, (line, expected)) in lines.iter().enumerate() {
        let mut bytes = line.clone();
        // A second line that is not even UTF-8: malformed whatever came before.
        if i % 7 == 3 {
            bytes.extend_from_slice(&[0xc3, 0x28]);
        }
        let expected = if i % 7 == 3 { libc::EINVAL } else { *expected };
        assert_eq!(
            write_errno(&request, &bytes).map(errno_name),
            Some(errno_name(expected)),
            "line {i}: {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    // Bad names under volumes/ are refused too.
    for name in ["-x", ".x", "a b", "\u{e9}", "x\\y", &"n".repeat(200)] {
        assert_errno(
            std::fs::File::create(d.volume("ssd", name)),
            libc::EINVAL,
            &format!("{name:?}"),
        );
    }
    assert_eq!(
        names_in(&d.target("hdd")),
        ["by-volume", "jobs", "request", "verify"]
    );
    assert_eq!(names_in(&l.gold), ["volume-real"]);
    // Still up and working.
    assert_eq!(d.request("hdd", "real wait"), None);
    let refusals = d.log().matches("refused").count();
    assert!(
        refusals >= lines.len(),
        "one log line per refusal: {refusals}"
    );
}

#[test]
fn damaged_backup_data_reads_as_eio_is_never_restored_and_verify_names_the_blocks() {
    let mut sb = Sandbox::new("corrupt");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "v", 8);
    random_volume(&l.gold, "old", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let verify = d.target("hdd").join("verify");
    let answer = ok(&format!(
        "exec 3<>'{}'; echo {id} >&3; cat <&3",
        verify.display()
    ));
    assert_eq!(answer.trim(), format!("ok {id}"));
    assert!(d.record("hdd", &id)["verified_at"].is_string());
    // Flip bytes in block 5 of the stored data, behind the daemon's back.
    let data = stored_data(&l.backups, &d.image("hdd", &id));
    d.stop_clean();
    ok(&format!(
        "printf '\\xde\\xad' | dd of='{}' bs=1 seek=$((5*1048576+1234)) conv=notrunc status=none && sync",
        data.display()
    ));
    let damaged_block = sb.path("damaged-block");
    ok(&format!(
        "dd if='{}' of='{}' bs=1M skip=5 count=1 status=none",
        data.display(),
        damaged_block.display()
    ));
    // A fresh daemon, so no block is known good yet.
    let d = sb.start_daemon(&l.config);
    let image = d.image("hdd", &id);
    let out = sh(&format!("cat '{}' > /dev/null", image.display()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{out:?}"
    );
    // The blocks before the damage still read.
    ok(&format!(
        "dd if='{}' bs=1M count=5 status=none | cmp - <(head -c 5M '{}')",
        image.display(),
        source.display()
    ));
    assert_eq!(
        write_errno(&verify, format!("{id}\n").as_bytes()),
        Some(libc::EIO)
    );
    let answer = ok(&format!(
        "exec 3<>'{}'; echo {id} >&3 2>/dev/null; cat <&3",
        verify.display()
    ));
    assert_eq!(answer.trim(), format!("damaged {id} 5"));
    assert_eq!(
        d.record("hdd", &id)["damaged_blocks"],
        serde_json::json!([5])
    );
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains(&id) && l.contains("damaged")),
        "{}",
        d.log()
    );
    // A restore of damaged data fails rather than writing it: by cp (the daemon's own
    // copy), into a new volume and over an existing one, and by dd (reads).
    for (volume_id, how) in [
        ("restored", "cp"),
        ("old", "cp"),
        ("old", "dd bs=1M conv=notrunc"),
    ] {
        let node = d.volume("ssd", volume_id);
        let out = if how == "cp" {
            sh(&format!("cp '{}' '{}'", image.display(), node.display()))
        } else {
            sh(&format!(
                "{how} if='{}' of='{}' status=none",
                image.display(),
                node.display()
            ))
        };
        assert!(!out.status.success(), "{how} into {volume_id}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
            "{how} into {volume_id}: {out:?}"
        );
        let volume = l.gold.join(format!("volume-{volume_id}"));
        let block5 = sh(&format!(
            "dd if='{}' bs=1M skip=5 count=1 status=none | cmp -s - '{}'",
            volume.display(),
            damaged_block.display()
        ));
        assert_eq!(
            block5.status.code(),
            Some(1),
            "{how} into {volume_id}: the damaged block must not reach the volume"
        );
    }
    assert_eq!(
        d.record("hdd", &id)["status"],
        "available",
        "a damaged backup is still listed, for the operator to decide"
    );
}

#[test]
fn many_backups_restores_and_readers_at_once_are_byte_exact() {
    let mut sb = Sandbox::new("concurrent");
    let l = layout(
        &mut sb,
        Some(Fs::Xfs),
        Some(Fs::Btrfs),
        "max_parallel_jobs = 2",
    );
    let sources: Vec<_> = (0..8)
        .map(|i| random_volume(&l.gold, &format!("c{i}"), 12))
        .collect();
    let seed = random_volume(&l.main, "seed", 16);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("finishing", &release));
    release_jobs(&release);
    let seed_id = d.backup("hdd", "seed wait");
    std::fs::remove_file(&release).unwrap();
    let ids: Vec<String> = (0..8).map(|i| d.backup("hdd", &format!("c{i}"))).collect();
    // Two workers, each holding a job: the other six wait.
    wait_for(
        || d.jobs("hdd").matches(" finishing ").count() == 2,
        "two jobs running",
    );
    let jobs = d.jobs("hdd");
    assert_eq!(jobs.matches(" queued ").count(), 6, "jobs:\n{jobs}");
    std::thread::scope(|s| {
        s.spawn(|| release_jobs(&release));
        for r in 0..4 {
            let (d, seed_id) = (&d, &seed_id);
            s.spawn(move || {
                ok(&format!(
                    "cp --sparse=always '{}' '{}'",
                    d.image("hdd", seed_id).display(),
                    d.volume("ssd", &format!("r{r}")).display()
                ));
            });
        }
        for _ in 0..3 {
            let (d, seed_id, seed) = (&d, &seed_id, &seed);
            s.spawn(move || {
                ok(&format!(
                    "cmp '{}' '{}'",
                    d.image("hdd", seed_id).display(),
                    seed.display()
                ));
            });
        }
    });
    for (id, source) in ids.iter().zip(&sources) {
        assert_eq!(d.wait_job("hdd", id), "available");
        ok(&format!(
            "cmp '{}' '{}'",
            d.image("hdd", id).display(),
            source.display()
        ));
    }
    for r in 0..4 {
        ok(&format!(
            "cmp '{}' '{}/volume-r{r}'",
            seed.display(),
            l.gold.display()
        ));
    }
}
