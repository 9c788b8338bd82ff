//! Trust first (issue 10): backupfs never destroys what it did not make, never hands out
//! data it has not checked, and never lets one client's slow request hold back another's.
//! Each test reproduces a defect found on an earlier main, with real storage and tools.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = ".backupfs-target";

/// `backupfs check-config`: (exit code, stdout + stderr).
fn check_config(config: &Path) -> (i32, String) {
    let out = run_timeout(
        Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(config),
        Duration::from_secs(30),
    );
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `backupfs mount` that is expected to refuse to start: (exit code, its log).
fn mount_refused(sb: &Sandbox, config: &Path) -> (i32, String) {
    let mnt = sb.mkdir("mnt-refused");
    let out = run_timeout(
        Command::new(BIN)
            .arg("mount")
            .arg(&mnt)
            .arg("--config")
            .arg(config),
        Duration::from_secs(30),
    );
    assert!(
        !is_fuse_mount(&mnt),
        "a refused start must not leave a mount"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A backend `hdd` with two volume pools `main` and `other` and a target `hdd` on `pool`
/// (one of them, by mistake, or a third pool `backups`).
fn two_pool_config(sb: &Sandbox, target_pool: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let main = sb.mkdir("hdd/main");
    let other = sb.mkdir("hdd/other");
    let backups = sb.mkdir("hdd/backups");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ main = \"{}\", other = \"{}\", backups = \"{}\" }}\n\
         [targets.hdd]\nbackend = \"hdd\"\npool = \"{target_pool}\"\n",
        sb.path("state").display(),
        main.display(),
        other.display(),
        backups.display(),
    ));
    (main, other, backups, config)
}

const CINDER_VOLUME: &str = "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc";

#[test]
fn a_target_on_a_pool_holding_a_cinder_volume_is_refused_and_the_volume_survives() {
    let sb = Sandbox::new("trust-misconfig");
    let (main, _, _, config) = two_pool_config(&sb, "main");
    let volume = random_volume(&main, CINDER_VOLUME, 4);
    let before = sha256(&volume);

    let (code, out) = check_config(&config);
    assert_eq!(code, 2, "check-config must refuse: {out}");
    assert!(out.contains("backends.hdd.pools.main"), "{out}");
    assert!(
        out.contains(&format!("volume-{CINDER_VOLUME}")),
        "names a file found: {out}"
    );

    let (code, log) = mount_refused(&sb, &config);
    assert_eq!(
        code, 2,
        "mount must refuse with the configuration status: {log}"
    );
    assert!(log.contains("backends.hdd.pools.main"), "{log}");
    assert_eq!(
        sha256(&volume),
        before,
        "the operator's volume is untouched"
    );
    assert!(!main.join(MARKER).exists(), "a refused pool is not claimed");
}

#[test]
fn a_target_pool_with_foreign_files_is_refused_naming_a_few_of_them() {
    let sb = Sandbox::new("trust-foreign");
    let (_, _, backups, config) = two_pool_config(&sb, "backups");
    for name in ["notes.txt", "a", "b", "c", "d", "e", "f"] {
        std::fs::write(backups.join(name), b"the operator's").unwrap();
    }
    let (code, out) = check_config(&config);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("backends.hdd.pools.backups"), "{out}");
    assert!(out.contains("found a, b, c, d, e (and 2 more)"), "{out}");
    let (code, _) = mount_refused(&sb, &config);
    assert_eq!(code, 2);
    for name in ["notes.txt", "a", "f"] {
        assert!(backups.join(name).exists());
    }
}

#[test]
fn an_empty_target_pool_is_claimed_and_its_marker_binds_it_to_its_target() {
    let mut sb = Sandbox::new("trust-claim");
    let (main, other, backups, config) = two_pool_config(&sb, "backups");
    let (code, out) = check_config(&config);
    assert_eq!(code, 0, "an empty pool is fine: {out}");
    assert!(
        !backups.join(MARKER).exists(),
        "check-config only checks; it writes nothing"
    );
    random_volume(&main, "v", 2);
    let d = sb.start_daemon(&config);
    let marker: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(backups.join(MARKER)).unwrap()).unwrap();
    assert_eq!(marker["target"], "hdd", "{marker}");
    assert_eq!(marker["format"], 1, "{marker}");
    assert_eq!(marker["id"].as_str().unwrap().len(), 36, "{marker}");
    let id = d.backup("hdd", "v wait");
    assert!(d.stop().success());

    // The same pool under another target's name: refused, naming the owner.
    let renamed = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[targets.hdd]", "[targets.other-name]");
    let renamed_config = sb.path("renamed.toml");
    std::fs::write(&renamed_config, renamed).unwrap();
    let (code, out) = check_config(&renamed_config);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("claimed by target \"hdd\""),
        "names the target that owns it: {out}"
    );

    // The pool that holds backups serving as a volume pool: refused.
    let swapped = std::fs::read_to_string(&config)
        .unwrap()
        .replace("pool = \"backups\"", "pool = \"other\"");
    let swapped_config = sb.path("swapped.toml");
    std::fs::write(&swapped_config, swapped).unwrap();
    let (code, out) = check_config(&swapped_config);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("backends.hdd.pools.backups"), "{out}");
    let (code, _) = mount_refused(&sb, &swapped_config);
    assert_eq!(code, 2);
    assert!(!other.join(MARKER).exists());

    // The backup is still there, under the right configuration.
    let d = sb.start_daemon(&config);
    ok(&format!(
        "cmp '{}' '{}/volume-v'",
        d.image("hdd", &id).display(),
        main.display()
    ));
}

/// Renames a pool's backup data back to the layout of backupfs before the claim marker
/// (data as `volume-<backup-id>`), as an earlier version left it.
fn make_legacy(backups: &Path) {
    for entry in std::fs::read_dir(backups).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .strip_prefix("backup-")
            .and_then(|n| n.strip_suffix(".img"))
        {
            std::fs::rename(entry.path(), backups.join(format!("volume-{id}"))).unwrap();
        }
    }
    std::fs::remove_file(backups.join(MARKER)).unwrap();
}

#[test]
fn a_pool_of_an_earlier_backupfs_is_claimed_and_migrated_even_after_a_crash_midway() {
    let mut sb = Sandbox::new("trust-legacy");
    let (main, _, backups, config) = two_pool_config(&sb, "backups");
    random_volume(&main, "v1", 3);
    random_volume(&main, "v2", 2);
    let d = sb.start_daemon(&config);
    let id1 = d.backup("hdd", "v1 wait");
    let id2 = d.backup("hdd", "v2 wait");
    assert!(d.stop().success());
    make_legacy(&backups);
    assert!(backups.join(format!("volume-{id1}")).exists());
    let (code, out) = check_config(&config);
    assert_eq!(code, 0, "an earlier backupfs's own pool is accepted: {out}");

    // A crash in the middle of the migration: one data file renamed, no marker yet.
    std::fs::rename(
        backups.join(format!("volume-{id2}")),
        backups.join(format!("backup-{id2}.img")),
    )
    .unwrap();
    let d = sb.start_daemon(&config);
    assert!(backups.join(MARKER).exists(), "claimed after migrating");
    for (id, volume) in [(&id1, "v1"), (&id2, "v2")] {
        assert!(!backups.join(format!("volume-{id}")).exists());
        ok(&format!(
            "cmp '{}' '{}/volume-{volume}'",
            d.image("hdd", id).display(),
            main.display()
        ));
    }
    let volumes = ok(&format!("ls '{}'", d.mnt.join("volumes/hdd").display()));
    assert_eq!(volumes.trim(), "v1\nv2", "backups never serve as volumes");
    assert!(d.stop().success());

    // A legacy pool with one file of someone else's is not ours to migrate.
    make_legacy(&backups);
    std::fs::write(backups.join("volume-someone-elses"), b"x").unwrap();
    let (code, out) = check_config(&config);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("volume-someone-elses"), "{out}");
}

