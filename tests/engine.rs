//! The engine without root, loop devices or FUSE: an `Engine` made from parts over the
//! in-memory volume driver (`volume::memory`, feature `testing`) and a catalogue in a
//! temporary directory. Backups, incrementals, retention, recovery after a crash and
//! device faults, each in milliseconds. What only real storage shows (reflinks, locks,
//! QEMU, Ceph, the mount) stays in the other test files.

use backupfs::config::Config;
use backupfs::engine::parts::BackendPart;
use backupfs::engine::{Engine, EngineError, Job};
use backupfs::ids::{BackupId, VolumeId};
use backupfs::targets::catalogue::{Catalogue, DirCatalogue};
use backupfs::targets::record::{Record, Status};
use backupfs::targets::{BackupTarget, VolumeTarget};
use backupfs::volume::VolumeDriver;
use backupfs::volume::memory::{HoldPoint, MemDriver};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const VOLUMES: &str = "volumes";
const BACKUPS: &str = "backups";
const TARGET: &str = "t";
const BACKEND: &str = "mem";
/// How long a test waits for the engine to reach a held operation.
const REACH: Duration = Duration::from_secs(20);

/// Bytes that differ from block to block and run to run of `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Storage for one engine: the in-memory pools (volumes and the target's), the target's
/// catalogue directory and a state directory. Everything goes with the temporary
/// directory when the test ends.
/// The node every engine of a test runs as (one at a time, or a restart after a crash).
const NODE: &str = "engine-test";
const LEASE: Duration = Duration::from_secs(30);

struct World {
    dir: tempfile::TempDir,
    driver: Arc<MemDriver>,
    /// Where the changes of the volumes come from, when not `driver` (a backend that
    /// cannot tell what changed, beside a target that shares data).
    volumes: Arc<MemDriver>,
    keep_last: u32,
    verify_reads: bool,
}

impl World {
    /// Writes a record as another (older, crashed) backupfs left it; no engine may be
    /// running on this world.
    fn put_record(&self, record: &Record) {
        DirCatalogue::open(TARGET, &self.catalogue_dir(), "writer", LEASE)
            .expect("catalogue")
            .write_record(record)
            .expect("record written");
    }

    fn new() -> World {
        let driver = MemDriver::new(&[VOLUMES, BACKUPS]);
        World {
            dir: tempfile::tempdir().expect("temporary directory"),
            volumes: driver.clone(),
            driver,
            keep_last: 0,
            verify_reads: true,
        }
    }

    /// Volumes on a driver that cannot tell what changed between two snapshots.
    fn without_change_map() -> World {
        let mut world = World::new();
        world.volumes = MemDriver::with_sharing(&[VOLUMES], false);
        world
    }

    fn catalogue_dir(&self) -> PathBuf {
        self.dir.path().join("catalogue")
    }

    /// An engine over this storage (its own state directory each time: a restarted
    /// daemon after a crash).
    fn engine(&self) -> Engine {
        let catalogue_dir = self.catalogue_dir();
        std::fs::create_dir_all(&catalogue_dir).expect("catalogue directory");
        let state_dir = tempfile::tempdir_in(self.dir.path()).expect("state directory");
        let config = Config::parse(&format!(
            "state_dir = {:?}\nnode = \"{NODE}\"\nmax_parallel_jobs = 2\nverify_reads = {}\n\
             [backends.{BACKEND}]\ndriver = \"file\"\npools = {{ {VOLUMES} = \"/nonexistent\", {BACKUPS} = \"/nonexistent\" }}\n\
             [targets.{TARGET}]\nbackend = \"{BACKEND}\"\npool = \"{BACKUPS}\"\nkeep_last = {}\n",
            state_dir.keep().display(),
            self.verify_reads,
            self.keep_last,
        ))
        .expect("configuration");
        let catalogue = DirCatalogue::open(TARGET, &catalogue_dir, NODE, LEASE).expect("catalogue");
        let target: Arc<dyn BackupTarget> = Arc::new(VolumeTarget::new(
            TARGET,
            self.driver.clone(),
            BACKUPS,
            Box::new(catalogue),
        ));
        let backend = BackendPart {
            name: BACKEND.to_string(),
            driver: self.volumes.clone(),
            volume_pools: vec![VOLUMES.to_string()],
        };
        Engine::from_parts(config, vec![backend], vec![target]).expect("engine")
    }

    /// A copy of this storage as a crash at this instant leaves it: the in-memory pools
    /// and the catalogue's files, as they are now.
    fn crashed_copy(&self) -> World {
        let driver = self.driver.fork();
        let volumes = if Arc::ptr_eq(&self.volumes, &self.driver) {
            driver.clone()
        } else {
            self.volumes.fork()
        };
        let copy = World {
            dir: tempfile::tempdir().expect("temporary directory"),
            driver,
            volumes,
            keep_last: self.keep_last,
            verify_reads: self.verify_reads,
        };
        std::fs::create_dir_all(copy.catalogue_dir()).expect("catalogue directory");
        for entry in std::fs::read_dir(self.catalogue_dir()).expect("catalogue") {
            let entry = entry.expect("catalogue entry");
            // The node's heartbeat and a record's lock are a dead process's after a
            // crash, which a restart takes over at once; here that process (this test)
            // is alive, so they are left out. Claims and decisions stay.
            let name = entry.file_name().to_string_lossy().into_owned();
            let name = name.trim_start_matches('.');
            if name.starts_with("backupfs.node.") || name.starts_with("backupfs.lock.") {
                continue;
            }
            if entry.file_type().expect("file type").is_file() {
                std::fs::copy(entry.path(), copy.catalogue_dir().join(entry.file_name()))
                    .expect("copy of a catalogue file");
            }
        }
        copy
    }

