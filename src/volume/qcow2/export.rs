//! qemu-storage-daemon FUSE exports: the guest-visible raw contents of a qcow2 image as a
//! regular file under the runtime directory. Each daemon owns a directory there, held by
//! a lock; a directory whose lock is free is a crashed daemon's and is cleaned at start.
//! An export never outlives its attachments: dropping the last one stops qsd and unmounts.
//! qsd gets the image as a descriptor backupfs opened and checked, with its format and
//! `backing: null` pinned, and no export is used before qsd is seen to hold no other file.

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak, mpsc};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, error, info, warn};

pub const QSD: &str = "qemu-storage-daemon";

/// How long qsd may take to mount its export, and to stop.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// A daemon's directory still being set up (not yet locked and renamed into place) is
/// left alone this long by other daemons' clean-up.
const SETUP_GRACE: Duration = Duration::from_secs(60);
const LOCK_FILE: &str = "lock";
const EXPORT_PREFIX: &str = "export-";

/// Why an export could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// qsd opened a file besides the image: the header it read was not the one backupfs
    /// checked. It was stopped before anything read or wrote through it.
    #[error("{0}")]
    Foreign(String),
}

/// Where exports are mounted: systemd's RuntimeDirectory when set, else /run/backupfs.
pub fn runtime_base() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/backupfs"))
        .join("qcow2-exports")
}

/// How an image is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub writable: bool,
    /// qsd reads the image with O_DIRECT (a backup's one pass: no page cache churn).
    pub direct: bool,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    /// qsd is being started for this key; others wait for it.
    Starting,
    Live,
}

/// An export's key: the canonical image path and whether it is writable.
type Key = (PathBuf, bool);

/// The exports of this daemon.
pub struct Exports {
    dir: PathBuf,
    dir_dev: u64,
    _lock: Flock<File>,
    next: AtomicU64,
    slots: Mutex<HashMap<Key, (Slot, Weak<Export>)>>,
    changed: Condvar,
}

/// One running qsd exporting one image; stopped when dropped.
pub struct Export {
    exports: Arc<Exports>,
    key: Key,
    pub mountpoint: PathBuf,
    child: Mutex<Child>,
}

