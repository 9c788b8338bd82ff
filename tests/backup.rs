//! Backups through a real mount, driven with real shell tools.

mod common;

use common::*;

#[test]
fn backup_with_wait_gives_an_image_identical_to_the_source() {
    let mut sb = Sandbox::new("wait");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "vol-a", 48);
    let before = sha256(&source);
    let d = sb.start_daemon(&l.config);

    assert_eq!(d.request("hdd", "vol-a wait name=nightly"), None);
    let listing = ok(&format!("ls '{}'", d.target("hdd").display()));
    let id = listing
        .lines()
        .find_map(|l| l.strip_suffix(".img"))
        .expect("an image is listed")
        .to_string();
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
    // Read again from storage (caches dropped): checked again on the way out.
    ok(&format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
    assert_eq!(sha256(&source), before, "the source must not change");

    let record = d.record("hdd", &id);
    assert_eq!(record["status"], "available");
    assert_eq!(record["volume_id"], "vol-a");
    assert_eq!(record["backend"], "ssd");
    assert_eq!(record["pool"], "gold");
    assert_eq!(record["target"], "hdd");
    assert_eq!(record["name"], "nightly");
    assert_eq!(record["size"], 48 << 20);
    assert_eq!(record["snapshot_used"], false);
    assert!(record["parent_id"].is_null());
    assert!(record["error"].is_null());
    assert_eq!(record["checksums"]["blocks"], 48);
    assert!(record["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(record["completed_at"].as_str().unwrap().ends_with('Z'));

    let xattrs = ok(&format!("getfattr -d '{}'", d.image("hdd", &id).display()));
    assert!(
        xattrs.contains("user.backupfs.volume_id=\"vol-a\""),
        "{xattrs}"
    );
    assert!(
        xattrs.contains("user.backupfs.status=\"available\""),
        "{xattrs}"
    );

    let jobs = d.jobs("hdd");
    let line = format!("{id} vol-a available {0}/{0}", 48 << 20);
    assert!(jobs.lines().any(|l| l == line), "jobs:\n{jobs}");

    let mode = ok(&format!("stat -c %a '{}'", d.image("hdd", &id).display()));
    assert_eq!(mode.trim(), "400");
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
fn backup_without_wait_returns_at_once_and_reads_back_its_id() {
    let mut sb = Sandbox::new("nowait");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "copy_bps_limit = 20000000");
    random_volume(&l.gold, "vol-b", 40);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "vol-b");
    assert_eq!(id.len(), 36, "a UUID: {id:?}");
    // Rate-limited to 20 MB/s, so the 40 MiB copy is still running: no image yet.
    let jobs = d.jobs("hdd");
    assert!(
        jobs.contains(&format!("{id} vol-b copying"))
            || jobs.contains(&format!("{id} vol-b queued")),
        "jobs:\n{jobs}"
    );
    assert!(
        !d.image("hdd", &id).exists(),
        "no partial image may be visible"
    );
    assert_eq!(d.record("hdd", &id)["status"], "creating");
    assert_eq!(d.wait_job("hdd", &id), "available");
    ok(&format!(
        "cmp '{}' '{}/volume-vol-b'",
        d.image("hdd", &id).display(),
        l.gold.display()
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
    let blocks: u64 = ok(&format!("stat -c %b '{}'", image.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(
        blocks * 512 < 16 << 20,
        "image allocates {} bytes",
        blocks * 512
    );
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
    let copy_blocks: u64 = ok(&format!("stat -c %b '{}'", copy.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(copy_blocks * 512 < 16 << 20);
}

#[test]
fn in_use_volume_is_backed_up_from_a_temporary_snapshot() {
    let mut sb = Sandbox::new("inuse");
    let l = layout(&mut sb, Some(Fs::Btrfs), Some(Fs::Xfs), "");
    let source = random_volume(&l.gold, "busy-vol", 32);
    let before = sha256(&source);
    let holder = sb.hold_lock(&source);
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.request("hdd", "busy-vol wait"), None);
    let id = ok(&format!(
        "ls '{}' | sed -n 's/\\.img$//p'",
        d.target("hdd").display()
    ))
    .trim()
    .to_string();
    assert_eq!(d.record("hdd", &id)["snapshot_used"], true);
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
    let left = ok(&format!("ls -A '{}'", l.gold.display()));
    assert_eq!(left.trim(), "volume-busy-vol", "the snapshot must be gone");
    assert_eq!(sha256(&source), before);
    sb.release(holder);
}

#[test]
fn volume_bound_to_a_loop_device_is_backed_up_from_a_snapshot() {
    let mut sb = Sandbox::new("loopuse");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.main, "attached", 16);
    let dev = sb.attach_loop(&source);
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.request("hdd", "attached wait"), None);
    let id = ok(&format!(
        "ls '{}' | sed -n 's/\\.img$//p'",
        d.target("hdd").display()
    ))
    .trim()
    .to_string();
    assert_eq!(d.record("hdd", &id)["snapshot_used"], true);
    ok(&format!("cmp '{}' '{dev}'", d.image("hdd", &id).display()));
    let left = ok(&format!("ls -A '{}'", l.main.display()));
    assert_eq!(left.trim(), "volume-attached");
    sb.detach_loop(&dev);
}

#[test]
fn in_use_volume_without_reflinks_is_refused_with_ebusy() {
    let mut sb = Sandbox::new("noreflink");
    // gold lives on the machine's own ext4: no reflinks, so no snapshots.
    let l = layout(&mut sb, Some(Fs::Ext4), Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "pinned", 8);
    let holder = sb.hold_lock(&source);
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.request("hdd", "pinned wait"), Some(libc::EBUSY));
    assert_eq!(d.request("hdd", "pinned"), Some(libc::EBUSY));
    let listing = ok(&format!("ls '{}'", d.target("hdd").display()));
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
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
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "copy_bps_limit = 10000000");
    random_volume(&l.gold, "slow", 40);
    let d = sb.start_daemon(&l.config);
    let request = d.target("hdd").join("request");
    for bad in [
        &b"\n"[..],
        b"../../etc/passwd\n",
        b"slow frobnicate\n",
        b"slow wait wait\n",
        b"slow name=\n",
        b"slow\nslow\n",
        b"\xff\xfe\n",
        b"slow incremental\n",
    ] {
        assert_eq!(write_errno(&request, bad), Some(libc::EINVAL), "{bad:?}");
    }
    assert_eq!(d.request("hdd", "no-such-volume"), Some(libc::ENOENT));
    let id = d.backup("hdd", "slow");
    assert_eq!(
        d.request("hdd", "slow"),
        Some(libc::EBUSY),
        "a second backup of a busy volume"
    );
    // Restores into a volume being backed up are refused too.
    assert_eq!(
        write_errno(&d.volume("ssd", "slow"), b"x"),
        Some(libc::EBUSY)
    );
    assert_eq!(d.wait_job("hdd", &id), "available");
    let records = ok(&format!(
        "ls '{}' | grep -c json",
        d.target("hdd").display()
    ));
    assert_eq!(
        records.trim(),
        "1",
        "only the accepted request made a record"
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
    assert_eq!(
        ok(&format!(
            "ls '{}' | grep -c json || true",
            d.target("small").display()
        ))
        .trim(),
        "0"
    );
    assert_eq!(d.request("small", "small wait"), None);
}

#[test]
fn backup_images_are_read_only_and_status_files_refuse_writes() {
    let mut sb = Sandbox::new("ro");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 4);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    assert_eq!(write_errno(&d.image("hdd", &id), b"x"), Some(libc::EROFS));
    assert_eq!(
        write_errno(&d.target("hdd").join("jobs"), b"x"),
        Some(libc::EACCES)
    );
    assert_eq!(
        write_errno(&d.target("hdd").join(format!("{id}.json")), b"x"),
        Some(libc::EACCES)
    );
    let out = sh(&format!("chmod 644 '{}'", d.image("hdd", &id).display()));
    assert!(!out.status.success());
    let out = sh(&format!("mkdir '{}/x'", d.target("hdd").display()));
    assert!(!out.status.success());
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
    let dev = ok(&format!(
        "losetup -r -f --show '{}'",
        d.image("hdd", &id).display()
    ))
    .trim()
    .to_string();
    let result = sh(&format!(
        "mount -o ro {dev} '{look}' && diff -r '{files}' '{look}' -x lost+found; rc=$?; umount '{look}'; exit $rc",
        look = look.display(),
        files = files.display()
    ));
    ok(&format!("losetup -d {dev}"));
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

#[test]
fn jobs_beyond_max_parallel_wait_as_queued() {
    let mut sb = Sandbox::new("queue");
    let l = layout(
        &mut sb,
        None,
        Some(Fs::Btrfs),
        "max_parallel_jobs = 1\ncopy_bps_limit = 20000000",
    );
    random_volume(&l.gold, "first", 24);
    random_volume(&l.gold, "second", 4);
    let d = sb.start_daemon(&l.config);
    let first = d.backup("hdd", "first");
    let second = d.backup("hdd", "second");
    let jobs = d.jobs("hdd");
    assert!(
        jobs.contains(&format!("{second} second queued 0/{}", 4 << 20)),
        "jobs:\n{jobs}"
    );
    assert_eq!(d.wait_job("hdd", &first), "available");
    assert_eq!(d.wait_job("hdd", &second), "available");
}

#[test]
fn rm_deletes_backups_and_failed_records_only() {
    let mut sb = Sandbox::new("rm");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 4);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let json = d.target("hdd").join(format!("{id}.json"));
    let out = sh(&format!("rm -f '{}'", json.display()));
    assert!(
        !out.status.success(),
        "the record of an available backup is not removed alone"
    );
    ok(&format!("rm '{}'", d.image("hdd", &id).display()));
    assert!(!json.exists());
    let left = ok(&format!("ls -A '{}'", l.backups.display()));
    assert_eq!(
        left.trim(),
        ".backupfs-target\n.backupfs.lock",
        "data, checksums and record are gone"
    );
}

#[test]
fn backups_and_records_survive_a_restart() {
    let mut sb = Sandbox::new("restart");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let source = random_volume(&l.gold, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait name=keep");
    let record = d.record("hdd", &id);
    assert!(d.stop().success());
    let d = sb.start_daemon(&l.config);
    assert_eq!(d.record("hdd", &id), record);
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
}