    fn put_volume(&self, volume_id: &str, size: u64, writes: &[(u64, &[u8])]) {
        self.volumes.put_volume(VOLUMES, volume_id, size, writes);
    }

    fn volume(&self, volume_id: &str) -> Vec<u8> {
        self.volumes
            .contents(VOLUMES, volume_id)
            .expect("volume exists")
    }

    /// The catalogue's files, but the nodes' coordination (heartbeats, claims).
    fn catalogue_files(&self) -> Vec<String> {
        files_in(&self.catalogue_dir())
            .into_iter()
            .filter(|name| !name.trim_start_matches('.').starts_with("backupfs."))
            .collect()
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn request(volume_id: &str, incremental: bool) -> backupfs::engine::BackupRequest {
    backupfs::engine::BackupRequest {
        volume_id: VolumeId::parse(volume_id).expect("volume id"),
        wait: false,
        name: None,
        incremental,
        device: None,
    }
}

fn start(engine: &Engine, volume_id: &str, incremental: bool) -> Arc<Job> {
    engine
        .start_backup(TARGET, &request(volume_id, incremental))
        .expect("backup accepted")
}

/// Runs a backup to its end; its record.
fn backup(engine: &Engine, volume_id: &str, incremental: bool) -> Record {
    let job = start(engine, volume_id, incremental);
    if let Err(failure) = job.wait() {
        panic!("backup of {volume_id} failed: {}", failure.reason);
    }
    // Records tell newer from older by their times, in milliseconds: a backup of a few
    // MiB in memory may take less.
    std::thread::sleep(Duration::from_millis(3));
    engine.record(TARGET, &job.backup_id).expect("record")
}

/// Runs a backup that must fail; its record and the failure.
fn failed_backup(engine: &Engine, volume_id: &str, incremental: bool) -> (Record, String) {
    let job = start(engine, volume_id, incremental);
    let failure = job.wait().expect_err("the backup fails");
    let record = engine.record(TARGET, &job.backup_id).expect("record");
    (record, failure.reason)
}

/// The whole image of a backup, read through the engine's checked reader.
fn image(engine: &Engine, backup_id: &BackupId) -> Vec<u8> {
    let image = engine.open_image(TARGET, backup_id).expect("image opens");
    let mut out = vec![0u8; image.size as usize];
    let mut at = 0;
    while at < out.len() {
        let n = image
            .read_at(&mut out[at..], at as u64)
            .expect("image read");
        assert!(n > 0, "image ends early at {at} of {}", out.len());
        at += n;
    }
    out
}

fn ids<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<String> {
    let mut ids: Vec<String> = records.into_iter().map(|r| r.id.to_string()).collect();
    ids.sort();
    ids
}

/// What is stored for backups in the target's pool.
fn stored_data(world: &World) -> Vec<String> {
    let mut ids: Vec<String> = world
        .driver
        .list(BACKUPS)
        .expect("target pool")
        .into_iter()
        .map(|v| v.id)
        .collect();
    ids.sort();
    ids
}

/// A volume of 5 MiB and a bit: data in block 0, a hole in blocks 1-2, data across the
/// 3/4 boundary, and a short last block.
fn sample_volume(world: &World, volume_id: &str, seed: u64) {
    let first = pattern(MIB as usize, seed);
    let straddle = pattern(MIB as usize, seed + 1);
    let tail = pattern(1000, seed + 2);
    world.put_volume(
        volume_id,
        5 * MIB + 1000,
        &[
            (0, &first),
            (3 * MIB + MIB / 2, &straddle),
            (5 * MIB, &tail),
        ],
    );
}

#[test]
fn a_full_backup_reads_back_as_the_volume_and_stores_only_its_data() {
    let world = World::new();
    sample_volume(&world, "vol-a", 1);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    assert_eq!(record.status, Status::Available);
    assert_eq!(record.size, 5 * MIB + 1000);
    assert_eq!(image(&engine, &record.id), world.volume("vol-a"));
    // The hole is not written: 1 MiB + 1 MiB + 1000 bytes of data.
    assert_eq!(record.stored_bytes, 2 * MIB + 1000);
    assert_eq!(record.parent_id, None);
    assert_eq!(
        world.driver.contents(BACKUPS, record.id.as_str()),
        Some(world.volume("vol-a"))
    );
    assert!(world.driver.snapshots(VOLUMES).is_empty());
    engine.shutdown();
}

#[test]
fn an_incremental_to_a_target_that_cannot_share_data_is_a_whole_copy() {
    // Without reflinks a new backup's data starts empty, not as its parent's: the
    // incremental asked for is a full backup, or every unchanged block would be lost.
    let mut world = World::new();
    world.volumes = MemDriver::new(&[VOLUMES]);
    world.driver = MemDriver::with_sharing(&[BACKUPS], false);
    sample_volume(&world, "vol-a", 2);
    let engine = world.engine();
    let first = backup(&engine, "vol-a", true);
    world
        .volumes
        .write(VOLUMES, "vol-a", 4 * MIB + 8192, &pattern(4096, 22));
    let second = backup(&engine, "vol-a", true);
    assert_eq!(second.parent_id, None, "{second:?}");
    assert_eq!(image(&engine, &second.id), world.volume("vol-a"));
    assert_ne!(image(&engine, &first.id), world.volume("vol-a"));
}

#[test]
fn incremental_backups_write_only_what_changed_and_keep_one_base_snapshot() {
    let world = World::new();
    sample_volume(&world, "vol-a", 2);
    let engine = world.engine();
    let full = backup(&engine, "vol-a", true);
    let before = world.volume("vol-a");
    assert_eq!(full.parent_id, None, "the first backup has no parent");
    let first_base = full
        .base_snapshot
        .clone()
        .expect("the snapshot is kept as base");

    // One 4 KiB page inside block 4, and one into the hole of block 1.
    world
        .volumes
        .write(VOLUMES, "vol-a", 4 * MIB + 8192, &pattern(4096, 20));
    world
        .volumes
        .write(VOLUMES, "vol-a", MIB + 4096, &pattern(4096, 21));
    let second = backup(&engine, "vol-a", true);
    assert_eq!(second.parent_id.as_ref(), Some(&full.id));
    assert_eq!(second.changes_found_by.as_deref(), Some("snapshot-diff"));
    assert_eq!(second.changed_bytes, Some(8192));
    // The storage said which pages changed: only those are written.
    assert_eq!(second.stored_bytes, 8192);
    assert_eq!(image(&engine, &second.id), world.volume("vol-a"));
    assert_eq!(image(&engine, &full.id), before, "the parent is unchanged");

    // The newer base replaces the older one: one base per volume.
    let second_base = second.base_snapshot.clone().expect("new base");
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![second_base.clone()]);
    let full = engine.record(TARGET, &full.id).expect("record");
    assert_eq!(full.base_snapshot, None);
    assert_eq!(full.temporary_snapshot, None);
    assert_ne!(first_base, second_base);

    // Deleting the parent leaves the child whole.
    engine.delete_backup(TARGET, &full.id).expect("delete");
    assert_eq!(image(&engine, &second.id), world.volume("vol-a"));
    assert_eq!(stored_data(&world), vec![second.id.to_string()]);
    // Deleting the backup that holds the base takes the base along.
    engine.delete_backup(TARGET, &second.id).expect("delete");
    assert!(world.volumes.snapshots(VOLUMES).is_empty());
    assert!(stored_data(&world).is_empty());
    engine.shutdown();
}

#[test]
fn an_incremental_backup_without_a_change_map_compares_checksums() {
    let world = World::without_change_map();
    sample_volume(&world, "vol-a", 3);
    let engine = world.engine();
    let full = backup(&engine, "vol-a", true);
    world
        .volumes
        .write(VOLUMES, "vol-a", 3 * MIB + 100, &pattern(10, 30));
    let second = backup(&engine, "vol-a", true);
    assert_eq!(second.parent_id.as_ref(), Some(&full.id));
    assert_eq!(second.changes_found_by.as_deref(), Some("checksums"));
    // The block that differs, and within it the one leaf whose sum differs.
    assert_eq!(second.stored_bytes, 64 << 10);
    assert_eq!(image(&engine, &second.id), world.volume("vol-a"));
    engine.shutdown();
}

#[test]
fn keep_last_keeps_the_newest_backups_of_the_volume_and_nothing_else_goes() {
    let mut world = World::new();
    world.keep_last = 2;
    sample_volume(&world, "vol-a", 4);
    sample_volume(&world, "vol-b", 5);
    let engine = world.engine();
    let other = backup(&engine, "vol-b", false);
    let a1 = backup(&engine, "vol-a", false);
    // A failed backup is no backup: not counted, and its record stays.
    world.volumes.faults(VOLUMES).fail_reads_at(Some(0));
    let (failed, _) = failed_backup(&engine, "vol-a", false);
    world.volumes.faults(VOLUMES).fail_reads_at(None);
    let a2 = backup(&engine, "vol-a", false);
    assert_eq!(
        ids(&engine.records(TARGET).expect("records")),
        ids([&other, &a1, &failed, &a2]),
        "two backups of vol-a: nothing to delete yet"
    );
    let a3 = backup(&engine, "vol-a", false);
    let a4 = backup(&engine, "vol-a", false);
    let records = engine.records(TARGET).expect("records");
    assert_eq!(ids(&records), ids([&other, &failed, &a3, &a4]));
    assert_eq!(stored_data(&world), ids([&other, &a3, &a4]));
    assert_eq!(image(&engine, &a4.id), world.volume("vol-a"));
    assert_eq!(image(&engine, &other.id), world.volume("vol-b"));
    engine.shutdown();
}

#[test]
fn keep_last_deletes_several_old_backups_in_one_round() {
    let world = World::new();
    sample_volume(&world, "vol-a", 6);
    let engine = world.engine();
    let old: Vec<Record> = (0..3).map(|_| backup(&engine, "vol-a", false)).collect();
    engine.shutdown();
    drop(engine);
    // Restarted with a smaller keep_last: the next backup deletes all three older ones.
    let mut world = world;
    world.keep_last = 1;
    let engine = world.engine();
    let newest = backup(&engine, "vol-a", false);
    assert_eq!(
        ids(&engine.records(TARGET).expect("records")),
        ids([&newest])
    );
    assert_eq!(stored_data(&world), ids([&newest]));
    for record in old {
        assert!(
            !world
                .catalogue_files()
                .iter()
                .any(|f| f.contains(record.id.as_str())),
            "nothing of {} is left",
            record.id
        );
    }
    engine.shutdown();
}

#[test]
fn a_source_read_error_fails_the_backup_and_leaves_nothing_behind() {
    let world = World::new();
    sample_volume(&world, "vol-a", 7);
    // In use: read from a temporary snapshot, which must go too.
    world.volumes.set_in_use(VOLUMES, "vol-a", Some("a guest"));
    let engine = world.engine();
    let before = world.volume("vol-a");
    world
        .volumes
        .faults(VOLUMES)
        .fail_reads_at(Some(3 * MIB + MIB / 2 + 5));
    let (record, reason) = failed_backup(&engine, "vol-a", false);
    assert_eq!(record.status, Status::Error);
    assert!(
        reason.contains("Input/output error") || reason.contains("EIO"),
        "{reason}"
    );
    assert_eq!(record.temporary_snapshot, None);
    assert!(world.volumes.snapshots(VOLUMES).is_empty());
    assert!(stored_data(&world).is_empty());
    assert_eq!(
        world.catalogue_files(),
        vec![
            ".backupfs-target".to_string(),
            format!("backup-{}.json", record.id)
        ]
    );
    assert_eq!(world.volume("vol-a"), before, "the source is only read");
    assert!(matches!(
        engine.open_image(TARGET, &record.id),
        Err(EngineError::NotFound(_))
    ));
    engine.shutdown();
}

#[test]
fn a_target_write_error_fails_the_backup_and_removes_its_partial_data() {
    let world = World::new();
    sample_volume(&world, "vol-a", 8);
    let engine = world.engine();
    let good = backup(&engine, "vol-a", false);
    world
        .driver
        .faults(BACKUPS)
        .fail_writes_at(Some(5 * MIB + 10));
    let (record, reason) = failed_backup(&engine, "vol-a", false);
    assert_eq!(record.status, Status::Error);
    assert!(reason.contains("Input/output error"), "{reason}");
    assert_eq!(stored_data(&world), ids([&good]));
    assert!(
        !world
            .catalogue_files()
            .iter()
            .any(|f| f.contains(record.id.as_str()) && !f.ends_with(".json")),
        "no checksums or leaf sums of the failed backup: {:?}",
        world.catalogue_files()
    );
    world.driver.faults(BACKUPS).fail_writes_at(None);
    assert_eq!(image(&engine, &good.id), world.volume("vol-a"));
    engine.shutdown();
}

#[test]
fn a_volume_written_during_the_copy_fails_the_backup() {
    let world = World::new();
    sample_volume(&world, "vol-a", 9);
    let engine = world.engine();
    let hold = world.volumes.hold(HoldPoint::Read {
        pool: VOLUMES.to_string(),
        offset: 3 * MIB,
    });
    let job = start(&engine, "vol-a", false);
    assert!(hold.wait_reached(REACH), "the copy reaches 3 MiB");
    world
        .volumes
        .write(VOLUMES, "vol-a", 100, b"a guest's write");
    hold.release();
    let failure = job.wait().expect_err("the backup fails");
    assert!(
        failure.reason.contains("written during the copy"),
        "{}",
        failure.reason
    );
    assert!(stored_data(&world).is_empty());
    engine.shutdown();
}

#[test]
fn damaged_data_reads_as_an_error_and_verify_names_the_block() {
    let world = World::new();
    sample_volume(&world, "vol-a", 10);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    // One byte of block 3 changes on the target (bit rot).
    let mut byte = world
        .driver
        .contents(BACKUPS, record.id.as_str())
        .expect("data")[(3 * MIB + MIB / 2 + 7) as usize];
    byte ^= 1;
    world
        .driver
        .write(BACKUPS, record.id.as_str(), 3 * MIB + MIB / 2 + 7, &[byte]);
    let image = engine.open_image(TARGET, &record.id).expect("image opens");
    let mut buf = vec![0u8; MIB as usize];
    image.read_at(&mut buf, 0).expect("block 0 is good");
    assert_eq!(buf, world.volume("vol-a")[..MIB as usize]);
    let err = image
        .read_at(&mut buf, 3 * MIB)
        .expect_err("block 3 is damaged");
    assert!(err.to_string().contains("damaged"), "{err}");
    image.read_at(&mut buf, 4 * MIB).expect("block 4 is good");
    // The range check a server-side copy makes, anywhere in the damaged block or across it.
    for (offset, len) in [
        (3 * MIB + 5, 10),
        (2 * MIB, 2 * MIB),
        (3 * MIB + MIB - 1, 1),
    ] {
        assert!(
            matches!(
                image.verify_range(offset, len),
                Err(EngineError::Damaged { ref blocks, .. }) if blocks == &vec![3]
            ),
            "range {offset}+{len}"
        );
    }
    image.verify_range(4 * MIB, 10).expect("block 4 is good");
    image
        .verify_range(2 * MIB, MIB)
        .expect("a range that ends where block 3 begins checks block 2 only");
    image
        .verify_range(3 * MIB + 5, 0)
        .expect("an empty range checks nothing");
    drop(image);
    let verify = engine
        .start_verify(TARGET, &record.id)
        .expect("verify queued");
    let failure = verify.wait().expect_err("verify finds the damage");
    match failure.cause.as_deref() {
        Some(EngineError::Damaged { blocks, .. }) => assert_eq!(blocks, &vec![3]),
        other => panic!("not Damaged: {other:?}"),
    }
    let record = engine.record(TARGET, &record.id).expect("record");
    assert_eq!(record.damaged_blocks, Some(vec![3]));
    engine.shutdown();
}

#[test]
fn a_crash_mid_copy_is_cleaned_at_the_next_start_and_other_backups_stay() {
    let world = World::new();
    sample_volume(&world, "vol-a", 11);
    let engine = world.engine();
    let good = backup(&engine, "vol-a", false);
    world.volumes.set_in_use(VOLUMES, "vol-a", Some("a guest"));
    let hold = world.volumes.hold(HoldPoint::Read {
        pool: VOLUMES.to_string(),
        offset: 4 * MIB,
    });
    let job = start(&engine, "vol-a", false);
    assert!(hold.wait_reached(REACH), "the copy reaches 4 MiB");

    // kill -9 now: what the storage holds at this instant is what the next start finds.
    let crashed = world.crashed_copy();
    let creating = crashed
        .driver
        .list(BACKUPS)
        .expect("list")
        .iter()
        .any(|v| v.id == job.backup_id.as_str());
    assert!(creating, "the partial data is there when the crash comes");
    assert_eq!(crashed.volumes.snapshots(VOLUMES).len(), 1);
    let restarted = crashed.engine();
    let record = restarted.record(TARGET, &job.backup_id).expect("record");
    assert_eq!(record.status, Status::Error);
    assert!(
        record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("interrupted")
    );
    assert_eq!(record.temporary_snapshot, None);
    assert!(crashed.volumes.snapshots(VOLUMES).is_empty());
    assert_eq!(stored_data(&crashed), ids([&good]));
    assert_eq!(image(&restarted, &good.id), crashed.volume("vol-a"));
    assert_eq!(crashed.volume("vol-a"), world.volume("vol-a"));
    restarted.shutdown();

    // The engine that was "killed" goes on in its own world, and ends cleanly.
    hold.release();
    job.wait().expect("the held backup completes");
    engine.shutdown();
}

#[test]
fn a_crash_during_a_deletion_is_finished_at_the_next_start() {
    let world = World::new();
    sample_volume(&world, "vol-a", 12);
    let engine = world.engine();
    let doomed = backup(&engine, "vol-a", false);
    let kept = backup(&engine, "vol-a", false);
    let hold = world.driver.hold(HoldPoint::Delete {
        pool: BACKUPS.to_string(),
    });
    let deleting = std::thread::scope(|scope| {
        let deleting = scope.spawn(|| engine.delete_backup(TARGET, &doomed.id));
        assert!(hold.wait_reached(REACH), "the deletion reaches the data");
        let crashed = world.crashed_copy();
        hold.release();
        (deleting.join().expect("delete thread"), crashed)
    });
    let (deleted, crashed) = deleting;
    deleted.expect("the held deletion completes");

    // What the crash left: the record says deleting, the data is still there.
    let record = std::fs::read_to_string(
        crashed
            .catalogue_dir()
            .join(format!("backup-{}.json", doomed.id)),
    )
    .expect("record");
    assert!(record.contains(r#""status": "deleting""#), "{record}");
    assert_eq!(stored_data(&crashed), ids([&doomed, &kept]));
    let restarted = crashed.engine();
    assert!(matches!(
        restarted.record(TARGET, &doomed.id),
        Err(EngineError::Target(_)) | Err(EngineError::NotFound(_))
    ));
    assert_eq!(stored_data(&crashed), ids([&kept]));
    assert!(
        !crashed
            .catalogue_files()
            .iter()
            .any(|f| f.contains(doomed.id.as_str())),
        "{:?}",
        crashed.catalogue_files()
    );
    assert_eq!(image(&restarted, &kept.id), crashed.volume("vol-a"));
    restarted.shutdown();
    engine.shutdown();
}

#[test]
fn a_crash_during_retention_is_finished_at_the_next_start() {
    let mut world = World::new();
    world.keep_last = 1;
    sample_volume(&world, "vol-a", 13);
    let engine = world.engine();
    let old = backup(&engine, "vol-a", false);
    let hold = world.driver.hold(HoldPoint::Delete {
        pool: BACKUPS.to_string(),
    });
    let job = start(&engine, "vol-a", false);
    assert!(hold.wait_reached(REACH), "retention deletes the old backup");
    let crashed = world.crashed_copy();
    hold.release();
    job.wait().expect("the new backup is available");

    let found = crashed.driver.list(BACKUPS).expect("list");
    assert_eq!(found.len(), 2, "both backups' data is there at the crash");
    let restarted = crashed.engine();
    let records = restarted.records(TARGET).expect("records");
    assert_eq!(ids(&records), vec![job.backup_id.to_string()]);
    assert_eq!(records[0].status, Status::Available);
    assert_eq!(stored_data(&crashed), vec![job.backup_id.to_string()]);
    assert!(
        !crashed
            .catalogue_files()
            .iter()
            .any(|f| f.contains(old.id.as_str()))
    );
    restarted.shutdown();
    engine.shutdown();
}

#[test]
fn a_snapshot_that_cannot_be_removed_stays_named_until_the_janitor_removes_it() {
    let world = World::new();
    sample_volume(&world, "vol-a", 14);
    world.volumes.set_in_use(VOLUMES, "vol-a", Some("a guest"));
    let engine = world.engine();
    world.volumes.faults(VOLUMES).fail_delete_snapshot(true);
    let record = backup(&engine, "vol-a", false);
    let named = record.temporary_snapshot.clone().expect("still named");
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![named]);
    engine.run_janitor();
    assert_eq!(world.volumes.snapshots(VOLUMES).len(), 1, "still failing");
    world.volumes.faults(VOLUMES).fail_delete_snapshot(false);
    engine.run_janitor();
    assert!(world.volumes.snapshots(VOLUMES).is_empty());
    let record = engine.record(TARGET, &record.id).expect("record");
    assert_eq!(record.temporary_snapshot, None);
    assert_eq!(record.status, Status::Available);
    engine.shutdown();
}

#[test]
fn a_deletion_that_fails_keeps_the_record_deleting_until_the_janitor_finishes() {
    let world = World::new();
    sample_volume(&world, "vol-a", 15);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    world.driver.faults(BACKUPS).fail_delete(true);
    engine
        .delete_backup(TARGET, &record.id)
        .expect_err("the data cannot be removed");
    let left = engine.record(TARGET, &record.id).expect("record stays");
    assert_eq!(left.status, Status::Deleting);
    assert!(engine.open_image(TARGET, &record.id).is_err());
    world.driver.faults(BACKUPS).fail_delete(false);
    engine.run_janitor();
    assert!(engine.record(TARGET, &record.id).is_err());
    assert!(stored_data(&world).is_empty());
    engine.shutdown();
}

#[test]
fn a_restart_keeps_base_snapshots_and_lists_the_jobs_that_ended() {
    let world = World::new();
    sample_volume(&world, "vol-a", 16);
    let engine = world.engine();
    let kept = backup(&engine, "vol-a", true);
    world.volumes.faults(VOLUMES).fail_reads_at(Some(0));
    let (failed, _) = failed_backup(&engine, "vol-a", false);
    world.volumes.faults(VOLUMES).fail_reads_at(None);
    engine.shutdown();
    drop(engine);

    let engine = world.engine();
    let base = kept.base_snapshot.clone().expect("a base");
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![base.clone()]);
    let record = engine.record(TARGET, &kept.id).expect("record");
    assert_eq!(record.base_snapshot, Some(base));
    assert_eq!(record.temporary_snapshot, None);
    let mut jobs: Vec<(String, &str)> = engine
        .jobs(Some(TARGET))
        .iter()
        .map(|job| (job.backup_id.to_string(), job.state()))
        .collect();
    jobs.sort();
    let mut expected = vec![
        (kept.id.to_string(), "available"),
        (failed.id.to_string(), "error"),
    ];
    expected.sort();
    assert_eq!(jobs, expected);
    // The next incremental still finds its changes through the base.
    world.volumes.write(VOLUMES, "vol-a", 0, b"changed");
    let next = backup(&engine, "vol-a", true);
    assert_eq!(next.changes_found_by.as_deref(), Some("snapshot-diff"));
    assert_eq!(next.stored_bytes, 4096);
    engine.shutdown();
}

#[test]
fn the_janitor_removes_the_base_snapshot_of_a_deleted_volume_only() {
    let world = World::new();
    sample_volume(&world, "vol-a", 17);
    sample_volume(&world, "vol-b", 18);
    let engine = world.engine();
    let gone = backup(&engine, "vol-a", true);
    let stays = backup(&engine, "vol-b", true);
    world
        .volumes
        .delete(VOLUMES, "vol-a")
        .expect("volume deleted");
    engine.run_janitor();
    let stays_base = stays.base_snapshot.clone().expect("a base");
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![stays_base.clone()]);
    let gone = engine.record(TARGET, &gone.id).expect("record");
    assert_eq!(gone.base_snapshot, None);
    assert_eq!(gone.temporary_snapshot, None);
    assert_eq!(gone.status, Status::Available, "the backup itself stays");
    let stays = engine.record(TARGET, &stays.id).expect("record");
    assert_eq!(stays.base_snapshot, Some(stays_base));
    engine.shutdown();
}

