//! The `s3` target against a real radosgw (Debian's `radosgw`, started by
//! contrib/ceph-cluster.sh on ports of its own, once per run, stopped at exit): backups
//! made with the engine's own copier from volume files, read back through the target's
//! devices, and the objects in the bucket inspected with the S3 API.
//!
//! `BACKUPFS_TEST_S3_DIR=DIR` reuses a cluster that `contrib/ceph-cluster.sh start DIR
//! --rgw-port N` started (faster when iterating); it is left running.

mod common;
#[path = "s3/config.rs"]
mod config;
#[path = "s3/https.rs"]
mod https;

use common::rgw::{self, Gateway};

use backupfs::copy::{self, Base, CopyOptions, CopyOutcome, Progress, Range};
use backupfs::ids::BackupId;
use backupfs::targets::BackupTarget;
use backupfs::targets::s3::client::Client;
use backupfs::targets::s3::{self, S3Error, S3Target, S3TargetConfig};
use backupfs::volume::device::{BlockDevice, FileDevice};
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;
const BUCKET: &str = "backupfs-test";

static ACCESS: RwLock<()> = RwLock::new(());

/// This binary's gateway: ports of its own (the Ceph harness of tests/rbd.rs uses
/// 3300/6789, tests/s3_nodes.rs 3396/6796/7496, the scripts' defaults 7480).
fn gateway() -> &'static Gateway {
    rgw::gateway("s3", [3397, 6797, 7497])
}

/// What a test needs: the gateway, shared; a scratch directory with credentials and a
/// key; its own prefix in the test bucket.
struct Fixture {
    _guard: Option<RwLockReadGuard<'static, ()>>,
    scratch: tempfile::TempDir,
    prefix: String,
}

fn client(bucket: &str) -> Client {
    rgw::client(gateway(), bucket)
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        Self::with_guard(test, Some(ACCESS.read()))
    }

    fn with_guard(test: &str, guard: Option<RwLockReadGuard<'static, ()>>) -> Fixture {
        gateway();
        client(BUCKET).create_bucket().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let credentials = scratch.path().join("credentials");
        std::fs::write(
            &credentials,
            "[default]\naws_access_key_id = TESTACCESSKEY\naws_secret_access_key = TESTSECRETKEY\n",
        )
        .unwrap();
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o600)).unwrap();
        s3::keygen(&scratch.path().join("key")).unwrap();
        Fixture {
            _guard: guard,
            prefix: format!("{test}-{}/", &uuid::Uuid::new_v4().to_string()[..8]),
            scratch,
        }
    }

    fn config(&self) -> S3TargetConfig {
        S3TargetConfig {
            kind: Some("s3".to_string()),
            endpoint: gateway().url.clone(),
            ca_file: None,
            bucket: BUCKET.to_string(),
            prefix: self.prefix.clone(),
            region: "us-east-1".to_string(),
            credentials: self.scratch.path().join("credentials"),
            profile: "default".to_string(),
            encryption_key: Some(self.scratch.path().join("key")),
            encryption: "aes-256-gcm".to_string(),
            compression: "zstd".to_string(),
            timeout: 30,
            keep_last: 0,
        }
    }

    fn open(&self) -> S3Target {
        s3::open("t", &self.config()).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// Every object under the test's prefix: (name, bytes).
    fn objects(&self) -> Vec<(String, Vec<u8>)> {
        let client = client(BUCKET);
        client
            .list(&self.prefix)
            .unwrap()
            .into_iter()
            .map(|o| {
                let bytes = client.get(&o.key, 1 << 30).unwrap().unwrap();
                (o.key[self.prefix.len()..].to_string(), bytes)
            })
            .collect()
    }
}

/// Deterministic bytes that do not compress (xorshift), so stored sizes mean something.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse volume of `size` bytes with `regions` (offset, bytes) written.
fn volume(path: &Path, size: u64, regions: &[(u64, Vec<u8>)]) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    file.set_len(size).unwrap();
    for (offset, bytes) in regions {
        std::os::unix::fs::FileExt::write_all_at(&file, bytes, *offset).unwrap();
    }
    file.sync_all().unwrap();
}

fn device(path: &Path) -> FileDevice {
    FileDevice::new(std::fs::File::open(path).unwrap(), path)
}

fn new_id() -> BackupId {
    BackupId::parse(&uuid::Uuid::new_v4().to_string()).unwrap()
}

