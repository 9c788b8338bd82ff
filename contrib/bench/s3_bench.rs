//! One measured pass of the `s3` target, run by contrib/bench/s3.sh: a full backup of
//! VOLUME, an incremental one of VOLUME2 (VOLUME with a few changes) from it, a restore
//! of the incremental into OUT, and, as the bound a restore can reach, a parallel GET of
//! the chunk objects the incremental's index names (each once) without decrypting or
//! writing them. Prints one line per step: `step seconds bytes cpu-seconds` (the CPU
//! time, user and system, of this process during the step), and `backup ID` (the
//! incremental). It makes BUCKET if it does not exist. `restore` repeats only the
//! last two steps, for backup ID already stored (to compare builds on the same objects);
//! `get` only the GET (of a backup a daemon made, restored through its mount). It opens
//! the target as node `s3-bench`: a daemon on this host may serve it at the same time.
//!
//!   s3_bench ENDPOINT BUCKET PREFIX CREDENTIALS KEY VOLUME VOLUME2 OUT
//!   s3_bench restore ENDPOINT BUCKET PREFIX CREDENTIALS KEY ID OUT
//!   s3_bench get ENDPOINT BUCKET PREFIX CREDENTIALS KEY ID

use backupfs::copy::{self, Base, CopyOptions, Progress, Range};
use backupfs::ids::BackupId;
use backupfs::targets::BackupTarget;
use backupfs::targets::auth::TargetKey;
use backupfs::targets::s3::chunk::{INDEX_CAP, Keys};
use backupfs::targets::s3::{self, S3Target, S3TargetConfig};
use backupfs::volume::device::{BlockDevice, FileDevice};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn device(path: &Path) -> FileDevice {
    FileDevice::new(std::fs::File::open(path).expect("volume"), path)
}

/// User and system CPU seconds of this process so far.
fn cpu() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A step's clock: wall and CPU time since it started.
struct Step(Instant, f64);

impl Step {
    fn start() -> Step {
        Step(Instant::now(), cpu())
    }

    fn print(&self, name: &str, bytes: u64) {
        let wall = self.0.elapsed().as_secs_f64();
        println!("{name} {wall:.3} {bytes} {:.3}", cpu() - self.1);
    }
}

fn main() {
    // As the daemon does (daemon.rs): big buffers go back to the kernel when freed.
    // SAFETY: mallopt only changes an allocator parameter; no other thread runs yet.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [
        mode,
        endpoint,
        bucket,
        prefix,
        credentials,
        key,
        id,
        rest @ ..,
    ] = &args[..]
        && (mode == "restore" || mode == "get")
    {
        let config = config(endpoint, bucket, prefix, credentials, key);
        let id = BackupId::parse(id).unwrap_or_else(|e| panic!("{e}"));
        let target = open(&config);
        match rest {
            [out] if mode == "restore" => {
                restore(&target, &id, out);
                get_all(&target, &config, &id);
            }
            [] if mode == "get" => get_all(&target, &config, &id),
            _ => usage(),
        }
        return;
    }
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
        usage()
    };
    let config = config(endpoint, bucket, prefix, credentials, key);
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
    let target = open(&config);
    let cancel = AtomicBool::new(false);

    // Full backup.
    let full = BackupId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
    let src = device(Path::new(volume));
    let size = src.size().unwrap();
    let step = Step::start();
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
    step.print("full", up);

    // Incremental: every block compared with the parent's checksum (no snapshot diff).
    let incremental = BackupId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
    let src2 = device(Path::new(volume2));
    let step = Step::start();
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
    step.print("incremental", up2 - up);
    println!("backup {incremental}");
    drop(target);

    // A fresh target: nothing cached.
    let target = open(&config);
    restore(&target, &incremental, out);
    get_all(&target, &config, &incremental);
    let (chunks, stored) = target.stored().unwrap();
    println!("stored {chunks} {stored}");
}

fn config(
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    credentials: &str,
    key: &str,
) -> S3TargetConfig {
    S3TargetConfig {
        kind: Some("s3".to_string()),
        endpoint: endpoint.to_string(),
        ca_file: None,
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region: "us-east-1".to_string(),
        credentials: PathBuf::from(credentials),
        profile: "default".to_string(),
        encryption_key: Some(PathBuf::from(key)),
        encryption: "aes-256-gcm".to_string(),
        compression: "zstd".to_string(),
        timeout: 30,
        keep_last: 0,
    }
}

fn usage() -> ! {
    eprintln!("usage: s3_bench ENDPOINT BUCKET PREFIX CREDENTIALS KEY VOLUME VOLUME2 OUT");
    eprintln!("       s3_bench restore ENDPOINT BUCKET PREFIX CREDENTIALS KEY ID OUT");
    eprintln!("       s3_bench get ENDPOINT BUCKET PREFIX CREDENTIALS KEY ID");
    std::process::exit(2);
}

fn open(config: &S3TargetConfig) -> S3Target {
    s3::open_as("bench", config, "s3-bench", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A restore of backup `id` into a new sparse file `out`, through the engine's copier.
fn restore(target: &S3Target, id: &BackupId, out: &str) {
    let cancel = AtomicBool::new(false);
    let _ = std::fs::remove_file(out);
    let file = std::fs::File::create(out).unwrap();
    let step = Step::start();
    let image = target.open_data(id).unwrap();
    let size = image.device.size().unwrap();
    file.set_len(size).unwrap();
    let dst = FileDevice::new(file, Path::new(out));
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
    step.print("restore", down);
}

/// Backup `id`'s objects fetched in parallel, 8 at a time, nothing else done with them.
fn get_all(target: &S3Target, config: &S3TargetConfig, id: &BackupId) {
    // The objects the index names, each once (a hole names none).
    let key = TargetKey::load(config.encryption_key.as_deref().unwrap()).unwrap();
    let index_object = format!("index.{id}");
    let sealed = target
        .store()
        .get(&index_object, INDEX_CAP)
        .unwrap()
        .unwrap();
    let index = Keys::new(Some(&key), true)
        .open_index(id.as_str(), &sealed)
        .unwrap();
    let mut names: Vec<String> = index.names().collect();
    names.sort();
    names.dedup();
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let step = Step::start();
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
    step.print("get-all", bytes.load(Ordering::Relaxed));
}