#[test]
fn restart_leaves_files_no_record_owns_and_logs_them() {
    let mut sb = Sandbox::new("trust-stray");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    assert!(d.stop().success());
    // Files that look like backup data but that no record owns: not ours to remove.
    let strays = [
        format!("volume-{CINDER_VOLUME}"),
        "backup-6b0c2f1e-1111-4222-8333-444455556666.img".to_string(),
        "notes.txt".to_string(),
    ];
    for name in &strays {
        std::fs::write(l.backups.join(name), b"keep me").unwrap();
    }
    let d = sb.start_daemon(&l.config);
    for name in &strays {
        assert!(l.backups.join(name).exists(), "{name} was removed");
    }
    assert!(
        d.log().contains("6b0c2f1e-1111-4222-8333-444455556666") && d.log().contains("notes.txt"),
        "the stray is logged: {}",
        d.log()
    );
    ok(&format!(
        "cmp '{}' '{}/volume-v'",
        d.image("hdd", &id).display(),
        l.gold.display()
    ));
}

#[test]
fn every_delete_path_leaves_a_foreign_file_beside_it() {
    let mut sb = Sandbox::new("trust-deletes");
    let l = layout(
        &mut sb,
        Some(Fs::Xfs),
        Some(Fs::Xfs),
        "copy_bps_limit = 4000000",
    );
    random_volume(&l.gold, "v", 2);
    random_volume(&l.gold, "slow", 16);
    let busy = random_volume(&l.gold, "busy", 2);
    let beside = |dir: &Path, name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, b"the operator's").unwrap();
        path
    };
    // Once the pool is claimed, files put beside backupfs' own are tolerated, never removed.
    let d = sb.start_daemon(&l.config);
    let keep_target = beside(&l.backups, "keep.txt");
    let keep_lookalike = beside(&l.backups, "backup-keep.img");
    let keep_pool = beside(&l.gold, "snapshot-backupfs-keep");
    // rm of an available backup.
    let id = d.backup("hdd", "v wait");
    ok(&format!("rm '{}'", d.image("hdd", &id).display()));
    // A temporary snapshot of an in-use volume, made and removed.
    let holder = sb.hold_lock(&busy);
    let snap_id = d.backup("hdd", "busy wait");
    assert_eq!(d.record("hdd", &snap_id)["snapshot_used"], true);
    sb.release(holder);
    // A backup cut off by a stop (its partial data removed), then rm of its record.
    let cut = d.backup("hdd", "slow");
    wait_for(
        || d.jobs("hdd").contains(&format!("{cut} slow copying")),
        "the copy",
    );
    assert!(d.stop().success());
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &cut)["status"], "error");
    ok(&format!(
        "rm '{}'",
        d.target("hdd").join(format!("{cut}.json")).display()
    ));
    for path in [&keep_target, &keep_lookalike, &keep_pool] {
        assert!(path.exists(), "{} was removed", path.display());
    }
}

#[test]
fn the_cleanup_of_a_backup_that_ran_out_of_space_leaves_a_foreign_file_beside_it() {
    let mut sb = Sandbox::new("trust-enospc");
    let (gold, backups, config) = small_target(&mut sb, "hdd", 48);
    random_volume(&gold, "big", 30);
    let keep = backups.join("keep.txt");
    let release = sb.path("release");
    let d = sb.start_daemon_env(&config, &pause_env("started", &release));
    std::fs::write(&keep, b"the operator's").unwrap();
    // Accepted while it fits; then the filesystem fills up (4 MiB left: the record still
    // fits) before its copy begins, so the copy runs out of space mid-way, every time.
    let id = d.backup("hdd", "big");
    wait_for(
        || d.log().contains("holding at started"),
        "the job to be held",
    );
    let fs = backups.parent().unwrap();
    ok(&format!(
        "fallocate -l $(( $(stat -f -c '%a' '{f}') * $(stat -f -c '%S' '{f}') - 4194304 )) '{f}/filler'",
        f = fs.display()
    ));
    let free_before = ok(&format!("stat -f -c '%a' '{}'", fs.display()));
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &id), "error");
    let record = d.record("hdd", &id);
    assert!(
        record["error"]
            .as_str()
            .unwrap_or("")
            .contains("No space left"),
        "{record}"
    );
    // The partial data is gone: only the record names the backup, and the space the
    // copy took is free again.
    assert_eq!(
        files_mentioning(&backups, &id),
        [record_file(&backups, &id)],
        "{}",
        d.log()
    );
    let free_after = ok(&format!("stat -f -c '%a' '{}'", fs.display()));
    assert!(
        free_after.trim().parse::<u64>().unwrap() + 2 >= free_before.trim().parse::<u64>().unwrap(),
        "free blocks {free_before} before the copy, {free_after} after its cleanup"
    );
    assert!(keep.exists(), "the foreign file survives the cleanup");
    assert!(d.stop().success());
    let d = sb.start_daemon(&config);
    assert!(keep.exists(), "and the restart");
    drop(d);
}

#[test]
fn a_crashed_daemons_qcow2_exports_are_cleaned_but_foreign_files_beside_them_stay() {
    let mut sb = Sandbox::new("trust-exports");
    let runtime = sb.mkdir("runtime");
    let vols = sb.mkdir("q/vols");
    let qbackups = sb.mkdir("q/qbackups");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\", qbackups = \"{}\" }}\n\
         [targets.q]\nbackend = \"qc\"\npool = \"qbackups\"\n",
        sb.path("state").display(),
        vols.display(),
        qbackups.display()
    ));
    ok(&format!(
        "qemu-img create -q -f qcow2 '{}/volume-v' 16M",
        vols.display()
    ));
    let env = [("RUNTIME_DIRECTORY", runtime.to_str().unwrap())];
    let d = sb.start_daemon_env(&config, &env);
    let pid = d.child.id();
    // An open volume keeps an export running.
    let mut reader = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<'{}'; sleep 600",
            d.volume("qc", "v").display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let dir = runtime.join("qcow2-exports").join(pid.to_string());
    wait_for(
        || {
            std::fs::read_dir(&dir)
                .map(|e| {
                    e.flatten()
                        .any(|f| f.file_name().to_string_lossy().ends_with(".pid"))
                })
                .unwrap_or(false)
        },
        "an export",
    );
    let foreign = dir.join("operator-notes.txt");
    std::fs::write(&foreign, b"keep").unwrap();
    d.kill9();
    let _ = reader.kill();
    let _ = reader.wait();
    let d = sb.start_daemon_env(&config, &env);
    assert!(foreign.exists(), "a file backupfs did not make survives");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["operator-notes.txt".to_string()], "{}", d.log());
}

/// Flips one byte of the largest file of `dir` (a backup's data) at `offset`.
fn flip_byte(dir: &Path, offset: u64) -> PathBuf {
    let data = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .unwrap()
        .path();
    ok(&format!(
        "b=$(dd if='{p}' bs=1 skip={offset} count=1 status=none | od -An -tu1 | tr -d ' '); \
         printf \"\\\\$(printf %o $(( (b + 1) % 256 )))\" | dd of='{p}' bs=1 seek={offset} conv=notrunc status=none; sync",
        p = data.display()
    ));
    data
}