#[test]
fn after_a_crash_between_a_new_base_and_the_removal_of_the_old_the_newest_stays() {
    let world = World::new();
    sample_volume(&world, "vol-a", 19);
    let engine = world.engine();
    let older = backup(&engine, "vol-a", true);
    world.volumes.write(VOLUMES, "vol-a", 0, b"changed");
    let newer = backup(&engine, "vol-a", true);
    engine.shutdown();
    drop(engine);
    // As the crash left it: the older record still names its base, which still exists.
    let old_base = older.base_snapshot.clone().expect("a base");
    world
        .volumes
        .snapshot(VOLUMES, "vol-a", &old_base)
        .expect("old base");
    world.put_record(&older);
    assert_eq!(world.volumes.snapshots(VOLUMES).len(), 2);

    let engine = world.engine();
    let new_base = newer.base_snapshot.clone().expect("a base");
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![new_base.clone()]);
    let older = engine.record(TARGET, &older.id).expect("record");
    assert_eq!(older.base_snapshot, None);
    assert_eq!(older.temporary_snapshot, None);
    let newer = engine.record(TARGET, &newer.id).expect("record");
    assert_eq!(newer.base_snapshot, Some(new_base));
    engine.shutdown();
}

#[test]
fn a_snapshot_an_older_record_names_only_by_snapshot_used_is_named_then_removed() {
    let world = World::new();
    sample_volume(&world, "vol-a", 20);
    world.volumes.set_in_use(VOLUMES, "vol-a", Some("a guest"));
    let engine = world.engine();
    let faults = world.volumes.faults(VOLUMES);
    faults.fail_delete_snapshot(true);
    let mut record = backup(&engine, "vol-a", false);
    engine.shutdown();
    drop(engine);
    let snapshot = record.temporary_snapshot.clone().expect("named");
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![snapshot.clone()]);
    // Records made before `temporary_snapshot` said only `snapshot_used` (and named no
    // node: nodes came later; a record naming its node names its snapshot too).
    assert!(record.snapshot_used);
    record.temporary_snapshot = None;
    record.node = None;
    world.put_record(&record);

    // Start-up looks for it; it cannot go yet, so the record names it from now on.
    let engine = world.engine();
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![snapshot.clone()]);
    let named = engine.record(TARGET, &record.id).expect("record");
    assert_eq!(named.temporary_snapshot, Some(snapshot));
    engine.shutdown();
    drop(engine);
    world.put_record(&record);

    // Once it can go, start-up removes it.
    faults.fail_delete_snapshot(false);
    let engine = world.engine();
    assert!(world.volumes.snapshots(VOLUMES).is_empty());
    let record = engine.record(TARGET, &record.id).expect("record");
    assert_eq!(record.status, Status::Available);
    assert_eq!(record.temporary_snapshot, None);
    engine.shutdown();
}