/// Backs `volume` up into a new backup with the engine's copier (an incremental one from
/// `base` and its checksums when given); the index is written.
fn backup(
    target: &S3Target,
    volume: &Path,
    base: Option<(&BackupId, &CopyOutcome, u64)>,
) -> (BackupId, CopyOutcome) {
    let id = new_id();
    let src = device(volume);
    let size = src.size().unwrap();
    let new = target.create_data(&id, size, base.map(|b| b.0)).unwrap();
    let progress = Progress::default();
    let cancel = AtomicBool::new(false);
    let outcome = match base {
        Some((_, parent, parent_size)) => {
            assert!(new.shared);
            copy::copy_incremental(
                &src,
                new.attachment.device.as_ref(),
                size,
                Base {
                    sums: &parent.checksums,
                    size: parent_size,
                    changed: None,
                    kind: parent.kind,
                },
                None,
                0,
                &progress,
                &cancel,
            )
            .unwrap()
        }
        None => copy::copy(
            &src,
            new.attachment.device.as_ref(),
            Range::whole(size),
            CopyOptions {
                dest_is_zero: true,
                bps_limit: 0,
            },
            &progress,
            &cancel,
        )
        .unwrap(),
    };
    drop(new);
    target.finish_data(&id).unwrap();
    (id, outcome)
}

/// The backup's image, read through the target in `piece`-byte reads.
fn image(target: &S3Target, id: &BackupId, piece: usize) -> std::io::Result<Vec<u8>> {
    let attachment = target.open_data(id).unwrap();
    let device = attachment.device.as_ref();
    let size = device.size()? as usize;
    let mut out = vec![0u8; size];
    for start in (0..size).step_by(piece) {
        let end = (start + piece).min(size);
        let n = device.read_at(&mut out[start..end], start as u64)?;
        assert_eq!(n, end - start);
    }
    Ok(out)
}

fn assert_same(target: &S3Target, id: &BackupId, volume: &Path) {
    let expected = std::fs::read(volume).unwrap();
    let got = image(target, id, MIB as usize).unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(
        got == expected,
        "backup {id} does not read as {}",
        volume.display()
    );
}

fn chunk_objects(fixture: &Fixture) -> usize {
    client(BUCKET)
        .list(&format!("{}chunk.", fixture.prefix))
        .unwrap()
        .len()
}

#[test]
fn a_backup_reads_exactly_as_the_volume_did_holes_and_a_partial_last_chunk_included() {
    let fixture = Fixture::new("exact");
    let target = fixture.open();
    let vol = fixture.path("vol");
    // 37 MiB + 64 KiB: the last chunk is partial; data across chunk boundaries, a
    // partial-chunk region, and whole chunks of holes.
    let size = 37 * MIB + 64 * 1024;
    volume(
        &vol,
        size,
        &[
            (0, noise(1, 5 * MIB as usize)),
            (CHUNK * 3 - 4096, noise(2, 8192)),
            (20 * MIB + 12345, noise(3, 100_000)),
            (size - 64 * 1024, noise(4, 64 * 1024)),
        ],
    );
    let (id, outcome) = backup(&target, &vol, None);
    assert_same(&target, &id, &vol);
    // Odd-sized reads across chunk boundaries read the same.
    let expected = std::fs::read(&vol).unwrap();
    assert!(image(&target, &id, 3 * MIB as usize + 4097).unwrap() == expected);
    // Holes are holes: data in chunks 0-3 (the second region straddles 3-4), 5 and 9.
    let attachment = target.open_data(&id).unwrap();
    let extents = attachment.device.data_extents(0..size).unwrap();
    assert_eq!(
        extents,
        [0..4 * CHUNK, 5 * CHUNK..6 * CHUNK, 9 * CHUNK..size]
    );
    // Another open of the target (a restart) reads it the same.
    drop(attachment);
    drop(target);
    let again = fixture.open();
    assert_same(&again, &id, &vol);
    assert_eq!(outcome.checksums.len() as u64, size.div_ceil(MIB));
}