#[test]
fn a_byte_damaged_after_a_full_read_is_never_handed_out() {
    let mut sb = Sandbox::new("trust-rot");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Xfs), "");
    let source = random_volume(&l.main, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let image = d.image("hdd", &id);
    // Every block is read and found good...
    ok(&format!("cmp '{}' '{}'", image.display(), source.display()));
    ok(&format!("cat '{}' > /dev/null", image.display()));
    // ...then the stored data rots and the caches go.
    let offset = 5 * (1 << 20) + 12345;
    let data = flip_byte(&l.backups, offset);
    evict(&data);
    evict(&image);
    let out = sh(&format!("cat '{}' > /dev/null", image.display()));
    assert!(
        !out.status.success(),
        "a damaged image cannot be read whole"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{out:?}"
    );
    evict(&image);
    let out = sh(&format!(
        "dd if='{}' bs=4096 skip={} count=1 status=none | od -An -tx1 | head -1",
        image.display(),
        offset / 4096
    ));
    assert!(!out.status.success() || out.stdout.is_empty(), "{out:?}");
    // A restore from it fails instead of writing wrong data.
    evict(&image);
    let out = sh(&format!(
        "cp '{}' '{}'",
        image.display(),
        d.mnt.join("volumes/ssd/restored").display()
    ));
    assert!(!out.status.success(), "the restore fails: {out:?}");
    evict(&image);
    let out = sh(&format!(
        "cp --sparse=always '{}' '{}'",
        image.display(),
        d.mnt.join("volumes/ssd/restored2").display()
    ));
    assert!(!out.status.success(), "the restore fails: {out:?}");
    // Through a loop device, too.
    evict(&image);
    let dev = sb.attach_loop_ro(&image);
    let out = sh(&format!(
        "dd if={dev} iflag=direct bs=1M skip=5 count=1 status=none of=/dev/null"
    ));
    assert!(!out.status.success(), "the loop device reads EIO: {out:?}");
    sb.detach_loop(&dev);
    // The undamaged blocks still read.
    ok(&format!(
        "cmp -n $((5 << 20)) '{}' '{}'",
        image.display(),
        source.display()
    ));
}

#[test]
fn with_verify_reads_false_damaged_data_reads_unchecked_and_only_verify_finds_it() {
    let mut sb = Sandbox::new("trust-unchecked");
    let l = layout(
        &mut sb,
        Some(Fs::Xfs),
        Some(Fs::Xfs),
        "verify_reads = false",
    );
    let source = random_volume(&l.main, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let image = d.image("hdd", &id);
    let offset = 5 * (1 << 20) + 12345;
    let data = flip_byte(&l.backups, offset);
    evict(&data);
    evict(&image);
    // The read hands out the damaged byte, as docs/configuration.md says of `false`...
    let out = sh(&format!("cmp '{}' '{}'", image.display(), source.display()));
    assert_eq!(out.status.code(), Some(1), "differ, no read error: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("byte {}", offset + 1)),
        "{out:?}"
    );
    // ...and a verify still finds it.
    assert_eq!(
        write_errno(&d.target("hdd").join("verify"), id.as_bytes()),
        Some(libc::EIO)
    );
    assert_eq!(
        d.record("hdd", &id)["damaged_blocks"],
        serde_json::json!([5])
    );
    d.stop_clean();
}

#[test]
fn data_lost_to_a_hole_in_the_backing_store_is_never_restored_as_zeros() {
    // A restore between two filesystems copies through the daemon in one pass, reading
    // only where data is: where data is must come from the checksums, not the store.
    let mut sb = Sandbox::new("trust-hole");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Xfs), "");
    let source = random_volume(&l.main, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let image = d.image("hdd", &id);
    // A good restore first, onto the other filesystem.
    let restored = d.mnt.join("volumes/ssd/good");
    ok(&format!(
        "cp '{}' '{}'",
        image.display(),
        restored.display()
    ));
    ok(&format!(
        "cmp '{}' '{}'",
        restored.display(),
        source.display()
    ));
    // Block 3 of the stored data becomes a hole behind the daemon's back.
    let data = stored_data(&l.backups, &image);
    ok(&format!(
        "fallocate --punch-hole --keep-size -o $((3 << 20)) -l $((1 << 20)) '{}'",
        data.display()
    ));
    evict(&data);
    evict(&image);
    for (name, how) in [("cp", "cp"), ("sparse", "cp --sparse=always")] {
        let out = sh(&format!(
            "{how} '{}' '{}'",
            image.display(),
            d.mnt.join(format!("volumes/ssd/{name}")).display()
        ));
        assert!(!out.status.success(), "{how}: the restore fails: {out:?}");
    }
    // The kernel's copy_file_range, as a server-side copy inside the mount.
    let target = d.mnt.join("volumes/ssd/copy-range");
    let out = sh(&format!(
        "xfs_io -f -c 'copy_range -s 0 -d 0 -l {} {}' '{}'",
        8 << 20,
        image.display(),
        target.display()
    ));
    assert!(
        !out.status.success() || !out.stderr.is_empty(),
        "copy_file_range fails: {out:?}"
    );
    assert!(
        d.log().contains("server-side copy refused (EIO)"),
        "{}",
        d.log()
    );
}

/// A config for `n` volumes of `mb` MiB each, copied at `bps` bytes/s per backup.
fn many_volumes(sb: &mut Sandbox, n: usize, mb: u64, extra: &str) -> (Layout, Vec<String>) {
    let l = layout(sb, None, Some(Fs::Xfs), extra);
    let names: Vec<String> = (0..n).map(|i| format!("vol-{i}")).collect();
    for name in &names {
        random_volume(&l.gold, name, mb);
    }
    (l, names)
}

fn states(d: &Daemon) -> Vec<String> {
    d.jobs("hdd")
        .lines()
        .filter_map(|l| l.split(' ').nth(2).map(str::to_string))
        .collect()
}