#[test]
fn only_the_record_of_a_failed_backup_is_removed_as_a_record() {
    let world = World::new();
    sample_volume(&world, "vol-a", 21);
    let engine = world.engine();
    let good = backup(&engine, "vol-a", false);
    world.volumes.faults(VOLUMES).fail_reads_at(Some(0));
    let (failed, _) = failed_backup(&engine, "vol-a", false);
    assert!(matches!(
        engine.delete_record(TARGET, &good.id),
        Err(EngineError::NotPermitted(_))
    ));
    assert_eq!(
        engine.record(TARGET, &good.id).expect("record").status,
        Status::Available
    );
    engine.delete_record(TARGET, &failed.id).expect("removed");
    assert!(engine.record(TARGET, &failed.id).is_err());
    assert_eq!(ids(&engine.records(TARGET).expect("records")), ids([&good]));
    assert_eq!(stored_data(&world), ids([&good]));
    engine.shutdown();
}

#[test]
fn reads_at_any_offset_and_length_give_the_volumes_bytes_and_stop_at_its_end() {
    let world = World::new();
    sample_volume(&world, "vol-a", 22);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    let volume = world.volume("vol-a");
    let size = volume.len() as u64;
    let image = engine.open_image(TARGET, &record.id).expect("image opens");
    for (offset, len) in [
        (1, 10),
        (MIB - 5, 10),
        (MIB / 2, 3 * MIB),
        (3 * MIB + MIB / 2 - 3, MIB + 7),
        (4 * MIB, MIB),
        (5 * MIB + 999, 1),
        (5 * MIB + 900, 4096),
        (0, 6 * MIB),
        (size, 10),
    ] {
        let mut buf = vec![0xeeu8; len as usize];
        let n = image.read_at(&mut buf, offset).expect("read");
        let end = (offset + len).min(size);
        assert_eq!(
            n as u64,
            end.saturating_sub(offset),
            "read of {len} at {offset}"
        );
        assert!(
            buf[..n] == volume[offset.min(size) as usize..end as usize],
            "bytes of the read of {len} at {offset}"
        );
    }
    image.verify_range(0, size).expect("every block is good");
    drop(image);
    engine.shutdown();
}

