//! Tests of the image reader: its caches, its checks, and `CheckedImage`.

use super::*;
use std::sync::atomic::AtomicU64;

#[test]
fn the_checksum_cache_is_bounded_and_keeps_the_most_recent() {
    let cache = SumsCache::default();
    for i in 0..SUMS_CACHED + 10 {
        cache.get(&format!("b{i}"), || Ok(vec![i as u64])).unwrap();
    }
    assert_eq!(cache.len(), SUMS_CACHED);
    let loaded = cache
        .get(&format!("b{}", SUMS_CACHED + 9), || panic!("cached"))
        .unwrap();
    assert_eq!(*loaded, vec![(SUMS_CACHED + 9) as u64]);
    cache.forget(&format!("b{}", SUMS_CACHED + 9));
    assert_eq!(cache.len(), SUMS_CACHED - 1);
}

#[test]
fn the_block_cache_is_bounded() {
    let cache = BlockCache::default();
    for b in 0..BLOCKS_CACHED as u64 + 5 {
        cache.put("x", b, Arc::new(AlignedBuf::new(4096).unwrap()));
    }
    assert!(cache.get("x", 0).is_none());
    assert!(cache.get("x", BLOCKS_CACHED as u64 + 4).is_some());
    cache.forget("x");
    assert!(cache.get("x", BLOCKS_CACHED as u64 + 4).is_none());
}

#[test]
fn the_block_cache_holds_each_block_once_and_a_put_drops_no_other() {
    let cache = BlockCache::default();
    let block = |n: usize| Arc::new(AlignedBuf::new(4096 * n).unwrap());
    cache.put("x", 0, block(1));
    cache.put("y", 0, block(2));
    cache.put("x", 1, block(3));
    // The same block number of another backup, another block of the same backup.
    for (id, b, len) in [("x", 0, 4096), ("y", 0, 2 * 4096), ("x", 1, 3 * 4096)] {
        assert_eq!(cache.get(id, b).map(|d| d.len()), Some(len), "{id} {b}");
    }
    // Put again, a block replaces its entry: one entry each, so 16 distinct blocks
    // fit (a duplicate would push the oldest out).
    cache.put("x", 0, block(4));
    assert_eq!(cache.blocks.lock().len(), 3);
    assert_eq!(cache.get("x", 0).map(|d| d.len()), Some(4 * 4096));
}

#[test]
fn checked_blocks_are_dropped_at_the_last_close_of_their_image() {
    let block = CHECKSUM_BLOCK as usize;
    let data: Vec<u8> = (0..2 * block).map(|i| (i * 7 % 251) as u8).collect();
    let kind = SumKind::Leaves;
    let sums: Vec<u64> = data.chunks(block).map(|b| kind.block_sum(b)).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, &data).unwrap();
    let cache = Arc::new(BlockCache::default());
    let id = BackupId::new();
    let open = || {
        let file = std::fs::File::open(&path).unwrap();
        BackupImage::new(
            &id,
            data.len() as u64,
            data.len() as u64,
            Attachment::new(crate::volume::device::FileDevice::new(file, path.clone())),
            Arc::new(sums.clone()),
            kind,
            true,
            cache.clone(),
        )
    };
    let (first, second) = (open(), open());
    let mut piece = [0u8; 10];
    first.read_at(&mut piece, 5).unwrap();
    assert!(
        cache.get(id.as_str(), 0).is_some(),
        "a part read keeps its block"
    );
    drop(first);
    assert!(cache.get(id.as_str(), 0).is_some(), "still open once");
    second.read_at(&mut piece, block as u64 + 3).unwrap();
    assert_eq!(piece[..], data[block + 3..block + 13]);
    drop(second);
    assert!(cache.get(id.as_str(), 0).is_none());
    assert!(cache.get(id.as_str(), 1).is_none());
    assert!(cache.open.lock().is_empty());
}

fn image_of(data: &[u8], sums: Vec<u64>, kind: SumKind) -> (tempfile::TempDir, BackupImage) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let image = BackupImage::new(
        &BackupId::new(),
        data.len() as u64,
        data.len() as u64,
        Attachment::new(crate::volume::device::FileDevice::new(file, path)),
        Arc::new(sums),
        kind,
        true,
        Arc::new(BlockCache::default()),
    );
    (dir, image)
}

#[test]
fn the_last_data_block_comes_from_the_sums() {
    let block = CHECKSUM_BLOCK;
    let data = vec![0u8; 4 * block as usize];
    let (_dir, image) = image_of(&data, vec![5, 0, 9, 0], SumKind::Leaves);
    assert_eq!(image.last_data_block(), Some(2 * block));
    let (_dir, image) = image_of(&data, vec![0, 0, 0, 0], SumKind::Leaves);
    assert_eq!(image.last_data_block(), None, "all holes");
    let (_dir, image) = image_of(&data, Vec::new(), SumKind::Leaves);
    assert_eq!(image.last_data_block(), None, "no checksums: not known");
}

