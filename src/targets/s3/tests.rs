//! The fast tier: the whole target above an in-memory store (tests/s3.rs runs the
//! same on radosgw).
use super::*;
use crate::copy::{self, CopyOptions, Progress, Range};
use crate::volume::device::FileDevice;
use std::sync::atomic::AtomicBool;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = chunk::CHUNK_SIZE;

fn key() -> Option<Arc<TargetKey>> {
    Some(Arc::new(TargetKey::from_bytes([3; 32])))
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn id() -> BackupId {
    BackupId::parse(&uuid::Uuid::new_v4().to_string()).unwrap()
}

/// Backs `bytes` up (a full backup through the copier, from a sparse file).
fn backup(target: &S3Target, bytes: &[u8]) -> BackupId {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let src = FileDevice::new(std::fs::File::open(file.path()).unwrap(), file.path());
    let id = id();
    let new = target.create_data(&id, bytes.len() as u64, None).unwrap();
    copy::copy(
        &src,
        new.attachment.device.as_ref(),
        Range::whole(bytes.len() as u64),
        CopyOptions {
            dest_is_zero: true,
            bps_limit: 0,
        },
        &Progress::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    drop(new);
    target.finish_data(&id).unwrap();
    id
}

fn read(target: &S3Target, id: &BackupId) -> std::io::Result<Vec<u8>> {
    let attachment = target.open_data(id).unwrap();
    let mut out = vec![0u8; attachment.device.size()? as usize];
    for start in (0..out.len()).step_by(MIB as usize) {
        let end = (start + MIB as usize).min(out.len());
        attachment
            .device
            .read_at(&mut out[start..end], start as u64)?;
    }
    Ok(out)
}

fn chunks(store: &super::super::store::MemStore) -> usize {
    store.list(CHUNK_PREFIX).unwrap().len()
}

#[test]
fn pieces_of_many_chunks_written_in_any_order_read_back_exactly() {
    let (target, store) = S3Target::in_memory(key());
    let size = 10 * CHUNK + 12345;
    let id = id();
    let new = target.create_data(&id, size, None).unwrap();
    let device = new.attachment.device.as_ref();
    let mut expected = vec![0u8; size as usize];
    // 64 KiB pieces at scattered offsets, in an order that visits every chunk many
    // times: staging overflows and chunks are stored, then staged again.
    let pieces = size / (64 << 10);
    for n in 0..pieces {
        let k = (n * 37) % pieces;
        if k.is_multiple_of(3) {
            continue;
        }
        let at = k * (64 << 10);
        let len = (64 << 10).min(size - at) as usize;
        let bytes = noise(k, len);
        expected[at as usize..at as usize + len].copy_from_slice(&bytes);
        device.write_at(&bytes, at).unwrap();
    }
    device.discard(CHUNK..2 * CHUNK).unwrap();
    expected[CHUNK as usize..2 * CHUNK as usize].fill(0);
    device.flush().unwrap();
    drop(new);
    target.finish_data(&id).unwrap();
    assert!(read(&target, &id).unwrap() == expected);
    // Only what the index names survives a collection: 11 chunks, of which chunk 1
    // (discarded) and chunk 10 (the 12345-byte tail, no piece reaches it) are holes.
    target.collect_garbage().unwrap();
    assert_eq!(chunks(&store), 9);
}

#[test]
fn a_shared_copy_reads_as_its_base_and_only_changed_chunks_are_added() {
    let (target, store) = S3Target::in_memory(key());
    let data = noise(1, 8 * CHUNK as usize);
    let base = backup(&target, &data);
    assert_eq!(chunks(&store), 8);
    let id = id();
    let new = target.create_data(&id, 9 * CHUNK, Some(&base)).unwrap();
    assert!(new.shared);
    let device = new.attachment.device.as_ref();
    device.write_at(&[7u8; 4096], 3 * CHUNK + 100).unwrap();
    device.flush().unwrap();
    drop(new);
    target.finish_data(&id).unwrap();
    let mut expected = data.clone();
    expected[3 * CHUNK as usize + 100..3 * CHUNK as usize + 4196].fill(7);
    expected.resize(9 * CHUNK as usize, 0);
    assert!(read(&target, &id).unwrap() == expected);
    assert!(read(&target, &base).unwrap() == data);
    assert_eq!(chunks(&store), 9);
    // A base larger than the new size is not shared.
    let shrunk = target
        .create_data(&super::tests::id(), CHUNK, Some(&base))
        .unwrap();
    assert!(!shrunk.shared);
}

#[test]
fn a_chunk_replaced_in_the_store_reads_as_eio() {
    let (target, store) = S3Target::in_memory(key());
    let id = backup(&target, &noise(2, 2 * CHUNK as usize));
    let names = store.list(CHUNK_PREFIX).unwrap();
    // One chunk's object under the other's name: it is authentic, but not that chunk.
    let other = store.get(&names[1], u64::MAX).unwrap().unwrap();
    store.put(&names[0], &other).unwrap();
    // A fresh target: nothing cached.
    let fresh = S3Target::on_memory(&store, "fresh", key());
    let error = read(&fresh, &id).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    drop(target);
}

#[test]
fn garbage_collection_frees_only_what_no_index_or_backup_in_progress_names() {
    let (target, store) = S3Target::in_memory(key());
    assert_eq!(chunks(&store), 0);
    let a = noise(3, 2 * CHUNK as usize);
    let first = backup(&target, &a);
    let second = backup(&target, &noise(4, 2 * CHUNK as usize));
    // A backup in progress holds one of first's chunks.
    let writing = target.create_data(&id(), CHUNK, None).unwrap();
    writing
        .attachment
        .device
        .write_at(&a[..CHUNK as usize], 0)
        .unwrap();
    target.inner.store.delete(&index_object(&first)).unwrap();
    target.inner.indexes.lock().clear();
    let report = target.collect_garbage().unwrap();
    assert_eq!((report.chunks, report.referenced), (4, 3), "{report:?}");
    assert_eq!(report.deleted, 0, "a backup is in progress: {report:?}");
    drop(writing);
    target.inner.writing.lock().clear();
    let report = target.collect_garbage().unwrap();
    assert_eq!(report.deleted, 2, "{report:?}");
    assert_eq!(chunks(&store), 2);
    assert!(read(&target, &second).is_ok());
}

/// A new backup of `volume` claimed on `target`, as the engine claims one before its
/// data is created.
fn claimed(target: &S3Target, volume: &str) -> (BackupId, Arc<crate::targets::lease::Claim>) {
    let id = id();
    let coordinator = target.inner.catalogue.coordinator().unwrap();
    let claim = coordinator.claim("be", volume, id.as_str()).unwrap();
    (id, claim)
}

#[test]
fn a_collection_on_one_node_deletes_nothing_a_backup_in_progress_on_another_relies_on() {
    let store = Arc::new(super::super::store::MemStore::default());
    let a = S3Target::on_memory(&store, "a", key());
    let b = S3Target::on_memory(&store, "b", key());
    let data = noise(10, 3 * CHUNK as usize);
    let old = backup(&a, &data);
    assert_eq!(chunks(&store), 3);
    // b backs up the same data: every chunk is found stored, nothing is uploaded.
    let (id, claim) = claimed(&b, "v");
    let new = b.create_data(&id, data.len() as u64, None).unwrap();
    new.attachment.device.write_at(&data, 0).unwrap();
    new.attachment.device.flush().unwrap();
    assert_eq!(b.traffic().2, 0, "deduplicated");
    // a deletes the only backup that names those chunks, and collects.
    a.remove_data(&old).unwrap();
    let report = a.collect_garbage().unwrap();
    assert_eq!(report.deferred.as_deref(), Some("b"), "{report:?}");
    assert_eq!((report.deleted, report.kept), (0, 3), "{report:?}");
    assert_eq!(chunks(&store), 3);
    drop(new);
    b.finish_data(&id).unwrap();
    b.inner.catalogue.coordinator().unwrap().release(&claim);
    // Named by b's index now: kept by every later collection.
    let report = a.collect_garbage().unwrap();
    assert_eq!((report.deleted, report.referenced), (0, 3), "{report:?}");
    assert!(read(&a, &id).unwrap() == data);
    assert!(read(&b, &id).unwrap() == data);
}

#[test]
fn what_a_node_knew_to_be_stored_is_checked_again_once_another_collected() {
    let store = Arc::new(super::super::store::MemStore::default());
    let a = S3Target::on_memory(&store, "a", key());
    let b = S3Target::on_memory(&store, "b", key());
    let data = noise(11, 2 * CHUNK as usize);
    // b stores the chunks (and knows them stored); a deletes that backup and collects
    // while no node backs up: the chunks go.
    let first = backup(&b, &data);
    a.remove_data(&first).unwrap();
    // remove_data started a collection in the background too: one of the two deletes them
    // (the other waits for it, or finds nothing left).
    let report = a.collect_garbage().unwrap();
    assert_eq!(chunks(&store), 0, "{report:?}");
    // b's next backup of the same data stores them again rather than naming what is gone.
    let (id, claim) = claimed(&b, "v");
    let new = b.create_data(&id, data.len() as u64, None).unwrap();
    new.attachment.device.write_at(&data, 0).unwrap();
    new.attachment.device.flush().unwrap();
    drop(new);
    b.finish_data(&id).unwrap();
    b.inner.catalogue.coordinator().unwrap().release(&claim);
    assert_eq!(chunks(&store), 2);
    assert!(read(&a, &id).unwrap() == data);
}

#[test]
fn a_backup_waits_for_a_collection_that_may_have_missed_its_claim() {
    use crate::targets::lease::{Coordinator, InProgress};
    let store = Arc::new(super::super::store::MemStore::default());
    let lease = Duration::from_millis(600);
    let a = Coordinator::join(store.clone(), "a", lease).unwrap();
    let b = Coordinator::join(store.clone(), "b", lease).unwrap();
    // a's collection looks before b claims: it found nothing in progress.
    let mut collection = a.begin_collection().unwrap();
    assert_eq!(collection.found(), &InProgress::None);
    let _claim = b.claim("be", "v", id().as_str()).unwrap();
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| b.await_collections().unwrap());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiting.is_finished(), "b decided while a may still delete");
        // a's next deletion is after a look of lease / 6 ago: it looks again, sees b's
        // claim, and deletes nothing more; its end lets b go.
        std::thread::sleep(lease / 6);
        assert!(!collection.may_delete().unwrap());
        assert_eq!(collection.found(), &InProgress::Elsewhere("b".to_string()));
        drop(collection);
        let waited = waiting.join().unwrap();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
    });
    // A collection that stops looking (paused, killed) holds a backup up for a lease
    // at most; it never deletes on a look that old.
    let mut collection = a.begin_collection().unwrap();
    let waited = b.await_collections().unwrap();
    assert!(waited >= lease && waited < lease * 3, "{waited:?}");
    assert!(!collection.may_delete().unwrap());
    drop(collection);
    // This node's own collection does not hold its own backups up (they wait for `uses`).
    let own = b.begin_collection().unwrap();
    assert!(b.await_collections().unwrap() < lease / 2);
    drop(own);
}

