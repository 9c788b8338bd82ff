//! Incremental backups (issue 13) on real reflink filesystems: each backup reads as the
//! volume did at its time, whatever was deleted since; only what changed is copied and
//! stored; the ways of finding changes agree; crashes leave every other backup intact.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One round of what a guest does to its disk: scattered 64 KiB writes, rewrites of a
/// range with the same bytes, punched holes, now and then the volume grows.
fn round_of_writes(volume: &Path, rng: &mut Lcg) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(volume)
        .unwrap();
    let size = file.metadata().unwrap().len();
    for _ in 0..12 {
        let at = rng.below(size / 4096) * 4096;
        let len = (64 << 10).min(size - at) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        file.write_all_at(&data, at).unwrap();
    }
    for _ in 0..3 {
        // Rewritten with the very same bytes: reads as unchanged, may look changed.
        let at = rng.below(size / 4096) * 4096;
        let mut same = vec![0u8; (128 << 10).min(size - at) as usize];
        file.read_exact_at(&mut same, at).unwrap();
        file.write_all_at(&same, at).unwrap();
    }
    for _ in 0..2 {
        let at = rng.below(size / 4096) * 4096;
        let len = (256 << 10).min(size - at);
        ok(&format!(
            "fallocate --punch-hole --keep-size -o {at} -l {len} '{}'",
            volume.display()
        ));
    }
    if rng.below(3) == 0 {
        file.set_len(size + (3 << 20) + 4096).unwrap();
        file.write_all_at(b"grown", size + (1 << 20)).unwrap();
    }
    file.sync_all().unwrap();
}

/// `echo "<vol> incremental wait"`, the new backup's id.
fn incremental(d: &Daemon, target: &str, volume: &str) -> String {
    let id = d.backup(target, &format!("{volume} incremental wait"));
    assert_eq!(d.record(target, &id)["status"], "available", "{}", d.log());
    id
}

fn snapshots_in(pool: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot-backupfs-"))
        .collect();
    names.sort();
    names
}

/// Two XFS filesystems (reflinks): backend `ssd` pool `gold` for volumes, backend `hdd`
/// with targets `a` and `b` on pools of their own.
struct Setup {
    gold: PathBuf,
    b: PathBuf,
    config: PathBuf,
}

fn setup(sb: &mut Sandbox, extra: &str, target_a: &str) -> Setup {
    let ssd = sb.loop_fs("ssd", Fs::Xfs, 512);
    let hdd = sb.loop_fs("hdd", Fs::Xfs, 1024);
    let gold = ssd.join("gold");
    let (a, b) = (hdd.join("a"), hdd.join("b"));
    for dir in [&gold, &a, &b] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n{extra}\n\
         [backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ a = \"{}\", b = \"{}\" }}\n\
         [targets.a]\nbackend = \"hdd\"\npool = \"a\"\n{target_a}\n\
         [targets.b]\nbackend = \"hdd\"\npool = \"b\"\n",
        state.display(),
        gold.display(),
        a.display(),
        b.display()
    ));
    Setup { gold, b, config }
}

