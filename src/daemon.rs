//! The daemon: starts the engine, mounts the tree, and stops cleanly on SIGTERM, SIGINT
//! or `umount` (jobs cancelled and cleaned up, mount detached, process gone), even with
//! files open on the mount. It never waits for the kernel to let go of an open file.

use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::fs::BackupFs;
use fuser::{MountOption, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("mount {path}: {source}")]
    Mount {
        path: String,
        source: std::io::Error,
    },
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

const STOP_SIGNALS: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

fn stop_signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in STOP_SIGNALS {
        set.add(signal);
    }
    set
}

impl DaemonError {
    /// A start refused because of the configuration (a target pool that is not ours): the
    /// same exit status as a configuration error.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            DaemonError::Engine(EngineError::Target(
                crate::targets::TargetError::Claim { .. }
            ))
        )
    }
}

/// Blocks the stop signals in the calling thread; threads spawned afterwards inherit the
/// mask, so only `sigtimedwait` below ever sees them.
pub fn block_stop_signals() -> Result<(), DaemonError> {
    stop_signal_set()
        .thread_block()
        .map_err(|e| DaemonError::Signals(e.into()))
}

/// Waits up to `timeout` for a stop signal.
fn wait_stop_signal(timeout: Duration) -> Option<libc::c_int> {
    let set = stop_signal_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: sigtimedwait with a valid set and timespec; siginfo may be null.
    let signal = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (signal > 0).then_some(signal)
}

fn detach(mountpoint: &Path) {
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            warn!("umount {}: {err}", mountpoint.display());
        }
    }
}

/// A mountpoint left by a daemon that died reads "Transport endpoint is not connected";
/// detach it so the new mount can take its place.
fn clear_stale_mount(mountpoint: &Path) {
    // stat alone may be answered from attributes the kernel still caches; listing the
    // directory has to ask the (dead) daemon.
    let probe = std::fs::metadata(mountpoint).and_then(|_| std::fs::read_dir(mountpoint).map(drop));
    if let Err(e) = probe
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        warn!(
            "{} is a stale mount of a dead daemon: detaching it",
            mountpoint.display()
        );
        detach(mountpoint);
    }
}

/// The kernel caps a FUSE mount's readahead at its bdi's `read_ahead_kb` (128 KiB), so
/// image reads would arrive in pieces smaller than a checksum block; 4 MiB lets them
/// arrive whole. Failing only costs speed.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "4096") {
        debug!("cannot raise readahead ({path}): {e}");
    }
}

/// glibc's mmap threshold slides up to 32 MiB as large blocks are freed, after which
/// every copy buffer and I/O reply (1 MiB and more; librados allocates one per request in
/// its messenger threads) is kept in a per-thread arena and never handed back. Fixing it
/// at 256 KiB returns them at once (what it saves: contrib/bench/README.md, "Memory").
fn limit_malloc_retention() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) } != 1 {
        debug!("mallopt(M_MMAP_THRESHOLD) refused");
    }
}

/// Mounts and serves until a stop signal or an unmount. Call `block_stop_signals` first,
/// before any thread exists.
pub fn serve(config: Config, mountpoint: &Path) -> Result<(), DaemonError> {
    clear_stale_mount(mountpoint);
    limit_malloc_retention();
    let allow_other = config.allow_other;
    let engine = Arc::new(Engine::start(config)?);
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        MountOption::FSName("backupfs".to_string()),
        MountOption::Subtype("backupfs".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
    ];
    options.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    options.n_threads = Some(4);
    options.clone_fd = true;
    let session = match BackupFs::new(engine.clone())
        .and_then(|fs| {
            let notifier = fs.notifier_slot();
            let session = fuser::Session::new(fs, mountpoint, &options)?;
            let _ = notifier.set(session.notifier());
            Ok(session)
        })
        .and_then(|s| s.spawn())
    {
        Ok(session) => session,
        Err(source) => {
            engine.shutdown();
            return Err(DaemonError::Mount {
                path: mountpoint.display().to_string(),
                source,
            });
        }
    };
    raise_readahead(mountpoint);
    engine.note_serving(mountpoint);
    info!(mountpoint = %mountpoint.display(), "backupfs mounted");
    let reason = loop {
        if let Some(signal) = wait_stop_signal(Duration::from_millis(200)) {
            break format!("signal {signal}");
        }
        if session.guard.is_finished() {
            break "unmounted".to_string();
        }
    };
    info!("stopping ({reason}): cancelling jobs");
    engine.shutdown();
    detach(mountpoint);
    // Joining would wait for the last open file on the mount; the process exits instead
    // and the kernel ends the connection.
    std::mem::forget(session);
    info!("backupfs stopped");
    Ok(())
}