#[test]
fn concurrent_wait_requests_from_many_shells_run_max_parallel_at_a_time() {
    let mut sb = Sandbox::new("trust-wait");
    // 8 MiB at 2 MB/s: about 4 s per backup, so 6 of them take three rounds.
    let (l, names) = many_volumes(
        &mut sb,
        7,
        8,
        "max_parallel_jobs = 2\ncopy_bps_limit = 2000000",
    );
    let d = sb.start_daemon(&l.config);
    let request = d.target("hdd").join("request");
    let shells: Vec<_> = names[..6]
        .iter()
        .map(|name| {
            Command::new("bash")
                .arg("-c")
                .arg(format!("echo '{name} wait' > '{}'", request.display()))
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // All six are accepted at once: two copy, four wait their turn.
    wait_for(
        || {
            let s = states(&d);
            s.len() == 6
                && s.iter().filter(|s| *s == "copying").count() == 2
                && s.iter().filter(|s| *s == "queued").count() == 4
        },
        "six jobs: two copying and four queued",
    );
    // A request without wait from yet another shell returns while they run.
    let started = Instant::now();
    assert_eq!(d.request("hdd", &names[6]), None);
    assert!(
        states(&d).iter().filter(|s| *s == "queued").count() >= 4,
        "answered while the others still wait ({:?})",
        started.elapsed()
    );
    for mut shell in shells {
        assert!(shell.wait().unwrap().success());
    }
    let s = states(&d);
    assert_eq!(
        s.iter().filter(|s| *s == "available").count(),
        6,
        "{}",
        d.jobs("hdd")
    );
}

#[test]
fn concurrent_verifies_run_max_parallel_at_a_time_and_do_not_hold_back_requests() {
    let mut sb = Sandbox::new("trust-verify");
    let (l, names) = many_volumes(&mut sb, 4, 2, "max_parallel_jobs = 2");
    let hold = sb.path("release");
    let d = sb.start_daemon_env(
        &l.config,
        &[
            ("BACKUPFS_TEST_PAUSE", "verifying"),
            ("BACKUPFS_TEST_RELEASE", hold.to_str().unwrap()),
        ],
    );
    let ids: Vec<String> = names[..3]
        .iter()
        .map(|n| d.backup("hdd", &format!("{n} wait")))
        .collect();
    let verify = d.target("hdd").join("verify");
    let shells: Vec<_> = ids
        .iter()
        .map(|id| {
            Command::new("bash")
                .arg("-c")
                .arg(format!("echo '{id}' > '{}'", verify.display()))
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_for(
        || {
            let s = states(&d);
            s.iter().filter(|s| *s == "verifying").count() == 2
                && s.iter().filter(|s| *s == "verify-queued").count() == 1
        },
        "two verifying, one waiting",
    );
    // Backups are still accepted at once.
    assert_eq!(d.request("hdd", &names[3]), None);
    std::fs::write(&hold, b"").unwrap();
    for mut shell in shells {
        assert!(shell.wait().unwrap().success());
    }
    for id in &ids {
        assert!(d.record("hdd", id)["verified_at"].is_string());
    }
}

#[test]
fn a_restore_holds_the_lock_a_hypervisor_checks_and_frees_it_at_close() {
    let mut sb = Sandbox::new("trust-restore-lock");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    let volume = random_volume(&l.gold, "v", 4);
    let d = sb.start_daemon(&l.config);
    let node = d.volume("ssd", "v");
    let lockf = |path: &Path| {
        sh(&format!(
            "python3 -c 'import fcntl,sys; f=open(sys.argv[1],\"r+b\"); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)' '{}'",
            path.display()
        ))
        .status
        .success()
    };
    for _ in 0..10 {
        // A restore as `cp` or `dd` makes it: open, write, close (no duplicated descriptor).
        let mut writer = Command::new("python3")
            .arg("-c")
            .arg(
                "import os,sys\n\
                 fd=os.open(sys.argv[1], os.O_RDWR)\n\
                 os.pwrite(fd, b'x' * 4096, 0)\n\
                 print('ready', flush=True); sys.stdin.readline()\n\
                 os.close(fd)\n\
                 print('closed', flush=True); sys.stdin.readline()\n",
            )
            .arg(&node)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::{BufRead, BufReader, Write};
        let mut stdin = writer.stdin.take().unwrap();
        let mut stdout = BufReader::new(writer.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        assert!(!lockf(&volume), "a hypervisor sees the volume in use");
        // What a hypervisor does first: open the image for writing, with QEMU's locks.
        let out = sh(&format!(
            "qemu-io -f raw -c 'read 0 4k' '{}'",
            volume.display()
        ));
        assert!(!out.status.success(), "QEMU sees the lock: {out:?}");
        writeln!(stdin).unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "closed\n");
        assert!(lockf(&volume), "the volume is free as soon as it is closed");
        ok(&format!(
            "qemu-io -f raw -c 'read 0 4k' '{}' >/dev/null",
            volume.display()
        ));
        writeln!(stdin).unwrap();
        assert!(writer.wait().unwrap().success());
    }
}

#[test]
fn a_backup_of_an_idle_volume_attached_during_the_copy_fails() {
    let mut sb = Sandbox::new("trust-attach-mid");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "copy_bps_limit = 2000000");
    let volume = random_volume(&l.gold, "v", 12);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v");
    wait_for(
        || states(&d).first().is_some_and(|s| s == "copying"),
        "the copy",
    );
    let dev = sb.attach_loop(&volume);
    std::thread::sleep(Duration::from_millis(1500));
    sb.detach_loop(&dev);
    assert_eq!(d.wait_job("hdd", &id), "error", "{}", d.jobs("hdd"));
    let record = d.record("hdd", &id);
    assert!(
        record["error"].as_str().unwrap().contains("attached"),
        "{record}"
    );
    assert!(!d.image("hdd", &id).exists());
}

#[test]
fn a_job_queued_when_the_daemon_stops_is_recorded_as_error_before_it_exits() {
    let mut sb = Sandbox::new("trust-stop-queued");
    let (l, names) = many_volumes(
        &mut sb,
        2,
        8,
        "max_parallel_jobs = 1\ncopy_bps_limit = 1000000",
    );
    let d = sb.start_daemon(&l.config);
    let running = d.backup("hdd", &names[0]);
    let queued = d.backup("hdd", &names[1]);
    wait_for(
        || states(&d) == ["copying", "queued"],
        "one running, one queued",
    );
    assert!(d.stop().success());
    for id in [&running, &queued] {
        let text = std::fs::read_to_string(l.backups.join(format!("backup-{id}.json"))).unwrap();
        let record: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(record["status"], "error", "{record}");
        assert!(
            record["error"].as_str().unwrap().contains("interrupted"),
            "{record}"
        );
    }
}

#[test]
fn a_failed_wait_reports_the_errno_of_its_cause() {
    let mut sb = Sandbox::new("trust-wait-errno");
    let (l, names) = many_volumes(&mut sb, 2, 2, "max_parallel_jobs = 1");
    let hold = sb.path("release");
    let d = sb.start_daemon_env(
        &l.config,
        &[
            ("BACKUPFS_TEST_PAUSE", "started"),
            ("BACKUPFS_TEST_RELEASE", hold.to_str().unwrap()),
        ],
    );
    let first = d.backup("hdd", &names[0]);
    wait_for(
        || d.log().contains("holding at started"),
        "the first job held",
    );
    let request = d.target("hdd").join("request");
    let line = format!("{} wait\n", names[1]);
    let waiter = std::thread::spawn(move || write_errno(&request, line.as_bytes()));
    wait_for(|| states(&d).len() == 2, "the second job queued");
    // The volume goes away while its backup waits its turn.
    std::fs::remove_file(l.gold.join(format!("volume-{}", names[1]))).unwrap();
    std::fs::write(&hold, b"").unwrap();
    assert_eq!(waiter.join().unwrap(), Some(libc::ENOENT));
    assert_eq!(d.wait_job("hdd", &first), "available");
}

#[test]
fn a_snapshot_whose_removal_failed_is_removed_later_even_once_its_backup_is_gone() {
    let mut sb = Sandbox::new("trust-snapshot");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Xfs), "");
    let volume = random_volume(&l.gold, "v", 4);
    let hold = sb.path("release");
    let holder = sb.hold_lock(&volume);
    let d = sb.start_daemon_env(
        &l.config,
        &[
            ("BACKUPFS_TEST_PAUSE", "snapshotting"),
            ("BACKUPFS_TEST_RELEASE", hold.to_str().unwrap()),
        ],
    );
    let id = d.backup("hdd", "v");
    let snapshot = l.gold.join(format!("snapshot-backupfs-{id}"));
    wait_for(|| snapshot.exists(), "the snapshot");
    // The snapshot cannot be removed (immutable), as a storage error would make it.
    ok(&format!("chattr +i '{}'", snapshot.display()));
    std::fs::write(&hold, b"").unwrap();
    assert_eq!(d.wait_job("hdd", &id), "available");
    assert!(snapshot.exists());
    ok(&format!("rm '{}'", d.image("hdd", &id).display()));
    ok(&format!("chattr -i '{}'", snapshot.display()));
    sb.release(holder);
    assert!(d.stop().success());
    let d = sb.start_daemon(&l.config);
    wait_for(|| !snapshot.exists(), "the snapshot to go");
    // Once it is gone, nothing of the backup remains.
    wait_for(
        || !d.target("hdd").join(format!("{id}.json")).exists(),
        "the record to go",
    );
}

#[test]
fn slow_releases_and_waits_never_stall_the_mount() {
    let mut sb = Sandbox::new("trust-stall");
    let runtime = sb.mkdir("runtime");
    let vols = sb.mkdir("q/vols");
    let qbackups = sb.mkdir("q/qbackups");
    let gold = sb.mkdir("gold");
    let backups = sb.mkdir("backups");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\nmax_parallel_jobs = 1\ncopy_bps_limit = 1000000\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\", qbackups = \"{}\" }}\n\
         [backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\", backups = \"{}\" }}\n\
         [targets.q]\nbackend = \"qc\"\npool = \"qbackups\"\n\
         [targets.hdd]\nbackend = \"ssd\"\npool = \"backups\"\n",
        sb.path("state").display(),
        vols.display(),
        qbackups.display(),
        gold.display(),
        backups.display()
    ));
    for i in 0..6 {
        ok(&format!(
            "qemu-img create -q -f qcow2 '{}/volume-q{i}' 16M",
            vols.display()
        ));
        random_volume(&gold, &format!("f{i}"), 4);
    }
    let env = [("RUNTIME_DIRECTORY", runtime.to_str().unwrap())];
    let d = sb.start_daemon_env(&config, &env);
    let pid = d.child.id();
    // Six readers of qcow2 volumes whose qemu-storage-daemon then hangs (SIGSTOP): their
    // next read and their close wait for it. Six reads that hang are more than the read
    // pool's threads and the session's together.
    let mut closers = Vec::new();
    for i in 0..6 {
        let node = d.volume("qc", &format!("q{i}"));
        let ready = sb.path(&format!("ready-{i}"));
        let go = sb.path(&format!("go-{i}"));
        closers.push(
            Command::new("python3")
                .arg("-c")
                .arg(
                    "import os,sys,time\n\
                     fd=os.open(sys.argv[1], os.O_RDONLY)\n\
                     os.pread(fd, 4096, 0)\n\
                     open(sys.argv[2], 'w').close()\n\
                     while not os.path.exists(sys.argv[3]): time.sleep(0.05)\n\
                     os.pread(fd, 4096, 8 << 20)\n\
                     os.close(fd)\n",
                )
                .arg(&node)
                .arg(&ready)
                .arg(&go)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for(|| ready.exists(), "a reader");
    }
    let qsds = qsd_children(pid);
    assert_eq!(qsds.len(), 6, "one export per reader");
    for qsd in &qsds {
        let _ = kill(Pid::from_raw(*qsd as i32), Signal::SIGSTOP);
    }
    for i in 0..6 {
        std::fs::write(sb.path(&format!("go-{i}")), b"").unwrap();
    }
    // And six backups waited for by six shells.
    let request = d.target("hdd").join("request");
    let mut waiters = Vec::new();
    for i in 0..6 {
        waiters.push(
            Command::new("bash")
                .arg("-c")
                .arg(format!("echo 'f{i} wait' > '{}'", request.display()))
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    // The mount still answers at once, a restore's writes included.
    for script in [
        format!("ls '{}'", d.mnt.join("backups/hdd").display()),
        format!("cat '{}'", d.target("hdd").join("jobs").display()),
        format!("ls '{}'", d.mnt.join("volumes/ssd").display()),
        format!("stat '{}'", d.volume("ssd", "f0").display()),
        format!(
            "dd if=/dev/urandom of='{}' bs=64k count=16 status=none",
            d.volume("ssd", "restored").display()
        ),
    ] {
        let started = Instant::now();
        let out = run_timeout(
            Command::new("bash").arg("-c").arg(&script),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{script} did not answer within 10 s ({:?})",
            started.elapsed()
        );
    }
    // ... while the readers still wait.
    for closer in &mut closers {
        assert!(closer.try_wait().unwrap().is_none(), "a read did not hang");
    }
    for qsd in &qsds {
        let _ = kill(Pid::from_raw(*qsd as i32), Signal::SIGCONT);
    }
    for mut closer in closers {
        assert!(closer.wait().unwrap().success());
    }
    for mut waiter in waiters {
        let _ = waiter.kill();
        let _ = waiter.wait();
    }
}

/// The qemu-storage-daemon processes started by the process `pid`.
fn qsd_children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(pid) && cmdline.starts_with(b"qemu-storage-daemon") {
            found.push(child);
        }
    }
    found
}

