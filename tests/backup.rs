//! Backups through a real mount, driven with real shell tools.

mod common;

use common::*;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

#[test]
fn backup_with_wait_gives_an_image_identical_to_the_source() {
    let mut sb = Sandbox::new("wait");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "vol-a", 48);
    let before = sha256(&source);
    let d = sb.start_daemon(&l.config);

    assert_eq!(d.request("hdd", "vol-a wait name=nightly"), None);
    let ids: Vec<String> = names_in(&d.target("hdd"))
        .iter()
        .filter_map(|name| name.strip_suffix(".img").map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 1, "one image is listed: {ids:?}");
    let id = &ids[0];
    let image = d.image("hdd", id);
    ok(&format!("cmp '{}' '{}'", image.display(), source.display()));
    // Read again once the page cache of the image is gone: the data comes from the
    // target again, not from what the first read cached.
    evict(&image);
    ok(&format!("cmp '{}' '{}'", image.display(), source.display()));
    assert_eq!(sha256(&source), before, "the source must not change");

    let record = d.record("hdd", id);
    assert_eq!(record["status"], "available");
    assert_eq!(record["volume_id"], "vol-a");
    assert_eq!(record["backend"], "ssd");
    assert_eq!(record["pool"], "gold");
    assert_eq!(record["target"], "hdd");
    assert_eq!(record["name"], "nightly");
    assert_eq!(record["size"], 48 << 20);
    assert_eq!(record["stored_bytes"], 48 << 20);
    assert_eq!(record["snapshot_used"], false);
    assert!(record["parent_id"].is_null());
    assert!(record["error"].is_null());
    assert_eq!(record["checksums"]["blocks"], 48);
    assert!(record["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(record["completed_at"].as_str().unwrap().ends_with('Z'));

    let jobs = d.jobs("hdd");
    let line = format!("{id} vol-a available {0}/{0}", 48 << 20);
    assert!(jobs.lines().any(|l| l == line), "jobs:\n{jobs}");

    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 48 << 20, "size = the source volume's size");
    let completed: i64 = ok(&format!(
        "date -u -d '{}' +%s",
        record["completed_at"].as_str().unwrap()
    ))
    .trim()
    .parse()
    .unwrap();
    assert_eq!(meta.mtime(), completed, "mtime = when the backup completed");
    assert!(
        meta.blocks() * 512 >= 48 << 20,
        "st_blocks = what is allocated"
    );
    let latest = ok(&format!(
        "readlink '{}/by-volume/vol-a/latest.img'",
        d.target("hdd").display()
    ));
    assert_eq!(latest.trim(), format!("../../{id}.img"));
    ok(&format!(
        "cmp '{}/by-volume/vol-a/latest.img' '{}'",
        d.target("hdd").display(),
        source.display()
    ));
}

#[test]
fn backup_without_wait_returns_at_once_and_no_partial_image_is_ever_visible() {
    let mut sb = Sandbox::new("nowait");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    let source = random_volume(&l.gold, "vol-b", 40);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("finishing", &release));
    // The job holds before it is recorded available: the write returned without it.
    let id = d.backup("hdd", "vol-b");
    d.wait_state("hdd", &id, "finishing");
    let jobs = d.jobs("hdd");
    assert!(
        jobs.lines()
            .any(|l| l.starts_with(&format!("{id} vol-b finishing "))),
        "jobs:\n{jobs}"
    );
    assert!(
        !names_in(&d.target("hdd")).contains(&format!("{id}.img")),
        "no partial image may be listed"
    );
    assert_errno(
        std::fs::metadata(d.image("hdd", &id)),
        libc::ENOENT,
        "lookup of a partial image",
    );
    assert_eq!(d.record("hdd", &id)["status"], "creating");
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &id), "available");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
    let usage = std::fs::read_to_string(d.target("hdd").join("request")).unwrap();
    assert!(usage.starts_with("usage:"), "{usage}");
}

#[test]
fn sparse_volume_backup_keeps_holes() {
    let mut sb = Sandbox::new("sparse");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = sparse_volume(&l.main, "thin", 2048, 700, 4);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "thin wait");
    let image = d.image("hdd", &id);
    ok(&format!("cmp '{}' '{}'", image.display(), source.display()));
    assert!(
        (4 << 20..16 << 20).contains(&allocated(&image)),
        "image allocates {} bytes for 4 MiB of data",
        allocated(&image)
    );
    assert_eq!(d.record("hdd", &id)["stored_bytes"], 4 << 20);
    // Tools that follow SEEK_DATA/SEEK_HOLE see the holes through the mount.
    let map = ok(&format!(
        "qemu-img map -f raw --output=json '{}'",
        image.display()
    ));
    let data: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data_bytes: u64 = data
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        data_bytes <= 8 << 20,
        "qemu-img sees {data_bytes} bytes of data"
    );
    let copy = sb.path("copy.raw");
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        image.display(),
        copy.display()
    ));
    ok(&format!(
        "qemu-img compare -f raw -F raw '{}' '{}'",
        copy.display(),
        source.display()
    ));
    assert!(allocated(&copy) < 16 << 20);
}

#[test]
fn in_use_volume_is_backed_up_from_a_temporary_snapshot() {
    let mut sb = Sandbox::new("inuse");
    let l = layout(&mut sb, Some(Fs::Btrfs), Some(Fs::Xfs), "");
    let source = random_volume(&l.gold, "busy-vol", 32);
    let before = sha256(&source);
    let holder = sb.hold_lock(&source);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "busy-vol wait");
    assert_eq!(d.record("hdd", &id)["snapshot_used"], true);
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
    assert_eq!(
        names_in(&l.gold),
        ["volume-busy-vol"],
        "the snapshot must be gone"
    );
    assert_eq!(sha256(&source), before);
    sb.release(holder);
}