#[test]
fn every_incremental_backup_is_a_whole_image_whatever_is_deleted_and_in_whatever_order() {
    let mut sb = Sandbox::new("inc-rounds");
    let s = setup(&mut sb, "", "");
    let volume = random_volume(&s.gold, "v", 48);
    let d = sb.start_daemon(&s.config);
    let mut rng = Lcg(0x1ec);
    let mut backups: Vec<(String, String)> = Vec::new();
    for round in 0..6 {
        if round > 0 {
            round_of_writes(&volume, &mut rng);
        }
        let sum = sha256(&volume);
        let id = incremental(&d, "a", "v");
        let record = d.record("a", &id);
        match backups.last() {
            None => {
                assert!(record["parent_id"].is_null(), "{record}");
                assert!(record["changed_bytes"].is_null(), "{record}");
            }
            Some((parent, _)) => {
                assert_eq!(record["parent_id"], parent.as_str(), "{record}");
                assert_eq!(record["changes_found_by"], "snapshot-diff", "{record}");
                // 12 writes of 64 KiB, and what a grown tail adds: far from 48 MiB.
                let changed = record["changed_bytes"].as_u64().unwrap();
                assert!(changed > 0 && changed < 8 << 20, "{record}");
                let stored = record["stored_bytes"].as_u64().unwrap();
                assert!(stored <= 2 * changed + (4 << 20), "{record}");
            }
        }
        // One base per volume and target: the newest backup's snapshot.
        assert_eq!(
            snapshots_in(&s.gold),
            vec![format!("snapshot-backupfs-{id}")]
        );
        assert_eq!(
            d.record("a", &id)["base_snapshot"],
            format!("snapshot-backupfs-{id}")
        );
        backups.push((id, sum));
    }
    for (id, sum) in &backups {
        assert_eq!(&sha256(&d.image("a", id)), sum, "backup {id}");
    }
    // Deleted in a shuffled order, parents first among them: the others stay whole.
    let mut order: Vec<usize> = (0..backups.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut left: Vec<usize> = (0..backups.len()).collect();
    for &victim in &order[..order.len() - 1] {
        ok(&format!(
            "rm '{}'",
            d.image("a", &backups[victim].0).display()
        ));
        left.retain(|&i| i != victim);
        for &i in &left {
            assert_eq!(
                sha256(&d.image("a", &backups[i].0)),
                backups[i].1,
                "backup {i} after deleting {victim}"
            );
        }
    }
    // The last one restores to a new volume, whole.
    let last = &backups[left[0]];
    ok(&format!(
        "cp '{}' '{}'",
        d.image("a", &last.0).display(),
        d.volume("ssd", "restored").display()
    ));
    assert_eq!(sha256(&s.gold.join("volume-restored")), last.1);
}

#[test]
fn the_storages_map_and_checksums_find_the_same_changes() {
    let mut sb = Sandbox::new("inc-methods");
    let s = setup(&mut sb, "", "");
    let volume = random_volume(&s.gold, "v", 32);
    let d = sb.start_daemon(&s.config);
    let mut rng = Lcg(77);
    for round in 0..5 {
        if round > 0 {
            round_of_writes(&volume, &mut rng);
        }
        let sum = sha256(&volume);
        let by_map = incremental(&d, "a", "v");
        // Target b's base snapshot is removed (as someone else might): its backups find
        // the changes by reading everything and comparing checksums.
        let b_records: Vec<serde_json::Value> = std::fs::read_dir(&s.b)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap())
            .collect();
        for record in &b_records {
            if let Some(base) = record["base_snapshot"].as_str() {
                std::fs::remove_file(s.gold.join(base)).unwrap();
            }
        }
        let by_sums = incremental(&d, "b", "v");
        if round > 0 {
            assert_eq!(d.record("a", &by_map)["changes_found_by"], "snapshot-diff");
            assert_eq!(d.record("b", &by_sums)["changes_found_by"], "checksums");
            // Both found changes; the map counts changed bytes, the checksums whole blocks.
            let changed_map = d.record("a", &by_map)["changed_bytes"].as_u64().unwrap();
            let changed_sums = d.record("b", &by_sums)["changed_bytes"].as_u64().unwrap();
            assert!(changed_map > 0 && changed_sums > 0);
            assert!(changed_sums < 32 << 20, "not everything: {changed_sums}");
        }
        assert_eq!(sha256(&d.image("a", &by_map)), sum, "round {round}");
        assert_eq!(sha256(&d.image("b", &by_sums)), sum, "round {round}");
        assert_eq!(
            d.record("a", &by_map)["checksums"]["digest"],
            d.record("b", &by_sums)["checksums"]["digest"],
            "the same checksums, found either way"
        );
    }
}

#[test]
fn an_incremental_on_a_target_that_cannot_share_data_is_a_full_backup() {
    let mut sb = Sandbox::new("inc-ext4");
    let l = layout(&mut sb, Some(Fs::Xfs), Some(Fs::Ext4), "");
    let volume = random_volume(&l.gold, "v", 8);
    let d = sb.start_daemon(&l.config);
    incremental(&d, "hdd", "v");
    round_of_writes(&volume, &mut Lcg(5));
    let id = incremental(&d, "hdd", "v");
    let record = d.record("hdd", &id);
    assert!(record["parent_id"].is_null(), "{record}");
    assert!(d.log().contains("cannot share data"), "{}", d.log());
    assert_eq!(sha256(&d.image("hdd", &id)), sha256(&volume));
}