#[test]
fn an_incremental_uploads_only_the_changed_chunks_and_both_read_exactly() {
    let fixture = Fixture::new("incremental");
    let target = fixture.open();
    let vol = fixture.path("vol");
    let size = 32 * MIB;
    volume(&vol, size, &[(0, noise(10, size as usize))]);
    let (first, outcome) = backup(&target, &vol, None);
    let (_, _, uploaded_full) = target.traffic();
    assert_eq!(uploaded_full, 8);
    let before = std::fs::read(&vol).unwrap();
    // A 1 % change: 64 KiB in chunk 2 and 256 KiB across the boundary of chunks 5-6.
    volume(
        &vol,
        size,
        &[
            (2 * CHUNK + 100 * 1024, noise(11, 64 * 1024)),
            (6 * CHUNK - 128 * 1024, noise(12, 256 * 1024)),
        ],
    );
    let (second, _) = backup(&target, &vol, Some((&first, &outcome, size)));
    let (_, _, uploaded) = target.traffic();
    assert_eq!(uploaded - uploaded_full, 3, "chunks 2, 5 and 6 only");
    assert_same(&target, &second, &vol);
    let first_image = image(&target, &first, MIB as usize).unwrap();
    assert!(first_image == before, "the parent still reads as it was");
    assert_eq!(chunk_objects(&fixture), 11);
}

#[test]
fn identical_data_is_stored_once_across_volumes_and_backups() {
    let fixture = Fixture::new("dedup");
    let target = fixture.open();
    let data = noise(20, 16 * MIB as usize);
    let mut ids = Vec::new();
    for n in 0..3 {
        let vol = fixture.path(&format!("vol{n}"));
        volume(&vol, 16 * MIB, &[(0, data.clone())]);
        ids.push((backup(&target, &vol, None).0, vol));
    }
    // Two identical chunks inside one volume are one object too.
    let twice = fixture.path("twice");
    let chunk = noise(21, CHUNK as usize);
    volume(&twice, 2 * CHUNK, &[(0, chunk.clone()), (CHUNK, chunk)]);
    ids.push((backup(&target, &twice, None).0, twice));
    assert_eq!(chunk_objects(&fixture), 4 + 1);
    let (_, _, uploaded) = target.traffic();
    assert_eq!(uploaded, 5);
    for (id, vol) in &ids {
        assert_same(&target, id, vol);
    }
}

#[test]
fn compressible_data_is_stored_compressed() {
    let fixture = Fixture::new("compress");
    let target = fixture.open();
    let vol = fixture.path("vol");
    let text: Vec<u8> = (0..)
        .map(|i: u64| format!("line {i}: the quick brown fox jumps over the lazy dog\n"))
        .flat_map(String::into_bytes)
        .take(16 * MIB as usize)
        .collect();
    volume(&vol, 16 * MIB, &[(0, text)]);
    let (id, _) = backup(&target, &vol, None);
    let (chunks, stored) = target.stored().unwrap();
    assert_eq!(chunks, 4);
    assert!(
        stored < 16 * MIB / 5,
        "{stored} bytes stored for 16 MiB of text"
    );
    assert_same(&target, &id, &vol);
}

#[test]
fn no_stored_object_holds_plaintext() {
    let fixture = Fixture::new("plaintext");
    let target = fixture.open();
    let vol = fixture.path("vol");
    let secret = b"TENANT-SECRET-4f1d9c";
    // Incompressible data with the secret in it: stored unencrypted, it would show.
    let mut data = noise(30, 8 * MIB as usize);
    for at in (0..data.len() - secret.len()).step_by(100_003) {
        data[at..at + secret.len()].copy_from_slice(secret);
    }
    volume(&vol, 8 * MIB, &[(0, data.clone())]);
    let (id, _) = backup(&target, &vol, None);
    assert_same(&target, &id, &vol);
    let objects = fixture.objects();
    assert!(objects.iter().any(|(n, _)| n.starts_with("chunk.")));
    assert!(objects.iter().any(|(n, _)| n.starts_with("index.")));
    for (name, bytes) in &objects {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "{name} holds plaintext"
        );
        // Nor 64 bytes of the volume anywhere.
        assert!(
            !bytes.windows(64).any(|w| w == &data[4096..4160]),
            "{name} holds volume bytes"
        );
    }
}

