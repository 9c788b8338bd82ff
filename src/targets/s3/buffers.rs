//! Chunk-sized buffers kept for the next chunk read. The daemon has big allocations
//! mapped afresh and unmapped when freed (`M_MMAP_THRESHOLD`, so that memory goes back
//! to the kernel), which makes every 4 MiB buffer 1024 page faults, zeroed pages and an
//! munmap: a restore spent more of its CPU there than in decryption (contrib/bench/README.md,
//! "The s3 target against restic"). A chunk's object is received into a buffer from here,
//! decrypted in place, decompressed into another, and the chunk cache gives its buffers
//! back when it lets a chunk go. At most `KEPT` wait here (32 MiB).

use super::chunk::CHUNK_CAP;
use parking_lot::Mutex;

/// Buffers kept at most.
const KEPT: usize = 8;
/// A kept buffer's capacity: a chunk's largest object, and one byte more (which tells a
/// bigger object from one of exactly the cap).
const CAPACITY: usize = CHUNK_CAP as usize + 1;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer for an object of at most `cap` bytes: a kept one if `cap` is a chunk's
/// (the body of a GET of a chunk), else a new, unallocated one.
pub fn for_object(cap: u64) -> Vec<u8> {
    if cap != CHUNK_CAP {
        return Vec::new();
    }
    chunk_buffer()
}

/// An empty buffer with room for a chunk's largest object.
pub fn chunk_buffer() -> Vec<u8> {
    match FREE.lock().pop() {
        Some(mut buffer) => {
            buffer.clear();
            buffer
        }
        None => Vec::with_capacity(CAPACITY),
    }
}

/// Keeps `buffer` for a later chunk, if it is one of ours and there is room.
pub fn give_back(buffer: Vec<u8>) {
    if buffer.capacity() != CAPACITY {
        return;
    }
    let mut free = FREE.lock();
    if free.len() < KEPT {
        free.push(buffer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chunk_buffers_are_kept_and_come_back_empty() {
        let mut buffer = for_object(CHUNK_CAP);
        assert_eq!(buffer.capacity(), CAPACITY);
        buffer.extend_from_slice(b"old bytes");
        give_back(buffer);
        // This one or another kept one (tests run at once): empty, whole.
        let again = chunk_buffer();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), CAPACITY);
        assert_eq!(for_object(1 << 20).capacity(), 0);
        give_back(vec![0; 16]);
        assert!(FREE.lock().iter().all(|b| b.capacity() == CAPACITY));
    }
}