#[test]
fn an_in_use_backup_that_fails_mid_run_leaves_no_temporary_snapshot() {
    let mut sb = Sandbox::new("inuse-fails");
    let l = layout(&mut sb, Some(Fs::Btrfs), Some(Fs::Xfs), "");
    let source = random_volume(&l.gold, "busy-vol", 32);
    let holder = sb.hold_lock(&source);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("snapshotting", &release));

    // Fails at run time: the target's filesystem fills up (4 MiB left: records
    // still fit) while the job holds its temporary snapshot.
    let id = d.backup("hdd", "busy-vol");
    wait_for(
        || d.log().contains("holding at snapshotting"),
        "the snapshot to be taken",
    );
    assert_eq!(
        names_in(&l.gold).len(),
        2,
        "volume and its temporary snapshot"
    );
    let hdd = l.backups.parent().unwrap();
    ok(&format!(
        "fallocate -l $(( $(stat -f -c '%a' '{h}') * $(stat -f -c '%S' '{h}') - 4194304 )) '{h}/filler'",
        h = hdd.display()
    ));
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &id), "error");
    let record = d.record("hdd", &id);
    assert_eq!(record["snapshot_used"], true, "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap_or("")
            .contains("No space left"),
        "{record}"
    );
    assert!(record["temporary_snapshot"].is_null(), "{record}");
    assert_eq!(
        names_in(&l.gold),
        ["volume-busy-vol"],
        "the temporary snapshot is gone with the failure: {}",
        d.log()
    );
    std::fs::remove_file(hdd.join("filler")).unwrap();
    d.stop_clean();

    // Cut off by a stop while holding its snapshot: gone as well. (A daemon of its own:
    // the release file above would let this job go on at once.)
    let d = sb.start_daemon_env(&l.config, &hold_env("snapshotting"));
    let id = d.backup("hdd", "busy-vol");
    wait_for(
        || d.log().contains("holding at snapshotting"),
        "the second snapshot to be taken",
    );
    assert_eq!(
        names_in(&l.gold).len(),
        2,
        "volume and its temporary snapshot"
    );
    assert!(d.stop().success());
    assert_eq!(names_in(&l.gold), ["volume-busy-vol"], "after a stop");
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &id)["status"], "error");
    assert!(d.record("hdd", &id)["temporary_snapshot"].is_null());
    d.stop_clean();
    sb.release(holder);
}

#[test]
fn volume_bound_to_a_loop_device_is_backed_up_from_a_snapshot() {
    let mut sb = Sandbox::new("loopuse");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.main, "attached", 16);
    let dev = sb.attach_loop(&source);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "attached wait");
    assert_eq!(d.record("hdd", &id)["snapshot_used"], true);
    ok(&format!("cmp '{}' '{dev}'", d.image("hdd", &id).display()));
    assert_eq!(names_in(&l.main), ["volume-attached"]);
    sb.detach_loop(&dev);
}

#[test]
fn volume_attached_during_the_copy_fails_that_backup() {
    let mut sb = Sandbox::new("attached-late");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "copy_bps_limit = 4000000");
    let source = random_volume(&l.gold, "v", 32);
    let before = sha256(&source);
    let d = sb.start_daemon(&l.config);
    let stored = allocated_under(&l.backups);
    let id = d.backup("hdd", "v");
    // 8 s of copying at 4 MB/s (the check comes when it ends): attached as soon as the
    // copy has begun.
    wait_for(
        || {
            d.jobs("hdd").lines().any(|l| {
                l.starts_with(&id) && l.contains(" copying ") && !l.contains(" copying 0/")
            })
        },
        "the copy to begin",
    );
    let dev = sb.attach_loop(&source);
    assert_eq!(d.wait_job("hdd", &id), "error");
    let record = d.record("hdd", &id);
    assert!(
        record["error"]
            .as_str()
            .unwrap_or("")
            .contains("attached during the copy"),
        "{record}"
    );
    assert_errno(
        std::fs::metadata(d.image("hdd", &id)),
        libc::ENOENT,
        "the image of a failed backup",
    );
    assert_eq!(
        files_mentioning(&l.backups, &id),
        [record_file(&l.backups, &id)]
    );
    assert!(allocated_under(&l.backups) < stored + (256 << 10));
    sb.detach_loop(&dev);
    assert_eq!(sha256(&source), before);
}