#[test]
fn data_lost_to_a_hole_is_damage_for_reads_range_checks_and_verify() {
    let world = World::new();
    sample_volume(&world, "vol-a", 23);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    // Block 0 of the stored data becomes a hole: it reads as zeros, which is not its data.
    let data = world
        .driver
        .attach(BACKUPS, record.id.as_str(), backupfs::volume::Access::Write)
        .expect("attach the stored data");
    data.device.discard(0..MIB).expect("hole");
    drop(data);
    let image = engine.open_image(TARGET, &record.id).expect("image opens");
    let mut buf = vec![0u8; 10];
    assert!(matches!(
        image.read_at(&mut buf, 5),
        Err(EngineError::Damaged { .. })
    ));
    let mut whole = vec![0u8; MIB as usize];
    assert!(matches!(
        image.read_at(&mut whole, 0),
        Err(EngineError::Damaged { .. })
    ));
    assert!(matches!(
        image.verify_range(0, 10),
        Err(EngineError::Damaged { ref blocks, .. }) if blocks == &vec![0]
    ));
    // Block 1 was a hole in the volume too: good without a read; block 4 holds its data.
    image
        .verify_range(MIB, MIB)
        .expect("a hole that was a hole");
    image.verify_range(4 * MIB + 3, 10).expect("block 4");
    image.read_at(&mut whole, MIB).expect("block 1 reads");
    assert!(whole.iter().all(|&b| b == 0));
    drop(image);
    let failure = engine
        .start_verify(TARGET, &record.id)
        .expect("verify queued")
        .wait()
        .expect_err("verify finds the hole");
    match failure.cause.as_deref() {
        Some(EngineError::Damaged { blocks, .. }) => assert_eq!(blocks, &vec![0]),
        other => panic!("not Damaged: {other:?}"),
    }
    engine.shutdown();
}

