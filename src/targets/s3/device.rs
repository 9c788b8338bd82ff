//! A backup of an `s3` target as a block device: `ChunkWriter` while the copy writes it,
//! `ChunkReader` once it is stored. Offset → chunk is `chunk::chunk_range`. The writer
//! keeps the new index in memory, uploads a chunk as soon as it is wholly written (a
//! full-chunk write goes straight up; pieces are staged until they cover the chunk, or
//! until the staging bound pushes the oldest out), and never writes the index itself: the
//! target does, once every chunk is up. Neither ever hands out unchecked bytes.

use super::chunk::{CHUNK_SIZE, Index, chunk_count, chunk_range};
use super::chunks::ChunkStore;
use crate::volume::device::{BlockDevice, IoHints};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Chunks staged per backup being written (4 MiB each): the memory bound of a writer.
/// More than the copier's requests in flight (`hints`), so that the chunk pushed out is
/// one the copier is done with, not one whose next piece is on its way (pushed out, it
/// is stored twice, the first copy garbage).
const STAGED_CHUNKS: usize = 8;
/// How far ahead of the furthest chunk read a sequential reader fetches (chunk
/// positions, holes included). Wider than `IN_FLIGHT`: GETs finish out of order, and a
/// window of 8 positions kept only 5 of them in flight on average behind a `cp` of an
/// image through the mount (contrib/bench/README.md, issue 29). With the copier's six
/// chunks in progress, within the chunk cache (20), as chunks read to their end leave it
/// at once, so that nothing fetched is pushed out before it is read.
const AHEAD: u64 = 12;
/// Chunk GETs a target keeps in flight for its sequential readers, their own reads
/// counted: what the parallel GET of contrib/bench/s3.sh keeps, which a restore must
/// match (a copier's workers alone have fewer in flight: they also decrypt and write).
const IN_FLIGHT: usize = 8;

fn hints() -> IoHints {
    IoHints {
        request_size: CHUNK_SIZE as usize,
        // What the copier's shared buffers give one copy anyway (24 MiB).
        queue_depth: 6,
    }
}

/// The pieces of `range` per chunk: (chunk, the piece).
fn pieces(range: Range<u64>) -> impl Iterator<Item = (u64, Range<u64>)> {
    let first = range.start / CHUNK_SIZE;
    let last = range.end.div_ceil(CHUNK_SIZE);
    (first..last).filter_map(move |i| {
        let start = range.start.max(i * CHUNK_SIZE);
        let end = range.end.min((i + 1) * CHUNK_SIZE);
        (start < end).then_some((i, start..end))
    })
}

/// Copies chunk `i`'s bytes `piece` (image offsets) from its plaintext into `out`; bytes
/// past the plaintext (an image grown since) read as zeros.
fn copy_out(plaintext: &[u8], i: u64, piece: &Range<u64>, out: &mut [u8]) {
    let from = (piece.start - i * CHUNK_SIZE) as usize;
    let len = (piece.end - piece.start) as usize;
    let have = plaintext.len().saturating_sub(from).min(len);
    if have > 0 {
        out[..have].copy_from_slice(&plaintext[from..from + have]);
    }
    out[have..len].fill(0);
}

/// What a sequential reader's window counts a chunk read by: 64 pieces of a 4 MiB chunk.
const GRANULE: u64 = CHUNK_SIZE / 64;

/// The bits of the granules that `start..end` (offsets in a chunk of `len` bytes) covers
/// wholly; the chunk's last granule counts as whole up to `len`.
fn granules(start: u64, end: u64, len: u64) -> u64 {
    let first = start.div_ceil(GRANULE);
    let last = if end >= len {
        len.div_ceil(GRANULE)
    } else {
        end / GRANULE
    };
    (first..last).fold(0, |bits, g| bits | 1 << g)
}

/// The extents of an index that hold data (chunks that are not holes), within `range`.
fn extents(index: &Index, extra: &[u64], range: Range<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, piece) in pieces(range) {
        if index.chunk(i).is_none() && !extra.contains(&i) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == piece.start => last.end = piece.end,
            _ => out.push(piece),
        }
    }
    out
}

struct Staged {
    /// The chunk's bytes (its length in the image); None until loaded.
    bytes: Option<Vec<u8>>,
    /// Bytes written or discarded since it was staged.
    covered: u64,
    /// Uploaded and dropped from the staging table: a late writer starts again.
    evicted: bool,
}

type StagedEntry = (Arc<Mutex<Staged>>, u64);

/// A backup being written: its index in memory, and the chunks being assembled.
pub struct Writing {
    pub backup_id: String,
    chunks: Arc<ChunkStore>,
    pub index: Mutex<Index>,
    /// chunk → its staged bytes and when it was last touched (a tick).
    staged: Mutex<HashMap<u64, StagedEntry>>,
    tick: AtomicU64,
    /// The first failure of an upload nobody waited for (an eviction): the backup fails.
    failed: Mutex<Option<(i32, String)>>,
    pub started: std::time::SystemTime,
}