#[test]
fn keep_last_deletes_a_volumes_oldest_backups_beyond_n() {
    let mut sb = Sandbox::new("inc-keep");
    let s = setup(&mut sb, "", "keep_last = 2");
    let volume = random_volume(&s.gold, "v", 4);
    random_volume(&s.gold, "other", 2);
    let d = sb.start_daemon(&s.config);
    let other = incremental(&d, "a", "other");
    let mut ids = Vec::new();
    let mut rng = Lcg(3);
    for _ in 0..4 {
        round_of_writes(&volume, &mut rng);
        ids.push((incremental(&d, "a", "v"), sha256(&volume)));
    }
    for (id, _) in &ids[..2] {
        assert!(!d.image("a", id).exists(), "{id} is beyond keep_last");
        assert!(d.log().contains("retention: deleted"), "{}", d.log());
    }
    for (id, sum) in &ids[2..] {
        assert_eq!(&sha256(&d.image("a", id)), sum);
    }
    assert!(
        d.image("a", &other).exists(),
        "another volume's backups are its own"
    );
}

/// Free bytes of the filesystem holding `dir`, once everything written is on disk.
fn free_bytes(dir: &Path) -> i64 {
    ok(&format!("sync -f '{}'", dir.display()));
    ok(&format!("stat -f -c '%a %S' '{}'", dir.display()))
        .split_whitespace()
        .map(|n| n.parse::<i64>().unwrap())
        .product()
}