impl Exports {
    /// This daemon's export directory under `base`, after cleaning what crashed daemons
    /// left there. One per process: every qcow2 backend shares it.
    pub fn open(base: &Path) -> std::io::Result<Arc<Exports>> {
        let mut instance = INSTANCE.lock();
        if let Some(exports) = instance.upgrade() {
            return Ok(exports);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)?;
        clean_stale(base);
        let pid = std::process::id();
        // Made under a hidden name and renamed once locked, so no other daemon's clean-up
        // can take it for a crashed daemon's while it is being set up.
        let setup = base.join(format!(".{pid}.setup"));
        let _ = remove_export_dir(&setup);
        std::fs::DirBuilder::new().mode(0o700).create(&setup)?;
        let lock = flock_nb(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(setup.join(LOCK_FILE))?,
        )?;
        let dir = base.join(pid.to_string());
        if let Err(e) = std::fs::rename(&setup, &dir) {
            let _ = remove_export_dir(&setup);
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot take {}: {e}", dir.display()),
            ));
        }
        let dir_dev = std::fs::metadata(&dir)?.dev();
        let exports = Arc::new(Exports {
            dir,
            dir_dev,
            _lock: lock,
            next: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        });
        *instance = Arc::downgrade(&exports);
        info!(
            "qcow2 exports: at most {} running at once (docs/operating.md, \"limits\")",
            live_cap()
        );
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain function; it runs once, at exit.
        AT_EXIT.call_once(|| unsafe {
            libc::atexit(remove_dir_at_exit);
        });
        Ok(exports)
    }

    /// An export of `image` fit for `mode`: a running one when there is one (a writable
    /// export also serves readers, who then see what the writer wrote), else a new qsd.
    /// `file` is the image, opened by backupfs and its header checked; `image` its name.
    pub fn get(
        self: &Arc<Exports>,
        image: &Path,
        file: &File,
        mode: Mode,
    ) -> Result<Arc<Export>, ExportError> {
        let key = (image.to_path_buf(), mode.writable);
        let fits: &[bool] = if mode.writable {
            &[true]
        } else {
            &[true, false]
        };
        {
            let mut slots = self.slots.lock();
            loop {
                let mut wait = false;
                for &writable in fits {
                    match slots.get(&(image.to_path_buf(), writable)) {
                        Some((Slot::Live, weak)) => match weak.upgrade() {
                            Some(export) => return Ok(export),
                            // Stopping: a new qsd could not take the image's locks yet.
                            None => wait = true,
                        },
                        Some((Slot::Starting, _)) => wait = true,
                        None => {}
                    }
                }
                if !wait {
                    break;
                }
                self.changed.wait(&mut slots);
            }
            room_for_another(slots.len(), live_cap())?;
            slots.insert(key.clone(), (Slot::Starting, Weak::new()));
        }
        let started = self.start(image, file, mode);
        let mut slots = self.slots.lock();
        match &started {
            Ok(export) => {
                slots.insert(key, (Slot::Live, Arc::downgrade(export)));
            }
            Err(_) => {
                slots.remove(&key);
            }
        }
        self.changed.notify_all();
        started
    }

    /// Whether a qsd of ours has `image` open for writing (and so holds its locks).
    pub fn holds_writable(&self, image: &Path) -> bool {
        self.slots.lock().contains_key(&(image.to_path_buf(), true))
    }

    fn start(
        self: &Arc<Exports>,
        image: &Path,
        file: &File,
        mode: Mode,
    ) -> Result<Arc<Export>, ExportError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mountpoint = self.dir.join(format!("{EXPORT_PREFIX}{n}"));
        let pidfile = with_suffix(&mountpoint, ".pid");
        let log_path = with_suffix(&mountpoint, ".log");
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&mountpoint)?;
        let log = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)?;
        // What qsd may hold besides the image: its log and its pidfile.
        let log_id = id(&log.metadata()?);
        let mut command = Command::new(QSD);
        command
            .args(qsd_args(&handed_over(file), &mountpoint, &pidfile, mode))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        hand_over(&mut command, file);
        let child = match spawn_tied(command) {
            Ok(child) => child,
            Err(e) => {
                remove_files(&mountpoint);
                return Err(
                    std::io::Error::new(e.kind(), format!("cannot start {QSD}: {e}")).into(),
                );
            }
        };
        // From here the export's Drop stops qsd and removes the files, also on errors.
        let export = Arc::new(Export {
            exports: self.clone(),
            key: (image.to_path_buf(), mode.writable),
            mountpoint,
            child: Mutex::new(child),
        });
        let started = Instant::now();
        loop {
            match std::fs::metadata(&export.mountpoint) {
                Ok(meta) if meta.dev() != self.dir_dev => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = export.child.lock().try_wait()? {
                return Err(std::io::Error::other(format!(
                    "{QSD} for {} exited ({status}) before its export was mounted: {}",
                    image.display(),
                    read_log(&log_path).trim()
                ))
                .into());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{QSD} did not mount the export of {} within {}s: {}",
                        image.display(),
                        START_TIMEOUT.as_secs(),
                        read_log(&log_path).trim()
                    ),
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // qsd opened every file of its block graph before it mounted the export. A header
        // rewritten between backupfs' check and qsd's read could have named one (a data
        // file cannot be pinned away: QEMU refuses the option on an image without one):
        // such an export is stopped (its Drop) before anyone reads or writes through it.
        let allowed = [
            id(&file.metadata()?),
            log_id,
            id(&std::fs::metadata(&pidfile)?),
        ];
        let foreign = foreign_files(export.child.lock().id(), &allowed)?;
        if !foreign.is_empty() {
            return Err(ExportError::Foreign(format!(
                "{QSD} exporting {} opened {} besides the image: its qcow2 header changed after backupfs checked it; export stopped unused",
                image.display(),
                foreign.join(", ")
            )));
        }
        debug!(
            image = %image.display(),
            mountpoint = %export.mountpoint.display(),
            writable = mode.writable,
            "qcow2 export started"
        );
        Ok(export)
    }
}