impl Writing {
    pub fn new(chunks: Arc<ChunkStore>, index: Index) -> Writing {
        Writing {
            backup_id: index.backup_id.clone(),
            chunks,
            index: Mutex::new(index),
            staged: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(0),
            failed: Mutex::new(None),
            started: std::time::SystemTime::now(),
        }
    }

    fn size(&self) -> u64 {
        self.index.lock().size
    }

    /// Stores chunk `i`'s bytes and names them in the index.
    fn upload(&self, i: u64, bytes: &[u8]) -> io::Result<()> {
        let _uses = self.chunks.uses.read();
        let name = self.chunks.save(bytes)?;
        self.index.lock().set(i, name.as_deref());
        Ok(())
    }

    fn check_failed(&self) -> io::Result<()> {
        match &*self.failed.lock() {
            Some((code, message)) => {
                tracing::warn!(
                    backup_id = self.backup_id,
                    "an earlier upload failed: {message}"
                );
                Err(io::Error::from_raw_os_error(*code))
            }
            None => Ok(()),
        }
    }

    fn upload_staged(&self, i: u64, staged: &mut Staged) -> io::Result<()> {
        if staged.evicted {
            return Ok(());
        }
        staged.evicted = true;
        match &staged.bytes {
            Some(bytes) => self.upload(i, bytes),
            None => Ok(()),
        }
    }

    /// Applies `change` to chunk `i`'s staged bytes (loading them first), uploading the
    /// chunk once `covered` reaches its length.
    fn with_staged(&self, i: u64, covered: u64, change: &dyn Fn(&mut [u8])) -> io::Result<()> {
        loop {
            let (entry, victims) = {
                let mut staged = self.staged.lock();
                let now = self.tick.fetch_add(1, Ordering::Relaxed);
                let entry = staged
                    .entry(i)
                    .or_insert_with(|| {
                        (
                            Arc::new(Mutex::new(Staged {
                                bytes: None,
                                covered: 0,
                                evicted: false,
                            })),
                            now,
                        )
                    })
                    .0
                    .clone();
                if let Some(e) = staged.get_mut(&i) {
                    e.1 = now;
                }
                // The least recently touched beyond the bound: stored, then dropped from
                // the table (not before: a writer that comes meanwhile must find the
                // entry, wait for it, and load what was stored).
                let excess = staged.len().saturating_sub(STAGED_CHUNKS);
                let mut candidates: Vec<(u64, u64)> = staged
                    .iter()
                    .filter(|(k, _)| **k != i)
                    .map(|(k, (_, t))| (*t, *k))
                    .collect();
                candidates.sort_unstable();
                let victims: Vec<(u64, Arc<Mutex<Staged>>)> = candidates
                    .into_iter()
                    .take(excess)
                    .filter_map(|(_, k)| staged.get(&k).map(|(e, _)| (k, e.clone())))
                    .collect();
                (entry, victims)
            };
            for (victim_index, victim) in victims {
                let mut locked = victim.lock();
                if let Err(e) = self.upload_staged(victim_index, &mut locked) {
                    let code = e.raw_os_error().unwrap_or(libc::EIO);
                    self.failed.lock().get_or_insert((code, e.to_string()));
                    return Err(e);
                }
                self.unstage(victim_index, &victim);
            }
            let mut staged = entry.lock();
            if staged.evicted {
                continue;
            }
            if staged.bytes.is_none() {
                let size = self.size();
                let range = chunk_range(i, size);
                let mut bytes = vec![0u8; (range.end - range.start) as usize];
                let current = self.index.lock().chunk(i);
                if let Some(name) = current {
                    let plaintext = self.chunks.load(&name)?;
                    copy_out(&plaintext, i, &range, &mut bytes);
                }
                staged.bytes = Some(bytes);
            }
            if let Some(bytes) = staged.bytes.as_mut() {
                change(bytes);
            }
            staged.covered += covered;
            let len = staged.bytes.as_ref().map_or(0, |b| b.len() as u64);
            if staged.covered >= len {
                self.upload_staged(i, &mut staged)?;
                self.unstage(i, &entry);
            }
            return Ok(());
        }
    }

    /// Drops chunk `i`'s entry from the table if it is still `entry`. Call with the
    /// entry locked and stored: a writer waiting for it then finds it evicted and starts
    /// again from what was stored.
    fn unstage(&self, i: u64, entry: &Arc<Mutex<Staged>>) {
        let mut table = self.staged.lock();
        if table.get(&i).is_some_and(|(e, _)| Arc::ptr_eq(e, entry)) {
            table.remove(&i);
        }
    }