#[test]
fn restoring_a_sparse_image_over_a_full_qcow2_volume_zeroes_its_holes() {
    let mut sb = Sandbox::new("trust-qcow2-holes");
    let runtime = sb.mkdir("runtime");
    let q = sb.loop_fs("q", Fs::Xfs, 512);
    let vols = q.join("vols");
    let gold = sb.mkdir("gold");
    let backups = sb.mkdir("backups");
    std::fs::create_dir_all(&vols).unwrap();
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\" }}\n\
         [backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\", backups = \"{}\" }}\n\
         [targets.hdd]\nbackend = \"ssd\"\npool = \"backups\"\n",
        sb.path("state").display(),
        vols.display(),
        gold.display(),
        backups.display()
    ));
    // A sparse source whose data extents start and end off cluster boundaries.
    let source = gold.join("volume-sparse");
    ok(&format!("truncate -s 8M '{}'", source.display()));
    for (seek, count) in [(3u64, 1u64), (70, 5), (700, 3), (1500, 20)] {
        ok(&format!(
            "dd if=/dev/urandom of='{}' bs=4k seek={seek} count={count} conv=notrunc status=none",
            source.display()
        ));
    }
    // A qcow2 volume full of data.
    let raw_full = sb.path("full.raw");
    ok(&format!(
        "head -c 8M /dev/urandom > '{}'",
        raw_full.display()
    ));
    let qvol = vols.join("volume-target");
    ok(&format!(
        "qemu-img convert -f raw -O qcow2 '{}' '{}'",
        raw_full.display(),
        qvol.display()
    ));
    let env = [("RUNTIME_DIRECTORY", runtime.to_str().unwrap())];
    let d = sb.start_daemon_env(&config, &env);
    let id = d.backup("hdd", "sparse wait");
    // Plain cp: copy_file_range, served by the daemon, holes discarded by the driver.
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("qc", "target").display()
    ));
    ok(&format!(
        "qemu-img compare -U -f qcow2 -F raw '{}' '{}'",
        qvol.display(),
        source.display()
    ));
}

#[test]
fn a_qcow2_volume_is_free_for_a_hypervisor_right_after_a_backup_a_read_or_a_restore() {
    let mut sb = Sandbox::new("trust-qcow2-free");
    let runtime = sb.mkdir("runtime");
    let q = sb.loop_fs("q", Fs::Xfs, 512);
    let vols = q.join("vols");
    let qbackups = q.join("qbackups");
    for dir in [&vols, &qbackups] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\", qbackups = \"{}\" }}\n\
         [targets.q]\nbackend = \"qc\"\npool = \"qbackups\"\n",
        sb.path("state").display(),
        vols.display(),
        qbackups.display()
    ));
    let image = vols.join("volume-v");
    ok(&format!(
        "qemu-img create -q -f qcow2 '{p}' 16M && qemu-io -f qcow2 -c 'write -P 0xab 1M 3M' '{p}' >/dev/null",
        p = image.display()
    ));
    let env = [("RUNTIME_DIRECTORY", runtime.to_str().unwrap())];
    let d = sb.start_daemon_env(&config, &env);
    let node = d.volume("qc", "v");
    // What a hypervisor does first: open the image for writing, with QEMU's locks.
    let hypervisor_can_open = || {
        let out = sh(&format!(
            "qemu-io -f qcow2 -c 'read 0 512' '{}' 2>&1",
            image.display()
        ));
        assert!(
            out.status.success(),
            "the volume is still held: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    for round in 0..8 {
        let id = d.backup("q", "v wait");
        hypervisor_can_open();
        ok(&format!("cat '{}' > /dev/null", node.display()));
        hypervisor_can_open();
        ok(&format!(
            "cp '{}' '{}'",
            d.image("q", &id).display(),
            node.display()
        ));
        hypervisor_can_open();
        ok(&format!(
            "dd if='{}' of='{}' bs=1M count=2 conv=notrunc status=none",
            d.image("q", &id).display(),
            node.display()
        ));
        hypervisor_can_open();
        if round % 2 == 1 {
            ok(&format!("rm '{}'", d.image("q", &id).display()));
        }
    }
}

// Authenticity (issue 22, items 2 and 5): a writer of the target's storage cannot make
// backupfs serve, verify as good, or build on a backup it did not make.