impl Drop for Exports {
    fn drop(&mut self) {
        // Every export holds an Arc of this: none is left. The lock goes with the file.
        if let Err(e) = remove_export_dir(&self.dir) {
            warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// This process's exports, while a driver uses them.
static INSTANCE: Mutex<Weak<Exports>> = Mutex::new(Weak::new());

/// The daemon exits without dropping its engine (and so its drivers): the export
/// directory goes here when no export is left in it; otherwise the next start cleans it.
extern "C" fn remove_dir_at_exit() {
    let Some(instance) = INSTANCE.try_lock() else {
        return;
    };
    if let Some(exports) = instance.upgrade()
        && exports
            .slots
            .try_lock()
            .is_some_and(|slots| slots.is_empty())
    {
        let _ = remove_export_dir(&exports.dir);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let mut child = self.child.lock();
        let pid = Pid::from_raw(child.id() as libc::pid_t);
        // SIGTERM: qsd flushes the image (its qcow2 metadata caches) and unmounts. Our own
        // child, not yet reaped: the pid is still its.
        let _ = kill(pid, Signal::SIGTERM);
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() < STOP_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => {
                    error!(
                        "{QSD} exporting {} did not stop within {}s: killing it; the image may need `qemu-img check -r leaks`",
                        self.key.0.display(),
                        STOP_TIMEOUT.as_secs()
                    );
                    let _ = child.kill();
                    break child.wait().ok();
                }
                Err(e) => {
                    error!("cannot wait for {QSD} (pid {pid}): {e}");
                    break None;
                }
            }
        };
        drop(child);
        let log = read_log(&with_suffix(&self.mountpoint, ".log"));
        match status {
            Some(status) if status.success() => {}
            _ => warn!(
                "{QSD} exporting {} ended with {status:?}: {}",
                self.key.0.display(),
                log.trim()
            ),
        }
        // qsd unmounts when it stops; a mount left by one that was killed goes here.
        detach_mount(&self.mountpoint);
        remove_files(&self.mountpoint);
        let mut slots = self.exports.slots.lock();
        if let Some((_, weak)) = slots.get(&self.key)
            && std::ptr::eq(weak.as_ptr(), self)
        {
            slots.remove(&self.key);
        }
        self.exports.changed.notify_all();
    }
}

/// Descriptors kept back for everything but exports (the same reserve as the FUSE
/// layer's open-file caps, docs/operating.md, "limits").
const RESERVED_DESCRIPTORS: u64 = 256;
/// Exports running at once, at most: each is a qemu-storage-daemon process.
const MAX_LIVE_EXPORTS: usize = 64;

/// How many exports may run at once: one per 16 spare descriptors of RLIMIT_NOFILE (an
/// export holds a few of ours, and a process), between 1 and `MAX_LIVE_EXPORTS`.
fn live_cap_for(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_DESCRIPTORS) / 16)
        .unwrap_or(MAX_LIVE_EXPORTS)
        .clamp(1, MAX_LIVE_EXPORTS)
}

/// How many exports may run at once in this process (from its RLIMIT_NOFILE).
pub fn live_cap() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    live_cap_for(getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft))
}

