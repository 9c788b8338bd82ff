//! The `block` driver through a real mount: loop devices stand for LVs (a directory of
//! `volume-<id>` links to them is what `/dev/<vg>/` looks like to backupfs).

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct BlockLayout {
    /// The block pool: `volume-<id>` links to loop devices.
    vg: PathBuf,
    config: PathBuf,
}

/// A block backend `lvm` (pool `vg`) and a `file` target `hdd` (on btrfs: reflinks, so
/// incrementals store what changed).
fn block_layout(sb: &mut Sandbox) -> BlockLayout {
    let vg = sb.mkdir("vg");
    let hdd = sb.loop_fs("hdd", Fs::Btrfs, 512);
    let backups = hdd.join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.lvm]\ndriver = \"block\"\npools = {{ vg = \"{}\" }}\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ backups = \"{}\" }}\n\
         [targets.hdd]\nbackend = \"hdd\"\npool = \"backups\"\n",
        sb.mkdir("state").display(),
        vg.display(),
        backups.display()
    ));
    BlockLayout { vg, config }
}

/// A loop device over a new sparse file of `size_mb` MiB, linked as `volume-<id>` in the
/// pool; `data`: (offset MiB, length MiB) of random data written to it.
fn loop_volume(sb: &mut Sandbox, vg: &Path, id: &str, size_mb: u64, data: &[(u64, u64)]) -> String {
    let file = sb.path(&format!("{id}.lv"));
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size_mb << 20))
        .unwrap();
    for (at, len) in data {
        ok(&format!(
            "head -c {len}M /dev/urandom | dd of='{}' bs=1M seek={at} conv=notrunc status=none",
            file.display()
        ));
    }
    let dev = sb.attach_loop(&file);
    std::os::unix::fs::symlink(&dev, vg.join(format!("volume-{id}"))).unwrap();
    dev
}