/// `backupfs keygen FILE`: (exit code, stdout + stderr).
fn keygen(file: &Path) -> (i32, String) {
    let out = run_timeout(
        Command::new(BIN).arg("keygen").arg(file),
        Duration::from_secs(30),
    );
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Makes a key with `backupfs keygen` and names it as the key of target `hdd` (the last
/// table of the layout's configuration).
fn key_target(sb: &Sandbox, config: &Path) -> PathBuf {
    let key = sb.path("hdd.key");
    let (code, out) = keygen(&key);
    assert_eq!(code, 0, "{out}");
    let mut text = std::fs::read_to_string(config).unwrap();
    text += &format!("key = \"{}\"\n", key.display());
    std::fs::write(config, text).unwrap();
    key
}

/// A record file of the target, edited as JSON.
fn edit_record(pool: &Path, backup_id: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = record_file(pool, backup_id);
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut record);
    std::fs::write(&path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
}

/// Where `by-volume/<volume>/latest.img` points, if it exists.
fn latest(d: &Daemon, volume_id: &str) -> Option<String> {
    std::fs::read_link(
        d.target("hdd")
            .join(format!("by-volume/{volume_id}/latest.img")),
    )
    .ok()
    .map(|p| p.to_string_lossy().into_owned())
}

/// `echo <id> > verify` on a fresh open, then what reading it answers: (errno, answer).
fn verify_answer(d: &Daemon, backup_id: &str) -> (Option<i32>, String) {
    let verify = d.target("hdd").join("verify");
    let errno = write_errno(&verify, format!("{backup_id}\n").as_bytes());
    let answer = sh(&format!(
        "exec 3<>'{}'; echo {backup_id} >&3; cat <&3",
        verify.display()
    ));
    (errno, String::from_utf8_lossy(&answer.stdout).into_owned())
}

#[test]
fn keygen_writes_a_0600_key_once_and_never_overwrites_or_follows_a_link() {
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new("trust-keygen");
    let key = sb.path("t.key");
    let (code, out) = keygen(&key);
    assert_eq!(code, 0, "{out}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(
        text.len() == 65
            && text.ends_with('\n')
            && text[..64].bytes().all(|c| c.is_ascii_hexdigit()),
        "one line of 64 hex digits: {text:?}"
    );
    // Another key is another key.
    let (code, _) = keygen(&sb.path("u.key"));
    assert_eq!(code, 0);
    assert_ne!(std::fs::read_to_string(sb.path("u.key")).unwrap(), text);
    // An existing file is never replaced.
    let (code, out) = keygen(&key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("exists already"), "{out}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
    // Nor is a link at that name followed.
    let victim = sb.path("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, sb.path("link.key")).unwrap();
    let (code, out) = keygen(&sb.path("link.key"));
    assert_eq!(code, 1, "{out}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    // A bare name is a file in the current directory (which is synced as its parent).
    let out = run_timeout(
        Command::new(BIN)
            .arg("keygen")
            .arg("here.key")
            .current_dir(sb.path("")),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("here.key")).unwrap().len(),
        65
    );
    // A directory that is not there: exit 1, and not "exists already".
    let (code, out) = keygen(&sb.path("missing/k.key"));
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("exists already"), "{out}");
}

#[test]
fn a_key_file_readable_by_others_is_refused_naming_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let mut sb = Sandbox::new("trust-keymode");
    let l = layout(&mut sb, None, None, "");
    let key = key_target(&sb, &l.config);
    let (code, out) = check_config(&l.config);
    assert_eq!(code, 0, "{out}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = check_config(&l.config);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("targets.hdd.key") && out.contains("0644"),
        "the error names the key and its mode: {out}"
    );
    let (code, log) = mount_refused(&sb, &l.config);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("targets.hdd.key"), "{log}");
}

#[test]
fn check_config_names_each_target_without_a_key() {
    let sb = Sandbox::new("trust-unkeyed");
    let pool = |name: &str| sb.mkdir(name).display().to_string();
    let key = sb.path("b.key");
    assert_eq!(keygen(&key).0, 0);
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ main = \"{}\", a = \"{}\", b = \"{}\" }}\n\
         [targets.a]\nbackend = \"hdd\"\npool = \"a\"\n\
         [targets.b]\nbackend = \"hdd\"\npool = \"b\"\nkey = \"{}\"\n",
        sb.path("state").display(),
        pool("main"),
        pool("a"),
        pool("b"),
        key.display()
    ));
    let (code, out) = check_config(&config);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("target a: no key: records are not authenticated"),
        "{out}"
    );
    assert!(!out.contains("target b:"), "{out}");
}

#[test]
fn on_a_keyed_target_an_image_and_sums_replaced_consistently_are_damaged_never_served() {
    let mut sb = Sandbox::new("trust-forged");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    key_target(&sb, &l.config);
    let source = random_volume(&l.gold, "v", 3);
    let d = sb.start_daemon(&l.config);
    let older = d.backup("hdd", "v wait");
    random_volume(&l.gold, "v", 3);
    let newer = d.backup("hdd", "v wait");
    assert_eq!(
        latest(&d, "v").as_deref(),
        Some(format!("../../{newer}.img").as_str())
    );
    assert!(d.stop().success());
    // A writer of the target puts the older backup's data and sums (its "payload") in
    // place of the newer one's, consistently: the digest recomputed in the record.
    let old_record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record_file(&l.backups, &older)).unwrap()).unwrap();
    for ext in ["img", "sums"] {
        std::fs::copy(
            l.backups.join(format!("backup-{older}.{ext}")),
            l.backups.join(format!("backup-{newer}.{ext}")),
        )
        .unwrap();
    }
    edit_record(&l.backups, &newer, |r| {
        r["checksums"]["digest"] = old_record["checksums"]["digest"].clone();
        r["checksums"]["mac"] = old_record["checksums"]["mac"].clone();
        r.as_object_mut().unwrap().remove("mac");
    });
    let d = sb.start_daemon(&l.config);
    let (errno, answer) = verify_answer(&d, &newer);
    assert_eq!(errno, Some(libc::EIO), "verify fails: {answer}");
    assert!(answer.contains("damaged"), "{answer}");
    let out = sh(&format!(
        "cat '{}' > /dev/null",
        d.image("hdd", &newer).display()
    ));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{out:?}"
    );
    assert!(d.record("hdd", &newer)["defect"].is_string());
    // The real backup is the newest again, and still reads.
    assert_eq!(
        latest(&d, "v").as_deref(),
        Some(format!("../../{older}.img").as_str())
    );
    assert_eq!(verify_answer(&d, &older).0, None);
    // An incremental backup never builds on it: its parent is the real one.
    let next = d.backup("hdd", "v incremental wait");
    assert_eq!(d.record("hdd", &next)["parent_id"], older.as_str());
    // It started from the real parent's leaf sums, checked against their MAC.
    assert!(!d.log().contains("do not match their MAC"), "{}", d.log());
    assert!(d.record("hdd", &older)["checksums"]["leaves_mac"].is_string());
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &next).display(),
        source.display()
    ));
}

#[test]
fn on_a_keyed_target_a_hand_edited_record_is_damaged() {
    let mut sb = Sandbox::new("trust-edited");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    key_target(&sb, &l.config);
    random_volume(&l.gold, "v", 3);
    random_volume(&l.gold, "w", 3);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let other = d.backup("hdd", "w wait");
    assert!(d.stop().success());
    // The size shortened within its last block (the checksums still fit it), and the
    // record made to belong to another volume.
    edit_record(&l.backups, &id, |r| {
        r["size"] = serde_json::json!((3 << 20) - 4096);
    });
    edit_record(&l.backups, &other, |r| {
        r["volume_id"] = serde_json::json!("v");
        r["completed_at"] = serde_json::json!("2099-01-01T00:00:00.000Z");
    });
    let d = sb.start_daemon(&l.config);
    for backup in [&id, &other] {
        let (errno, answer) = verify_answer(&d, backup);
        assert_eq!(errno, Some(libc::EIO), "{answer}");
        assert!(answer.contains("damaged"), "{answer}");
        let out = sh(&format!(
            "cat '{}' > /dev/null",
            d.image("hdd", backup).display()
        ));
        assert!(!out.status.success(), "{out:?}");
    }
    assert_eq!(latest(&d, "v"), None, "no sound backup of v is left");
    // `backupfs status` lists both as damaged.
    let status = run_timeout(
        Command::new(BIN).arg("status").arg("--mount").arg(&d.mnt),
        Duration::from_secs(30),
    );
    let status = String::from_utf8_lossy(&status.stdout);
    for backup in [&id, &other] {
        assert!(
            status.contains(&format!("damaged hdd {backup} ")),
            "{status}"
        );
    }
    // Setting an attribute rewrites the record: it stays damaged (never sealed anew).
    setxattr(&d.image("hdd", &id), "user.note", b"x").unwrap();
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record_file(&l.backups, &id)).unwrap()).unwrap();
    assert_eq!(stored["xattrs"]["user.note"], "x", "{stored}");
    assert!(stored.get("mac").is_none(), "{stored}");
    let (errno, _) = verify_answer(&d, &id);
    assert_eq!(errno, Some(libc::EIO));
    // And it can be deleted like any other backup.
    ok(&format!("rm '{}'", d.image("hdd", &id).display()));
    assert!(!l.backups.join(format!("backup-{id}.json")).exists());
    assert!(!l.backups.join(format!("backup-{id}.img")).exists());
}