#[test]
fn incremental_backups_share_unchanged_data_on_disk_and_a_deleted_parent_frees_only_its_own() {
    const MIB: i64 = 1 << 20;
    let mut sb = Sandbox::new("inc-on-disk");
    let s = setup(&mut sb, "", "");
    let volume = random_volume(&s.gold, "v", 32);
    let hdd = s.b.parent().unwrap().to_path_buf();
    let d = sb.start_daemon(&s.config);
    let write_mib = |at_mib: u64| {
        ok(&format!(
            "dd if=/dev/urandom of='{}' bs=1M seek={at_mib} count=1 conv=notrunc status=none",
            volume.display()
        ))
    };
    // What each step takes (or gives back) on the target's filesystem, measured there,
    // not as the daemon reports it: 1 MiB of slack for records, checksums and leaf sums,
    // and below it 64 KiB for the small files of the nodes' coordination (a claim, its
    // spare, a record's lock: 4 KiB each) that the step before removed and XFS frees
    // in the background, during this step's measurement.
    let mut free = free_bytes(&hdd);
    let mut step = |what: &str, low: i64, high: i64, taken: bool| {
        // XFS frees an unlinked file's blocks in the background (deferred inode
        // inactivation): a deletion is given up to 10 s to show.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (mut now, mut moved);
        loop {
            now = free_bytes(&hdd);
            moved = if taken { free - now } else { now - free };
            if taken || moved >= low || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        free = now;
        eprintln!("{what}: {} KiB", moved / 1024);
        assert!(
            (low..=high).contains(&moved),
            "{what}: {moved} bytes, not within {low}..={high}"
        );
    };
    let full = incremental(&d, "a", "v");
    step("the full backup takes", 32 * MIB, 33 * MIB, true);
    write_mib(8);
    let by_map = incremental(&d, "a", "v");
    assert_eq!(d.record("a", &by_map)["changes_found_by"], "snapshot-diff");
    const COORDINATION: i64 = 64 << 10;
    step(
        "an incremental found by the snapshot takes",
        MIB - COORDINATION,
        2 * MIB,
        true,
    );
    // Without the base snapshot, the checksums find the change: still only it is stored.
    std::fs::remove_file(s.gold.join(format!("snapshot-backupfs-{by_map}"))).unwrap();
    write_mib(20);
    let by_sums = incremental(&d, "a", "v");
    assert_eq!(d.record("a", &by_sums)["changes_found_by"], "checksums");
    step(
        "an incremental found by checksums takes",
        MIB - COORDINATION,
        2 * MIB,
        true,
    );
    let sum = sha256(&volume);

    // The full backup's own data is the MiB at 8 that both others rewrote.
    std::fs::remove_file(d.image("a", &full)).unwrap();
    step("deleting the full backup frees", MIB / 2, 2 * MIB, false);
    std::fs::remove_file(d.image("a", &by_map)).unwrap();
    step("deleting the middle backup frees", MIB / 2, 2 * MIB, false);
    assert_eq!(sha256(&d.image("a", &by_sums)), sum);
    std::fs::remove_file(d.image("a", &by_sums)).unwrap();
    step("deleting the last backup frees", 32 * MIB, 33 * MIB, false);
    d.stop_clean();
}

/// The backup ids that have a record in a target, sorted.
fn recorded_ids(d: &Daemon, target: &str) -> Vec<String> {
    let mut ids: Vec<String> = names_in(&d.target(target))
        .into_iter()
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .collect();
    ids.sort();
    ids
}

#[test]
fn keep_last_keeps_exactly_the_newest_available_of_the_volume_on_its_backend() {
    let mut sb = Sandbox::new("inc-keep-exact");
    // A second backend whose volume has the same ID: its backups are not this volume's.
    let silver = sb.mkdir("silver");
    let extra = format!(
        "[backends.silver]\ndriver = \"file\"\npools = {{ silver = \"{}\" }}\n",
        silver.display()
    );
    let s = setup(&mut sb, &extra, "");
    let keep_config = sb.path("keep.toml");
    let text = std::fs::read_to_string(&s.config).unwrap();
    let with_keep = text.replace(
        "[targets.a]\nbackend = \"hdd\"\npool = \"a\"\n",
        "[targets.a]\nbackend = \"hdd\"\npool = \"a\"\nkeep_last = 2\n",
    );
    assert_ne!(with_keep, text, "keep_last set on target a");
    std::fs::write(&keep_config, with_keep).unwrap();
    let full = |d: &Daemon| {
        let id = d.backup("a", "v wait");
        assert_eq!(d.record("a", &id)["status"], "available", "{}", d.log());
        id
    };

    // Without retention: one backup of silver's v, three of gold's v.
    random_volume(&silver, "v", 2);
    let d = sb.start_daemon(&s.config);
    let silvers = full(&d);
    assert_eq!(d.record("a", &silvers)["backend"], "silver");
    std::fs::remove_file(silver.join("volume-v")).unwrap();
    let volume = random_volume(&s.gold, "v", 4);
    let mut golds = Vec::new();
    let mut rng = Lcg(27);
    for _ in 0..3 {
        round_of_writes(&volume, &mut rng);
        golds.push((full(&d), sha256(&volume)));
    }
    d.stop_clean();
    // A failed backup of gold's v, newer than all three: recorded `error`.
    let d = sb.start_daemon_env(&s.config, &hold_env("finishing"));
    let failed = d.backup("a", "v");
    wait_for(
        || d.log().contains("holding at finishing"),
        "the pause point",
    );
    d.stop_clean();

    // With keep_last = 2, one more backup: two deletions in one round, the failed record
    // neither counted nor deleted, silver's backup untouched.
    let d = sb.start_daemon(&keep_config);
    assert_eq!(d.record("a", &failed)["status"], "error");
    round_of_writes(&volume, &mut rng);
    golds.push((full(&d), sha256(&volume)));
    let mut expected = vec![
        silvers.clone(),
        failed.clone(),
        golds[2].0.clone(),
        golds[3].0.clone(),
    ];
    expected.sort();
    assert_eq!(recorded_ids(&d, "a"), expected, "{}", d.log());
    for (id, _) in &golds[..2] {
        assert!(!d.image("a", id).exists(), "{id} is beyond keep_last");
    }
    for (id, sum) in &golds[2..] {
        assert_eq!(&sha256(&d.image("a", id)), sum);
    }
    assert_eq!(
        d.log().matches("retention: deleted").count(),
        2,
        "one line per deletion: {}",
        d.log()
    );
    assert_eq!(d.record("a", &silvers)["status"], "available");
    d.stop_clean();
}

#[test]
fn kill9_at_every_step_of_an_incremental_leaves_the_parent_and_base_intact() {
    for point in ["snapshotting", "finishing"] {
        let mut sb = Sandbox::new(&format!("inc-crash-{point}"));
        let s = setup(&mut sb, "", "");
        let volume = random_volume(&s.gold, "v", 16);
        let d = sb.start_daemon(&s.config);
        let parent = incremental(&d, "a", "v");
        let parent_sum = sha256(&d.image("a", &parent));
        assert!(d.stop().success());
        round_of_writes(&volume, &mut Lcg(11));
        let d = sb.start_daemon_env(&s.config, &hold_env(point));
        let id = d.backup("a", "v incremental");
        wait_for(
            || d.log().contains(&format!("holding at {point}")),
            "the pause point",
        );
        d.kill9();
        let d = sb.start_daemon(&s.config);
        let record = d.record("a", &id);
        assert_eq!(record["status"], "error", "{record}");
        assert!(!d.image("a", &id).exists());
        assert_eq!(
            sha256(&d.image("a", &parent)),
            parent_sum,
            "the parent is intact"
        );
        assert_eq!(
            snapshots_in(&s.gold),
            vec![format!("snapshot-backupfs-{parent}")],
            "only the parent's base is left"
        );
        // And the next incremental builds on the parent as if nothing happened.
        let next = incremental(&d, "a", "v");
        assert_eq!(d.record("a", &next)["parent_id"], parent.as_str());
        assert_eq!(sha256(&d.image("a", &next)), sha256(&volume));
    }
}

#[test]
fn a_qcow2_volume_is_backed_up_incrementally_by_comparing_checksums() {
    let mut sb = Sandbox::new("inc-qcow2");
    let q = sb.loop_fs("q", Fs::Xfs, 512);
    let runtime = sb.mkdir("runtime");
    let (vols, backups) = (q.join("vols"), q.join("backups"));
    for dir in [&vols, &backups] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\", backups = \"{}\" }}\n\
         [targets.q]\nbackend = \"qc\"\npool = \"backups\"\n",
        sb.mkdir("state").display(),
        vols.display(),
        backups.display()
    ));
    let image = vols.join("volume-v");
    ok(&format!(
        "qemu-img create -q -f qcow2 '{p}' 64M && qemu-io -f qcow2 -c 'write -P 0xab 1M 20M' '{p}' >/dev/null",
        p = image.display()
    ));
    let d = sb.start_daemon_env(&config, &[("RUNTIME_DIRECTORY", runtime.to_str().unwrap())]);
    let first = incremental(&d, "q", "v");
    ok(&format!(
        "qemu-io -f qcow2 -c 'write -P 0x11 5M 64k' -c 'write -P 0x22 30M 1M' '{}' >/dev/null",
        image.display()
    ));
    let second = incremental(&d, "q", "v");
    let record = d.record("q", &second);
    assert_eq!(record["parent_id"], first.as_str(), "{record}");
    assert_eq!(record["changes_found_by"], "checksums", "{record}");
    // Two 1 MiB blocks differ; of them, the 64 KiB pieces that differ are written (1 + 16).
    assert_eq!(
        record["changed_bytes"],
        17 << 16,
        "two blocks differ, in 17 pieces: {record}"
    );
    let raw = sb.path("expected.raw");
    ok(&format!(
        "qemu-img convert -U -f qcow2 -O raw '{}' '{}'",
        image.display(),
        raw.display()
    ));
    assert_eq!(sha256(&d.image("q", &second)), sha256(&raw));
    ok(&format!("rm '{}'", d.image("q", &first).display()));
    assert_eq!(sha256(&d.image("q", &second)), sha256(&raw));
}

