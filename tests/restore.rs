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
    let line = restore_line(&d, "copied");
    assert!(line.starts_with("ssd copied restored "), "{line}");
}

#[test]
fn cp_of_an_image_onto_its_own_filesystem_is_a_reflink() {
    let mut sb = Sandbox::new("cp-reflink");
    // Backend hdd's volume pool `main` and the target's pool share one XFS.
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.main, "dense", 24);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "dense wait");
    let fs = l.main.parent().unwrap();
    let free = || {
        ok(&format!("sync -f '{}'", fs.display()));
        ok(&format!("stat -f -c '%a %S' '{}'", fs.display()))
            .split_whitespace()
            .map(|n| n.parse::<i64>().unwrap())
            .product::<i64>()
    };
    let before = free();
    ok(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &id).display(),
        d.volume("hdd", "copied").display()
    ));
    let restored = l.main.join("volume-copied");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        restored.display()
    ));
    let taken = before - free();
    eprintln!("the restore took {} KiB", taken / 1024);
    assert!(
        taken < 2 << 20,
        "24 MiB restored took {taken} bytes: not a reflink"
    );
    // FIEMAP: every extent of the restored volume is shared (with the backup's data).
    let map = ok(&format!("filefrag -v '{}'", restored.display()));
    let extents: Vec<&str> = map
        .lines()
        .filter(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .collect();
    assert!(!extents.is_empty(), "{map}");
    assert!(extents.iter().all(|l| l.contains("shared")), "{map}");
    d.stop_clean();
}

/// The line of `restores` for a volume of backend `ssd` (its last one).
fn restore_line(d: &Daemon, volume_id: &str) -> String {
    let listed = std::fs::read_to_string(d.mnt.join("restores")).unwrap();
    listed
        .lines()
        .rfind(|l| l.starts_with(&format!("ssd {volume_id} ")))
        .unwrap_or_else(|| panic!("no restore of {volume_id} in:\n{listed}"))
        .to_string()
}

/// `backupfs_restores_total{result="<result>"}` now.
fn restores_counted(d: &Daemon, result: &str) -> u64 {
    let text = std::fs::read_to_string(d.mnt.join("metrics/backupfs.prom")).unwrap();
    let prefix = format!("backupfs_restores_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix} in:\n{text}"))
        .parse()
        .unwrap()
}

