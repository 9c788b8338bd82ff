//! The on-store formats of the `s3` target, version 1: chunk objects and backup indexes,
//! and the keys they are made with. Pure functions of bytes and keys: no I/O here.
//!
//! - A **chunk** is 4 MiB of an image at a 4 MiB-aligned offset (the last one shorter),
//!   named `chunk.<hex>` after the HMAC-SHA256 of its plaintext under the target's
//!   chunk-name key (the name tells nothing without the key; equal data, equal name:
//!   stored once per target). Its object is `BKFSCHK1`, a flags byte (bit 0: zstd,
//!   bit 1: encrypted), with encryption a fresh random 96-bit nonce, then the payload:
//!   AES-256-GCM of the (compressed) bytes, the associated data binding magic, flags and
//!   the chunk's name, so an object moved to another name fails to open.
//! - An **index** (`index.<backup id>`) lists a backup's chunks in image order, `None` for
//!   an all-zero chunk (a hole), with the image size: JSON, zstd, sealed the same way
//!   (magic `BKFSIDX1`, the associated data binding the backup id).
//!
//! Without a key (`encryption = "none"`) names are plain SHA-256 and objects carry no
//! nonce; a chunk is then checked by its name's digest and an index by a SHA-256
//! trailer: integrity against rot, no secrecy and no authenticity.

use hmac::{Hmac, Mac};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

/// Bytes of image per chunk.
pub const CHUNK_SIZE: u64 = 4 << 20;
pub const CHUNK_PREFIX: &str = "chunk.";
pub const INDEX_PREFIX: &str = "index.";
const CHUNK_MAGIC: &[u8; 8] = b"BKFSCHK1";
const INDEX_MAGIC: &[u8; 8] = b"BKFSIDX1";
const FLAG_ZSTD: u8 = 1;
const FLAG_SEALED: u8 = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const ZSTD_LEVEL: i32 = 3;
/// The largest index read: 1 PiB of image is 2^28 chunks... an index holds ~70 bytes per
/// chunk before compression; 256 MiB of compressed index is far beyond any volume.
pub const INDEX_CAP: u64 = 256 << 20;
/// A chunk object is at most its plaintext plus header, nonce and tag (stored raw when
/// compression does not help).
pub const CHUNK_CAP: u64 = CHUNK_SIZE + 64;

/// Why stored bytes cannot be used: each is a damaged object (EIO for a reader).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a backupfs object (bad magic or flags)")]
    Magic,
    #[error("fails its authentication (tampered with, or sealed with another key)")]
    Authentication,
    #[error("does not decompress: {0}")]
    Decompress(String),
    #[error("content does not match its name")]
    Digest,
    #[error("index is malformed: {0}")]
    Index(String),
}

/// The keys of one target, derived from its key file (or none: `encryption = "none"`).
pub struct Keys {
    sealed: Option<Sealed>,
    compress: bool,
}

struct Sealed {
    name_key: [u8; 32],
    /// AES-256-GCM (ring's: 3-4 times RustCrypto's speed here, which was most of a
    /// restore's CPU once its buffers were kept; the same objects either way).
    cipher: LessSafeKey,
}

impl Keys {
    /// From the target key: one derived key names chunks, another encrypts objects.
    pub fn new(key: Option<&crate::targets::auth::TargetKey>, compress: bool) -> Keys {
        Keys {
            sealed: key.map(|key| Sealed {
                name_key: key.derive("s3 chunk names"),
                cipher: LessSafeKey::new(
                    UnboundKey::new(&AES_256_GCM, &key.derive("s3 objects aes-256-gcm"))
                        .unwrap_or_else(|_| unreachable!("a 32-byte key is an AES-256 key")),
                ),
            }),
            compress,
        }
    }

    pub fn encrypted(&self) -> bool {
        self.sealed.is_some()
    }

    /// The name of the chunk holding `plaintext`.
    pub fn chunk_name(&self, plaintext: &[u8]) -> String {
        let digest: Vec<u8> = match &self.sealed {
            Some(sealed) => {
                let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&sealed.name_key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
                mac.update(plaintext);
                mac.finalize().into_bytes().to_vec()
            }
            None => Sha256::digest(plaintext).to_vec(),
        };
        format!("{CHUNK_PREFIX}{}", hex(&digest))
    }

