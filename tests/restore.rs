//! Restores through the mount: copying an image onto a volume node, with real tools.

mod common;

use common::*;

/// A daemon with one backup of a sparse 256 MiB volume `src` (data at 10 MiB and at the
/// end), on target `hdd`; returns its id.
fn with_backup(sb: &mut Sandbox) -> (Layout, Daemon, String) {
    let l = layout(sb, Some(Fs::Xfs), Some(Fs::Btrfs), "");
    let source = sparse_volume(&l.main, "src", 256, 10, 3);
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=1M seek=255 count=1 conv=notrunc status=none",
        source.display()
    ));
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "src wait");
    (l, d, id)
}

#[test]
fn cp_sparse_restores_onto_an_existing_volume_of_another_backend() {
    let mut sb = Sandbox::new("cp-existing");
    let (l, d, id) = with_backup(&mut sb);
    // The destination is bigger and full of other data: all of it must be replaced.
    let dest = random_volume(&l.gold, "dest", 300);
    ok(&format!(
        "cp --sparse=always '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("ssd", "dest").display()
    ));
    assert_eq!(
        std::fs::metadata(&dest).unwrap().len(),
        300 << 20,
        "volumes never shrink"
    );
    ok(&format!(
        "cmp -n {} '{}' '{}'",
        256 << 20,
        d.image("hdd", &id).display(),
        dest.display()
    ));
    ok(&format!(
        "tail -c {} '{}' | cmp - <(head -c {} /dev/zero)",
        44 << 20,
        dest.display(),
        44 << 20
    ));
}

#[test]
fn cp_restores_a_sparse_image_into_a_new_volume_keeping_holes() {
    let mut sb = Sandbox::new("cp-new");
    let (l, d, id) = with_backup(&mut sb);
    // cp finds the holes with SEEK_DATA/SEEK_HOLE and writes only the data.
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("ssd", "fresh").display()
    ));
    let fresh = l.gold.join("volume-fresh");
    ok(&format!(
        "qemu-img compare -f raw -F raw '{}' '{}'",
        d.image("hdd", &id).display(),
        fresh.display()
    ));
    let blocks: u64 = ok(&format!("stat -c %b '{}'", fresh.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(
        blocks * 512 < 32 << 20,
        "holes stay holes: {} bytes",
        blocks * 512
    );
    assert!(ok(&format!("ls '{}'", d.mnt.join("volumes/ssd").display())).contains("fresh"));
}

#[test]
fn dd_conv_notrunc_restores_in_place() {
    let mut sb = Sandbox::new("dd");
    let (l, d, id) = with_backup(&mut sb);
    let dest = random_volume(&l.gold, "dd-dest", 256);
    ok(&format!(
        "dd if='{}' of='{}' bs=1M conv=notrunc,sparse status=none",
        d.image("hdd", &id).display(),
        d.volume("ssd", "dd-dest").display()
    ));
    // conv=sparse skips zero blocks: only an O_TRUNC or discard would zero them, so the
    // operator's plain dd leaves old data there. Without sparse, dd rewrites everything.
    ok(&format!(
        "dd if='{}' of='{}' bs=1M conv=notrunc status=none",
        d.image("hdd", &id).display(),
        d.volume("ssd", "dd-dest").display()
    ));
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        dest.display()
    ));
}