#[test]
fn a_good_verify_is_recorded_and_reads_stay_open() {
    let world = World::new();
    sample_volume(&world, "vol-a", 24);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    assert_eq!(record.verified_at, None);
    engine
        .start_verify(TARGET, &record.id)
        .expect("verify queued")
        .wait()
        .expect("a good backup verifies");
    let record = engine.record(TARGET, &record.id).expect("record");
    assert!(record.verified_at.is_some());
    assert_eq!(record.damaged_blocks, Some(vec![]));
    assert_eq!(image(&engine, &record.id), world.volume("vol-a"));
    engine.shutdown();
}

#[test]
fn a_full_backup_after_an_incremental_leaves_the_base_in_place_across_a_restart() {
    let world = World::new();
    sample_volume(&world, "vol-a", 25);
    let engine = world.engine();
    let incremental = backup(&engine, "vol-a", true);
    let full = backup(&engine, "vol-a", false);
    assert_eq!(full.base_snapshot, None);
    engine.shutdown();
    drop(engine);
    // Start-up keeps one base per volume: the newest backup that has one, not the newest.
    let engine = world.engine();
    let base = incremental.base_snapshot.clone().expect("a base");
    assert_eq!(world.volumes.snapshots(VOLUMES), vec![base.clone()]);
    let record = engine.record(TARGET, &incremental.id).expect("record");
    assert_eq!(record.base_snapshot, Some(base));
    engine.shutdown();
}