    /// The object for chunk `name` holding `plaintext`, with a fresh random nonce.
    pub fn seal_chunk(&self, name: &str, plaintext: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(self.seal(CHUNK_MAGIC, name.as_bytes(), plaintext, nonce))
    }

    /// The plaintext of chunk `name`'s object, checked.
    pub fn open_chunk(&self, name: &str, object: &[u8]) -> Result<Vec<u8>, FormatError> {
        self.open_chunk_owned(name, object.to_vec())
    }

    /// `open_chunk` of an object received into a buffer of its own: decrypted in place,
    /// no copy of it made (a compressed chunk is decompressed into a kept buffer and the
    /// object's goes back to `buffers`).
    pub fn open_chunk_owned(&self, name: &str, object: Vec<u8>) -> Result<Vec<u8>, FormatError> {
        let plaintext = self.open(CHUNK_MAGIC, name.as_bytes(), object, CHUNK_SIZE)?;
        // Sealed: the tag over the name already proves it. Unsealed: the digest does.
        if self.sealed.is_none() && self.chunk_name(&plaintext) != name {
            return Err(FormatError::Digest);
        }
        Ok(plaintext)
    }

    pub fn seal_index(&self, index: &Index) -> std::io::Result<Vec<u8>> {
        let json = serde_json::to_vec(index).map_err(std::io::Error::other)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(self.seal(INDEX_MAGIC, index.backup_id.as_bytes(), &json, nonce))
    }

    /// The index of `backup_id` from its object, checked (its own backup id included).
    pub fn open_index(&self, backup_id: &str, object: &[u8]) -> Result<Index, FormatError> {
        let json = self.open(
            INDEX_MAGIC,
            backup_id.as_bytes(),
            object.to_vec(),
            INDEX_CAP * 8,
        )?;
        let index: Index =
            serde_json::from_slice(&json).map_err(|e| FormatError::Index(e.to_string()))?;
        index.check(backup_id)?;
        Ok(index)
    }

    fn seal(&self, magic: &[u8; 8], bound: &[u8], plaintext: &[u8], nonce: [u8; 12]) -> Vec<u8> {
        let compressed = (self.compress && compressible(plaintext))
            .then(|| zstd::bulk::compress(plaintext, ZSTD_LEVEL).ok())
            .flatten()
            .filter(|c| c.len() < plaintext.len());
        let mut flags = 0;
        let body: &[u8] = match &compressed {
            Some(c) => {
                flags |= FLAG_ZSTD;
                c
            }
            None => plaintext,
        };
        let mut object = Vec::with_capacity(body.len() + 64);
        object.extend_from_slice(magic);
        match &self.sealed {
            Some(sealed) => {
                flags |= FLAG_SEALED;
                object.push(flags);
                object.extend_from_slice(&nonce);
                let aad = associated(magic, flags, bound);
                let start = object.len();
                object.extend_from_slice(body);
                let tag = sealed
                    .cipher
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut object[start..],
                    )
                    .unwrap_or_else(|_| unreachable!("AES-GCM seals up to 64 GiB"));
                object.extend_from_slice(tag.as_ref());
            }
            None => {
                object.push(flags);
                object.extend_from_slice(body);
                object.extend_from_slice(&Sha256::digest(&object));
            }
        }
        object
    }

    fn open(
        &self,
        magic: &[u8; 8],
        bound: &[u8],
        mut object: Vec<u8>,
        max_plaintext: u64,
    ) -> Result<Vec<u8>, FormatError> {
        if object.len() < magic.len() + 1 || &object[..8] != magic {
            return Err(FormatError::Magic);
        }
        let flags = object[8];
        if flags & !(FLAG_ZSTD | FLAG_SEALED) != 0
            || (flags & FLAG_SEALED != 0) != self.sealed.is_some()
        {
            // An unsealed object where a key is configured is refused: whoever can write
            // the bucket must not get plaintext accepted by leaving the tag out.
            return Err(if flags & FLAG_SEALED != 0 || self.sealed.is_some() {
                FormatError::Authentication
            } else {
                FormatError::Magic
            });
        }
        // The body (compressed or not) is `object[start..]` once checked.
        let start = match &self.sealed {
            Some(sealed) => {
                let start = 9 + NONCE_LEN;
                if object.len() < start + TAG_LEN {
                    return Err(FormatError::Authentication);
                }
                let nonce: [u8; NONCE_LEN] = object[9..start]
                    .try_into()
                    .map_err(|_| FormatError::Authentication)?;
                let tag_at = object.len() - TAG_LEN;
                let aad = associated(magic, flags, bound);
                // Nothing of it is used unless the tag matches (the object is dropped).
                sealed
                    .cipher
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut object[start..],
                    )
                    .map_err(|_| FormatError::Authentication)?;
                object.truncate(tag_at);
                start
            }
            None => {
                if object.len() < 9 + 32 {
                    return Err(FormatError::Digest);
                }
                let digest_at = object.len() - 32;
                let (content, digest) = object.split_at(digest_at);
                if Sha256::digest(content).as_slice() != digest {
                    return Err(FormatError::Digest);
                }
                object.truncate(digest_at);
                9
            }
        };
        if flags & FLAG_ZSTD == 0 {
            object.drain(..start);
            return Ok(object);
        }
        let body = &object[start..];
        if max_plaintext > CHUNK_SIZE {
            return zstd::bulk::decompress(body, max_plaintext as usize)
                .map_err(|e| FormatError::Decompress(e.to_string()));
        }
        let mut plaintext = super::buffers::chunk_buffer();
        zstd::bulk::Decompressor::new()
            .and_then(|mut z| z.decompress_to_buffer(body, &mut plaintext))
            .map_err(|e| FormatError::Decompress(e.to_string()))?;
        if plaintext.len() as u64 > max_plaintext {
            return Err(FormatError::Decompress(format!(
                "more than {max_plaintext} bytes"
            )));
        }
        super::buffers::give_back(object);
        Ok(plaintext)
    }
}

