//! Reliability: crashes at every step, full storage, bad input, corruption and
//! concurrency, with real processes and real storage.

mod common;

use common::*;
use std::path::Path;

/// After a crash and a restart: the interrupted backup is an `error` record with a
/// reason, has no image, no data and no snapshot left, and its source is unchanged.
fn assert_cleaned_up(d: &Daemon, l: &Layout, id: &str, source: &Path, before: &str) {
    let record = d.record("hdd", id);
    assert_eq!(record["status"], "error", "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("interrupted"),
        "{record}"
    );
    assert!(!d.image("hdd", id).exists());
    let pool = ok(&format!("ls -A '{}'", l.backups.display()));
    assert!(
        !pool.contains(&format!("backup-{id}.img")),
        "partial data left: {pool}"
    );
    assert!(!pool.contains(".tmp"), "temporary files left: {pool}");
    for dir in [&l.gold, &l.main] {
        let listing = ok(&format!("ls -A '{}'", dir.display()));
        assert!(
            !listing.contains("snapshot-backupfs"),
            "snapshot left: {listing}"
        );
    }
    assert_eq!(sha256(source), before, "the source must be untouched");
    let jobs = d.jobs("hdd");
    assert!(
        jobs.contains(&format!("{id} ")),
        "restarted jobs list the failure:\n{jobs}"
    );
}

fn wait_state(d: &Daemon, id: &str, state: &str) {
    wait_for(
        || {
            d.jobs("hdd")
                .lines()
                .any(|l| l.starts_with(id) && l.split(' ').nth(2) == Some(state))
        },
        state,
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
            "max_parallel_jobs = 1\ncopy_bps_limit = 4000000",
        );
        let earlier_source = random_volume(&l.gold, "earlier", 2);
        let source = random_volume(&l.gold, "victim", 16);
        let blocker = random_volume(&l.gold, "blocker", 64);
        let before = sha256(&source);
        // In-use, so every point has a snapshot to clean up.
        let holder = sb.hold_lock(&source);
        let env: Vec<(&str, &str)> = if point == "queued" {
            vec![]
        } else {
            vec![("BACKUPFS_TEST_PAUSE", point)]
        };
        let d = sb.start_daemon_env(&l.config, &env);
        let earlier = if point == "queued" {
            Some(d.backup("hdd", "earlier wait"))
        } else {
            None
        };
        if point == "queued" {
            // A slow job ahead keeps ours queued.
            let _ = d.backup("hdd", "blocker");
        }
        let id = d.backup("hdd", "victim");
        wait_state(&d, &id, point);
        if point != "queued" {
            wait_for(
                || d.log().contains(&format!("holding at {point}")),
                "the pause point",
            );
        }
        if point == "snapshotting" {
            assert!(l.gold.join(format!("snapshot-backupfs-{id}")).exists());
        }
        d.kill9();
        let d = sb.start_daemon(&l.config);
        assert_cleaned_up(&d, &l, &id, &source, &before);
        if let Some(earlier) = earlier {
            ok(&format!(
                "cmp '{}' '{}'",
                d.image("hdd", &earlier).display(),
                earlier_source.display()
            ));
        }
        let _ = sha256(&blocker);
        sb.release(holder);
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
    let mut writer = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "for i in $(seq 0 200); do dd if='{img}' of='{vol}' bs=1M skip=$i seek=$i count=1 conv=notrunc status=none; done",
            img = d.image("hdd", &id).display(),
            vol = d.volume("ssd", "target-vol").display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        || d.log().contains("restore into volume ended"),
        "the first pieces of the restore",
    );
    d.kill9();
    let _ = writer.kill();
    let _ = writer.wait();
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
    let (ssd, backups, config) = small_target(&mut sb, "hdd", 48);
    // Each fits alone; together they do not: the pool fills during the copies.
    random_volume(&ssd, "one", 30);
    random_volume(&ssd, "two", 30);
    random_volume(&ssd, "small", 2);
    let d = sb.start_daemon(&config);
    let results: Vec<Option<i32>> = std::thread::scope(|s| {
        let a = s.spawn(|| d.request("hdd", "one wait"));
        let b = s.spawn(|| d.request("hdd", "two wait"));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert!(results.contains(&Some(libc::ENOSPC)), "{results:?}");
    let listing = ok(&format!("ls '{}'", d.target("hdd").display()));
    let images = listing.lines().filter(|l| l.ends_with(".img")).count();
    assert_eq!(images, results.iter().filter(|r| r.is_none()).count());
    let pool = ok(&format!("ls -A '{}'", backups.display()));
    let data = pool.lines().filter(|l| l.starts_with("volume-")).count();
    assert_eq!(data, images, "no partial data: {pool}");
    // Deleting what was made frees space; a smaller backup then works.
    for img in listing.lines().filter(|l| l.ends_with(".img")) {
        ok(&format!("rm '{}/{img}'", d.target("hdd").display()));
    }
    assert_eq!(d.request("hdd", "small wait"), None);
}

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() as usize) % items.len()]
    }
}