#[test]
fn the_janitor_leaves_the_snapshot_of_a_running_backup_alone() {
    let world = World::new();
    sample_volume(&world, "vol-a", 26);
    world.volumes.set_in_use(VOLUMES, "vol-a", Some("a guest"));
    let engine = world.engine();
    // The job has made its backup available and is about to remove its snapshot.
    let hold = world.volumes.hold(HoldPoint::DeleteSnapshot {
        pool: VOLUMES.to_string(),
    });
    let job = start(&engine, "vol-a", false);
    assert!(hold.wait_reached(REACH), "the job removes its snapshot");
    let record = engine.record(TARGET, &job.backup_id).expect("record");
    assert_eq!(record.status, Status::Available);
    let snapshot = record.temporary_snapshot.clone().expect("named");
    engine.run_janitor();
    assert_eq!(
        world.volumes.snapshots(VOLUMES),
        vec![snapshot],
        "the running job's snapshot is its own to remove"
    );
    hold.release();
    job.wait().expect("the backup completes");
    assert!(world.volumes.snapshots(VOLUMES).is_empty());
    let record = engine.record(TARGET, &job.backup_id).expect("record");
    assert_eq!(record.temporary_snapshot, None);
    engine.shutdown();
}

#[test]
fn a_deletion_that_cannot_finish_does_not_make_its_base_the_volumes_newest() {
    let world = World::new();
    sample_volume(&world, "vol-a", 27);
    let engine = world.engine();
    let older = backup(&engine, "vol-a", true);
    world.volumes.write(VOLUMES, "vol-a", 0, b"changed");
    let newer = backup(&engine, "vol-a", true);
    world.driver.faults(BACKUPS).fail_delete(true);
    engine
        .delete_backup(TARGET, &newer.id)
        .expect_err("its data cannot be removed");
    engine.shutdown();
    drop(engine);
    // And a crash between the newer base and the removal of the older left both.
    let old_base = older.base_snapshot.clone().expect("a base");
    world
        .volumes
        .snapshot(VOLUMES, "vol-a", &old_base)
        .expect("old base");
    world.put_record(&older);

    // The deletion still cannot finish; the record being deleted is no backup, so the
    // base kept is the older backup's.
    let engine = world.engine();
    let deleting = engine.record(TARGET, &newer.id).expect("record stays");
    assert_eq!(deleting.status, Status::Deleting);
    let older = engine.record(TARGET, &older.id).expect("record");
    assert_eq!(older.base_snapshot, Some(old_base.clone()));
    assert!(world.volumes.snapshots(VOLUMES).contains(&old_base));
    engine.shutdown();
}