/// Rewrites backup `id` in pool `pool` as a backupfs made before leaf sums wrote it:
/// `xxh3-64` of each whole 1 MiB block, no leaf-sums file.
fn as_made_before_leaf_sums(pool: &Path, id: &str) {
    let data = std::fs::read(pool.join(format!("backup-{id}.img"))).unwrap();
    let sums: Vec<u8> = data
        .chunks(1 << 20)
        .flat_map(|block| backupfs::copy::SumKind::Flat.block_sum(block).to_le_bytes())
        .collect();
    std::fs::write(pool.join(format!("backup-{id}.sums")), &sums).unwrap();
    std::fs::remove_file(pool.join(format!("backup-{id}.leaves"))).unwrap();
    let path = pool.join(format!("backup-{id}.json"));
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let checksums = record["checksums"].as_object_mut().unwrap();
    checksums.insert("algorithm".into(), "xxh3-64".into());
    checksums.insert(
        "digest".into(),
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&sums)).into(),
    );
    checksums.remove("leaves");
    std::fs::write(&path, serde_json::to_string(&record).unwrap()).unwrap();
}

#[test]
fn leaf_sums_carry_on_from_older_backups_and_a_damaged_leaf_file_costs_only_reads() {
    let mut sb = Sandbox::new("inc-leaves");
    let s = setup(&mut sb, "", "");
    let volume = random_volume(&s.gold, "v", 16);
    let mut rng = Lcg(0x1eaf);
    let d = sb.start_daemon(&s.config);
    let first = incremental(&d, "b", "v");
    let first_sum = sha256(&volume);
    let checksums = d.record("b", &first)["checksums"].clone();
    assert_eq!(checksums["algorithm"], "xxh3-64-leaves", "{checksums}");
    let leaves = checksums["leaves"]
        .as_str()
        .expect("the record names its leaf sums");
    assert_eq!(
        std::fs::metadata(s.b.join(leaves)).unwrap().len(),
        16 * 16 * 8,
        "16 sums of 8 bytes per 1 MiB block"
    );
    d.stop_clean();

    // A backup made before leaf sums still reads (every read checked its way), and the
    // next incremental from it reads every block once to take the new checksums.
    as_made_before_leaf_sums(&s.b, &first);
    let d = sb.start_daemon(&s.config);
    assert_eq!(sha256(&d.image("b", &first)), first_sum, "{}", d.log());
    round_of_writes(&volume, &mut rng);
    let second = incremental(&d, "b", "v");
    let record = d.record("b", &second);
    assert_eq!(record["parent_id"], first.as_str(), "{record}");
    assert_eq!(
        record["checksums"]["algorithm"], "xxh3-64-leaves",
        "{record}"
    );
    assert!(record["checksums"]["leaves"].is_string(), "{record}");
    assert!(
        record["changed_bytes"].as_u64().unwrap() < 8 << 20,
        "only what changed is written: {record}"
    );
    assert_eq!(sha256(&d.image("b", &second)), sha256(&volume));
    assert!(d.log().contains("reading every block once"), "{}", d.log());

    // Leaf sums that rotted are told by their block's checksum: whole blocks are read
    // instead, and the backup is as exact as ever.
    let leaves = s.b.join(format!("backup-{second}.leaves"));
    let len = std::fs::metadata(&leaves).unwrap().len() as usize;
    std::fs::write(&leaves, vec![0x5a; len]).unwrap();
    round_of_writes(&volume, &mut rng);
    let third = incremental(&d, "b", "v");
    assert_eq!(d.record("b", &third)["changes_found_by"], "snapshot-diff");
    assert_eq!(sha256(&d.image("b", &third)), sha256(&volume));
    // The same checksums as a full backup of the same data.
    let full = d.backup("b", "v wait");
    assert_eq!(
        d.record("b", &third)["checksums"]["digest"],
        d.record("b", &full)["checksums"]["digest"]
    );
    // Entries of blocks that changed were taken again; the others are inherited as they
    // are (and checked before any use).
    let third_leaves = std::fs::read(s.b.join(format!("backup-{third}.leaves"))).unwrap();
    let full_leaves = std::fs::read(s.b.join(format!("backup-{full}.leaves"))).unwrap();
    assert_eq!(third_leaves.len(), full_leaves.len());
    let entries = third_leaves.chunks(128).zip(full_leaves.chunks(128));
    let (mut retaken, mut inherited) = (0, 0);
    for (block, (got, want)) in entries.enumerate() {
        if got.iter().all(|&b| b == 0x5a) {
            inherited += 1;
        } else {
            assert!(got == want, "block {block}: neither rotted nor right");
            retaken += 1;
        }
    }
    assert!(
        retaken > 0 && inherited > 0,
        "{retaken} retaken, {inherited} inherited"
    );

    // Leaf sums that are gone: the next backup starts a file of its own (its changed
    // blocks read whole), and the chain goes on with leaf sums.
    std::fs::remove_file(s.b.join(format!("backup-{full}.leaves"))).unwrap();
    round_of_writes(&volume, &mut rng);
    let fourth = incremental(&d, "b", "v");
    let record = d.record("b", &fourth);
    assert_eq!(record["parent_id"], full.as_str(), "{record}");
    assert!(record["checksums"]["leaves"].is_string(), "{record}");
    assert_eq!(sha256(&d.image("b", &fourth)), sha256(&volume));
    round_of_writes(&volume, &mut rng);
    let fifth = incremental(&d, "b", "v");
    assert_eq!(sha256(&d.image("b", &fifth)), sha256(&volume));
    assert_eq!(
        d.record("b", &fifth)["checksums"]["digest"],
        d.record("b", &d.backup("b", "v wait"))["checksums"]["digest"]
    );

    // Deleting a backup takes its leaf sums with it.
    std::fs::remove_file(d.image("b", &second)).unwrap();
    assert!(!leaves.exists());
    d.stop_clean();
}