#[test]
fn volume_written_or_grown_during_the_copy_fails_that_backup() {
    let mut sb = Sandbox::new("written-late");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "copy_bps_limit = 4000000");
    let d = sb.start_daemon(&l.config);
    // Each change alone: a write in place (the mtime moves, the size stays) and a growth
    // whose mtime is put back (only the size moves). Neither takes a lock or a loop
    // device, so only the stat after the copy can tell.
    let reference = sb.path("mtime-reference");
    let changes: [(&str, String); 2] = [
        (
            "written",
            "dd if=/dev/urandom of='{vol}' bs=4k seek=256 count=1 conv=notrunc status=none"
                .to_string(),
        ),
        (
            "grown",
            format!(
                "touch -r '{{vol}}' '{r}' && truncate -s +1M '{{vol}}' && touch -m -r '{r}' '{{vol}}'",
                r = reference.display()
            ),
        ),
    ];
    for (volume_id, change) in changes {
        let source = random_volume(&l.gold, volume_id, 24);
        let stored = allocated_under(&l.backups);
        let id = d.backup("hdd", volume_id);
        // 6 s of copying at 4 MB/s (the check comes when it ends): changed as soon as
        // the copy has begun.
        wait_for(
            || {
                d.jobs("hdd").lines().any(|l| {
                    l.starts_with(&id) && l.contains(" copying ") && !l.contains(" copying 0/")
                })
            },
            "the copy to begin",
        );
        ok(&change.replace("{vol}", &source.to_string_lossy()));
        assert_eq!(d.wait_job("hdd", &id), "error", "{volume_id}");
        let record = d.record("hdd", &id);
        assert!(
            record["error"]
                .as_str()
                .unwrap_or("")
                .contains("written during the copy"),
            "{volume_id}: {record}"
        );
        assert_errno(
            std::fs::metadata(d.image("hdd", &id)),
            libc::ENOENT,
            "the image of a failed backup",
        );
        assert_eq!(
            files_mentioning(&l.backups, &id),
            [record_file(&l.backups, &id)]
        );
        assert!(allocated_under(&l.backups) < stored + (256 << 10));
    }
    d.stop_clean();
}

/// Until some job of `volume_id` has copied more than nothing.
#[track_caller]
fn wait_copying(d: &Daemon, target: &str, volume_id: &str) {
    wait_for(
        || {
            d.jobs(target).lines().any(|l| {
                let fields: Vec<&str> = l.split(' ').collect();
                fields.get(1) == Some(&volume_id)
                    && fields.get(2) == Some(&"copying")
                    && !fields.get(3).is_some_and(|done| done.starts_with("0/"))
            })
        },
        "the copy to begin",
    );
}

#[test]
fn a_request_with_wait_fails_with_ecanceled_ebusy_or_eio_as_its_job_ended() {
    let mut sb = Sandbox::new("wait-errnos");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "copy_bps_limit = 4000000");
    for volume_id in ["cut", "written", "shrunk"] {
        random_volume(&l.gold, volume_id, 24);
    }
    // Each `wait` request runs in a thread of its own: the write returns when the job
    // has ended, with its errno.
    let request_in_thread = |d: &Daemon, line: &str| {
        let (request, line) = (d.target("hdd").join("request"), format!("{line}\n"));
        std::thread::spawn(move || write_errno(&request, line.as_bytes()))
    };

    // Cut off by a stop: ECANCELED.
    let d = sb.start_daemon_env(&l.config, &hold_env("started"));
    let cut = request_in_thread(&d, "cut wait");
    wait_for(
        || d.log().contains("holding at started"),
        "the job to be held",
    );
    assert!(d.stop().success());
    assert_eq!(cut.join().unwrap(), Some(libc::ECANCELED), "a wait cut off");

    let d = sb.start_daemon(&l.config);
    // Written during the copy: EBUSY.
    let written = request_in_thread(&d, "written wait");
    wait_copying(&d, "hdd", "written");
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=4k seek=256 count=1 conv=notrunc status=none",
        l.gold.join("volume-written").display()
    ));
    assert_eq!(written.join().unwrap(), Some(libc::EBUSY), "written");
    // Shrunk under the copy: the source ends early, a failure with no errno of its own:
    // EIO.
    let shrunk = request_in_thread(&d, "shrunk wait");
    wait_copying(&d, "hdd", "shrunk");
    truncate(&l.gold.join("volume-shrunk"), 1 << 20).unwrap();
    assert_eq!(
        shrunk.join().unwrap(),
        Some(libc::EIO),
        "shrunk:\n{}",
        d.log()
    );
    d.stop_clean();
}

#[test]
fn in_use_volume_without_reflinks_is_refused_with_ebusy() {
    let mut sb = Sandbox::new("noreflink");
    // gold is on ext4: no reflinks, so no snapshots.
    let l = layout(&mut sb, Some(Fs::Ext4), Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "pinned", 8);
    let holder = sb.hold_lock(&source);
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.request("hdd", "pinned wait"), Some(libc::EBUSY));
    assert_eq!(d.request("hdd", "pinned"), Some(libc::EBUSY));
    assert_eq!(
        names_in(&d.target("hdd")),
        ["by-volume", "jobs", "request", "verify"]
    );
    assert!(d.log().contains("cannot be snapshotted"), "{}", d.log());
    sb.release(holder);
    // Once released, the same volume backs up.
    assert_eq!(d.request("hdd", "pinned wait"), None);
}

#[test]
fn request_refusals_have_their_errnos_and_change_nothing() {
    let mut sb = Sandbox::new("errnos");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "slow", 8);
    let before = sha256(&source);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("finishing", &release));
    let request = d.target("hdd").join("request");
    for bad in [
        &b"\n"[..],
        b"../../etc/passwd\n",
        b"slow frobnicate\n",
        b"slow wait wait\n",
        b"slow name=\n",
        b"slow\nslow\n",
        b"\xff\xfe\n",
        b"slow incremental incremental\n",
    ] {
        assert_eq!(write_errno(&request, bad), Some(libc::EINVAL), "{bad:?}");
    }
    assert_eq!(d.request("hdd", "no-such-volume"), Some(libc::ENOENT));
    let id = d.backup("hdd", "slow");
    // Held before it ends: the backup is running for as long as this test needs.
    d.wait_state("hdd", &id, "finishing");
    assert_eq!(
        d.request("hdd", "slow"),
        Some(libc::EBUSY),
        "a second backup of a busy volume"
    );
    // Restores into a volume being backed up are refused too, and write nothing.
    assert_eq!(
        write_errno(&d.volume("ssd", "slow"), b"x"),
        Some(libc::EBUSY)
    );
    assert_errno(
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(d.volume("ssd", "slow")),
        libc::EBUSY,
        "O_TRUNC open of a volume being backed up",
    );
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &id), "available");
    assert_eq!(sha256(&source), before);
    let records: Vec<String> = names_in(&d.target("hdd"))
        .into_iter()
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert_eq!(
        records,
        [format!("{id}.json")],
        "only the accepted request made a record"
    );
}