#[test]
fn block_volumes_are_listed_read_and_backed_up_and_a_thin_ones_image_stores_only_its_data() {
    let mut sb = Sandbox::new("blk-backup");
    let l = block_layout(&mut sb);
    let dense = loop_volume(&mut sb, &l.vg, "dense", 16, &[(0, 16)]);
    let thin = loop_volume(&mut sb, &l.vg, "thin", 64, &[(10, 2), (40, 1)]);
    // A link to a regular file is no volume: skipped, with a log line.
    let plain = sb.path("plain");
    std::fs::write(&plain, vec![7u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&plain, l.vg.join("volume-plain")).unwrap();
    let d = sb.start_daemon(&l.config);

    let listed = names_in(&d.mnt.join("volumes/lvm"));
    assert_eq!(listed, vec!["dense", "thin"], "{listed:?}");
    assert_eq!(
        std::fs::metadata(d.volume("lvm", "thin")).unwrap().len(),
        64 << 20
    );
    ok(&format!(
        "cmp '{}' {dense}",
        d.volume("lvm", "dense").display()
    ));
    assert_errno(
        std::fs::metadata(d.volume("lvm", "plain")),
        libc::ENOENT,
        "a link to a regular file",
    );
    assert_eq!(d.request("hdd", "plain wait"), Some(libc::ENOENT));
    assert!(
        d.log().contains("not a block device"),
        "the skipped link is logged:\n{}",
        d.log()
    );

    for (id, dev) in [("dense", &dense), ("thin", &thin)] {
        assert_eq!(d.request("hdd", &format!("{id} wait")), None, "{}", d.log());
        let backup = only_backup_of(&d, id);
        ok(&format!(
            "cmp '{}' {dev}",
            d.image("hdd", &backup).display()
        ));
        let record = d.record("hdd", &backup);
        assert_eq!(record["backend"], "lvm", "{record}");
        assert_eq!(record["snapshot_used"], false, "{record}");
    }
    // The thin device's image holds its 3 MiB of data, not its 64 MiB.
    let thin_backup = only_backup_of(&d, "thin");
    let stored = std::fs::metadata(d.image("hdd", &thin_backup))
        .unwrap()
        .blocks()
        * 512;
    assert!(
        stored <= 4 << 20,
        "the thin volume's image stores {stored} bytes"
    );
    assert!(
        stored >= 3 << 20,
        "the thin volume's image stores {stored} bytes"
    );

    // Incrementals compare checksums: one changed MiB is what the next backup writes.
    ok(&format!(
        "head -c 1M /dev/urandom | dd of={dense} bs=1M seek=5 oflag=direct conv=notrunc status=none"
    ));
    let id = d.backup("hdd", "dense incremental wait");
    let record = d.record("hdd", &id);
    assert_eq!(record["status"], "available", "{record}");
    assert_eq!(record["changes_found_by"], "checksums", "{record}");
    assert!(!record["parent_id"].is_null(), "{record}");
    assert!(
        record["changed_bytes"].as_u64().unwrap() <= 1 << 20,
        "{record}"
    );
    ok(&format!("cmp '{}' {dense}", d.image("hdd", &id).display()));
}

/// The one backup of `volume` on target `hdd` without a parent.
fn only_backup_of(d: &Daemon, volume: &str) -> String {
    let jobs = d.jobs("hdd");
    let ids: Vec<&str> = jobs
        .lines()
        .filter(|line| line.split(' ').nth(1) == Some(volume))
        .map(|line| line.split(' ').next().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "jobs:\n{jobs}");
    ids[0].to_string()
}

#[test]
fn restores_by_cp_and_dd_onto_a_block_device_zero_its_holes_and_it_cannot_be_created_or_grown() {
    let mut sb = Sandbox::new("blk-restore");
    let l = block_layout(&mut sb);
    let source = loop_volume(&mut sb, &l.vg, "src", 32, &[(3, 2), (20, 1)]);
    let dest = loop_volume(&mut sb, &l.vg, "dst", 32, &[(0, 32)]);
    loop_volume(&mut sb, &l.vg, "small", 16, &[]);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "src wait");
    let image = d.image("hdd", &id);
    let volume = d.volume("lvm", "dst");

    // cp: O_TRUNC zeroes the device, the holes cp skips stay zeros.
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        image.display(),
        volume.display()
    ));
    ok(&format!("cmp {source} {dest}"));
    assert_eq!(
        std::fs::metadata(&volume).unwrap().len(),
        32 << 20,
        "a device keeps its size"
    );

    // dd: the same, with its own sparse writes.
    ok(&format!(
        "head -c 32M /dev/urandom | dd of={dest} bs=1M oflag=direct status=none"
    ));
    ok(&format!(
        "dd if='{}' of='{}' bs=1M conv=sparse status=none",
        image.display(),
        volume.display()
    ));
    ok(&format!("cmp {source} {dest}"));

    // Truncating to a smaller size zeroes what lies past it; a device never grows.
    assert_eq!(truncate(&volume, 4 << 20).ok(), Some(()));
    ok(&format!(
        "cmp -n 4194304 {source} {dest} && test -z \"$(dd if={dest} bs=1M skip=4 status=none | tr -d '\\0' | head -c 1)\""
    ));
    assert_errno(truncate(&volume, 64 << 20), libc::EPERM, "growing a device");
    assert_errno(
        std::fs::File::create(d.mnt.join("volumes/lvm/new")),
        libc::EPERM,
        "creating a block volume",
    );
    assert!(!l.vg.join("volume-new").exists());

    // An image bigger than the device does not fit: the copy fails, nothing grows.
    let out = sh(&format!(
        "cp '{}' '{}'",
        image.display(),
        d.volume("lvm", "small").display()
    ));
    assert!(!out.status.success(), "a 32 MiB image fit a 16 MiB device");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Operation not permitted") || stderr.contains("No space left"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(d.volume("lvm", "small")).unwrap().len(),
        16 << 20
    );
}