/// EMFILE once `live` exports (running, starting or stopping) reach `cap`: a user
/// opening many qcow2 volumes must not start hundreds of processes.
fn room_for_another(live: usize, cap: usize) -> std::io::Result<()> {
    if live >= cap {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    Ok(())
}

/// The command line of one export, in qsd's JSON syntax (no comma escaping of paths). The
/// image is `image`, the name of the descriptor `hand_over` gives qsd; its format is pinned
/// (no probing) and `backing: null` keeps QEMU from opening a backing file whatever the
/// header says.
fn qsd_args(image: &str, mountpoint: &Path, pidfile: &Path, mode: Mode) -> Vec<String> {
    let file = serde_json::json!({
        "driver": "file",
        "node-name": "file",
        "filename": image,
        "read-only": !mode.writable,
        // Readers take no image locks: our own reads must not look like a hypervisor to
        // in-use checks, and never stop one from starting. A writer takes them, so no
        // hypervisor can open a volume while we restore into it.
        "locking": if mode.writable { "on" } else { "off" },
        "cache": { "direct": mode.direct },
        "discard": "unmap",
    });
    let mut qcow2 = serde_json::json!({
        "driver": "qcow2",
        "node-name": "volume",
        "file": "file",
        "backing": null,
        "read-only": !mode.writable,
    });
    if mode.writable {
        // Holes stay holes: discards free clusters, written zeros become zero clusters.
        qcow2["discard"] = "unmap".into();
        qcow2["detect-zeroes"] = "unmap".into();
    }
    let export = serde_json::json!({
        "type": "fuse",
        "id": "export",
        "node-name": "volume",
        "mountpoint": mountpoint.to_string_lossy(),
        "writable": mode.writable,
        // Only this daemon (root) reads it.
        "allow-other": "off",
    });
    vec![
        "--blockdev".into(),
        file.to_string(),
        "--blockdev".into(),
        qcow2.to_string(),
        "--export".into(),
        export.to_string(),
        "--pidfile".into(),
        pidfile.to_string_lossy().into_owned(),
    ]
}

/// The name a child that `hand_over` gave `file` opens it by: that inode, the one backupfs
/// checked, whatever the pool directory's name points to by then.
pub fn handed_over(file: &File) -> String {
    format!("/proc/self/fd/{}", file.as_raw_fd())
}

/// Lets the child inherit `file` (at the same number) and no other descriptor beyond its
/// standard ones, also none the daemon inherited itself: whatever else the child holds, it
/// opened itself. (A descriptor below 3 would be the child's stdio: its QEMU tool then
/// fails to open the image, which is safe.)
pub fn hand_over(command: &mut Command, file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls; `fd` stays open in the parent until the spawn returns (the caller
    // holds `file` across it). Descriptors are marked close-on-exec, not closed, so the
    // pipe std reports exec failures on still works.
    unsafe {
        command.pre_exec(move || {
            for (first, last) in [(3, fd.saturating_sub(1)), (fd + 1, libc::c_int::MAX)] {
                if first <= last
                    && libc::syscall(
                        libc::SYS_close_range,
                        first as libc::c_uint,
                        last as libc::c_uint,
                        libc::CLOSE_RANGE_CLOEXEC,
                    ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A file's identity.
fn id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// What process `pid` holds open beyond the regular files `allowed` (by identity),
/// /dev/null, /dev/fuse, anonymous pipes and anonymous inodes (eventfd, signalfd...):
/// each as /proc names it.
fn foreign_files(pid: u32, allowed: &[(u64, u64)]) -> std::io::Result<Vec<String>> {
    let devices = [libc::makedev(1, 3), libc::makedev(10, 229)];
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let path = entry?.path();
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let name = match std::fs::read_link(&path) {
            Ok(name) => name.to_string_lossy().into_owned(),
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        // Paths start with '/': these are no file's name.
        if name.starts_with("anon_inode:") || name.starts_with("pipe:") {
            continue;
        }
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let kind = meta.file_type();
        let fine = if kind.is_file() || kind.is_block_device() {
            allowed.contains(&id(&meta))
        } else if kind.is_char_device() {
            devices.contains(&meta.rdev())
        } else {
            false
        };
        if !fine {
            foreign.push(name);
        }
    }
    Ok(foreign)
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts a qsd that dies with this daemon: its parent-death signal is SIGTERM (qsd then
/// flushes and unmounts). The kernel sends it when the parent *thread* ends, so every qsd
/// is started by one thread that lives as long as the process.
fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = match SPAWNER.get() {
        Some(spawner) => spawner,
        None => {
            let (sender, requests) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("qsd-spawner".into())
                .spawn(move || {
                    for (mut command, reply) in requests {
                        let _ = reply.send(command.spawn());
                    }
                })?;
            // Of two racing first calls, one thread ends when its sender is dropped.
            SPAWNER.get_or_init(|| sender)
        }
    };
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls.
    unsafe {
        command.pre_exec(move || {
            // The daemon blocks SIGTERM and friends in its threads (it waits for them);
            // a blocked mask survives exec and qsd would never see its stop signal.
            let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(none.as_mut_ptr());
            if libc::pthread_sigmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon died before prctl: nobody would ever stop this qsd.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the qsd spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the qsd spawner thread is gone"))?
}

/// Cleans the directories of daemons that are gone (their lock is free): stops their
/// qsd processes, detaches their export mounts, removes the files.
fn clean_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if name.starts_with('.') {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > SETUP_GRACE);
            if !old {
                continue;
            }
        }
        let held = File::open(path.join(LOCK_FILE))
            .ok()
            .is_some_and(|lock| flock_nb(lock).is_err());
        if held {
            continue;
        }
        let mut cleaned = 0;
        if let Ok(files) = std::fs::read_dir(&path) {
            for file in files.flatten() {
                let file_name = file.file_name().to_string_lossy().into_owned();
                if file_name.starts_with(EXPORT_PREFIX) && !file_name.contains('.') {
                    let mountpoint = file.path();
                    stop_stale_qsd(&with_suffix(&mountpoint, ".pid"));
                    detach_mount(&mountpoint);
                    cleaned += 1;
                }
            }
        }
        match remove_export_dir(&path) {
            Ok(()) => info!(
                "removed {} left by a backupfs that is gone ({cleaned} qcow2 exports)",
                path.display()
            ),
            Err(e) => warn!(
                "cleaned the qcow2 exports left in {} by a backupfs that is gone ({cleaned}), but kept the directory: {e}",
                path.display()
            ),
        }
    }
}

/// A crashed daemon's qsd (normally gone already: it gets SIGTERM when the daemon dies).
/// qsd holds a lock on its pidfile while it runs, which names it reliably.
fn stop_stale_qsd(pidfile: &Path) {
    let Ok(file) = File::open(pidfile) else {
        return;
    };
    let Some(pid) = posix_lock_holder(&file) else {
        return;
    };
    warn!("stopping {QSD} pid {pid} left by a backupfs that is gone");
    // The pid holds the pidfile's lock, so it is that qsd.
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let started = Instant::now();
    while posix_lock_holder(&file) == Some(pid) {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid holding a POSIX lock on `file` (qemu's pidfile lock is one).
fn posix_lock_holder(file: &File) -> Option<libc::pid_t> {
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let got = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETLK(&mut lock));
    (got.is_ok() && lock.l_type != libc::F_UNLCK as i16 && lock.l_pid > 0).then_some(lock.l_pid)
}

/// `file` locked (flock, exclusive), or the error at once if another holds it.
fn flock_nb(file: File) -> std::io::Result<Flock<File>> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e.into())
}

/// Lazily unmounts whatever is mounted on `path`; nothing mounted is fine.
fn detach_mount(path: &Path) {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => debug!("detached the export mount {}", path.display()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => warn!("cannot detach the export mount {}: {e}", path.display()),
    }
}

/// Whether `name` is a file an export directory's owner makes: its lock, and each
/// export's mountpoint, pidfile and log.
fn is_export_file(name: &str) -> bool {
    if name == LOCK_FILE {
        return true;
    }
    let Some(rest) = name.strip_prefix(EXPORT_PREFIX) else {
        return false;
    };
    let number = rest
        .strip_suffix(".pid")
        .or_else(|| rest.strip_suffix(".log"))
        .unwrap_or(rest);
    !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())
}

/// Removes an export directory: the files backupfs made in it, then the directory. A file
/// someone else put there stays, and so does the directory (the error names the files).
fn remove_export_dir(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut foreign = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_export_file(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path())?;
        } else {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        return Err(std::io::Error::other(format!(
            "it holds files backupfs did not make: {}",
            foreign.join(", ")
        )));
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_files(mountpoint: &Path) {
    for path in [
        mountpoint.to_path_buf(),
        with_suffix(mountpoint, ".pid"),
        with_suffix(mountpoint, ".log"),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The first 4 KiB of a qsd log, for error messages.
fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let _ = file.take(4096).read_to_string(&mut text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_exports_are_capped_by_the_descriptor_limit() {
        assert_eq!(live_cap_for(1024), 48);
        assert_eq!(live_cap_for(320), 4);
        assert_eq!(live_cap_for(0), 1);
        assert_eq!(live_cap_for(u64::MAX), MAX_LIVE_EXPORTS);
        assert!(room_for_another(3, 4).is_ok());
        let refused = room_for_another(4, 4).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EMFILE));
    }

    #[test]
    fn only_export_files_are_ours() {
        for ours in ["lock", "export-0", "export-12.pid", "export-7.log"] {
            assert!(is_export_file(ours), "{ours}");
        }
        for theirs in [
            "export-",
            "export-a",
            "export-1.txt",
            "notes",
            "export-1.pid.bak",
        ] {
            assert!(!is_export_file(theirs), "{theirs}");
        }
    }

    #[test]
    fn args_are_json_pin_the_format_and_readers_take_no_locks() {
        let args = qsd_args(
            "/proc/self/fd/7",
            Path::new("/run/x,with,commas/export-0"),
            Path::new("/run/x/export-0.pid"),
            Mode {
                writable: false,
                direct: true,
            },
        );
        let file: serde_json::Value = serde_json::from_str(&args[1]).unwrap();
        assert_eq!(file["filename"], "/proc/self/fd/7");
        assert_eq!(file["locking"], "off");
        assert_eq!(file["read-only"], true);
        assert_eq!(file["cache"]["direct"], true);
        let qcow2: serde_json::Value = serde_json::from_str(&args[3]).unwrap();
        assert_eq!(qcow2["driver"], "qcow2");
        assert_eq!(qcow2["file"], "file");
        assert!(qcow2["backing"].is_null() && qcow2.get("backing").is_some());
        let export: serde_json::Value = serde_json::from_str(&args[5]).unwrap();
        assert_eq!(export["writable"], false);
        assert_eq!(export["mountpoint"], "/run/x,with,commas/export-0");
        assert_eq!(args[7], "/run/x/export-0.pid");

        let args = qsd_args(
            "/proc/self/fd/7",
            Path::new("/run/x/export-1"),
            Path::new("/run/x/export-1.pid"),
            Mode {
                writable: true,
                direct: false,
            },
        );
        let file: serde_json::Value = serde_json::from_str(&args[1]).unwrap();
        assert_eq!(file["locking"], "on");
        let qcow2: serde_json::Value = serde_json::from_str(&args[3]).unwrap();
        assert_eq!(qcow2["detect-zeroes"], "unmap");
        assert!(qcow2["backing"].is_null() && qcow2.get("backing").is_some());
    }

    #[test]
    fn files_a_child_holds_beyond_the_allowed_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (image, other) = (dir.path().join("image"), dir.path().join("other"));
        std::fs::write(&image, b"image").unwrap();
        std::fs::write(&other, b"other").unwrap();
        let image_file = File::open(&image).unwrap();
        // The child holds the image (handed over), and opens `other` on descriptor 5.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("exec 5<'{}'; sleep 30", other.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        hand_over(&mut command, &image_file);
        let mut child = command.spawn().unwrap();
        let allowed = [id(&image_file.metadata().unwrap())];
        let deadline = Instant::now() + Duration::from_secs(10);
        let foreign = loop {
            let foreign = foreign_files(child.id(), &allowed).unwrap();
            if !foreign.is_empty() || Instant::now() > deadline {
                break foreign;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(foreign, [other.display().to_string()]);
    }

    /// What a header rewritten between backupfs' check and qsd's open would do: qsd is
    /// handed an image whose header names a data file. It is stopped before the export is
    /// used, the data file untouched. (Needs root, FUSE and qemu-utils, as the tests in
    /// tests/ do.)
    #[test]
    fn an_export_whose_qsd_opened_a_file_besides_the_image_is_refused_unused() {
        let dir = tempfile::tempdir().unwrap();
        let (image, victim) = (dir.path().join("image"), dir.path().join("victim"));
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={},data_file_raw=on", victim.display()))
            .arg(&image)
            .arg("1M")
            .status()
            .unwrap();
        assert!(made.success());
        // Written after qemu-img create, which makes the data file empty.
        let contents: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&victim, &contents).unwrap();
        let exports = Exports::open(&dir.path().join("exports")).unwrap();
        let file = File::open(&image).unwrap();
        let mode = Mode {
            writable: true,
            direct: false,
        };
        match exports.get(&image, &file, mode) {
            Err(ExportError::Foreign(message)) => {
                assert!(message.contains(&victim.display().to_string()), "{message}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("exported an image whose qsd opened its data file"),
        }
        assert!(
            std::fs::read(&victim).unwrap() == contents,
            "the data file changed"
        );
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            !mounts.contains(&dir.path().display().to_string()),
            "{mounts}"
        );
        assert!(exports.slots.lock().is_empty());
    }
}