#[test]
fn backup_of_a_volume_open_for_writing_is_refused_with_ebusy() {
    let mut sb = Sandbox::new("busy-restore");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "restoring", 4);
    let d = sb.start_daemon(&l.config);
    // A restore in progress: the volume is open for writing through the mount.
    let restore = std::fs::OpenOptions::new()
        .write(true)
        .open(d.volume("ssd", "restoring"))
        .unwrap();
    assert_eq!(d.request("hdd", "restoring"), Some(libc::EBUSY));
    assert_eq!(d.request("hdd", "restoring wait"), Some(libc::EBUSY));
    assert!(
        !names_in(&d.target("hdd"))
            .iter()
            .any(|n| n.ends_with(".json")),
        "a refusal makes no record"
    );
    drop(restore);
    // The restore ended: the volume backs up again (the kernel releases the file a moment
    // after close returns).
    wait_for(
        || d.request("hdd", "restoring wait") != Some(libc::EBUSY),
        "the restore to end",
    );
    assert!(
        names_in(&d.target("hdd"))
            .iter()
            .any(|n| n.ends_with(".img"))
    );
}

#[test]
fn target_too_small_is_refused_with_enospc() {
    let mut sb = Sandbox::new("enospc");
    let (ssd, _, config) = small_target(&mut sb, "small", 24);
    random_volume(&ssd, "big", 64);
    random_volume(&ssd, "small", 4);
    let d = sb.start_daemon(&config);
    assert_eq!(d.request("small", "big wait"), Some(libc::ENOSPC));
    assert_eq!(d.request("small", "big"), Some(libc::ENOSPC));
    assert_eq!(
        names_in(&d.target("small")),
        ["by-volume", "jobs", "request", "verify"],
        "a refusal makes no record"
    );
    assert_eq!(d.request("small", "small wait"), None);
}

#[test]
fn two_requests_that_fit_alone_but_not_together_are_not_both_accepted() {
    // Issue 23: the space check ignored jobs already accepted, so both were, and both
    // failed mid-copy.
    let mut sb = Sandbox::new("enospc-two");
    let (ssd, _, config) = small_target(&mut sb, "small", 40);
    random_volume(&ssd, "a", 18);
    random_volume(&ssd, "b", 18);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&config, &pause_env("started", &release));
    let first = d.backup("small", "a");
    assert_eq!(d.request("small", "b"), Some(libc::ENOSPC));
    assert!(
        d.log().contains("reserved by backups already accepted"),
        "{}",
        d.log()
    );
    release_jobs(&release);
    assert_eq!(d.wait_job("small", &first), "available");
    // Once the first backup is gone, the second fits.
    std::fs::remove_file(d.image("small", &first)).expect("rm the first backup");
    let second = d.backup("small", "b");
    assert_eq!(d.wait_job("small", &second), "available");
}

#[test]
fn an_incremental_request_is_not_refused_for_data_its_parent_already_holds() {
    // Issue 23: the space check compared free space with all the data of the volume, so
    // an incremental that stores a few MiB was refused on a target with less free space
    // than that. On btrfs (reflinks) the incremental shares its parent's data.
    let mut sb = Sandbox::new("enospc-incr");
    let hdd = sb.loop_fs("hdd", Fs::Btrfs, 256);
    let gold = sb.mkdir("ssd");
    let backups = hdd.join("backups");
    std::fs::create_dir_all(&backups).expect("pool dir");
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n[backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ backups = \"{}\" }}\n\
         [targets.small]\nbackend = \"hdd\"\npool = \"backups\"\n",
        state.display(),
        gold.display(),
        backups.display()
    ));
    let volume = random_volume(&gold, "v", 96);
    let d = sb.start_daemon(&config);
    let full = d.backup("small", "v incremental wait");
    assert_eq!(d.record("small", &full)["status"], "available");
    let free = nix::sys::statvfs::statvfs(&backups).expect("statvfs");
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    assert!(
        free < 96 << 20,
        "the test needs less free space than the volume: {free}"
    );
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=1M count=2 seek=10 conv=notrunc status=none",
        volume.display()
    ));
    // A full backup would not fit; the incremental does.
    assert_eq!(d.request("small", "v"), Some(libc::ENOSPC));
    let incremental = d.backup("small", "v incremental wait");
    let record = d.record("small", &incremental);
    assert_eq!(record["status"], "available", "{record}");
    assert_eq!(record["parent_id"], full.as_str());
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("small", &incremental).display(),
        volume.display()
    ));
}

#[test]
fn backup_images_are_read_only_and_status_files_refuse_writes() {
    let mut sb = Sandbox::new("ro");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 4);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let image = d.image("hdd", &id);
    let record = d.target("hdd").join(format!("{id}.json"));
    assert_eq!(write_errno(&image, b"x"), Some(libc::EROFS));
    assert_errno(
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&image),
        libc::EROFS,
        "O_TRUNC open of an image",
    );
    assert_errno(truncate(&image, 0), libc::EROFS, "truncate of an image");
    assert_errno(truncate(&image, 1 << 30), libc::EROFS, "extending an image");
    assert_eq!(
        write_errno(&d.target("hdd").join("jobs"), b"x"),
        Some(libc::EACCES)
    );
    assert_eq!(write_errno(&record, b"x"), Some(libc::EACCES));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 4 << 20);
    ok(&format!(
        "cmp '{}' '{}/volume-v'",
        image.display(),
        l.gold.display()
    ));
}