#[test]
fn every_read_is_checked_also_after_a_good_one() {
    // Backups made before leaf sums are checked the way they were made.
    for kind in [SumKind::Leaves, SumKind::Flat] {
        every_read_checked(kind);
    }
}

fn every_read_checked(kind: SumKind) {
    let block = CHECKSUM_BLOCK as usize;
    let mut data: Vec<u8> = (0..3 * block + 100).map(|i| (i * 7 % 251) as u8).collect();
    let sums: Vec<u64> = data.chunks(block).map(|b| kind.block_sum(b)).collect();
    let (dir, image) = image_of(&data, sums.clone(), kind);
    let mut buf = vec![0u8; data.len()];
    assert_eq!(image.read_at(&mut buf, 0).unwrap(), data.len());
    assert_eq!(buf, data);
    // Pieces that cover blocks in part, at odd offsets.
    let mut piece = vec![0u8; 5000];
    assert_eq!(image.read_at(&mut piece, block as u64 - 17).unwrap(), 5000);
    assert_eq!(piece, data[block - 17..block - 17 + 5000]);
    // The stored data rots: the next read of that block fails, whole or in part.
    data[2 * block + 5] ^= 1;
    std::fs::write(dir.path().join("img"), &data).unwrap();
    let (_dir, image) = image_of(&data, sums, kind);
    let mut buf = vec![0u8; data.len()];
    assert!(matches!(
        image.read_at(&mut buf, 0),
        Err(EngineError::Damaged { .. })
    ));
    let mut small = vec![0u8; 10];
    assert!(image.read_at(&mut small, 2 * block as u64 + 1).is_err());
    assert_eq!(image.read_at(&mut small, 10).unwrap(), 10);
    let cancel = AtomicBool::new(false);
    assert_eq!(
        image.damaged_blocks(&Progress::default(), &cancel).unwrap(),
        vec![2]
    );
}

/// A device in memory that counts its reads, each taking the given time.
struct CountedReads(
    crate::volume::device::memory::MemDevice,
    Arc<AtomicU64>,
    std::time::Duration,
);

impl BlockDevice for CountedReads {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.1.fetch_add(1, Ordering::Relaxed);
        let n = self.0.read_at(buf, offset)?;
        std::thread::sleep(self.2);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn grow(&self, size: u64) -> std::io::Result<()> {
        self.0.grow(size)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, range: std::ops::Range<u64>) -> std::io::Result<()> {
        self.0.discard(range)
    }
    fn data_extents(
        &self,
        range: std::ops::Range<u64>,
    ) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        self.0.data_extents(range)
    }
    fn hints(&self) -> crate::volume::device::IoHints {
        self.0.hints()
    }
}

#[test]
fn a_checked_image_is_a_read_only_device_whose_data_is_what_the_sums_say() {
    // Blocks: data, zeros, data whose stored bytes were lost to a hole, a short one.
    let block = CHECKSUM_BLOCK as usize;
    let mut data: Vec<u8> = (0..3 * block + 100).map(|i| (i * 13 % 251) as u8).collect();
    data[block..2 * block].fill(0);
    let kind = SumKind::CURRENT;
    let sums: Vec<u64> = data.chunks(block).map(|b| kind.block_sum(b)).collect();
    let id = BackupId::new();
    let open = |verify: bool| {
        let device = crate::volume::device::memory::MemDevice::new(data.len() as u64);
        device.fill(0, &data[..block]);
        device.fill(3 * block as u64, &data[3 * block..]);
        BackupImage::new(
            &id,
            data.len() as u64,
            data.len() as u64,
            Attachment::new(CountedReads(device, Arc::default(), Default::default())),
            Arc::new(sums.clone()),
            kind,
            verify,
            Arc::new(BlockCache::default()),
        )
    };
    let (size, mib) = (data.len() as u64, CHECKSUM_BLOCK);
    let image = open(true);
    let checked = CheckedImage(&image);
    assert!(
        checked.describe().contains(id.as_str()),
        "{}",
        checked.describe()
    );
    assert_eq!(checked.size().unwrap(), size);
    assert_eq!(checked.hints(), image.device().hints());
    // Data where a block's checksum is not that of zeros, whatever the store holds
    // (block 2 is a hole there: it is read, and fails its check).
    assert_eq!(
        checked.data_extents(0..size).unwrap(),
        vec![0..mib, 2 * mib..size]
    );
    assert_eq!(
        checked.data_extents(mib / 2..2 * mib + 10).unwrap(),
        vec![mib / 2..mib, 2 * mib..2 * mib + 10]
    );
    assert_eq!(checked.data_extents(mib..2 * mib).unwrap(), vec![]);
    assert_eq!(checked.data_extents(size..size + mib).unwrap(), vec![]);
    assert_eq!(
        checked.data_extents(3 * mib + 10..size + mib).unwrap(),
        vec![3 * mib + 10..size]
    );
    // Seeks follow the sums too: the zero block is a hole, the lost one data.
    assert_eq!(checked.seek_data(0).unwrap(), Some(0));
    assert_eq!(checked.seek_data(mib + 10).unwrap(), Some(2 * mib));
    assert_eq!(checked.seek_data(size - 1).unwrap(), Some(size - 1));
    assert_eq!(checked.seek_data(size).unwrap(), None);
    assert_eq!(checked.seek_hole(10).unwrap(), Some(mib));
    assert_eq!(checked.seek_hole(mib + 10).unwrap(), Some(mib + 10));
    assert_eq!(checked.seek_hole(2 * mib).unwrap(), Some(size));
    assert_eq!(checked.seek_hole(size).unwrap(), None);
    // Reads are checked: good blocks read as stored, the lost one fails.
    let mut buf = vec![0u8; 2 * block];
    assert_eq!(checked.read_at(&mut buf, 0).unwrap(), 2 * block);
    assert_eq!(buf, data[..2 * block]);
    let mut tail = vec![0u8; 200];
    assert_eq!(checked.read_at(&mut tail, 3 * mib).unwrap(), 100);
    assert_eq!(tail[..100], data[3 * block..]);
    assert!(checked.read_at(&mut buf[..10], 2 * mib).is_err());
    // Read-only.
    for e in [
        checked.write_at(b"x", 0).unwrap_err(),
        checked.grow(size + 1).unwrap_err(),
        checked.discard(0..mib).unwrap_err(),
    ] {
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    }
    // Reads not checked: the store's own extents.
    let unchecked = open(false);
    assert_eq!(
        CheckedImage(&unchecked).data_extents(0..size).unwrap(),
        unchecked.device().data_extents(0..size).unwrap()
    );
    assert_ne!(
        CheckedImage(&unchecked).data_extents(0..size).unwrap(),
        vec![0..mib, 2 * mib..size]
    );
    assert_eq!(
        CheckedImage(&unchecked).seek_data(mib + 10).unwrap(),
        Some(3 * mib)
    );
    assert_eq!(
        CheckedImage(&unchecked).seek_hole(2 * mib).unwrap(),
        Some(2 * mib)
    );
}

