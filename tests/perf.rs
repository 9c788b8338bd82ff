//! What the performance work of issue 28 changed, held to the behaviour it must keep:
//! `ls -l` of a target (fewer requests per entry), image reads after readers come and
//! go (checked blocks dropped at the last close), restores written in large pieces. No
//! timing here: contrib/bench/hand.sh measures.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;

/// `ls -l` of the target as (name, size) for the backups' images and records.
fn listed(target: &std::path::Path) -> Vec<(String, u64)> {
    let out = ok(&format!("ls -ln '{}'", target.display()));
    let mut entries: Vec<(String, u64)> = out
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = *fields.last()?;
            if !(name.ends_with(".img") || name.ends_with(".json")) {
                return None;
            }
            Some((name.to_string(), fields.get(4)?.parse().ok()?))
        })
        .collect();
    entries.sort();
    entries
}

#[test]
fn ls_l_of_many_backups_shows_each_image_and_record_with_its_current_size() {
    let mut sb = Sandbox::new("perf-ls");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    random_volume(&l.gold, "v", 1);
    random_volume(&l.gold, "w", 2);
    let d = sb.start_daemon(&l.config);
    let mut ids = Vec::new();
    for i in 0..12 {
        let volume = if i % 2 == 0 { "v" } else { "w" };
        ids.push((d.backup("hdd", &format!("{volume} wait")), volume));
    }
    let target = d.target("hdd");
    let entries = listed(&target);
    assert_eq!(entries.len(), 2 * ids.len(), "{entries:?}");
    for (id, volume) in &ids {
        let image = entries
            .iter()
            .find(|(name, _)| *name == format!("{id}.img"))
            .unwrap_or_else(|| panic!("{id}.img not listed: {entries:?}"));
        assert_eq!(image.1, if *volume == "v" { 1 << 20 } else { 2 << 20 });
        let record = entries
            .iter()
            .find(|(name, _)| *name == format!("{id}.json"))
            .unwrap_or_else(|| panic!("{id}.json not listed"));
        let text = std::fs::read(target.join(format!("{id}.json"))).expect("record");
        assert_eq!(record.1, text.len() as u64, "{id}.json");
    }
    // The record's own attributes (user.backupfs.*) still answer; other namespaces are
    // not supported (`ls -l` then stops asking for them).
    let image = d.image("hdd", &ids[0].0);
    let size = ok(&format!(
        "getfattr --only-values -n user.backupfs.size '{}'",
        image.display()
    ));
    assert_eq!(size, (1u64 << 20).to_string());
    let other = sh(&format!(
        "getfattr -n security.selinux '{}'",
        image.display()
    ));
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Operation not supported"),
        "{other:?}"
    );

    // A record grows when an attribute is set: `ls -l` right after shows the new size
    // (the kernel keeps a record's attributes 1 s, and is told to forget them when it
    // changes through the mount).
    let record = target.join(format!("{}.json", ids[0].0));
    let before = std::fs::metadata(&record).expect("stat").len();
    ok(&format!(
        "setfattr -n user.note -v 'kept for the audit' '{}'",
        image.display()
    ));
    let text = std::fs::read(&record).expect("record");
    assert!(text.len() as u64 > before);
    let now = listed(&target);
    let shown = now
        .iter()
        .find(|(name, _)| *name == format!("{}.json", ids[0].0))
        .expect("listed");
    assert_eq!(shown.1, text.len() as u64);
    assert_eq!(
        std::fs::metadata(&record).expect("stat").len(),
        text.len() as u64
    );

    // A verify rewrites the record (`verified_at`): a stat right after the verify ends
    // shows the new size, though a listing just before handed the old one to the kernel.
    let (checked, _) = &ids[2];
    let record = target.join(format!("{checked}.json"));
    let before = std::fs::metadata(&record).expect("stat").len();
    listed(&target);
    assert_eq!(
        write_errno(&target.join("verify"), format!("{checked}\n").as_bytes()),
        None
    );
    let text = std::fs::read(&record).expect("record");
    assert_ne!(text.len() as u64, before, "the verify changed the record");
    assert_eq!(
        std::fs::metadata(&record).expect("stat").len(),
        text.len() as u64
    );

    // A deleted backup's record is gone at once, for stat as for the listing.
    let (gone, _) = &ids[1];
    let gone_record = target.join(format!("{gone}.json"));
    std::fs::metadata(&gone_record).expect("stat before");
    ok(&format!("rm '{}'", d.image("hdd", gone).display()));
    assert_errno(
        std::fs::metadata(&gone_record),
        libc::ENOENT,
        "stat of a deleted backup's record",
    );
    assert_eq!(listed(&target).len(), 2 * (ids.len() - 1));
}

#[test]
fn an_image_read_in_pieces_after_another_reader_closed_it_reads_exactly() {
    let mut sb = Sandbox::new("perf-close");
    let l = layout(&mut sb, None, Some(Fs::Xfs), "");
    let volume = random_volume(&l.gold, "v", 8);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let image = d.image("hdd", &id);
    // One reader reads in small pieces (whole checked blocks kept), then closes; a
    // second, opened before that close, reads on in small pieces and must still get
    // every byte right, as must a third opened after.
    let out = ok(&format!(
        "exec 3<'{img}'; dd if='{img}' bs=4k count=300 status=none | cmp - '{vol}' -n 1228800 && \
         dd bs=4k skip=300 status=none <&3 >/dev/null; exec 3<&-; \
         dd if='{img}' bs=3k status=none | cmp - '{vol}' && echo same",
        img = image.display(),
        vol = volume.display()
    ));
    assert_eq!(out.trim(), "same");
    evict(&image);
    ok(&format!(
        "dd if='{}' bs=512 skip=4095 count=3 status=none | cmp - <(dd if='{}' bs=512 skip=4095 count=3 status=none)",
        image.display(),
        volume.display()
    ));
    assert_eq!(std::fs::metadata(&image).expect("stat").size(), 8 << 20);
}

#[test]
fn a_restore_by_cp_sparse_always_or_dd_through_the_mount_lands_exactly_from_cold() {
    let mut sb = Sandbox::new("perf-restore");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Xfs), "");
    // Data at an offset that is no multiple of the 2 MiB read buffer, long enough for
    // writeback to be started behind the writer and its pages dropped a window back (8
    // MiB pieces, a 32 MiB window), then a hole, then a short tail.
    let volume = sparse_volume(&l.gold, "v", 100, 3, 70);
    ok(&format!(
        "head -c 700000 /dev/urandom | dd of='{}' bs=1 seek=$((97 << 20)) conv=notrunc status=none",
        volume.display()
    ));
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let image = d.image("hdd", &id);
    evict(&image);
    ok(&format!(
        "cp --sparse=always '{}' '{}' && cmp '{}' '{}'",
        image.display(),
        d.volume("ssd", "fresh").display(),
        l.gold.join("volume-fresh").display(),
        volume.display()
    ));
    // dd writes every block in sequence, zeros included, onto a volume made before.
    ok(&format!(
        "truncate -s 100M '{}'",
        l.gold.join("volume-again").display()
    ));
    evict(&image);
    ok(&format!(
        "dd if='{}' of='{}' bs=1M conv=notrunc status=none && cmp '{}' '{}'",
        image.display(),
        d.volume("ssd", "again").display(),
        l.gold.join("volume-again").display(),
        volume.display()
    ));
    let restores = std::fs::read_to_string(d.mnt.join("restores")).expect("restores");
    assert!(restores.contains("fresh"), "{restores}");
    assert!(restores.contains("again"), "{restores}");
    assert!(!restores.contains("failed"), "{restores}");
}