#[test]
fn a_block_volume_opened_exclusively_or_mounted_elsewhere_is_refused_ebusy() {
    let mut sb = Sandbox::new("blk-busy");
    let l = block_layout(&mut sb);
    let dev = loop_volume(&mut sb, &l.vg, "busy", 32, &[]);
    let d = sb.start_daemon(&l.config);
    let volume = d.volume("lvm", "busy");

    // Opened O_EXCL by another process (here, the test).
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev)
        .unwrap();
    assert_eq!(d.request("hdd", "busy wait"), Some(libc::EBUSY));
    assert_errno(
        std::fs::OpenOptions::new().write(true).open(&volume),
        libc::EBUSY,
        "a restore onto a device open O_EXCL elsewhere",
    );
    drop(holder);
    assert_eq!(d.request("hdd", "busy wait"), None, "{}", d.log());

    // Mounted.
    ok(&format!("mkfs.ext4 -q -F {dev} >/dev/null 2>&1"));
    let mnt = sb.mkdir("busy-mnt");
    sb.mount(&dev, &mnt, "");
    assert_eq!(d.request("hdd", "busy wait"), Some(libc::EBUSY));
    assert_errno(
        std::fs::OpenOptions::new().write(true).open(&volume),
        libc::EBUSY,
        "a restore onto a mounted device",
    );
    sb.umount(&mnt);
    // Let go: backed up again, and restorable.
    wait_for_limit(
        Duration::from_secs(10),
        || d.request("hdd", "busy wait").is_none(),
        "the unmounted device backed up",
    );
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .unwrap(),
    );
}

#[test]
fn check_config_refuses_a_target_on_a_block_pool_naming_the_key() {
    let sb = Sandbox::new("blk-cfg");
    let vg = sb.mkdir("vg");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.lvm]\ndriver = \"block\"\npools = {{ vg = \"{}\" }}\n\
         [targets.t]\nbackend = \"lvm\"\npool = \"vg\"\n",
        sb.path("state").display(),
        vg.display()
    ));
    let out = timed(Duration::from_secs(60), BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("targets.t.pool"), "{stderr}");
    assert!(stderr.contains("block"), "{stderr}");
}

