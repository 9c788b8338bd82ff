//! One measured pass of the `s3` target, run by contrib/bench/s3.sh: a full backup of
//! VOLUME, an incremental one of VOLUME2 (VOLUME with a few changes) from it, a restore
//! of the incremental into OUT, and, as the bound a restore can reach, a parallel GET of
//! the same chunk objects without decrypting or writing them. Prints one line per step:
//! `step seconds bytes`. It makes BUCKET if it does not exist.
//!
//!   s3_bench ENDPOINT BUCKET PREFIX CREDENTIALS KEY VOLUME VOLUME2 OUT

use backupfs::copy::{self, Base, CopyOptions, Progress, Range};
use backupfs::ids::BackupId;
use backupfs::targets::BackupTarget;
use backupfs::targets::s3::{self, S3TargetConfig};
use backupfs::volume::device::{BlockDevice, FileDevice};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

fn device(path: &Path) -> FileDevice {
    FileDevice::new(std::fs::File::open(path).expect("volume"), path)
}

fn main() {
    // As the daemon does (daemon.rs): big buffers go back to the kernel when freed.
    // SAFETY: mallopt only changes an allocator parameter; no other thread runs yet.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [
        endpoint,
        bucket,
        prefix,
        credentials,
        key,
        volume,
        volume2,
        out,
    ] = &args[..]
    else {
        eprintln!("usage: s3_bench ENDPOINT BUCKET PREFIX CREDENTIALS KEY VOLUME VOLUME2 OUT");
        std::process::exit(2);
    };
    let config = S3TargetConfig {
        kind: Some("s3".to_string()),
        endpoint: endpoint.clone(),
        ca_file: None,
        bucket: bucket.clone(),
        prefix: prefix.clone(),
        region: "us-east-1".to_string(),
        credentials: PathBuf::from(credentials),
        profile: "default".to_string(),
        encryption_key: Some(PathBuf::from(key)),
        encryption: "aes-256-gcm".to_string(),
        compression: "zstd".to_string(),
        timeout: 30,
        keep_last: 0,
    };
    // The bench's own bucket (a target never makes one).
    let credentials_pair = s3::client::read_credentials(Path::new(credentials), "default")
        .unwrap_or_else(|e| panic!("{e}"));
    s3::client::Client::new(
        s3::client::Endpoint {
            url: endpoint.clone(),
            bucket: bucket.clone(),
            region: "us-east-1".to_string(),
        },
        credentials_pair,
        std::time::Duration::from_secs(30),
    )
    .and_then(|client| client.create_bucket().map_err(|e| e.to_string()))
    .unwrap_or_else(|e| panic!("{e}"));
    let target = s3::open("bench", &config).unwrap_or_else(|e| panic!("{e}"));
    let cancel = AtomicBool::new(false);

    // Full backup.
    let full = BackupId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
    let src = device(Path::new(volume));
    let size = src.size().unwrap();
    let t0 = Instant::now();
    let new = target.create_data(&full, size, None).unwrap();
    let outcome = copy::copy(
        &src,
        new.attachment.device.as_ref(),
        Range::whole(size),
        CopyOptions {
            dest_is_zero: true,
            bps_limit: 0,
        },
        &Progress::default(),
        &cancel,
    )
    .unwrap();
    drop(new);
    target.finish_data(&full).unwrap();
    let (up, _, _) = target.traffic();
    println!("full {:.3} {up}", t0.elapsed().as_secs_f64());

    // Incremental: every block compared with the parent's checksum (no snapshot diff).
    let incremental = BackupId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
    let src2 = device(Path::new(volume2));
    let t0 = Instant::now();
    let new = target.create_data(&incremental, size, Some(&full)).unwrap();
    copy::copy_incremental(
        &src2,
        new.attachment.device.as_ref(),
        size,
        Base {
            sums: &outcome.checksums,
            size,
            changed: None,
            kind: outcome.kind,
        },
        None,
        0,
        &Progress::default(),
        &cancel,
    )
    .unwrap();
    drop(new);
    target.finish_data(&incremental).unwrap();
    let (up2, _, _) = target.traffic();
    println!("incremental {:.3} {}", t0.elapsed().as_secs_f64(), up2 - up);

    // Restore of the incremental into a new sparse file.
    let _ = std::fs::remove_file(out);
    let file = std::fs::File::create(out).unwrap();
    file.set_len(size).unwrap();
    let dst = FileDevice::new(file, out);
    drop(target);
    let target = s3::open("bench", &config).unwrap();
    let t0 = Instant::now();
    let image = target.open_data(&incremental).unwrap();
    copy::copy(
        image.device.as_ref(),
        &dst,
        Range::whole(size),
        CopyOptions {
            dest_is_zero: true,
            bps_limit: 0,
        },
        &Progress::default(),
        &cancel,
    )
    .unwrap();
    let (_, down, _) = target.traffic();
    println!("restore {:.3} {down}", t0.elapsed().as_secs_f64());

    // The same objects fetched in parallel (8 at a time), nothing else done with them.
    let names: Vec<String> = target.store().list("chunk.").unwrap().into_iter().collect();
    let next = AtomicUsize::new(0);
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else { break };
                    let object = target.store().get(name, 8 << 20).unwrap().unwrap();
                    bytes.fetch_add(object.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    println!(
        "get-all {:.3} {}",
        t0.elapsed().as_secs_f64(),
        bytes.load(Ordering::Relaxed)
    );
    let (chunks, stored) = target.stored().unwrap();
    println!("stored {chunks} {stored}");
}