    fn is_staged(&self, i: u64) -> bool {
        self.staged.lock().contains_key(&i)
    }

    /// Uploads every staged chunk: after this the index in memory names all the data.
    pub fn flush_all(&self) -> io::Result<()> {
        self.check_failed()?;
        let entries: Vec<(u64, Arc<Mutex<Staged>>)> = self
            .staged
            .lock()
            .iter()
            .map(|(i, (entry, _))| (*i, entry.clone()))
            .collect();
        for (i, entry) in entries {
            let mut locked = entry.lock();
            self.upload_staged(i, &mut locked)?;
            self.unstage(i, &entry);
        }
        Ok(())
    }

    /// Every chunk name this backup names now (its index in memory).
    pub fn names(&self) -> Vec<String> {
        self.index.lock().names().collect()
    }
}

/// The device a copy writes a new backup through.
pub struct ChunkWriter {
    pub writing: Arc<Writing>,
    pub describe: String,
}

impl BlockDevice for ChunkWriter {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.writing.size())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.writing.size();
        let end = (offset + buf.len() as u64).min(size);
        if offset >= end {
            return Ok(0);
        }
        for (i, piece) in pieces(offset..end) {
            let out = &mut buf[(piece.start - offset) as usize..(piece.end - offset) as usize];
            let staged = self.writing.staged.lock().get(&i).map(|(e, _)| e.clone());
            if let Some(entry) = staged {
                let staged = entry.lock();
                if let (false, Some(bytes)) = (staged.evicted, &staged.bytes) {
                    copy_out(bytes, i, &piece, out);
                    continue;
                }
            }
            match self.writing.index.lock().chunk(i) {
                None => out.fill(0),
                Some(name) => {
                    let plaintext = self.writing.chunks.load(&name)?;
                    copy_out(&plaintext, i, &piece, out);
                }
            }
        }
        Ok((end - offset) as usize)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writing.check_failed()?;
        let end = offset + buf.len() as u64;
        self.grow(end)?;
        let size = self.writing.size();
        for (i, piece) in pieces(offset..end) {
            let data = &buf[(piece.start - offset) as usize..(piece.end - offset) as usize];
            if piece == chunk_range(i, size) && !self.writing.is_staged(i) {
                self.writing.upload(i, data)?;
                continue;
            }
            let at = (piece.start - i * CHUNK_SIZE) as usize;
            self.writing
                .with_staged(i, piece.end - piece.start, &|bytes: &mut [u8]| {
                    bytes[at..at + data.len()].copy_from_slice(data)
                })?;
        }
        Ok(())
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        self.writing.index.lock().grow(size);
        Ok(())
    }

    /// Uploads whatever is staged; the index is written by the target (`finish_data`).
    fn flush(&self) -> io::Result<()> {
        self.writing.flush_all()
    }

    fn discard(&self, range: Range<u64>) -> io::Result<()> {
        self.writing.check_failed()?;
        let size = self.writing.size();
        let range = range.start.min(size)..range.end.min(size);
        for (i, piece) in pieces(range) {
            if piece == chunk_range(i, size) && !self.writing.is_staged(i) {
                self.writing.index.lock().set(i, None);
                continue;
            }
            let at = (piece.start - i * CHUNK_SIZE) as usize;
            let len = (piece.end - piece.start) as usize;
            self.writing
                .with_staged(i, len as u64, &|bytes: &mut [u8]| {
                    bytes[at..at + len].fill(0)
                })?;
        }
        Ok(())
    }

    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let staged: Vec<u64> = self.writing.staged.lock().keys().copied().collect();
        let index = self.writing.index.lock();
        let range = range.start..range.end.min(index.size);
        Ok(extents(&index, &staged, range))
    }

    fn hints(&self) -> IoHints {
        hints()
    }
}

/// A stored backup, read chunk by chunk (checked), with a few chunks fetched ahead of a
/// sequential reader.
pub struct ChunkReader {
    pub index: Arc<Index>,
    pub chunks: Arc<ChunkStore>,
    pub describe: String,
    /// The chunk after the last one read: a read there is sequential.
    next: AtomicU64,
    prefetching: Arc<AtomicUsize>,
    /// What was read so far of chunks being read (chunk → a bit per `GRANULE`): a chunk
    /// read to its end leaves the cache at once, instead of holding room the window
    /// ahead needs. Bits, not a byte count: a piece read twice counts once.
    read: Mutex<HashMap<u64, u64>>,
}

impl ChunkReader {
    pub fn new(index: Arc<Index>, chunks: Arc<ChunkStore>, describe: String) -> ChunkReader {
        ChunkReader {
            index,
            chunks,
            describe,
            next: AtomicU64::new(u64::MAX),
            prefetching: Arc::new(AtomicUsize::new(0)),
            read: Mutex::new(HashMap::new()),
        }
    }