/// The restore note on a volume's own file in its pool (`getfattr`, not through the
/// mount), if any.
fn pool_note(volume_file: &std::path::Path) -> Option<String> {
    let out = sh(&format!(
        "getfattr --only-values -n user.backupfs.restore '{}'",
        volume_file.display()
    ));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The ways an operator restores by plain reads (`{img}`, `{vol}`): none of them may be
/// told a restore succeeded when the volume does not hold the backup. The pipe's reader
/// and writer are different processes.
const RESTORE_TOOLS: [(&str, &str); 5] = [
    ("cp-sparse", "cp --sparse=always '{img}' '{vol}'"),
    ("cp", "cp '{img}' '{vol}'"),
    (
        "dd",
        "dd if='{img}' of='{vol}' bs=1M conv=notrunc status=none",
    ),
    // Goes on past the error with zeros (and exits 0): it reaches the image's end, only
    // the failed read tells.
    (
        "dd-noerror",
        "dd if='{img}' of='{vol}' bs=1M conv=notrunc,noerror,sync",
    ),
    (
        "pipe",
        "set -o pipefail; cat '{img}' | dd of='{vol}' bs=1M conv=notrunc status=none",
    ),
];

/// A daemon with backups of one sparse 64 MiB volume `src` (data in MiB 0, 20-22 and 40,
/// a hole after): returns the layout, the daemon and `n` backup ids.
fn with_sparse_backups(sb: &mut Sandbox, n: usize) -> (Layout, Daemon, Vec<String>) {
    let l = layout(sb, Some(Fs::Xfs), Some(Fs::Xfs), "");
    let source = sparse_volume(&l.main, "src", 64, 20, 3);
    for at in [0, 40] {
        ok(&format!(
            "dd if=/dev/urandom of='{}' bs=1M seek={at} count=1 conv=notrunc status=none",
            source.display()
        ));
    }
    let d = sb.start_daemon(&l.config);
    let ids = (0..n).map(|_| d.backup("hdd", "src wait")).collect();
    (l, d, ids)
}

#[test]
fn a_restore_from_a_damaged_backup_fails_whatever_tool_copies_it() {
    let mut sb = Sandbox::new("restore-damaged");
    let (l, d, ids) = with_sparse_backups(&mut sb, 3);
    // Damage in block 0 and in a middle block (MiB 21), behind the daemon's back.
    let damaged = [(&ids[0], 1000), (&ids[1], (21 << 20) + 4321)];
    for (id, offset) in damaged {
        damage_bytes(
            &l.backups.join(format!("backup-{id}.img")),
            offset,
            b"\xde\xad",
        );
    }
    let mut failed = 0;
    for (id, offset) in damaged {
        for (tool, script) in RESTORE_TOOLS {
            let volume_id = format!("{tool}-{}", offset >> 20);
            // Other data where the image has a hole, to be replaced.
            let pool_file = sparse_volume(&l.gold, &volume_id, 64, 30, 4);
            let out = sh(&script
                .replace("{img}", &d.image("hdd", id).display().to_string())
                .replace("{vol}", &d.volume("ssd", &volume_id).display().to_string()));
            let what = format!("{tool}, damage at {offset}");
            // dd conv=noerror says the error and exits 0: only backupfs tells then.
            assert!(
                !out.status.success() || tool == "dd-noerror",
                "{what}: the copy fails: {out:?}"
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
                "{what}: {out:?}"
            );
            let line = restore_line(&d, &volume_id);
            assert!(line.contains(" failed "), "{what}: {line}");
            assert!(
                line.contains(&format!("a read of backup {id} that fed it failed")),
                "{what}: the reason is the read: {line}"
            );
            let note = pool_note(&pool_file).unwrap_or_else(|| panic!("{what}: no note"));
            assert!(note.starts_with("incomplete: "), "{what}: {note}");
            failed += 1;
            assert_eq!(restores_counted(&d, "failed"), failed, "{what}");
            // Room for the next ones (the ssd pool is small).
            std::fs::remove_file(&pool_file).unwrap();
        }
    }
    assert_eq!(restores_counted(&d, "restored"), 0);
    assert!(
        d.log().contains("ERROR") && d.log().contains("the volume is incomplete"),
        "{}",
        d.log()
    );
    // The same ways from a good backup: restored, no note (no false failure, also when
    // cp skips the zeros and ends on a hole).
    for (tool, script) in RESTORE_TOOLS {
        let volume_id = format!("{tool}-good");
        let pool_file = sparse_volume(&l.gold, &volume_id, 64, 30, 4);
        ok(&script
            .replace("{img}", &d.image("hdd", &ids[2]).display().to_string())
            .replace("{vol}", &d.volume("ssd", &volume_id).display().to_string()));
        ok(&format!(
            "cmp '{}' '{}'",
            d.image("hdd", &ids[2]).display(),
            pool_file.display()
        ));
        let line = restore_line(&d, &volume_id);
        assert!(line.contains(" restored "), "{tool}: {line}");
        assert_eq!(pool_note(&pool_file), None, "{tool}");
        // Not even for a moment (dd closes a duplicate of its output first).
        let said_failed = d.log().lines().any(|l| {
            l.contains("restore into volume failed")
                && l.contains(&format!("volume_id=\"{volume_id}\""))
        });
        assert!(!said_failed, "{tool}: {}", d.log());
    }
    assert_eq!(restores_counted(&d, "restored"), RESTORE_TOOLS.len() as u64);
    assert_eq!(restores_counted(&d, "failed"), failed);
}

#[test]
fn a_restore_refused_at_its_first_read_is_listed_failed_and_its_new_volume_marked() {
    let mut sb = Sandbox::new("restore-refused");
    let (l, d, ids) = with_sparse_backups(&mut sb, 1);
    damage_bytes(
        &l.backups.join(format!("backup-{}.img", ids[0])),
        10,
        b"\xde\xad",
    );
    // cp makes the new volume, then its first read of the image fails: nothing written.
    let out = sh(&format!(
        "cp '{}' '{}'",
        d.image("hdd", &ids[0]).display(),
        d.volume("ssd", "fresh").display()
    ));
    assert!(!out.status.success(), "{out:?}");
    let line = restore_line(&d, "fresh");
    assert!(line.starts_with("ssd fresh failed 0/"), "{line}");
    let note = pool_note(&l.gold.join("volume-fresh")).expect("the new volume is marked");
    assert!(note.starts_with("incomplete: "), "{note}");
    assert_eq!(restores_counted(&d, "failed"), 1);
}

#[test]
fn a_restore_whose_writer_stops_before_the_images_last_data_is_failed() {
    let mut sb = Sandbox::new("restore-short");
    let (l, d, ids) = with_sparse_backups(&mut sb, 1);
    let pool_file = random_volume(&l.gold, "cut", 64);
    // No read fails: the writer just stops (killed, cut off) 10 MiB before the last data.
    ok(&format!(
        "head -c 30M '{}' 1<>'{}'",
        d.image("hdd", &ids[0]).display(),
        d.volume("ssd", "cut").display()
    ));
    let line = restore_line(&d, "cut");
    assert!(line.starts_with("ssd cut failed "), "{line}");
    assert!(line.contains("ended short"), "{line}");
    let note = pool_note(&pool_file).expect("marked incomplete");
    assert!(note.starts_with("incomplete: "), "{note}");
    assert_eq!(restores_counted(&d, "failed"), 1);
}

#[test]
fn a_read_failure_through_an_image_file_the_writer_opened_fails_its_restore() {
    let mut sb = Sandbox::new("restore-shared");
    let (l, d, ids) = with_sparse_backups(&mut sb, 1);
    damage_bytes(
        &l.backups.join(format!("backup-{}.img", ids[0])),
        10,
        b"\xde\xad",
    );
    let pool_file = sparse_volume(&l.gold, "shared", 64, 30, 4);
    // The writer opens the image and the volume; a child that shares the image's open
    // file reads it and is handed EIO; the writer writes the volume to its end anyway
    // (so it is not short) and exits 0.
    let script = r#"
import os, sys
image = os.open(sys.argv[1], os.O_RDONLY)
volume = os.open(sys.argv[2], os.O_WRONLY)
child = os.fork()
if child == 0:
    try:
        os.pread(image, 1 << 20, 0)
    except OSError:
        os._exit(1)
    os._exit(0)
_, status = os.waitpid(child, 0)
assert status != 0, "the child read damaged data"
for at in range(0, 64 << 20, 1 << 20):
    os.pwrite(volume, bytes(1 << 20), at)
"#;
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(d.image("hdd", &ids[0]))
        .arg(d.volume("ssd", "shared"))
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    let line = restore_line(&d, "shared");
    assert!(line.starts_with("ssd shared failed "), "{line}");
    assert!(line.contains("a read of backup"), "{line}");
    assert!(pool_note(&pool_file).is_some_and(|n| n.starts_with("incomplete: ")));
    assert_eq!(restores_counted(&d, "failed"), 1);
}

#[test]
fn a_read_failure_before_the_writer_opened_the_volume_fails_its_restore() {
    let mut sb = Sandbox::new("restore-read-first");
    let (l, d, ids) = with_sparse_backups(&mut sb, 1);
    damage_bytes(
        &l.backups.join(format!("backup-{}.img", ids[0])),
        10,
        b"\xde\xad",
    );
    let pool_file = sparse_volume(&l.gold, "readfirst", 64, 30, 4);
    // A tool that reads the whole image first (zeros for what it cannot read), still
    // holding it, then opens the volume and writes all of it, and exits 0: the data it
    // writes is the image's, with the damaged block lost.
    let script = r#"
import os, sys
image = os.open(sys.argv[1], os.O_RDONLY)
data = []
for at in range(0, 64 << 20, 1 << 20):
    try:
        data.append(os.pread(image, 1 << 20, at))
    except OSError:
        data.append(bytes(1 << 20))
volume = os.open(sys.argv[2], os.O_WRONLY)
for i, block in enumerate(data):
    os.pwrite(volume, block, i << 20)
os.close(volume)
"#;
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(d.image("hdd", &ids[0]))
        .arg(d.volume("ssd", "readfirst"))
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    let line = restore_line(&d, "readfirst");
    assert!(line.starts_with("ssd readfirst failed "), "{line}");
    assert!(line.contains("a read of backup"), "{line}");
    assert!(pool_note(&pool_file).is_some_and(|n| n.starts_with("incomplete: ")));
    assert_eq!(restores_counted(&d, "failed"), 1);
    assert_eq!(restores_counted(&d, "restored"), 0);
}

#[test]
fn read_failures_of_other_users_cannot_push_a_restores_failure_out_of_memory() {
    let mut sb = Sandbox::new("restore-flood");
    ok(&format!("chmod 755 '{}'", sb.dir.display()));
    // Group root may read images: a user other than root, with it as a supplementary
    // group, reads the damaged image again and again while root restores from it.
    let l = layout(
        &mut sb,
        Some(Fs::Xfs),
        Some(Fs::Xfs),
        "allow_other = true\nadmin_group = \"root\"",
    );
    let source = sparse_volume(&l.main, "src", 64, 20, 3);
    ok(&format!(
        "dd if=/dev/urandom of='{}' bs=1M count=1 conv=notrunc status=none",
        source.display()
    ));
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "src wait");
    damage_bytes(
        &l.backups.join(format!("backup-{id}.img")),
        (20 << 20) + 10,
        b"\xde\xad",
    );
    let pool_file = sparse_volume(&l.gold, "flooded", 64, 30, 4);
    let image = d.image("hdd", &id);
    // Root's restore reads every block (zeros for the one that fails), writes it all,
    // and holds the volume until the flood is over.
    let restorer = r#"
import os, sys, time
image = os.open(sys.argv[1], os.O_RDONLY)
volume = os.open(sys.argv[2], os.O_WRONLY)
for at in range(0, 64 << 20, 1 << 20):
    try:
        block = os.pread(image, 1 << 20, at)
    except OSError:
        block = bytes(1 << 20)
    os.pwrite(volume, block, at)
open(sys.argv[3], "w").close()
deadline = time.time() + 120
while not os.path.exists(sys.argv[4]) and time.time() < deadline:
    time.sleep(0.05)
os.close(volume)
"#;
    let (wrote, flooded) = (sb.path("wrote"), sb.path("flooded"));
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(restorer)
        .arg(&image)
        .arg(d.volume("ssd", "flooded"))
        .arg(&wrote)
        .arg(&flooded)
        .spawn()
        .unwrap();
    wait_for(|| wrote.exists(), "the restorer wrote the volume");
    let flood = r#"
import os, sys
os.setgroups([0]); os.setgid(65534); os.setuid(65534)
image = os.open(sys.argv[1], os.O_RDONLY)
failed = 0
for i in range(3000):
    try:
        os.pread(image, 4096, (20 << 20) + (i % 256) * 4096)
    except OSError:
        failed += 1
assert failed == 3000, failed
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(flood)
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&flooded, b"").unwrap();
    assert!(child.wait().unwrap().success());
    let line = restore_line(&d, "flooded");
    assert!(line.starts_with("ssd flooded failed "), "{line}");
    assert!(pool_note(&pool_file).is_some_and(|n| n.starts_with("incomplete: ")));
}