#[test]
fn hundreds_of_malformed_requests_are_refused_and_change_nothing() {
    let mut sb = Sandbox::new("fuzz");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "real", 1);
    let d = sb.start_daemon(&l.config);
    let request = d.target("hdd").join("request");
    let mut lines: Vec<(Vec<u8>, i32)> = vec![
        (b"\n".to_vec(), libc::EINVAL),
        (b"   \n".to_vec(), libc::EINVAL),
        (vec![b'a'; 5000], libc::EINVAL),
        (vec![b'a'; 129], libc::EINVAL),
        (b"real\nreal\n".to_vec(), libc::EINVAL),
        (b"real name\n".to_vec(), libc::EINVAL),
        (b"real name=\n".to_vec(), libc::EINVAL),
        (b"real wait=1\n".to_vec(), libc::EINVAL),
        (b"\0\0\0".to_vec(), libc::EINVAL),
        ("r\u{e9}al\n".as_bytes().to_vec(), libc::EINVAL),
        ("\u{202e}real\n".as_bytes().to_vec(), libc::EINVAL),
        (b"no-such-volume\n".to_vec(), libc::ENOENT),
        (b"no-such-volume wait\n".to_vec(), libc::ENOENT),
    ];
    let mut rng = Lcg(0x5eed);
    let prefixes = ["", " ", "../", "/", ".", "-", "\t", "\u{ff}", "real/", "~"];
    let bodies = [
        "real",
        "x",
        "../etc/passwd",
        "a b",
        "vol\u{0}x",
        "..",
        "v\u{1b}[31m",
        "%s%n",
    ];
    let options = [
        "",
        " wait",
        " name=",
        " nam=x",
        " incremental",
        " wait wait",
        " \u{7f}",
        " name=a name=b",
    ];
    while lines.len() < 220 {
        let line = format!(
            "{}{}{}\n",
            rng.pick(&prefixes),
            rng.pick(&bodies),
            rng.pick(&options)
        );
        // Only lines the grammar refuses belong here; an unknown but well-formed id is ENOENT.
        let expected = match backupfs::engine::request::parse(line.as_bytes()) {
            Err(_) => libc::EINVAL,
            Ok(r) if r.volume_id == "real" => continue,
            Ok(_) => libc::ENOENT,
        };
        lines.push((line.into_bytes(), expected));
    }
    for (i, (line, expected)) in lines.iter().enumerate() {
        let mut bytes = line.clone();
        if i % 7 == 3 {
            bytes.extend_from_slice(&[0xc3, 0x28]);
        }
        let expected = if i % 7 == 3 { libc::EINVAL } else { *expected };
        assert_eq!(
            write_errno(&request, &bytes),
            Some(expected),
            "line {i}: {bytes:?}"
        );
    }
    // Bad names under volumes/ are refused too.
    for name in ["-x", ".x", "a b", "\u{e9}", "x\\y", &"n".repeat(200)] {
        let err = std::fs::File::create(d.volume("ssd", name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{name:?}");
    }
    let listing = ok(&format!("ls -A '{}'", d.target("hdd").display()));
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
        ["by-volume", "jobs", "request", "verify"]
    );
    assert_eq!(
        ok(&format!("ls -A '{}'", l.gold.display())).trim(),
        "volume-real"
    );
    // Still up and working.
    assert_eq!(d.request("hdd", "real wait"), None);
    let refusals = d.log().matches("refused").count();
    assert!(
        refusals >= lines.len(),
        "one log line per refusal: {refusals}"
    );
}

#[test]
fn damaged_backup_data_reads_as_eio_and_verify_names_the_blocks() {
    let mut sb = Sandbox::new("corrupt");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 8);
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
    let data = l.backups.join(format!("backup-{id}.img"));
    ok(&format!(
        "printf '\\xde\\xad' | dd of='{}' bs=1 seek=$((5*1048576+1234)) conv=notrunc status=none && sync && echo 3 > /proc/sys/vm/drop_caches",
        data.display()
    ));
    // A fresh daemon, so no block is known good yet.
    d.stop();
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
        data.display()
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
    assert!(d.log().contains("damaged"), "{}", d.log());
    // A restore of damaged data is refused rather than done silently.
    let out = sh(&format!(
        "cp '{}' '{}'",
        image.display(),
        d.volume("ssd", "restored").display()
    ));
    assert!(!out.status.success());
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
    let d = sb.start_daemon(&l.config);
    let seed_id = d.backup("hdd", "seed wait");
    let ids: Vec<String> = (0..8).map(|i| d.backup("hdd", &format!("c{i}"))).collect();
    let jobs = d.jobs("hdd");
    assert!(
        jobs.contains(" queued "),
        "with 2 workers, most of 8 wait:\n{jobs}"
    );
    std::thread::scope(|s| {
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