#[test]
fn chmod_chown_mkdir_rmdir_and_rename_fail_with_eperm_everywhere() {
    let mut sb = Sandbox::new("eperm");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let t = d.target("hdd");
    let nodes = [
        d.mnt.clone(),
        d.mnt.join("backups"),
        d.mnt.join("volumes"),
        t.clone(),
        t.join("by-volume"),
        t.join("by-volume/v"),
        t.join("request"),
        t.join("jobs"),
        t.join("verify"),
        d.image("hdd", &id),
        t.join(format!("{id}.json")),
        d.mnt.join("volumes/ssd"),
        d.volume("ssd", "v"),
    ];
    for node in &nodes {
        let what = node.display();
        assert_errno(
            std::fs::set_permissions(node, std::fs::Permissions::from_mode(0o777)),
            libc::EPERM,
            &format!("chmod {what}"),
        );
        assert_errno(
            lchown(node, 1, u32::MAX),
            libc::EPERM,
            &format!("chown {what}"),
        );
        assert_errno(
            lchown(node, u32::MAX, 1),
            libc::EPERM,
            &format!("chgrp {what}"),
        );
    }
    for dir in [
        &d.mnt,
        &d.mnt.join("backups"),
        &t,
        &d.mnt.join("volumes/ssd"),
    ] {
        assert_errno(
            std::fs::create_dir(dir.join("new-dir")),
            libc::EPERM,
            &format!("mkdir in {}", dir.display()),
        );
    }
    for dir in [
        t.join("by-volume/v"),
        t.join("by-volume"),
        t.clone(),
        d.mnt.join("volumes/ssd"),
        d.mnt.join("backups"),
    ] {
        assert_errno(
            std::fs::remove_dir(&dir),
            libc::EPERM,
            &format!("rmdir {}", dir.display()),
        );
    }
    let renames = [
        (
            d.image("hdd", &id),
            t.join("00000000-0000-4000-8000-000000000001.img"),
        ),
        (
            t.join(format!("{id}.json")),
            t.join("00000000-0000-4000-8000-000000000001.json"),
        ),
        (d.volume("ssd", "v"), d.volume("ssd", "w")),
        (d.volume("ssd", "v"), d.volume("hdd", "v")),
        (t.join("by-volume"), t.join("by-vol")),
        (t.join("request"), t.join("request2")),
    ];
    for (from, to) in &renames {
        assert_errno(
            std::fs::rename(from, to),
            libc::EPERM,
            &format!("rename {} {}", from.display(), to.display()),
        );
    }
    // Nothing changed.
    for node in &nodes {
        assert_eq!(std::fs::symlink_metadata(node).unwrap().uid(), 0);
    }
    assert_eq!(names_in(&l.gold), ["volume-v"]);
    assert_eq!(names_in(&l.main), Vec::<String>::new());
    assert!(d.image("hdd", &id).exists());
}

#[test]
fn tree_modes_are_the_documented_ones() {
    let mut sb = Sandbox::new("modes");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 1);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let t = d.target("hdd");
    let expected = [
        (d.mnt.join("backups"), 0o040755),
        (d.mnt.join("volumes"), 0o040755),
        (t.clone(), 0o040700),
        (t.join("by-volume"), 0o040700),
        (d.mnt.join("volumes/ssd"), 0o040700),
        (d.mnt.join("volumes/hdd"), 0o040700),
        (d.volume("ssd", "v"), 0o100600),
        (t.join("request"), 0o100600),
        (d.image("hdd", &id), 0o100400),
        (t.join(format!("{id}.json")), 0o100400),
        (t.join("jobs"), 0o100400),
        (d.mnt.join("restores"), 0o100400),
        (d.mnt.join("metrics"), 0o040700),
        (d.mnt.join("metrics/backupfs.prom"), 0o100400),
    ];
    for (path, mode) in expected {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            meta.mode(),
            mode,
            "{}: {:o}, expected {mode:o}",
            path.display(),
            meta.mode()
        );
        assert_eq!(
            (meta.uid(), meta.gid()),
            (0, 0),
            "{} is root's",
            path.display()
        );
    }
}