#[test]
fn an_empty_volume_backs_up_and_reads_as_empty() {
    let world = World::new();
    world.put_volume("vol-empty", 0, &[]);
    let engine = world.engine();
    let record = backup(&engine, "vol-empty", false);
    assert_eq!((record.size, record.stored_bytes), (0, 0));
    let image = engine.open_image(TARGET, &record.id).expect("image opens");
    assert_eq!(image.read_at(&mut [0u8; 10], 0).expect("read"), 0);
    image.verify_range(0, 10).expect("nothing to check");
    drop(image);
    engine
        .start_verify(TARGET, &record.id)
        .expect("verify queued")
        .wait()
        .expect("an empty backup verifies");
    engine.shutdown();
}

#[test]
fn with_verify_reads_off_stored_data_cut_short_is_a_read_error_not_stale_bytes() {
    let mut world = World::new();
    world.verify_reads = false;
    sample_volume(&world, "vol-a", 28);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    // Damage is not looked for: a range check passes, reads hand out what is stored.
    let rotten = 3 * MIB + MIB / 2;
    let mut byte = world
        .driver
        .contents(BACKUPS, record.id.as_str())
        .expect("data")[rotten as usize];
    byte ^= 1;
    world
        .driver
        .write(BACKUPS, record.id.as_str(), rotten, &[byte]);
    let image = engine.open_image(TARGET, &record.id).expect("image opens");
    image.verify_range(3 * MIB, MIB).expect("not checked");
    let mut one = [0u8; 1];
    image.read_at(&mut one, rotten).expect("read unchecked");
    assert_eq!(one[0], byte);
    // What is not stored at all is an error, never whatever the buffer held.
    world
        .driver
        .truncate(BACKUPS, record.id.as_str(), 4 * MIB + 100);
    let mut buf = vec![0xeeu8; MIB as usize];
    assert!(
        image.read_at(&mut buf, 4 * MIB).is_err(),
        "a read past the stored end"
    );
    drop(image);
    engine.shutdown();
}

#[test]
fn a_range_check_past_the_end_of_an_image_of_whole_blocks_stops_at_its_last_block() {
    let world = World::new();
    let data = pattern(2 * MIB as usize, 29);
    world.put_volume("vol-a", 2 * MIB, &[(0, &data)]);
    let engine = world.engine();
    let record = backup(&engine, "vol-a", false);
    let image = engine.open_image(TARGET, &record.id).expect("image opens");
    image
        .verify_range(MIB, 5 * MIB)
        .expect("blocks 1 and no further");
    image.verify_range(0, 2 * MIB).expect("both blocks");
    let mut buf = vec![0u8; 3 * MIB as usize];
    assert_eq!(image.read_at(&mut buf, 0).expect("read"), 2 * MIB as usize);
    assert!(buf[..data.len()] == data[..]);
    drop(image);
    engine.shutdown();
}