#[test]
fn records_made_changed_and_removed_on_one_node_show_on_another() {
    let store = Arc::new(super::super::store::MemStore::default());
    let a = S3Target::on_memory(&store, "a", key());
    let b = S3Target::on_memory(&store, "b", key());
    let id = id();
    let mut record: crate::targets::record::Record = serde_json::from_value(serde_json::json!({
        "format": 1, "id": id.as_str(), "volume_id": "v", "backend": "be", "pool": "p",
        "target": "t", "status": "creating", "size": 4096,
        "created_at": "2026-01-01T00:00:00.000Z", "completed_at": null, "name": null,
        "snapshot_used": false, "parent_id": null, "checksums": null, "error": null,
    }))
    .unwrap();
    a.write_record(&record).unwrap();
    b.inner.catalogue.refresh().unwrap();
    assert_eq!(b.record(&id).unwrap().status, record.status);
    // One being made is read again from the store (the other node may have finished).
    record.status = crate::targets::record::Status::Available;
    a.write_record(&record).unwrap();
    assert_eq!(b.record(&id).unwrap().status, record.status);
    // Another change shows at the next refresh; a read-change-write reads the store, not
    // what is kept in memory.
    record.name = Some("renamed".to_string());
    a.write_record(&record).unwrap();
    assert_eq!(b.record(&id).unwrap().name, None);
    b.catalogue().reload(&id).unwrap();
    assert_eq!(b.record(&id).unwrap().name, record.name);
    a.remove_record(&id).unwrap();
    b.inner.catalogue.refresh().unwrap();
    assert!(matches!(b.record(&id), Err(TargetError::NotFound(_))));
    assert!(b.records().unwrap().is_empty());
}