#[test]
fn backups_delete_in_any_order_and_garbage_collection_frees_their_chunks() {
    let fixture = Fixture::new("delete");
    let target = fixture.open();
    let vol = fixture.path("vol");
    let size = 16 * MIB;
    volume(&vol, size, &[(0, noise(40, size as usize))]);
    let (a, oa) = backup(&target, &vol, None);
    let image_a = std::fs::read(&vol).unwrap();
    volume(&vol, size, &[(0, noise(41, CHUNK as usize))]);
    let (b, ob) = backup(&target, &vol, Some((&a, &oa, size)));
    let image_b = std::fs::read(&vol).unwrap();
    volume(&vol, size, &[(CHUNK, noise(42, CHUNK as usize))]);
    let (c, _) = backup(&target, &vol, Some((&b, &ob, size)));
    let image_c = std::fs::read(&vol).unwrap();
    assert_eq!(chunk_objects(&fixture), 6);

    // The middle one first: nothing else loses a byte; its own chunk (b's chunk 0 is
    // c's too) stays, so nothing is freed. (Removing starts a collection in the
    // background too: the state is what is checked, not which collection did it.)
    let (_, stored_before) = target.stored().unwrap();
    target.remove_data(&b).unwrap();
    let report = target.collect_garbage().unwrap();
    assert_eq!((report.deleted, report.chunks), (0, 6), "{report:?}");
    assert!(image(&target, &a, MIB as usize).unwrap() == image_a);
    assert!(image(&target, &c, MIB as usize).unwrap() == image_c);
    // Then the oldest: its two chunks that c replaced are freed, space included.
    target.remove_data(&a).unwrap();
    target.collect_garbage().unwrap();
    let (chunks, stored_after) = target.stored().unwrap();
    assert_eq!(chunks, 4);
    assert_eq!(stored_before - stored_after, 2 * (CHUNK + 8 + 1 + 12 + 16));
    assert!(image(&target, &c, MIB as usize).unwrap() == image_c);
    let _ = image_b;
    // The last: everything goes.
    target.remove_data(&c).unwrap();
    target.collect_garbage().unwrap();
    assert_eq!(chunk_objects(&fixture), 0);
    assert_eq!(target.data_ids().unwrap(), Vec::<String>::new());
}

#[test]
fn garbage_collection_keeps_what_a_backup_in_progress_names() {
    let fixture = Fixture::new("gc-progress");
    let target = fixture.open();
    let vol = fixture.path("vol");
    let data = noise(50, 8 * MIB as usize);
    volume(&vol, 8 * MIB, &[(0, data.clone())]);
    let (a, _) = backup(&target, &vol, None);
    // A new backup of the same data is being written: its chunks are a's.
    let id = new_id();
    let new = target.create_data(&id, 8 * MIB, None).unwrap();
    new.attachment.device.write_at(&data, 0).unwrap();
    target.remove_data(&a).unwrap();
    let report = target.collect_garbage().unwrap();
    assert_eq!((report.deleted, report.referenced), (0, 2), "{report:?}");
    new.attachment.device.flush().unwrap();
    drop(new);
    target.finish_data(&id).unwrap();
    let report = target.collect_garbage().unwrap();
    assert_eq!(report.deleted, 0, "{report:?}");
    assert_same(&target, &id, &vol);
}

#[test]
fn a_tampered_chunk_reads_as_eio_and_a_tampered_index_is_damaged() {
    let fixture = Fixture::new("tamper");
    let target = fixture.open();
    let vol = fixture.path("vol");
    volume(&vol, 8 * MIB, &[(0, noise(60, 8 * MIB as usize))]);
    let (id, _) = backup(&target, &vol, None);
    drop(target);
    let client = client(BUCKET);
    let chunks: Vec<String> = client
        .list(&format!("{}chunk.", fixture.prefix))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    // One chunk with a flipped byte in its ciphertext, the other swapped for it.
    let mut bytes = client.get(&chunks[0], 1 << 30).unwrap().unwrap();
    bytes[1000] ^= 0x40;
    client.put(&chunks[0], &bytes).unwrap();
    let target = fixture.open();
    let attachment = target.open_data(&id).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let errors: Vec<Option<i32>> = [0, CHUNK]
        .iter()
        .map(|&at| {
            attachment
                .device
                .read_at(&mut buf, at)
                .err()
                .and_then(|e| e.raw_os_error())
        })
        .collect();
    assert!(errors.contains(&Some(libc::EIO)), "{errors:?}");
    assert!(
        errors.contains(&None),
        "{errors:?}: the other chunk still reads"
    );
    drop(attachment);

    let index = format!("{}index.{id}", fixture.prefix);
    let mut bytes = client.get(&index, 1 << 30).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    client.put(&index, &bytes).unwrap();
    // (One node name, one open target: the earlier one goes first.)
    drop(target);
    let target = fixture.open();
    match target.open_data(&id) {
        Err(backupfs::targets::TargetError::BadRecord { message, .. }) => {
            assert!(message.contains("damaged"), "{message}")
        }
        other => panic!("a tampered index opened: {other:?}"),
    }
    // A garbage collection deletes nothing while an index cannot be read.
    assert!(target.collect_garbage().is_err());
    assert_eq!(chunk_objects(&fixture), 2);
}