#[test]
fn deleting_the_backup_that_holds_the_base_snapshot_removes_the_snapshot() {
    let mut sb = Sandbox::new("inc-delete-base");
    let s = setup(&mut sb, "", "");
    let volume = random_volume(&s.gold, "v", 8);
    let d = sb.start_daemon(&s.config);
    let first = incremental(&d, "a", "v");
    round_of_writes(&volume, &mut Lcg(7));
    let second = incremental(&d, "a", "v");
    let base = format!("snapshot-backupfs-{second}");
    assert_eq!(snapshots_in(&s.gold), std::slice::from_ref(&base));
    assert_eq!(d.record("a", &second)["base_snapshot"], base.as_str());
    let first_sum = sha256(&d.image("a", &first));

    std::fs::remove_file(d.image("a", &second)).unwrap();
    assert_eq!(
        snapshots_in(&s.gold),
        Vec::<String>::new(),
        "the base went with its backup: {}",
        d.log()
    );
    assert_eq!(sha256(&d.image("a", &first)), first_sum);
    // The next incremental has a parent without a base: it compares checksums, and its
    // own snapshot is the one base again.
    round_of_writes(&volume, &mut Lcg(8));
    let third = incremental(&d, "a", "v");
    let record = d.record("a", &third);
    assert_eq!(record["parent_id"], first.as_str(), "{record}");
    assert_eq!(record["changes_found_by"], "checksums", "{record}");
    assert_eq!(sha256(&d.image("a", &third)), sha256(&volume));
    assert_eq!(
        snapshots_in(&s.gold),
        vec![format!("snapshot-backupfs-{third}")]
    );
    d.stop_clean();
}