#[test]
fn an_available_record_without_checksums_or_with_too_few_is_damaged_never_served() {
    let mut sb = Sandbox::new("trust-nosums");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 3);
    let d = sb.start_daemon(&l.config);
    let good = d.backup("hdd", "v wait");
    let no_sums = d.backup("hdd", "v wait");
    let short = d.backup("hdd", "v wait");
    assert!(d.stop().success());
    // No key on this target: the record's shape alone must refuse both.
    edit_record(&l.backups, &no_sums, |r| {
        r["checksums"] = serde_json::Value::Null
    });
    edit_record(&l.backups, &short, |r| {
        r["size"] = serde_json::json!(5 << 20)
    });
    let d = sb.start_daemon(&l.config);
    for backup in [&no_sums, &short] {
        let (errno, answer) = verify_answer(&d, backup);
        assert_eq!(errno, Some(libc::EIO), "{backup}: {answer}");
        assert!(answer.contains("damaged"), "{answer}");
        let out = sh(&format!(
            "cat '{}' > /dev/null",
            d.image("hdd", backup).display()
        ));
        assert!(!out.status.success(), "{out:?}");
        assert!(d.record("hdd", backup)["defect"].is_string());
    }
    assert_eq!(
        latest(&d, "v").as_deref(),
        Some(format!("../../{good}.img").as_str())
    );
}

#[test]
fn on_a_keyed_target_forged_leaf_sums_are_not_built_on() {
    let mut sb = Sandbox::new("trust-leaves");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    key_target(&sb, &l.config);
    let source = random_volume(&l.gold, "v", 3);
    let d = sb.start_daemon(&l.config);
    let parent = d.backup("hdd", "v wait");
    // A writer of the target changes the parent's leaf sums.
    damage_bytes(
        &l.backups.join(format!("backup-{parent}.leaves")),
        8,
        b"forged!!",
    );
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=64K seek=3 count=1 conv=notrunc status=none",
        source.display()
    ));
    let next = d.backup("hdd", "v incremental wait");
    assert_eq!(d.record("hdd", &next)["parent_id"], parent.as_str());
    assert!(d.log().contains("do not match their MAC"), "{}", d.log());
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &next).display(),
        source.display()
    ));
    assert_eq!(verify_answer(&d, &next).0, None);
}

#[test]
fn on_a_keyed_rbd_target_records_carry_a_mac_and_a_hand_edited_one_is_damaged() {
    use common::ceph::{self, POOL};
    let cluster = ceph::cluster();
    let mut sb = Sandbox::new("trust-rbdkey");
    let namespace = format!("mac-{}", std::process::id());
    cluster.rbd(&[
        "namespace",
        "create",
        "--pool",
        POOL,
        "--namespace",
        &namespace,
    ]);
    let client = cluster.client("cinder");
    let main = sb.mkdir("files/main");
    let key = sb.path("rbd.key");
    assert_eq!(keygen(&key).0, 0);
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.ceph]\ndriver = \"rbd\"\nceph_conf = \"{}\"\nclient = \"{}\"\ntimeout = 5\n\
         pools = {{ backups = \"{POOL}/{namespace}\" }}\n\
         [backends.files]\ndriver = \"file\"\npools = {{ main = \"{}\" }}\n\
         [targets.rbd]\nbackend = \"ceph\"\npool = \"backups\"\nkey = \"{}\"\n",
        sb.mkdir("state").display(),
        client.conf.display(),
        client.name,
        main.display(),
        key.display(),
    ));
    let source = random_volume(&main, "v", 3);
    let d = sb.start_daemon(&config);
    let id = d.backup("rbd", "v wait");
    let object = format!("backupfs.record.{id}");
    let rados = |args: &[&str]| {
        let mut all = vec!["--pool", POOL, "--namespace", namespace.as_str()];
        all.extend_from_slice(args);
        ceph::run(&cluster.conf, 60, "rados", &all)
    };
    let stored = sb.path("record.json");
    rados(&["get", &object, &stored.to_string_lossy()]);
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    assert!(
        record["mac"].as_str().unwrap().starts_with("hmac-sha256:"),
        "{record}"
    );
    assert!(record["checksums"]["mac"].is_string(), "{record}");
    assert_eq!(verify_answer_in(&d, "rbd", &id).0, None);
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("rbd", &id).display(),
        source.display()
    ));
    assert!(d.stop().success());
    // A holder of a `profile rbd` key edits the record in the pool.
    record["size"] = serde_json::json!((3 << 20) - 4096);
    std::fs::write(&stored, serde_json::to_vec(&record).unwrap()).unwrap();
    rados(&["put", &object, &stored.to_string_lossy()]);
    let d = sb.start_daemon(&config);
    let (errno, answer) = verify_answer_in(&d, "rbd", &id);
    assert_eq!(errno, Some(libc::EIO), "{answer}");
    assert!(answer.contains("damaged"), "{answer}");
    let out = sh(&format!(
        "cat '{}' > /dev/null",
        d.image("rbd", &id).display()
    ));
    assert!(!out.status.success(), "{out:?}");
    assert!(d.record("rbd", &id)["defect"].is_string());
    assert!(d.stop().success());
}

/// `verify_answer` on target `target`.
fn verify_answer_in(d: &Daemon, target: &str, backup_id: &str) -> (Option<i32>, String) {
    let verify = d.target(target).join("verify");
    let errno = write_errno(&verify, format!("{backup_id}\n").as_bytes());
    let answer = sh(&format!(
        "exec 3<>'{}'; echo {backup_id} >&3; cat <&3",
        verify.display()
    ));
    (errno, String::from_utf8_lossy(&answer.stdout).into_owned())
}

// ----------------------------------------------------------------------------------------
// Issue 22, items 2 and 3: links, special files and temporary names in pools and targets.
// Whoever writes a pool or a target's storage must not steer the root daemon to another
// file of the host. The "host file" here is one the test made, outside every pool.

/// A host file outside every pool: 1 MiB of one byte, and its sha256.
fn host_file(sb: &Sandbox, name: &str) -> (PathBuf, String) {
    let path = sb.path(name);
    std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
    let sum = sha256(&path);
    (path, sum)
}

/// Reading `path` through the mount must fail, or at least not give the host file.
#[track_caller]
fn never_reads_as(path: &Path, host: &Path) {
    let out = sh_limit(
        Duration::from_secs(60),
        &format!(
            "timeout 30 cmp '{}' '{}' 2>&1",
            path.display(),
            host.display()
        ),
    );
    assert!(
        !out.status.success(),
        "{} serves the host file {}",
        path.display(),
        host.display()
    );
    assert_ne!(
        out.status.code(),
        Some(124),
        "reading {} hung",
        path.display()
    );
}