/// Whether compressing `plaintext` is worth trying: when none of eight 16 KiB samples
/// spread over it shrinks by 3 % (random or already compressed data), the whole attempt
/// (15 ms per 4 MiB chunk here) is spared.
fn compressible(plaintext: &[u8]) -> bool {
    const SAMPLE: usize = 16 << 10;
    const SAMPLES: usize = 8;
    if plaintext.len() <= 2 * SAMPLE * SAMPLES {
        return true;
    }
    let step = (plaintext.len() - SAMPLE) / (SAMPLES - 1);
    (0..SAMPLES).any(|i| {
        let sample = &plaintext[i * step..i * step + SAMPLE];
        zstd::bulk::compress(sample, ZSTD_LEVEL).is_ok_and(|c| c.len() < SAMPLE / 100 * 97)
    })
}

fn associated(magic: &[u8; 8], flags: u8, bound: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(9 + bound.len());
    aad.extend_from_slice(magic);
    aad.push(flags);
    aad.extend_from_slice(bound);
    aad
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` is a chunk's name as this format makes them.
pub fn is_chunk_name(name: &str) -> bool {
    name.strip_prefix(CHUNK_PREFIX).is_some_and(|digest| {
        digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A backup's image as chunks: entry `i` holds bytes `i * CHUNK_SIZE ..` of the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: u32,
    pub backup_id: String,
    pub size: u64,
    pub chunk_size: u64,
    /// Chunk names without their `chunk.` prefix; `None`: all zeros.
    pub chunks: Vec<Option<String>>,
}

impl Index {
    pub fn new(backup_id: &str, size: u64) -> Index {
        Index {
            format: 1,
            backup_id: backup_id.to_string(),
            size,
            chunk_size: CHUNK_SIZE,
            chunks: vec![None; chunk_count(size) as usize],
        }
    }

    /// Full object names of the chunks it names (each once).
    pub fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.chunks
            .iter()
            .flatten()
            .map(|digest| format!("{CHUNK_PREFIX}{digest}"))
    }

    pub fn chunk(&self, i: u64) -> Option<String> {
        self.chunks
            .get(i as usize)
            .and_then(|c| c.as_ref())
            .map(|digest| format!("{CHUNK_PREFIX}{digest}"))
    }

    pub fn set(&mut self, i: u64, name: Option<&str>) {
        if let Some(entry) = self.chunks.get_mut(i as usize) {
            *entry = name.and_then(|n| n.strip_prefix(CHUNK_PREFIX).map(str::to_string));
        }
    }

    /// Grows the image to `size` (new chunks are holes); never shrinks it.
    pub fn grow(&mut self, size: u64) {
        if size > self.size {
            // The old last chunk, if partial, keeps its bytes; past them it reads zeros
            // (a chunk's plaintext is exactly as long as it was written).
            self.size = size;
            self.chunks.resize(chunk_count(size) as usize, None);
        }
    }

    fn check(&self, backup_id: &str) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::Index(m));
        if self.format != 1 {
            return bad(format!("unknown format {}", self.format));
        }
        if self.backup_id != backup_id {
            return bad(format!("holds the index of {}", self.backup_id));
        }
        if self.chunk_size != CHUNK_SIZE {
            return bad(format!("chunk size {}", self.chunk_size));
        }
        if self.chunks.len() as u64 != chunk_count(self.size) {
            return bad(format!(
                "{} chunks for {} bytes",
                self.chunks.len(),
                self.size
            ));
        }
        if let Some(bad_name) = self
            .chunks
            .iter()
            .flatten()
            .find(|d| !is_chunk_name(&format!("{CHUNK_PREFIX}{d}")))
        {
            return bad(format!("bad chunk name {bad_name:?}"));
        }
        Ok(())
    }
}

/// How many chunks an image of `size` bytes has. Precondition: none (0 bytes: none).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// The bytes of the image that chunk `i` holds, for an image of `size` bytes.
/// Precondition: `i < chunk_count(size)`.
pub fn chunk_range(i: u64, size: u64) -> std::ops::Range<u64> {
    let start = i * CHUNK_SIZE;
    start..(start + CHUNK_SIZE).min(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::auth::TargetKey;

    fn keys(compress: bool) -> Keys {
        Keys::new(Some(&TargetKey::from_bytes([7; 32])), compress)
    }

    #[test]
    fn known_answer_names_and_sealed_object_layout() {
        let keys = keys(true);
        // HMAC-SHA256 under a key derived from [7; 32]: pinned, so that a change of the
        // derivation or naming (which would orphan every stored chunk) fails here.
        let name = keys.chunk_name(b"hello");
        assert_eq!(name, KNOWN_NAME);
        let plain = Keys::new(None, false);
        assert_eq!(
            plain.chunk_name(b"hello"),
            "chunk.2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        // The object with a fixed nonce, pinned byte for byte.
        let object = keys.seal(CHUNK_MAGIC, name.as_bytes(), b"hello", [1; 12]);
        assert_eq!(hex(&object), KNOWN_OBJECT);
        assert_eq!(keys.open_chunk(&name, &object).unwrap(), b"hello");
    }

    // Computed independently with Python's hmac and the `cryptography` package's AESGCM:
    // name_key = HMAC(K, "backupfs derived key v1\n" || le64(14) || "s3 chunk names"),
    // the same for "s3 objects aes-256-gcm", K = [7; 32]; "hello" does not compress, so
    // it is stored raw (flags = 2, sealed).
    const KNOWN_NAME: &str =
        "chunk.68d994d95f8d9e755abce4ffba2a8483465ca2103e161114c9bdf5c34b8afb19";
    const KNOWN_OBJECT: &str =
        "424b465343484b3102010101010101010101010101d4f6fb5018e698d2881f4f72544d9ddd9483678c50";

    #[test]
    fn a_chunk_round_trips_compressed_and_holds_no_plaintext() {
        let keys = keys(true);
        let data: Vec<u8> = b"backupfs plaintext ".repeat(300_000)[..CHUNK_SIZE as usize].to_vec();
        let name = keys.chunk_name(&data);
        let object = keys.seal_chunk(&name, &data).unwrap();
        assert!(object.len() < data.len() / 10, "{} bytes", object.len());
        assert!(!object.windows(9).any(|w| w == b"plaintext"));
        assert_eq!(keys.open_chunk(&name, &object).unwrap(), data);
        // Two seals of the same data differ (fresh nonces) and both open.
        let again = keys.seal_chunk(&name, &data).unwrap();
        assert_ne!(object, again);
        assert_eq!(keys.open_chunk(&name, &again).unwrap(), data);
    }

    #[test]
    fn incompressible_data_is_stored_raw_but_still_sealed() {
        let keys = keys(true);
        let mut data = vec![0u8; 1 << 20];
        getrandom::fill(&mut data).unwrap();
        let name = keys.chunk_name(&data);
        let object = keys.seal_chunk(&name, &data).unwrap();
        assert_eq!(object[8], FLAG_SEALED);
        assert_eq!(object.len(), data.len() + 9 + NONCE_LEN + TAG_LEN);
        assert_eq!(keys.open_chunk(&name, &object).unwrap(), data);
    }

    #[test]
    fn a_chunk_that_decompresses_past_a_chunk_is_refused_even_sealed_right() {
        // Sealed with our key, so only its size is wrong: one byte past a chunk (the kept
        // buffers it decompresses into are a little larger than a chunk).
        let keys = keys(true);
        let data = vec![b'a'; CHUNK_SIZE as usize + 1];
        let name = keys.chunk_name(&data);
        let object = keys.seal_chunk(&name, &data).unwrap();
        assert_eq!(object[8], FLAG_SEALED | FLAG_ZSTD);
        let opened = keys.open_chunk(&name, &object);
        assert!(
            matches!(opened, Err(FormatError::Decompress(_))),
            "{opened:?}"
        );
    }

    #[test]
    fn random_data_is_not_tried_and_text_is() {
        let mut random = vec![0u8; 4 << 20];
        getrandom::fill(&mut random).unwrap();
        assert!(!compressible(&random));
        let text = b"some text, some more text ".repeat(200_000);
        assert!(compressible(&text));
        assert!(compressible(b"short"));
    }

    #[test]
    fn a_tampered_moved_or_foreign_key_object_fails_authentication() {
        let keys = keys(true);
        let name = keys.chunk_name(b"data");
        let object = keys.seal_chunk(&name, b"data").unwrap();
        for at in [8, 10, object.len() / 2, object.len() - 1] {
            let mut bad = object.clone();
            bad[at] ^= 1;
            assert!(keys.open_chunk(&name, &bad).is_err(), "byte {at}");
        }
        let other_name = keys.chunk_name(b"other");
        assert_eq!(
            keys.open_chunk(&other_name, &object),
            Err(FormatError::Authentication)
        );
        let other_key = Keys::new(Some(&TargetKey::from_bytes([8; 32])), true);
        assert_eq!(
            other_key.open_chunk(&name, &object),
            Err(FormatError::Authentication)
        );
        // An unsealed object is refused where a key is configured.
        let plain = Keys::new(None, true);
        let unsealed = plain.seal_chunk(&name, b"data").unwrap();
        assert_eq!(
            keys.open_chunk(&name, &unsealed),
            Err(FormatError::Authentication)
        );
        assert_eq!(keys.open_chunk(&name, b"junk"), Err(FormatError::Magic));
    }

    #[test]
    fn unsealed_chunks_are_checked_by_their_digest() {
        let plain = Keys::new(None, true);
        let name = plain.chunk_name(b"data");
        let object = plain.seal_chunk(&name, b"data").unwrap();
        assert_eq!(plain.open_chunk(&name, &object).unwrap(), b"data");
        let mut bad = object.clone();
        bad[9] ^= 1;
        assert_eq!(plain.open_chunk(&name, &bad), Err(FormatError::Digest));
        let other = plain.chunk_name(b"other");
        assert_eq!(plain.open_chunk(&other, &object), Err(FormatError::Digest));
    }

    #[test]
    fn an_index_round_trips_and_is_bound_to_its_backup() {
        let keys = keys(true);
        let mut index = Index::new("b1", 3 * CHUNK_SIZE + 5);
        assert_eq!(index.chunks.len(), 4);
        let name = keys.chunk_name(b"x");
        index.set(1, Some(&name));
        let object = keys.seal_index(&index).unwrap();
        assert_eq!(keys.open_index("b1", &object).unwrap(), index);
        assert_eq!(
            keys.open_index("b2", &object),
            Err(FormatError::Authentication)
        );
        assert_eq!(index.chunk(1).as_deref(), Some(name.as_str()));
        assert_eq!(index.chunk(0), None);
        assert_eq!(index.names().collect::<Vec<_>>(), [name]);
        assert_eq!(
            chunk_range(3, index.size),
            3 * CHUNK_SIZE..3 * CHUNK_SIZE + 5
        );
    }
}