#[test]
fn a_base_snapshot_whose_volume_was_deleted_is_removed_and_its_backups_stay() {
    let mut sb = Sandbox::new("inc-volume-gone");
    let s = setup(&mut sb, "", "");
    let volume = random_volume(&s.gold, "v", 8);
    random_volume(&s.gold, "kept", 4);
    let d = sb.start_daemon(&s.config);
    let gone = incremental(&d, "a", "v");
    let kept = incremental(&d, "a", "kept");
    let sum = sha256(&d.image("a", &gone));
    assert_eq!(snapshots_in(&s.gold).len(), 2);
    assert!(d.stop().success());
    // As Cinder's NFS driver deletes a volume: the file goes, our snapshot beside it stays.
    std::fs::remove_file(&volume).unwrap();
    let d = sb.start_daemon(&s.config);
    assert_eq!(
        snapshots_in(&s.gold),
        vec![format!("snapshot-backupfs-{kept}")],
        "only the base of a volume that still exists is kept: {}",
        d.log()
    );
    let record = d.record("a", &gone);
    assert!(record["base_snapshot"].is_null(), "{record}");
    assert!(record["temporary_snapshot"].is_null(), "{record}");
    assert_eq!(record["status"], "available", "{record}");
    assert_eq!(sha256(&d.image("a", &gone)), sum, "the backup stays whole");
    assert!(d.log().contains("the volume is gone"), "{}", d.log());
    assert_eq!(
        d.record("a", &kept)["base_snapshot"],
        format!("snapshot-backupfs-{kept}").as_str()
    );
}