#[test]
fn a_symlinked_volume_is_never_listed_read_backed_up_grown_or_restored_into() {
    let mut sb = Sandbox::new("trust-link-volume");
    let l = layout(&mut sb, None, None, "");
    let (secret, sum) = host_file(&sb, "secret");
    std::os::unix::fs::symlink(&secret, l.main.join("volume-linked")).unwrap();
    random_volume(&l.main, "real", 2);
    let d = sb.start_daemon(&l.config);

    let listed = names_in(&d.mnt.join("volumes/hdd"));
    assert!(listed.contains(&"real".to_string()), "{listed:?}");
    assert!(!listed.contains(&"linked".to_string()), "{listed:?}");
    let linked = d.volume("hdd", "linked");
    assert_errno(std::fs::metadata(&linked), libc::ENOENT, "stat of a link");
    assert_errno(std::fs::read(&linked), libc::ENOENT, "read of a link");
    never_reads_as(&linked, &secret);
    assert_errno(truncate(&linked, 4 << 20), libc::ENOENT, "grow of a link");
    assert_errno(
        getxattr(&linked, "user.backupfs.restore"),
        libc::ENOENT,
        "attributes of a link",
    );
    // A backup of it is refused; nothing of the host file reaches the target.
    assert!(d.request("hdd", "linked wait").is_some(), "{}", d.log());
    // A restore into it writes nothing through the link.
    let id = d.backup("hdd", "real wait");
    let out = sh(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        linked.display()
    ));
    assert!(!out.status.success(), "a restore into a link: {out:?}");

    assert_eq!(sha256(&secret), sum, "the host file is untouched");
    assert_eq!(std::fs::metadata(&secret).unwrap().len(), 1 << 20);
    assert!(
        listxattr(&secret).unwrap().is_empty(),
        "no note on the host file"
    );
    assert!(
        std::fs::symlink_metadata(l.main.join("volume-linked"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link itself stays"
    );
    for file in files_under(&l.backups) {
        assert_ne!(sha256(&file), sum, "{} holds the host file", file.display());
    }
    assert!(
        d.log()
            .contains("volume-linked is a symbolic link, not a regular file"),
        "the refusal is logged: {}",
        d.log()
    );
}

#[test]
fn a_symlinked_qcow2_volume_is_never_listed_nor_read() {
    let mut sb = Sandbox::new("trust-link-qcow2");
    let runtime = sb.mkdir("runtime");
    let vols = sb.mkdir("vols");
    let backups = sb.mkdir("backups");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\" }}\n\
         [backends.ssd]\ndriver = \"file\"\npools = {{ backups = \"{}\" }}\n\
         [targets.hdd]\nbackend = \"ssd\"\npool = \"backups\"\n",
        sb.path("state").display(),
        vols.display(),
        backups.display()
    ));
    let (secret, _) = host_file(&sb, "secret.raw");
    let image = sb.path("secret.qcow2");
    ok(&format!(
        "qemu-img convert -f raw -O qcow2 '{}' '{}'",
        secret.display(),
        image.display()
    ));
    std::os::unix::fs::symlink(&image, vols.join("volume-linked")).unwrap();
    let env = [("RUNTIME_DIRECTORY", runtime.to_str().unwrap())];
    let d = sb.start_daemon_env(&config, &env);
    assert!(names_in(&d.mnt.join("volumes/qc")).is_empty());
    let linked = d.volume("qc", "linked");
    assert_errno(std::fs::metadata(&linked), libc::ENOENT, "stat of a link");
    never_reads_as(&linked, &secret);
    assert!(d.request("hdd", "linked wait").is_some(), "{}", d.log());
    assert!(
        d.log().contains("is a symbolic link, not a regular file"),
        "{}",
        d.log()
    );
}

#[test]
fn a_planted_record_with_a_symlinked_image_never_serves_the_host_file() {
    let mut sb = Sandbox::new("trust-link-image");
    let l = layout(&mut sb, None, None, "");
    let (secret, sum) = host_file(&sb, "secret");
    let d = sb.start_daemon(&l.config);
    // What a writer of the target's storage can plant: an available record without
    // checksums, and its data as a link to a host file.
    let id = "6b0c2f1e-1111-4222-8333-444455556666";
    let record = serde_json::json!({
        "format": 1, "id": id, "volume_id": "v", "backend": "hdd", "pool": "main",
        "target": "hdd", "status": "available", "size": 1 << 20,
        "created_at": "2026-01-01T00:00:00.000Z", "completed_at": "2026-01-01T00:00:01.000Z",
        "name": null, "snapshot_used": false, "parent_id": null, "checksums": null,
        "error": null, "stored_bytes": 1 << 20,
    });
    std::fs::write(
        l.backups.join(format!("backup-{id}.json")),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink(&secret, l.backups.join(format!("backup-{id}.img"))).unwrap();

    never_reads_as(&d.image("hdd", id), &secret);
    never_reads_as(&d.target("hdd").join("by-volume/v/latest.img"), &secret);
    // Nor is it what a restore writes.
    let _ = sh(&format!(
        "cp '{}' '{}'",
        d.image("hdd", id).display(),
        d.mnt.join("volumes/ssd/restored").display()
    ));
    let restored = l.gold.join("volume-restored");
    if restored.exists() {
        assert_ne!(sha256(&restored), sum, "a restore wrote the host file");
    }
    assert_eq!(sha256(&secret), sum);
}

#[test]
fn a_fifo_planted_as_a_record_hangs_neither_ls_nor_start_up() {
    let mut sb = Sandbox::new("trust-fifo-record");
    let l = layout(&mut sb, None, None, "");
    random_volume(&l.main, "v", 1);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let fifo = l
        .backups
        .join("backup-6b0c2f1e-1111-4222-8333-444455556666.json");
    ok(&format!("mkfifo '{}'", fifo.display()));
    let ls = |d: &Daemon| {
        sh_limit(
            Duration::from_secs(60),
            &format!("timeout 20 ls -l '{}'", d.target("hdd").display()),
        )
    };
    let out = ls(&d);
    assert!(out.status.success(), "ls of the target: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&id),
        "{out:?}"
    );
    d.stop_clean();
    // Start-up reads every record (recovery): the FIFO is skipped, not waited on.
    let d = sb.start_daemon(&l.config);
    let out = ls(&d);
    assert!(out.status.success(), "ls after a restart: {out:?}");
    assert!(
        d.log().contains("is a FIFO, not a regular file"),
        "{}",
        d.log()
    );
    assert!(fifo.exists(), "a file no record owns is left alone");
}

#[test]
fn links_planted_at_predictable_temporary_names_never_let_a_setfattr_or_verify_write_a_host_file() {
    let mut sb = Sandbox::new("trust-tmp-links");
    let l = layout(&mut sb, None, None, "");
    random_volume(&l.main, "v", 1);
    let (victim, sum) = host_file(&sb, "victim");
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    // The names an earlier backupfs used: .backup-<id>.json.<pid>.<n>.tmp, for this
    // daemon's pid and its neighbours, and the first writes' counters.
    let pid = d.pid();
    for p in pid.saturating_sub(2)..=pid + 2 {
        for n in 0..100 {
            let name = format!(".backup-{id}.json.{p}.{n}.tmp");
            std::os::unix::fs::symlink(&victim, l.backups.join(name)).unwrap();
        }
    }
    setxattr(&d.image("hdd", &id), "user.note", b"kept").unwrap();
    assert_eq!(
        write_errno(
            &d.target("hdd").join("verify"),
            format!("{id}\n").as_bytes()
        ),
        None,
        "{}",
        d.log()
    );
    assert_eq!(sha256(&victim), sum, "the host file is untouched");
    let record = l.backups.join(format!("backup-{id}.json"));
    assert!(
        std::fs::symlink_metadata(&record).unwrap().is_file(),
        "the record is a file of its own, not a planted link"
    );
    let written = d.record("hdd", &id);
    assert_eq!(written["xattrs"]["user.note"], "kept", "{written}");
    assert!(written["verified_at"].is_string(), "{written}");
    // The start-up sweep removes the links themselves, never what they point at.
    d.stop_clean();
    let d = sb.start_daemon(&l.config);
    assert_eq!(sha256(&victim), sum);
    let left: Vec<String> = names_in(&l.backups)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(d);
}