#[test]
fn a_paused_gateway_fails_requests_with_etimedout_within_the_bound() {
    let guard: RwLockWriteGuard<'static, ()> = ACCESS.write();
    let fixture = Fixture::with_guard("paused", None);
    let mut config = fixture.config();
    config.timeout = 3;
    let target = s3::open("t", &config).unwrap();
    let vol = fixture.path("vol");
    volume(&vol, 8 * MIB, &[(0, noise(70, 8 * MIB as usize))]);
    let (id, _) = backup(&target, &vol, None);
    drop(target);
    let target = s3::open("t", &config).unwrap();
    let attachment = target.open_data(&id).unwrap();
    let pids = std::fs::read_to_string(gateway().dir.join("pids")).unwrap();
    let pid: i32 = pids
        .lines()
        .find_map(|l| l.strip_prefix("rgw.a "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the gateway's pid");
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            // SAFETY: signals a process this test paused.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    // SAFETY: pauses the gateway this harness started; `Resume` continues it.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let resume = Resume(pid);
    let t0 = Instant::now();
    let mut buf = vec![0u8; MIB as usize];
    let read = attachment.device.read_at(&mut buf, 0);
    let took = t0.elapsed();
    assert_eq!(
        read.err().and_then(|e| e.raw_os_error()),
        Some(libc::ETIMEDOUT)
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // A backup meanwhile fails the same way, within the bound per request: as it begins
    // (it looks for other nodes' garbage collections) or at its first write.
    let t0 = Instant::now();
    let id2 = new_id();
    let failed = match target.create_data(&id2, 8 * MIB, None) {
        Err(backupfs::targets::TargetError::Io { source, .. }) => source.raw_os_error(),
        Err(other) => panic!("{other}"),
        Ok(new) => new
            .attachment
            .device
            .write_at(&noise(71, CHUNK as usize), 0)
            .err()
            .and_then(|e| e.raw_os_error()),
    };
    assert_eq!(failed, Some(libc::ETIMEDOUT));
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    drop(resume);
    // Answering again: the same device reads.
    let mut answered = false;
    for _ in 0..30 {
        if attachment.device.read_at(&mut buf, 0).is_ok() {
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(answered);
    drop(guard);
}

#[test]
fn the_object_store_contract_holds_on_radosgw() {
    let fixture = Fixture::new("store");
    let target = fixture.open();
    let store = target.store();
    assert!(store.put_if_absent("x.1", b"one").unwrap());
    assert!(!store.put_if_absent("x.1", b"two").unwrap());
    assert_eq!(store.get("x.1", 100).unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(
        store.get("x.1", 2).unwrap_err().raw_os_error(),
        Some(libc::EFBIG)
    );
    store.delete("x.1").unwrap();
    store.delete("x.1").unwrap();
    assert_eq!(store.get("x.1", 100).unwrap(), None);
}

#[test]
fn many_partially_written_chunks_are_staged_evicted_and_stored_whole() {
    // 16 chunks, each with two data pieces and holes between (the copier writes the
    // pieces and, without dest_is_zero, discards the rest): more than the writer
    // stages at once, so chunks are pushed out and finished later.
    let fixture = Fixture::new("staging");
    let target = fixture.open();
    let vol = fixture.path("vol");
    let size = 16 * CHUNK;
    let regions: Vec<(u64, Vec<u8>)> = (0..16)
        .flat_map(|i| {
            [
                (i * CHUNK + 64 * 1024, noise(80 + i, 64 * 1024)),
                (i * CHUNK + 3 * MIB, noise(180 + i, 128 * 1024)),
            ]
        })
        .collect();
    volume(&vol, size, &regions);
    let (first, outcome) = backup(&target, &vol, None);
    assert_same(&target, &first, &vol);
    std::fs::copy(&vol, fixture.path("vol-first")).unwrap();
    // An incremental that rewrites a 64 KiB piece of every chunk.
    let changes: Vec<(u64, Vec<u8>)> = (0..16)
        .map(|i| (i * CHUNK + 2 * MIB, noise(280 + i, 64 * 1024)))
        .collect();
    volume(&vol, size, &changes);
    let (second, _) = backup(&target, &vol, Some((&first, &outcome, size)));
    assert_same(&target, &second, &vol);
    // A chunk pushed out before its last piece came was stored twice: the first copy
    // is garbage, and goes.
    target.collect_garbage().unwrap();
    assert_eq!(chunk_objects(&fixture), 32);
    assert_same(&target, &first, &fixture.path("vol-first"));
}

#[test]
fn garbage_collection_while_backups_run_frees_only_what_was_unreferenced_before_they_began() {
    let fixture = Fixture::new("gc-mark");
    let target = fixture.open();
    let vol = fixture.path("vol");
    volume(&vol, 2 * CHUNK, &[(0, noise(90, 2 * CHUNK as usize))]);
    let (a, _) = backup(&target, &vol, None);
    // A backup of other data is in progress when a is removed: a's chunks are not
    // freed (the collection cannot tell what that backup will name), only marked.
    let w1 = new_id();
    let writing = target.create_data(&w1, CHUNK, None).unwrap();
    writing
        .attachment
        .device
        .write_at(&noise(91, CHUNK as usize), 0)
        .unwrap();
    target.remove_data(&a).unwrap();
    // (The removal's own collection, in the background, must not run once w1 is done.)
    target.wait_for_collections();
    let report = target.collect_garbage().unwrap();
    assert_eq!((report.deleted, report.kept), (0, 2), "{report:?}");
    writing.attachment.device.flush().unwrap();
    drop(writing);
    target.finish_data(&w1).unwrap();
    // Every backup in progress now began after that collection, when a's chunks were
    // already unreferenced: they are freed now.
    std::thread::sleep(Duration::from_millis(20));
    let w2 = new_id();
    let writing = target.create_data(&w2, CHUNK, None).unwrap();
    let report = target.collect_garbage().unwrap();
    assert_eq!((report.deleted, report.kept), (2, 0), "{report:?}");
    drop(writing);
    target.remove_data(&w2).unwrap();
    assert_eq!(chunk_objects(&fixture), 1);
}

#[test]
fn an_s3_target_in_the_configuration_serves_backups_through_the_mount() {
    let fixture = Fixture::new("mount");
    let mut sb = common::Sandbox::new("s3-mount");
    let gold = sb.mkdir("gold");
    let state = sb.mkdir("state");
    let source = common::random_volume(&gold, "v1", 9);
    // Holes too: an image reads them back as zeros.
    common::ok(&format!("truncate -s 24M '{}'", source.display()));
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n[backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [targets.off]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nprefix = \"{}\"\n\
         credentials = \"{}\"\nencryption_key = \"{}\"\n",
        state.display(),
        gold.display(),
        gateway().url,
        fixture.prefix,
        fixture.path("credentials").display(),
        fixture.path("key").display(),
    ));
    let checked = Command::new(env!("CARGO_BIN_EXE_backupfs"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
    let d = sb.start_daemon(&config);
    let id = d.backup("off", "v1 wait");
    assert_eq!(d.record("off", &id)["status"], "available");
    common::ok(&format!(
        "cmp '{}' '{}'",
        d.image("off", &id).display(),
        source.display()
    ));
    // An incremental after a small change, then a restore of it onto a new volume.
    common::ok(&format!(
        "dd if=/dev/urandom of='{}' bs=64K count=1 seek=5 conv=notrunc status=none",
        source.display()
    ));
    let incremental = d.backup("off", "v1 incremental wait");
    assert_eq!(d.record("off", &incremental)["parent_id"], id.as_str());
    common::ok(&format!(
        "cp --sparse=always '{}' '{}'",
        d.image("off", &incremental).display(),
        d.volume("ssd", "restored").display()
    ));
    common::ok(&format!(
        "cmp '{}' '{}'",
        gold.join("volume-restored").display(),
        source.display()
    ));
    // Nothing in the bucket holds the volume's bytes in the clear.
    let marker = std::fs::read(&source).unwrap()[..4096].to_vec();
    for (name, bytes) in fixture.objects() {
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker.as_slice()),
            "{name} holds plaintext"
        );
    }
    // Deleted in any order: the parent first.
    std::fs::remove_file(d.image("off", &id)).unwrap();
    common::ok(&format!(
        "cmp '{}' '{}'",
        d.image("off", &incremental).display(),
        source.display()
    ));
    std::fs::remove_file(d.image("off", &incremental)).unwrap();
    d.stop_clean();
}