#[test]
fn restore_into_in_use_volume_is_refused() {
    let mut sb = Sandbox::new("restore-inuse");
    let (l, d, id) = with_backup(&mut sb);
    let image = d.image("hdd", &id);
    // Each way a hypervisor holds a volume: a loop device, fcntl, OFD and flock locks.
    for how in ["loop", "posix", "ofd", "flock"] {
        let volume_id = format!("running-{how}");
        let dest = random_volume(&l.gold, &volume_id, 8);
        let before = sha256(&dest);
        let node = d.volume("ssd", &volume_id);
        let (holder, dev) = match how {
            "loop" => (None, Some(sb.attach_loop(&dest))),
            "posix" => (Some(sb.hold(&dest, Lock::Posix)), None),
            "ofd" => (Some(sb.hold(&dest, Lock::Ofd)), None),
            _ => (Some(sb.hold(&dest, Lock::Flock)), None),
        };
        assert_eq!(write_errno(&node, b"x"), Some(libc::EBUSY), "{how}");
        assert_errno(
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&node),
            libc::EBUSY,
            &format!("O_TRUNC open of a volume held by {how}"),
        );
        assert_errno(
            truncate(&node, 0),
            libc::EBUSY,
            &format!("truncate of a volume held by {how}"),
        );
        let out = sh(&format!("cp '{}' '{}'", image.display(), node.display()));
        assert!(!out.status.success(), "{how}: cp succeeded");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Device or resource busy"),
            "{how}: {out:?}"
        );
        assert_eq!(
            sha256(&dest),
            before,
            "{how}: an in-use volume is never written"
        );
        assert!(
            d.log()
                .contains(&format!("open of volume ssd/{volume_id} refused")),
            "{how}: the refusal is logged:\n{}",
            d.log()
        );
        if let Some(holder) = holder {
            sb.release(holder);
        }
        if let Some(dev) = dev {
            sb.detach_loop(&dev);
        }
        // Let go of, the same volume restores.
        ok(&format!("cp '{}' '{}'", image.display(), node.display()));
        ok(&format!(
            "cmp -n {} '{}' '{}'",
            256 << 20,
            image.display(),
            dest.display()
        ));
    }
}

#[test]
fn volume_nodes_refuse_unlink_and_bad_names() {
    let mut sb = Sandbox::new("volnames");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "keep", 1);
    let d = sb.start_daemon(&l.config);
    assert_errno(
        std::fs::remove_file(d.volume("ssd", "keep")),
        libc::EPERM,
        "rm of a volume",
    );
    assert!(l.gold.join("volume-keep").exists());
    for bad in [
        "-dash",
        ".dot",
        "_under",
        "sp ace",
        "x".repeat(129).as_str(),
    ] {
        assert_errno(
            std::fs::File::create(d.volume("ssd", bad)),
            libc::EINVAL,
            &format!("create of {bad:?}"),
        );
        assert_errno(
            std::fs::metadata(d.volume("ssd", bad)),
            libc::EINVAL,
            &format!("lookup of {bad:?}"),
        );
    }
    assert_errno(
        std::fs::File::create(d.target("hdd").join("x.img")),
        libc::EINVAL,
        "not a backup id",
    );
    assert_errno(
        std::fs::metadata(d.target("hdd").join("x.json")),
        libc::EINVAL,
        "lookup of a record that is not a backup id",
    );
    assert_errno(
        std::fs::File::create(
            d.target("hdd")
                .join("00000000-0000-4000-8000-000000000000.img"),
        ),
        libc::EPERM,
        "images are made by backups only",
    );
    assert_eq!(names_in(&l.gold), ["volume-keep"], "nothing was created");
}

#[test]
fn creating_files_makes_volumes_only_under_a_backend() {
    let mut sb = Sandbox::new("create");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let keep = random_volume(&l.gold, "keep", 1);
    let before = sha256(&keep);
    let d = sb.start_daemon(&l.config);
    // O_EXCL on an existing volume.
    assert_errno(
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(d.volume("ssd", "keep")),
        libc::EEXIST,
        "O_EXCL create of an existing volume",
    );
    assert_eq!(sha256(&keep), before);
    // Anywhere else than volumes/<backend>/: EPERM.
    for elsewhere in [
        d.mnt.join("notes.txt"),
        d.mnt.join("backups/notes.txt"),
        d.mnt.join("volumes/notes.txt"),
        d.target("hdd").join("notes.txt"),
        d.target("hdd").join("by-volume/notes.txt"),
    ] {
        assert_errno(
            std::fs::File::create(&elsewhere),
            libc::EPERM,
            &format!("create of {}", elsewhere.display()),
        );
        assert_errno(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&elsewhere),
            libc::EPERM,
            &format!("O_EXCL create of {}", elsewhere.display()),
        );
    }
    // A new volume, made empty in the backend's first volume pool.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(d.volume("ssd", "fresh"))
        .unwrap();
    assert_eq!(
        std::fs::metadata(l.gold.join("volume-fresh"))
            .unwrap()
            .len(),
        0
    );
    assert_eq!(names_in(&l.gold), ["volume-fresh", "volume-keep"]);
    assert_eq!(names_in(&d.mnt.join("volumes/ssd")), ["fresh", "keep"]);
}

