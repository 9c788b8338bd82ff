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
    let dest = random_volume(&l.gold, "running", 8);
    let before = sha256(&dest);
    let holder = sb.hold_lock(&dest);
    assert_eq!(
        write_errno(&d.volume("ssd", "running"), b"x"),
        Some(libc::EBUSY)
    );
    let out = sh(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("ssd", "running").display()
    ));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{out:?}"
    );
    assert_eq!(sha256(&dest), before, "an in-use volume is never written");
    sb.release(holder);
}

#[test]
fn volume_nodes_refuse_unlink_and_bad_names() {
    let mut sb = Sandbox::new("volnames");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "keep", 1);
    let d = sb.start_daemon(&l.config);
    let out = sh(&format!("rm -f '{}'", d.volume("ssd", "keep").display()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "{out:?}"
    );
    assert!(l.gold.join("volume-keep").exists());
    for bad in ["-dash", ".dot", "sp ace", "x".repeat(129).as_str()] {
        let err = std::fs::File::create(d.volume("ssd", bad)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{bad}");
    }
    let err = std::fs::File::create(d.target("hdd").join("x.img")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "not a backup id");
    let err = std::fs::File::create(
        d.target("hdd")
            .join("00000000-0000-4000-8000-000000000000.img"),
    )
    .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EPERM),
        "images are made by backups only"
    );
    let only = ok(&format!("ls -A '{}'", l.gold.display()));
    assert_eq!(only.trim(), "volume-keep", "nothing was created");
}

#[test]
fn volumes_created_outside_backupfs_are_listed() {
    let mut sb = Sandbox::new("outside");
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let d = sb.start_daemon(&l.config);
    assert_eq!(
        ok(&format!("ls '{}'", d.mnt.join("volumes/hdd").display())).trim(),
        ""
    );
    random_volume(&l.main, "late", 1);
    let listing = ok(&format!("ls '{}'", d.mnt.join("volumes/hdd").display()));
    assert_eq!(listing.trim(), "late");
    // The backups pool serves no volumes.
    assert!(!ok(&format!("ls '{}'", d.mnt.join("volumes/hdd").display())).contains("backups"));
    ok(&format!(
        "cmp '{}' '{}/volume-late'",
        d.volume("hdd", "late").display(),
        l.main.display()
    ));
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