#[test]
fn every_record_field_is_an_extended_attribute_of_the_image() {
    let mut sb = Sandbox::new("xattr");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 3);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait name=weekly");
    let image = d.image("hdd", &id);
    let fields = [
        "id",
        "volume_id",
        "backend",
        "pool",
        "target",
        "status",
        "size",
        "created_at",
        "completed_at",
        "name",
        "snapshot_used",
        "parent_id",
        "error",
        "stored_bytes",
        "verified_at",
    ];
    // As the record says, with null as empty: before and after a verify.
    let check_all = |record: &serde_json::Value| {
        for field in fields {
            let value = getxattr(&image, &format!("user.backupfs.{field}"))
                .unwrap_or_else(|e| panic!("user.backupfs.{field}: {e}"));
            let expected = match &record[field] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(
                String::from_utf8_lossy(&value),
                expected,
                "user.backupfs.{field}"
            );
        }
    };
    let record = d.record("hdd", &id);
    assert!(record["verified_at"].is_null());
    check_all(&record);
    assert_eq!(getxattr(&image, "user.backupfs.name").unwrap(), b"weekly");
    assert_eq!(getxattr(&image, "user.backupfs.size").unwrap(), b"3145728");
    assert_eq!(getxattr(&image, "user.backupfs.verified_at").unwrap(), b"");
    assert_eq!(
        write_errno(
            &d.target("hdd").join("verify"),
            format!("{id}\n").as_bytes()
        ),
        None
    );
    let verified = d.record("hdd", &id);
    assert!(verified["verified_at"].is_string(), "{verified}");
    check_all(&verified);

    let mut listed = listxattr(&image).unwrap();
    listed.sort();
    let mut wanted: Vec<String> = fields
        .iter()
        .map(|f| format!("user.backupfs.{f}"))
        .collect();
    wanted.sort();
    assert_eq!(
        listed, wanted,
        "listxattr names every field and nothing else"
    );
    let dump = ok(&format!("getfattr -d '{}'", image.display()));
    assert!(
        dump.contains(&format!("user.backupfs.id=\"{id}\"")),
        "{dump}"
    );

    for other in [
        "user.backupfs.checksums",
        "user.backupfs.damaged_blocks",
        "user.backupfs.format",
        "user.backupfs.",
        "user.backupfs.nope",
        "user.other",
    ] {
        assert_errno(getxattr(&image, other), libc::ENODATA, other);
    }
    // Outside user.* nothing is supported (so `ls -l` stops asking, issue 28).
    assert_errno(
        getxattr(&image, "trusted.backupfs.id"),
        libc::EOPNOTSUPP,
        "trusted.backupfs.id",
    );
    // Other nodes have no attributes.
    assert_errno(
        getxattr(
            &d.target("hdd").join(format!("{id}.json")),
            "user.backupfs.id",
        ),
        libc::ENODATA,
        "an attribute of a record",
    );
    assert_errno(
        setxattr(&image, "user.backupfs.name", b"changed"),
        libc::EPERM,
        "setting one of the record's own attributes",
    );
    assert_eq!(getxattr(&image, "user.backupfs.name").unwrap(), b"weekly");
    // An operator's note: kept in the record, listed, read back, removed.
    ok(&format!(
        "setfattr -n user.note -v 'checked by ops' '{}'",
        image.display()
    ));
    assert_eq!(getxattr(&image, "user.note").unwrap(), b"checked by ops");
    assert_eq!(
        d.record("hdd", &id)["xattrs"]["user.note"],
        "checked by ops"
    );
    let listed = ok(&format!(
        "getfattr --absolute-names -d '{}'",
        image.display()
    ));
    assert!(listed.contains("user.note=\"checked by ops\""), "{listed}");
    ok(&format!("setfattr -x user.note '{}'", image.display()));
    assert_errno(
        getxattr(&image, "user.note"),
        libc::ENODATA,
        "a removed note",
    );
    let out = sh(&format!("setfattr -x user.note '{}'", image.display()));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such attribute"),
        "{out:?}"
    );
    assert_errno(
        setxattr(&image, "trusted.mine", b"x"),
        libc::EOPNOTSUPP,
        "an attribute outside user.*",
    );
}

/// setxattr(2) with `flags` (XATTR_CREATE, XATTR_REPLACE).
fn setxattr_flags(path: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (path, name) = (
        c_string(path.as_os_str().as_bytes()),
        c_string(name.as_bytes()),
    );
    // SAFETY: valid C strings, a buffer of the length given.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn removexattr(path: &Path, name: &str) -> std::io::Result<()> {
    let (path, name) = (
        c_string(path.as_os_str().as_bytes()),
        c_string(name.as_bytes()),
    );
    // SAFETY: valid C strings.
    if unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn c_string(bytes: &[u8]) -> std::ffi::CString {
    std::ffi::CString::new(bytes).expect("no NUL")
}

#[test]
fn operator_attributes_are_utf8_256_kib_together_honour_create_replace_and_only_user() {
    let mut sb = Sandbox::new("xattr-rules");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let image = d.image("hdd", &id);

    // XATTR_CREATE and XATTR_REPLACE.
    setxattr_flags(&image, "user.a", b"one", libc::XATTR_CREATE).unwrap();
    assert_errno(
        setxattr_flags(&image, "user.a", b"two", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE of a set attribute",
    );
    assert_errno(
        setxattr_flags(&image, "user.b", b"two", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE of an unset attribute",
    );
    assert_errno(getxattr(&image, "user.b"), libc::ENODATA, "not made");
    setxattr_flags(&image, "user.a", b"two", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&image, "user.a").unwrap(), b"two");
    // UTF-8 only: the record keeps text.
    assert_errno(
        setxattr(&image, "user.bin", b"\xff\xfe"),
        libc::EINVAL,
        "a value that is not UTF-8",
    );
    assert_errno(getxattr(&image, "user.bin"), libc::ENODATA, "not kept");
    // Other namespaces are not supported: set, remove and read.
    for name in ["trusted.note", "security.note"] {
        assert_errno(setxattr(&image, name, b"x"), libc::EOPNOTSUPP, name);
        assert_errno(removexattr(&image, name), libc::EOPNOTSUPP, name);
        assert_errno(getxattr(&image, name), libc::EOPNOTSUPP, name);
    }
    removexattr(&image, "user.a").unwrap();

    // 256 KiB of names and values together, counted as the record stores them.
    let big = |name: &str| vec![b'a'; (64 << 10) - name.len()];
    for n in 0..4 {
        let name = format!("user.big{n}");
        setxattr(&image, &name, &big(&name))
            .unwrap_or_else(|e| panic!("{name}: {e}; log:\n{}", d.log()));
    }
    assert_errno(
        setxattr(&image, "user.x", b"1"),
        libc::ENOSPC,
        "one byte beyond 256 KiB",
    );
    let mut longer = big("user.big0");
    longer.push(b'a');
    assert_errno(
        setxattr(&image, "user.big0", &longer),
        libc::ENOSPC,
        "a replacement one byte longer",
    );
    setxattr(&image, "user.big0", &vec![b'b'; (64 << 10) - 9]).unwrap();
    for n in 0..4 {
        removexattr(&image, &format!("user.big{n}")).unwrap();
    }
    // Control characters are UTF-8 too, and take six bytes each in the record's JSON:
    // 64 KiB of them count 384 KiB (uncounted, three such values made the record too
    // large to read back, and the backup with it).
    let control = vec![1u8; (64 << 10) - 9];
    assert_errno(
        setxattr(&image, "user.ctl0", &control),
        libc::ENOSPC,
        "64 KiB of control characters",
    );
    let fits = vec![1u8; 40 << 10];
    setxattr(&image, "user.ctl1", &fits).unwrap();
    assert_eq!(
        d.record("hdd", &id)["xattrs"]["user.ctl1"]
            .as_str()
            .map(str::len),
        Some(40 << 10)
    );
    d.stop_clean();
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &id)["status"], "available", "{}", d.log());
    assert_eq!(getxattr(&image, "user.ctl1").unwrap(), fits);
    assert_eq!(sha256(&image), sha256(&source));
    d.stop_clean();
}