/// A checked image of `data` whose every device read is counted and takes `delay`.
fn counted_image(data: &[u8], delay: std::time::Duration) -> (BackupImage, Arc<AtomicU64>) {
    let block = CHECKSUM_BLOCK as usize;
    let kind = SumKind::CURRENT;
    let sums: Vec<u64> = data.chunks(block).map(|b| kind.block_sum(b)).collect();
    let device = crate::volume::device::memory::MemDevice::new(data.len() as u64);
    device.fill(0, data);
    let reads = Arc::new(AtomicU64::new(0));
    let image = BackupImage::new(
        &BackupId::new(),
        data.len() as u64,
        data.len() as u64,
        Attachment::new(CountedReads(device, reads.clone(), delay)),
        Arc::new(sums),
        kind,
        true,
        Arc::new(BlockCache::default()),
    );
    (image, reads)
}

#[test]
fn a_run_of_whole_blocks_is_read_at_once_and_checked_block_by_block() {
    let block = CHECKSUM_BLOCK as usize;
    let data: Vec<u8> = (0..5 * block + 100).map(|i| (i * 13 % 251) as u8).collect();
    let (image, reads) = counted_image(&data, Default::default());
    // Blocks 1, 2 and 3 whole (not up to the image's end): one read.
    let mut buf = vec![0u8; 3 * block];
    assert_eq!(image.read_at(&mut buf, block as u64).unwrap(), 3 * block);
    assert_eq!(buf, data[block..4 * block]);
    assert_eq!(reads.load(Ordering::Relaxed), 1, "one read for the run");
    // From block 4 to the end (the last block is short): one read again.
    let mut buf = vec![0u8; block + 100];
    assert_eq!(
        image.read_at(&mut buf, 4 * block as u64).unwrap(),
        block + 100
    );
    assert_eq!(buf, data[4 * block..]);
    assert_eq!(reads.load(Ordering::Relaxed), 2);
}

#[test]
fn two_reads_of_parts_of_one_block_at_once_read_it_once() {
    // What the kernel's readahead does once its requests are not aligned to blocks:
    // two threads each answer a request covering half of the same block.
    let block = CHECKSUM_BLOCK as usize;
    let data: Vec<u8> = (0..2 * block).map(|i| (i * 13 % 251) as u8).collect();
    let (image, reads) = counted_image(&data, std::time::Duration::from_millis(200));
    let half = block / 2;
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            let mut buf = vec![0u8; half];
            image.read_at(&mut buf, half as u64).unwrap();
            buf
        });
        // The second starts while the first is reading the block.
        while reads.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let mut buf = vec![0u8; half];
        image.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data[..half]);
        assert_eq!(first.join().unwrap(), data[half..block]);
    });
    assert_eq!(reads.load(Ordering::Relaxed), 1, "the block was read once");
}