#[test]
fn a_chunk_read_to_its_end_leaves_the_cache_unless_read_again_soon() {
    let (target, _store) = S3Target::in_memory(key());
    // Chunks: a, b, a again (dedup), c.
    let a = noise(1, CHUNK as usize);
    let data = [
        a.clone(),
        noise(2, CHUNK as usize),
        a.clone(),
        noise(3, CHUNK as usize),
    ]
    .concat();
    let id = backup(&target, &data);
    let chunks = target.inner.chunks.clone();
    let name_of = |i: usize| {
        chunks
            .keys
            .chunk_name(&data[i * CHUNK as usize..(i + 1) * CHUNK as usize])
    };
    let attachment = target.open_data(&id).unwrap();
    let device = attachment.device.as_ref();
    let mut piece = vec![0u8; MIB as usize];
    let mut read_at = |offset: u64| {
        device.read_at(&mut piece, offset).unwrap();
        assert!(piece[..] == data[offset as usize..(offset + MIB) as usize]);
    };
    // Chunk 1 (b) in 1 MiB pieces, one of them twice: three quarters read, still kept.
    for offset in [CHUNK, CHUNK + MIB, CHUNK + MIB, CHUNK + 2 * MIB] {
        read_at(offset);
    }
    assert!(chunks.is_at_hand(&name_of(1)), "read in part: kept");
    read_at(CHUNK + 3 * MIB);
    assert!(!chunks.is_at_hand(&name_of(1)), "read to its end: let go");
    // Chunk 0 (a) read whole is kept: chunk 2, ahead, is the same chunk.
    for offset in (0..CHUNK).step_by(MIB as usize) {
        read_at(offset);
    }
    assert!(chunks.is_at_hand(&name_of(0)), "needed again ahead: kept");
    // Read again, a chunk that was let go is fetched again and reads the same.
    read_at(CHUNK + MIB);
}