#[test]
fn filesystem_inside_a_backup_can_be_mounted_read_only() {
    let mut sb = Sandbox::new("look");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let files = sb.mkdir("files");
    ok(&format!(
        "cd '{}' && echo hello > a.txt && mkdir sub && head -c 3M /dev/urandom > sub/blob",
        files.display()
    ));
    let volume = l.gold.join("volume-fsvol");
    ok(&format!(
        "mkfs.ext4 -q -F -d '{}' '{}' 64M",
        files.display(),
        volume.display()
    ));
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "fsvol wait");
    let look = sb.mkdir("look");
    let dev = sb.losetup(&d.image("hdd", &id), true);
    sb.mount(&dev, &look, "ro");
    ok(&format!(
        "diff -r '{}' '{}' -x lost+found",
        files.display(),
        look.display()
    ));
    sb.umount(&look);
    sb.detach_loop(&dev);
}

#[test]
fn jobs_beyond_max_parallel_wait_as_queued() {
    let mut sb = Sandbox::new("queue");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "max_parallel_jobs = 1");
    random_volume(&l.gold, "first", 6);
    random_volume(&l.gold, "second", 4);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("finishing", &release));
    let first = d.backup("hdd", "first");
    d.wait_state("hdd", &first, "finishing");
    // The one worker holds the first job: the second waits, whatever the timing.
    let second = d.backup("hdd", "second");
    let jobs = d.jobs("hdd");
    assert!(
        jobs.lines()
            .any(|l| l == format!("{second} second queued 0/{}", 4 << 20)),
        "jobs:\n{jobs}"
    );
    assert!(
        jobs.find(&first) < jobs.find(&second),
        "oldest first:\n{jobs}"
    );
    // A queued backup makes its volume busy too.
    assert_eq!(d.request("hdd", "second"), Some(libc::EBUSY));
    assert_eq!(
        write_errno(&d.volume("ssd", "second"), b"x"),
        Some(libc::EBUSY),
        "a restore into a volume whose backup is queued"
    );
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &first), "available");
    assert_eq!(d.wait_job("hdd", &second), "available");
}

