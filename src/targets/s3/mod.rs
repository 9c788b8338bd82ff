//! The `s3` target: backups kept in an S3 bucket (radosgw, AWS, any S3) as fixed 4 MiB
//! chunks, deduplicated by a keyed digest, compressed and encrypted, one authenticated
//! index per backup; every backup still reads as a whole image.

pub mod client;
pub mod sigv4;
