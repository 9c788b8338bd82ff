//! The `s3` target: backups kept in an S3 bucket (radosgw, AWS, any S3) as fixed 4 MiB
//! chunks, deduplicated by a keyed digest, compressed and encrypted, one authenticated
//! index per backup; every backup still reads as a whole image.

pub mod chunk;
pub mod client;
pub mod config;
pub mod sigv4;

pub use config::S3TargetConfig;

/// Writes a new random target key to `path` (`backupfs keygen FILE`): mode 0600, never
/// replacing a file or following a link there. The same key file serves `key` and
/// `encryption_key`: what each protects uses a key derived from it for that purpose alone.
pub fn keygen(path: &std::path::Path) -> Result<(), crate::targets::auth::KeyError> {
    crate::targets::auth::generate(path)
}