#[test]
fn check_config_refuses_a_block_pool_others_may_change() {
    let sb = Sandbox::new("blk-cfg-mode");
    let vg = sb.mkdir("vg");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.lvm]\ndriver = \"block\"\npools = {{ vg = \"{}\" }}\n",
        sb.path("state").display(),
        vg.display()
    ));
    let check = || {
        let out = timed(Duration::from_secs(60), BIN)
            .arg("check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(check().0, Some(0), "{}", check().1);
    // Anyone may add a link: the node's own disks could be named as volumes.
    std::fs::set_permissions(&vg, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let (code, stderr) = check();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("backends.lvm.pools.vg"), "{stderr}");
    assert!(
        stderr.contains("writable by its group or others"),
        "{stderr}"
    );
}

#[test]
fn a_request_naming_a_device_backs_it_up_and_refuses_paths_that_are_no_free_block_device() {
    let mut sb = Sandbox::new("blk-device");
    let l = block_layout(&mut sb);
    // A device in no pool, as Cinder attaches one; named through a link, as by-path is.
    let file = sb.path("attached.lv");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(24 << 20))
        .unwrap();
    ok(&format!(
        "head -c 3M /dev/urandom | dd of='{}' bs=1M seek=7 conv=notrunc status=none",
        file.display()
    ));
    let dev = sb.attach_loop(&file);
    let link = sb.path("by-path-lun");
    std::os::unix::fs::symlink(&dev, &link).unwrap();
    let d = sb.start_daemon(&l.config);

    let id = d.backup("hdd", &format!("cinder-vol device={} wait", link.display()));
    let record = d.record("hdd", &id);
    assert_eq!(record["status"], "available", "{record}");
    assert_eq!(record["volume_id"], "cinder-vol");
    assert_eq!(record["device"], link.display().to_string(), "{record}");
    assert_eq!(record["size"], 24 << 20);
    let image = d.image("hdd", &id);
    ok(&format!("cmp '{}' {dev}", image.display()));
    let stored = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(stored <= 4 << 20, "the image stores {stored} bytes");
    // The device is no volume of the mount.
    assert!(names_in(&d.mnt.join("volumes/lvm")).is_empty());

    // Incrementals of the same volume ID from the device compare checksums.
    ok(&format!(
        "head -c 1M /dev/urandom | dd of={dev} bs=1M seek=1 oflag=direct conv=notrunc status=none"
    ));
    let next = d.backup("hdd", &format!("cinder-vol device={dev} incremental wait"));
    let record = d.record("hdd", &next);
    assert_eq!(record["parent_id"], id.as_str(), "{record}");
    assert_eq!(record["changes_found_by"], "checksums", "{record}");
    ok(&format!("cmp '{}' {dev}", d.image("hdd", &next).display()));

    // Not absolute, not there, not a block device: EINVAL.
    let plain = sb.path("plain");
    std::fs::write(&plain, b"x").unwrap();
    for bad in [
        "dev/loop0".to_string(),
        sb.path("nothing").display().to_string(),
        plain.display().to_string(),
        "/dev/null".to_string(),
    ] {
        assert_eq!(
            d.request("hdd", &format!("cinder-vol device={bad} wait")),
            Some(libc::EINVAL),
            "device={bad}"
        );
    }
    // In use: EBUSY.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev)
        .unwrap();
    assert_eq!(
        d.request("hdd", &format!("cinder-vol device={dev} wait")),
        Some(libc::EBUSY)
    );
    drop(holder);
}

#[test]
fn a_block_volume_whose_partition_is_mounted_is_refused_ebusy_naming_the_partition() {
    let mut sb = Sandbox::new("blk-part");
    let l = block_layout(&mut sb);
    // A disk with one partition (an MBR written by hand: type 83, from sector 2048 to
    // the end), its partition mounted, as a VM's disk looks when a node mounts it.
    let file = sb.path("disk.lv");
    let sectors: u32 = (32 << 20) / 512;
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&(sectors - 2048).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::fs::write(&file, &mbr).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(32 << 20))
        .unwrap();
    let dev = sb.attach_loop_partitioned(&file);
    let part = format!("{dev}p1");
    // The kernel here does not scan it at attach: partx adds it (BLKPG).
    sh(&format!("partx -a {dev}"));
    wait_for_limit(
        Duration::from_secs(10),
        || Path::new(&part).exists(),
        "the partition's device node",
    );
    std::os::unix::fs::symlink(&dev, l.vg.join("volume-disk")).unwrap();
    ok(&format!("mkfs.ext4 -q -F {part} >/dev/null 2>&1"));
    let mnt = sb.mkdir("part-mnt");
    sb.mount(&part, &mnt, "");
    let d = sb.start_daemon(&l.config);

    assert_eq!(d.request("hdd", "disk wait"), Some(libc::EBUSY));
    // The refusal says why: the partition, and where it is mounted.
    let name = part.trim_start_matches("/dev/");
    let why = format!("partition {name} mounted at {}", mnt.display());
    assert!(
        d.log().contains(&why),
        "{why:?} not in the log:\n{}",
        d.log()
    );
    assert_eq!(
        d.request("hdd", &format!("disk2 device={dev} wait")),
        Some(libc::EBUSY)
    );
    assert_errno(
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.volume("lvm", "disk")),
        libc::EBUSY,
        "a restore onto a disk whose partition is mounted",
    );
    sb.umount(&mnt);
    assert_eq!(d.request("hdd", "disk wait"), None, "{}", d.log());
}