    /// Notes `piece` (image offsets) of chunk `i` (named `name`) read; once all of it
    /// was read, lets it go from the cache, unless the window ahead names the same chunk
    /// (a repeated block: dedup).
    fn count_read(&self, i: u64, name: &str, piece: &Range<u64>) {
        let len = chunk_range(i, self.index.size).end - i * CHUNK_SIZE;
        let bits = granules(
            piece.start - i * CHUNK_SIZE,
            piece.end - i * CHUNK_SIZE,
            len,
        );
        let all = granules(0, len, len);
        {
            let mut read = self.read.lock();
            // Pieces read long ago and never finished (a random reader): forgotten.
            if read.len() > 4 * AHEAD as usize {
                read.clear();
            }
            let done = read.entry(i).or_default();
            *done |= bits;
            if *done != all {
                return;
            }
            read.remove(&i);
        }
        let last = chunk_count(self.index.size);
        let again = (i + 1..(i + 1 + AHEAD).min(last))
            .any(|j| self.index.chunk(j).as_deref() == Some(name));
        if !again {
            self.chunks.release(name);
        }
    }

    /// Starts fetching the chunks after `i` (at most `AHEAD` of them, while the target
    /// has fewer than `IN_FLIGHT` loads under way); what they fetch waits in the chunk
    /// cache. Failures are left to the real read.
    fn prefetch(&self, i: u64) {
        let last = chunk_count(self.index.size);
        for ahead in i + 1..(i + 1 + AHEAD).min(last) {
            let Some(name) = self.index.chunk(ahead) else {
                continue;
            };
            if self.chunks.is_at_hand(&name) {
                continue;
            }
            if self.chunks.loads_in_flight() >= IN_FLIGHT {
                return;
            }
            if self.prefetching.fetch_add(1, Ordering::AcqRel) >= AHEAD as usize {
                self.prefetching.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let chunks = self.chunks.clone();
            let counter = self.prefetching.clone();
            let spawned = std::thread::Builder::new()
                .name("s3-prefetch".to_string())
                .spawn(move || {
                    let _ = chunks.load(&name);
                    counter.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                self.prefetching.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl BlockDevice for ChunkReader {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.index.size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = (offset + buf.len() as u64).min(self.index.size);
        if offset >= end {
            return Ok(0);
        }
        for (i, piece) in pieces(offset..end) {
            // Sequential: at or just after the furthest chunk read, or a little before
            // it (the copier's workers read neighbouring chunks at once, in any order);
            // then fetch ahead of the furthest. A jump starts over from there.
            let next = self.next.load(Ordering::Acquire);
            if next == u64::MAX || i > next || i + 8 < next {
                self.next.store(i + 1, Ordering::Release);
            } else {
                let furthest = self.next.fetch_max(i + 1, Ordering::AcqRel).max(i + 1);
                self.prefetch(furthest - 1);
            }
            let out = &mut buf[(piece.start - offset) as usize..(piece.end - offset) as usize];
            match self.index.chunk(i) {
                None => out.fill(0),
                Some(name) => {
                    let plaintext = self.chunks.load(&name)?;
                    copy_out(&plaintext, i, &piece, out);
                    drop(plaintext);
                    self.count_read(i, &name, &piece);
                }
            }
        }
        Ok((end - offset) as usize)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn grow(&self, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _range: Range<u64>) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let range = range.start..range.end.min(self.index.size);
        Ok(extents(&self.index, &[], range))
    }

    fn hints(&self) -> IoHints {
        hints()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_chunk_boundaries() {
        let c = CHUNK_SIZE;
        let got: Vec<_> = pieces(c - 10..2 * c + 5).collect();
        assert_eq!(got, [(0, c - 10..c), (1, c..2 * c), (2, 2 * c..2 * c + 5)]);
        assert_eq!(pieces(5..5).count(), 0);
        let mut out = [9u8; 8];
        copy_out(b"abc", 0, &(1..9), &mut out);
        assert_eq!(&out, b"bc\0\0\0\0\0\0");
    }

    #[test]
    fn granules_count_whole_pieces_once() {
        let g = GRANULE;
        assert_eq!(granules(0, g, CHUNK_SIZE), 1);
        // A piece that covers a granule in part does not count it.
        assert_eq!(granules(1, 2 * g, CHUNK_SIZE), 0b10);
        assert_eq!(granules(0, 2 * g - 1, CHUNK_SIZE), 0b1);
        assert_eq!(granules(0, CHUNK_SIZE, CHUNK_SIZE), u64::MAX);
        // A short last chunk: its end counts its last granule whole.
        assert_eq!(granules(g, g + 10, g + 10), 0b10);
        assert_eq!(granules(0, g + 10, g + 10), 0b11);
    }
}