#[test]
fn rm_deletes_backups_and_failed_records_only() {
    let mut sb = Sandbox::new("rm");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 4);
    random_volume(&l.gold, "w", 4);
    let d = sb.start_daemon(&l.config);
    let empty = allocated_under(&l.backups);
    let id = d.backup("hdd", "v wait");
    let json = d.target("hdd").join(format!("{id}.json"));
    assert_errno(
        std::fs::remove_file(&json),
        libc::EPERM,
        "rm of the record of an available backup",
    );
    assert_eq!(d.record("hdd", &id)["status"], "available");
    assert!(allocated_under(&l.backups) >= empty + (4 << 20));
    std::fs::remove_file(d.image("hdd", &id)).unwrap();
    assert_errno(
        std::fs::metadata(&json),
        libc::ENOENT,
        "the record after rm",
    );
    // Data, checksums and record are gone, whatever the files were called.
    assert_eq!(
        files_mentioning(&l.backups, &id),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(
        allocated_under(&l.backups) < empty + (256 << 10),
        "{} bytes still allocated",
        allocated_under(&l.backups)
    );
    assert_eq!(
        names_in(&d.target("hdd")),
        ["by-volume", "jobs", "request", "verify"]
    );
    d.stop_clean();

    // A failed backup: interrupted by a stop.
    let d = sb.start_daemon_env(&l.config, &hold_env("finishing"));
    let failed = d.backup("hdd", "w");
    d.wait_state("hdd", &failed, "finishing");
    d.stop_clean();
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &failed)["status"], "error");
    assert_errno(
        std::fs::remove_file(d.image("hdd", &failed)),
        libc::ENOENT,
        "rm of the image of a failed backup",
    );
    std::fs::remove_file(d.target("hdd").join(format!("{failed}.json"))).unwrap();
    assert_eq!(
        names_in(&d.target("hdd")),
        ["by-volume", "jobs", "request", "verify"]
    );
    assert_eq!(
        files_mentioning(&l.backups, &failed),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn by_volume_latest_is_the_newest_of_several_backups() {
    let mut sb = Sandbox::new("latest");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "v", 1);
    random_volume(&l.gold, "other", 1);
    let d = sb.start_daemon(&l.config);
    let by_volume = d.target("hdd").join("by-volume");
    let latest = by_volume.join("v/latest.img");
    let link = || {
        std::fs::read_link(&latest)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(names_in(&by_volume), Vec::<String>::new());
    // Backups of small volumes made quickly: several end within the same second, and the
    // newest must still be the one made last. Each has different data.
    let mut ids = Vec::new();
    for round in 0..6 {
        ok(&format!(
            "printf 'round {round}' | dd of='{}' conv=notrunc status=none",
            source.display()
        ));
        let id = d.backup("hdd", "v wait");
        let pointed = link();
        let completed = |link: &str| {
            let id = link.trim_start_matches("../../").trim_end_matches(".img");
            d.record("hdd", id)["completed_at"].clone()
        };
        assert_eq!(
            pointed,
            format!("../../{id}.img"),
            "after backup {round}: latest.img is not the backup just made (that one completed at {}, the one it points to at {})",
            completed(&format!("../../{id}.img")),
            completed(&pointed)
        );
        ok(&format!(
            "cmp '{}' '{}'",
            latest.display(),
            source.display()
        ));
        ids.push(id);
    }
    // Another volume's backups do not change it; only volumes with a backup are listed.
    d.backup("hdd", "other wait");
    assert_eq!(link(), format!("../../{}.img", ids[5]));
    assert_eq!(names_in(&by_volume), ["other", "v"]);
    // Deleting the newest makes the one before it the newest.
    std::fs::remove_file(d.image("hdd", &ids[5])).unwrap();
    assert_eq!(link(), format!("../../{}.img", ids[4]));
    for id in &ids[..5] {
        std::fs::remove_file(d.image("hdd", id)).unwrap();
    }
    assert_eq!(names_in(&by_volume), ["other"]);
    assert_errno(
        std::fs::symlink_metadata(&latest),
        libc::ENOENT,
        "latest.img of a volume without backups",
    );
}

#[test]
fn verify_refuses_malformed_unknown_and_unavailable_backups() {
    let mut sb = Sandbox::new("verify");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 2);
    random_volume(&l.gold, "w", 2);
    let release = sb.path("release");
    let d = sb.start_daemon_env(&l.config, &pause_env("finishing", &release));
    let verify = d.target("hdd").join("verify");
    let running = d.backup("hdd", "w");
    d.wait_state("hdd", &running, "finishing");
    for bad in [
        &b"\n"[..],
        b"not-a-uuid\n",
        b"../../etc/passwd\n",
        b"0000000-0000-4000-8000-000000000000\n",
        b"\xff\n",
    ] {
        assert_eq!(write_errno(&verify, bad), Some(libc::EINVAL), "{bad:?}");
    }
    assert_eq!(
        write_errno(&verify, b"00000000-0000-4000-8000-000000000000\n"),
        Some(libc::ENOENT),
        "an unknown backup"
    );
    assert_eq!(
        write_errno(&verify, format!("{running}\n").as_bytes()),
        Some(libc::ENOENT),
        "a backup still being made"
    );
    release_jobs(&release);
    assert_eq!(d.wait_job("hdd", &running), "available");
    let id = d.backup("hdd", "v wait");
    assert_eq!(write_errno(&verify, format!("{id}\n").as_bytes()), None);
    d.stop_clean();

    // A failed backup has nothing to verify.
    let d = sb.start_daemon_env(&l.config, &hold_env("finishing"));
    let failed = d.backup("hdd", "w");
    d.wait_state("hdd", &failed, "finishing");
    d.stop_clean();
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &failed)["status"], "error");
    assert_eq!(
        write_errno(&verify, format!("{failed}\n").as_bytes()),
        Some(libc::ENOENT),
        "a failed backup"
    );
    assert!(d.record("hdd", &failed)["verified_at"].is_null());
}

#[test]
fn backups_and_records_survive_a_restart() {
    let mut sb = Sandbox::new("restart");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait name=keep");
    let record = d.record("hdd", &id);
    d.stop_clean();
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &id), record);
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
    let jobs = d.jobs("hdd");
    assert!(
        jobs.lines()
            .any(|l| l.starts_with(&format!("{id} v available "))),
        "ended jobs are listed again after a restart:\n{jobs}"
    );
}

#[test]
fn a_volume_with_remotefs_snapshot_overlays_is_backed_up_and_the_log_says_what_it_holds() {
    // Issue 23: such a request was accepted silently; the backup holds `volume-<id>`, not
    // the newer data of Cinder's overlay `volume-<id>.<snapshot-id>`.
    let mut sb = Sandbox::new("overlays");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let volume = random_volume(&l.gold, "v", 2);
    let snapshot = "2b9e3c1a-5d6f-4a7b-8c9d-0e1f2a3b4c5d";
    std::fs::write(l.gold.join(format!("volume-v.{snapshot}")), b"newer data").unwrap();
    std::fs::write(l.gold.join("volume-v.info"), b"{}").unwrap();
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    assert_eq!(d.record("hdd", &id)["status"], "available");
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("snapshot overlays"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(line.contains(&format!("volume-v.{snapshot}")), "{line}");
    assert!(!line.contains("volume-v.info"), "{line}");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        volume.display()
    ));
}