#[test]
fn volumes_created_outside_backupfs_are_listed() {
    let mut sb = Sandbox::new("outside");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let d = sb.start_daemon(&l.config);
    assert_eq!(names_in(&d.mnt.join("volumes/hdd")), Vec::<String>::new());
    random_volume(&l.main, "late", 1);
    assert_eq!(names_in(&d.mnt.join("volumes/hdd")), ["late"]);
    ok(&format!(
        "cmp '{}' '{}/volume-late'",
        d.volume("hdd", "late").display(),
        l.main.display()
    ));
}

#[test]
fn target_pool_is_never_served_as_volumes_even_with_backups_stored() {
    let mut sb = Sandbox::new("hidden");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.main, "in-main", 2);
    random_volume(&l.gold, "in-gold", 2);
    let d = sb.start_daemon(&l.config);
    // Backups stored in backend hdd's target pool, of volumes of both backends.
    let ids = [
        d.backup("hdd", "in-main wait"),
        d.backup("hdd", "in-gold wait"),
        d.backup("hdd", "in-main wait"),
    ];
    assert!(
        allocated_under(&l.backups) >= 6 << 20,
        "the target pool holds the backups"
    );
    assert_eq!(names_in(&d.mnt.join("volumes/hdd")), ["in-main"]);
    assert_eq!(names_in(&d.mnt.join("volumes/ssd")), ["in-gold"]);
    for id in &ids {
        assert_errno(
            std::fs::metadata(d.volume("hdd", id)),
            libc::ENOENT,
            "a backup looked up as a volume",
        );
        assert_eq!(
            d.request("hdd", id),
            Some(libc::ENOENT),
            "a backup's data requested as a volume"
        );
    }
    // A new volume of backend hdd goes to its volume pool, never to the target's pool,
    // though "backups" sorts before "main".
    let stored_before = files_under(&l.backups);
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &ids[1]).display(),
        d.volume("hdd", "restored").display()
    ));
    assert_eq!(names_in(&l.main), ["volume-in-main", "volume-restored"]);
    assert_eq!(files_under(&l.backups), stored_before);
    assert_eq!(
        names_in(&d.mnt.join("volumes/hdd")),
        ["in-main", "restored"]
    );
}

#[test]
fn truncate_keeps_the_size_and_zeroes_the_tail() {
    let mut sb = Sandbox::new("truncate");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let vol = random_volume(&l.gold, "t", 8);
    let d = sb.start_daemon(&l.config);
    ok(&format!(
        "truncate -s 4M '{}'",
        d.volume("ssd", "t").display()
    ));
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 8 << 20);
    ok(&format!(
        "tail -c 4M '{}' | cmp - <(head -c 4M /dev/zero)",
        vol.display()
    ));
    ok(&format!(
        "truncate -s 16M '{}'",
        d.volume("ssd", "t").display()
    ));
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 16 << 20);
    // O_TRUNC (what `>` does) leaves an all-zero volume of the same size.
    ok(&format!(
        "printf abc > '{}'",
        d.volume("ssd", "t").display()
    ));
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 16 << 20);
    ok(&format!(
        "cmp <(printf abc; head -c $((16*1024*1024-3)) /dev/zero) '{}'",
        vol.display()
    ));
}

#[test]
fn cp_of_a_dense_image_is_a_server_side_copy() {
    let mut sb = Sandbox::new("cp-cfr");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Btrfs), "");
    random_volume(&l.main, "dense", 24);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "dense wait");
    // For a file without holes cp calls copy_file_range, which the kernel hands to the
    // daemon because both files are in one mount.
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("ssd", "copied").display()
    ));
    ok(&format!(
        "cmp '{}' '{}/volume-copied'",
        d.image("hdd", &id).display(),
        l.gold.display()
    ));
    wait_for(
        || {
            d.log().contains(&format!(
                "bytes_written=0 bytes_copied_server_side={}",
                24 << 20
            ))
        },
        "the restore's log line",
    );
}
