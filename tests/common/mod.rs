//! Shared set-up for the tests: real loop-mounted filesystems, a real daemon on a real
//! mount, real shell tools.
//!
//! Every resource a test makes is owned by its `Sandbox` and undone on Drop, also when
//! the test fails: processes killed, mounts detached, loop devices freed, the directory
//! removed. Cleanup never panics, so one failing step cannot skip the others. Every
//! external command runs under `timeout`, and a watchdog kills what a test started once
//! it overruns its deadline, so a wedged FUSE request fails the test instead of hanging
//! the suite. Sandboxes live under one directory per checkout; the first sandbox of a
//! test process sweeps what earlier, dead runs of this checkout's suite left there.
#![allow(dead_code)]

pub mod ceph;
mod loops;
pub mod rgw;

pub use loops::{detach_loop_device, loops_under};

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_backupfs");

/// How long one shell command may run before `timeout` kills it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a test may run before the watchdog kills everything it started.
pub const TEST_DEADLINE: Duration = Duration::from_secs(400);
/// How long `wait_for` waits for a state to be reached.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(90);
/// The system's python (a per-user shim may not be readable by the test's other users).
pub const PYTHON: &str = "/usr/bin/python3";

#[derive(Debug, Clone, Copy)]
pub enum Fs {
    Btrfs,
    Xfs,
    Ext4,
}

/// How another process holds a volume, the ways docs/operating.md names for "in-use".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// An fcntl (POSIX) record lock, `lockf`.
    Posix,
    /// An open file description lock (`F_OFD_SETLK`), as QEMU takes them.
    Ofd,
    /// A BSD `flock`.
    Flock,
}

// ----------------------------------------------------------------------------------------
// Commands, each with a timeout.

/// `program` run under `timeout`: TERM after `limit`, KILL 10 s later. `timeout` makes a
/// process group of its own and signals all of it, so a script's children go too.
pub fn timed(limit: Duration, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("timeout");
    command
        .arg("-k")
        .arg("10")
        .arg(format!("{}", limit.as_secs().max(1)))
        .arg(program);
    command
}

/// Runs `bash -c script` (with COMMAND_TIMEOUT); the output whatever the status.
pub fn sh(script: &str) -> Output {
    sh_limit(COMMAND_TIMEOUT, script)
}

pub fn sh_limit(limit: Duration, script: &str) -> Output {
    timed(limit, "bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("timeout and bash run")
}

/// Runs a command with a deadline: killed (and reported as failed) when it takes longer.
pub fn run_timeout(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command starts");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a script that must succeed; its stdout.
#[track_caller]
pub fn ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "script failed ({}): {script}\nstdout: {}\nstderr: {}",
        describe(out.status),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An exit status in words; 124 and 137 are `timeout` giving up on the command.
pub fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(124) | Some(137) => format!("timed out ({status})"),
        _ => status.to_string(),
    }
}

// ----------------------------------------------------------------------------------------
// Errnos.

/// The errno of a failed call, None if it succeeded.
pub fn errno_of<T>(result: std::io::Result<T>) -> Option<i32> {
    result.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// Asserts that a call failed with exactly `expected`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(result: std::io::Result<T>, expected: i32, what: &str) {
    match result {
        Ok(value) => panic!(
            "{what}: succeeded ({value:?}), expected {}",
            errno_name(expected)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(expected),
            "{what}: failed with {e}, expected {}",
            errno_name(expected)
        ),
    }
}

pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "",
    };
    format!("{name}({errno})")
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in a path")
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// chown(2) without following a symlink.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: a valid C string.
    check(unsafe { libc::lchown(cpath(path).as_ptr(), uid, gid) })
}

/// truncate(2) by path (a setattr of the size, no open).
pub fn truncate(path: &Path, size: u64) -> std::io::Result<()> {
    // SAFETY: a valid C string.
    check(unsafe { libc::truncate(cpath(path).as_ptr(), size as libc::off_t) })
}

/// The value of one extended attribute.
pub fn getxattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let name = CString::new(name).expect("no NUL in a name");
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid C strings, a buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            cpath(path).as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let name = CString::new(name).expect("no NUL in a name");
    // SAFETY: valid C strings, a buffer of the length given.
    check(unsafe {
        libc::setxattr(
            cpath(path).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// The names listxattr(2) gives.
pub fn listxattr(path: &Path) -> std::io::Result<Vec<String>> {
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: a valid C string, a buffer of the length given.
    let n = unsafe { libc::listxattr(cpath(path).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect())
}

/// The errno of one write(2) of `line` to `path` (opened O_WRONLY), None if it succeeded.
pub fn write_errno(path: &Path, line: &[u8]) -> Option<i32> {
    let mut file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) => return e.raw_os_error(),
    };
    // One write(2), exactly as `echo` makes it; a short write would be a failure too.
    match file.write(line) {
        Ok(n) if n == line.len() => None,
        Ok(_) => Some(libc::EIO),
        Err(e) => e.raw_os_error(),
    }
}

pub fn sha256(path: &Path) -> String {
    ok(&format!("sha256sum '{}' | cut -d' ' -f1", path.display()))
        .trim()
        .to_string()
}

/// Drops the page cache of one file (not the whole machine's: other tests are timing
/// their own work).
pub fn evict(path: &Path) {
    ok(&format!(
        "dd if='{}' iflag=nocache count=0 status=none",
        path.display()
    ));
}

#[track_caller]
/// Overwrites `bytes` at `offset` of `path` behind the daemon's back (rot on the backup
/// storage), durably, and drops the file's pages so that the next read sees the disk.
pub fn damage_bytes(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
    evict(path);
}

pub fn wait_for(cond: impl FnMut() -> bool, what: &str) {
    wait_for_limit(WAIT_TIMEOUT, cond, what);
}

/// Waits at most `limit` for `cond`; how long it took.
#[track_caller]
pub fn wait_for_limit(limit: Duration, mut cond: impl FnMut() -> bool, what: &str) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < limit,
            "timed out after {:?} waiting for {what}",
            limit
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

pub fn is_fuse_mount(path: &Path) -> bool {
    mounts()
        .iter()
        .any(|m| m.target == path && m.kind.starts_with("fuse"))
}

// ----------------------------------------------------------------------------------------
// What is in a directory, without knowing the daemon's file names.

/// Every regular file at or below `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(entry.path()),
                Ok(t) if t.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files.sort();
    files
}

/// Bytes really allocated by the files at or below `dir`.
pub fn allocated_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|f| std::fs::symlink_metadata(f).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
}

/// Files at or below `dir` that name `id`, in their name or (small files) their content.
pub fn files_mentioning(dir: &Path, id: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            f.to_string_lossy().contains(id)
                || (std::fs::metadata(f).is_ok_and(|m| m.len() <= 1 << 20)
                    && std::fs::read(f)
                        .is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains(id)))
        })
        .collect()
}

/// The file holding the record of `backup_id` in a target's pool: the JSON object whose
/// `id` it is (found by content, whatever the file is called), not the temporary of a
/// rewrite in flight (whose name starts with a dot, as every temporary's does).
#[track_caller]
pub fn record_file(pool: &Path, backup_id: &str) -> PathBuf {
    let found: Vec<PathBuf> = files_under(pool)
        .into_iter()
        .filter(|f| {
            !f.file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"."))
                && std::fs::metadata(f).is_ok_and(|m| m.len() <= 1 << 20)
                && std::fs::read(f)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v["id"] == backup_id)
        })
        .collect();
    assert_eq!(found.len(), 1, "one record of {backup_id}: {found:?}");
    found.into_iter().next().expect("one record")
}

/// The file in a target's pool that stores the data of the image `image` (raw or qcow2,
/// whatever it is called): the one `qemu-img compare` finds equal to the image.
#[track_caller]
pub fn stored_data(pool: &Path, image: &Path) -> PathBuf {
    let found: Vec<PathBuf> = files_under(pool)
        .into_iter()
        .filter(|f| std::fs::metadata(f).is_ok_and(|m| m.len() >= 1 << 20))
        .filter(|f| {
            sh(&format!(
                "qemu-img compare -U -q -f raw '{}' '{}' 2>/dev/null",
                image.display(),
                f.display()
            ))
            .status
            .success()
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one stored copy of {}: {found:?}",
        image.display()
    );
    found.into_iter().next().expect("one file")
}

/// The names in a directory, sorted (hidden ones included).
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

// ----------------------------------------------------------------------------------------
// Mounts, loop devices and processes, read from /proc and /sys (never from a mount that
// may be wedged).

pub struct MountEntry {
    pub target: PathBuf,
    pub kind: String,
    /// major:minor of the mounted device.
    pub device: String,
}

/// /proc/self/mountinfo, with octal escapes undone.
pub fn mounts() -> Vec<MountEntry> {
    let unescape = |field: &str| {
        let bytes = field.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'\\'
                && i + 3 < bytes.len()
                && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
            {
                out.push(v);
                i += 4;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        PathBuf::from(std::ffi::OsStr::from_bytes(&out))
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                target: unescape(fields.get(4)?),
                device: fields.get(2)?.to_string(),
                kind: fields.get(dash + 1)?.to_string(),
            })
        })
        .collect()
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t.starts_with(dir))
        .collect()
}

/// Lazily detaches every mount at or below `dir`, deepest first. Never blocks on a FUSE
/// daemon and never panics. A FUSE mount's connection is aborted first (through
/// fusectl): once seen here (kernel 6.18), a request left counted on a connection whose
/// daemon had died held the last unmount in `fuse_kill_sb_anon` for good.
pub fn unmount_all_under(dir: &Path) {
    let mut entries: Vec<MountEntry> = mounts()
        .into_iter()
        .filter(|m| m.target.starts_with(dir))
        .collect();
    entries.sort_by_key(|m| std::cmp::Reverse(m.target.components().count()));
    entries.dedup_by(|a, b| a.target == b.target);
    for entry in entries {
        if entry.kind.starts_with("fuse") {
            abort_fuse_connection(&entry.device);
        }
        // SAFETY: umount2 with a valid C string.
        unsafe { libc::umount2(cpath(&entry.target).as_ptr(), libc::MNT_DETACH) };
    }
}

/// Aborts the FUSE connection of the mount whose device is `major:minor` (fusectl names
/// connections by the minor), mounting fusectl if it is not.
fn abort_fuse_connection(device: &str) {
    let Some((_, minor)) = device.split_once(':') else {
        return;
    };
    let connections = Path::new("/sys/fs/fuse/connections");
    let abort = connections.join(minor).join("abort");
    if !abort.exists() {
        let _ = timed(Duration::from_secs(10), "mount")
            .args(["-t", "fusectl", "none"])
            .arg(connections)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = std::fs::write(&abort, b"1");
}

/// Processes (other than this one) whose command line names a path at or below `dir`:
/// what a test started there (daemons, qemu-storage-daemons, lock holders, shells).
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_bytes();
    // `dir` itself or below it, not a sibling whose name merely starts the same.
    let names_dir = |cmdline: &[u8]| {
        cmdline.windows(needle.len()).enumerate().any(|(at, w)| {
            w == needle
                && cmdline
                    .get(at + needle.len())
                    .is_none_or(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
        })
    };
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| names_dir(&cmdline))
        })
        .collect()
}

fn process_alive(pid: i32) -> bool {
    // A zombie is gone for our purposes: it holds no file and no mount.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// SIGKILLs the processes, then waits (bounded) for them to be gone.
fn kill_and_wait(pids: &[i32]) {
    for pid in pids {
        // SAFETY: kill(2) of a pid we found started by this sandbox.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|pid| process_alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything a test made at or below `dir`, undone: its processes killed, its mounts
/// detached, its loop devices freed. Never panics, never waits on a FUSE daemon.
pub fn undo_everything_under(dir: &Path) {
    // Twice: a process killed may have been about to start another.
    for _ in 0..2 {
        kill_and_wait(&processes_under(dir));
    }
    unmount_all_under(dir);
    for dev in loops_under(dir) {
        detach_loop_device(&dev, dir);
    }
    // A loop device mounted under `dir` is detached only once that mount has gone.
    unmount_all_under(dir);
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

// ----------------------------------------------------------------------------------------
// Where sandboxes live, and the sweep of what dead runs left there.

fn checkout_tag() -> String {
    // FNV-1a of the checkout's path: each checkout's suite keeps to its own sandboxes.
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in env!("CARGO_MANIFEST_DIR").bytes() {
        hash = (hash ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{:08x}", hash as u32)
}

/// The directory holding this checkout's sandboxes.
pub fn sandboxes_root() -> PathBuf {
    std::env::temp_dir().join(format!("backupfs-tests-{}", checkout_tag()))
}

/// Prefix of the accounts tests make: `bt<tag>x<pid><test letter><role letter>`.
pub fn account_prefix() -> String {
    format!("bt{}x", &checkout_tag()[..4])
}

/// The pid in a sandbox's name `<name>-<pid>-<n>`.
fn owner_pid(sandbox: &Path) -> Option<i32> {
    let name = sandbox.file_name()?.to_str()?;
    let mut fields = name.rsplit('-');
    fields.next()?;
    fields.next()?.parse().ok()
}

/// Removes what runs of this suite that are gone left behind: their sandboxes (processes,
/// mounts, loop devices, files) and their accounts. Sandboxes of live runs are left alone.
pub fn sweep_dead_runs() {
    let root = sandboxes_root();
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let path = entry.path();
            match owner_pid(&path) {
                Some(pid) if pid_alive(pid) => continue,
                _ => {}
            }
            eprintln!("sweeping a dead run's sandbox {}", path.display());
            undo_everything_under(&path);
            if mounts_under(&path).is_empty() {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
    let prefix = account_prefix();
    let dead_account = |name: &str| {
        name.strip_prefix(&prefix).is_some_and(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<i32>().is_ok_and(|pid| !pid_alive(pid))
        })
    };
    for (file, remove) in [("/etc/passwd", "userdel"), ("/etc/group", "groupdel")] {
        let names: Vec<String> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|name| dead_account(name))
            .map(str::to_string)
            .collect();
        for name in names {
            let _ = timed(Duration::from_secs(30), remove)
                .arg(&name)
                .stderr(Stdio::null())
                .status();
        }
    }
}

static SWEEP: std::sync::Once = std::sync::Once::new();
static SANDBOXES: AtomicUsize = AtomicUsize::new(0);

// ----------------------------------------------------------------------------------------
// The sandbox.

pub struct Sandbox {
    pub dir: PathBuf,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    children: Vec<Child>,
    daemons: usize,
    watchdog: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

/// Kills what the test started under `dir` if it is still running at `deadline`: a hung
/// syscall on the mount then returns (ECONNABORTED, ENOTCONN) and the test fails
/// instead of hanging.
fn watchdog(dir: PathBuf, deadline: Duration) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (done, finished) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(deadline) {
            eprintln!(
                "watchdog: the test of {} ran over {} s: killing what it started",
                dir.display(),
                deadline.as_secs()
            );
            undo_everything_under(&dir);
        }
    });
    (done, thread)
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        Sandbox::with_deadline(name, TEST_DEADLINE)
    }

    /// A sandbox whose watchdog fires after `deadline` instead of TEST_DEADLINE.
    pub fn with_deadline(name: &str, deadline: Duration) -> Sandbox {
        SWEEP.call_once(sweep_dead_runs);
        let root = sandboxes_root();
        std::fs::create_dir_all(&root).expect("sandboxes root");
        let n = SANDBOXES.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(format!("{name}-{}-{n}", std::process::id()));
        // A leftover of an earlier process with our pid: undo it first.
        undo_everything_under(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("sandbox dir");
        let watchdog = Some(watchdog(dir.clone(), deadline));
        Sandbox {
            dir,
            mounts: Vec::new(),
            loops: Vec::new(),
            children: Vec::new(),
            daemons: 0,
            watchdog,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// A directory of its own (on the machine's disk: ext4 here, no reflinks).
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(&path).expect("mkdir");
        path
    }

    /// Attaches `file` to a loop device (read-only with `read_only`); detached on Drop.
    pub fn losetup(&mut self, file: &Path, read_only: bool) -> String {
        let dev = ok(&format!(
            "losetup {} -f --show '{}'",
            if read_only { "-r" } else { "" },
            file.display()
        ))
        .trim()
        .to_string();
        self.loops.push(dev.clone());
        dev
    }

    /// `mount [-o options] source dir`; detached on Drop.
    pub fn mount(&mut self, source: &str, dir: &Path, options: &str) {
        let options = if options.is_empty() {
            String::new()
        } else {
            format!("-o {options}")
        };
        // Recorded first: a mount that succeeds after the timeout fired is still undone.
        self.mounts.push(dir.to_path_buf());
        ok(&format!("mount {options} {source} '{}'", dir.display()));
    }

    /// `mount --bind`; detached on Drop.
    pub fn bind(&mut self, source: &Path, dir: &Path) {
        self.mount(&format!("--bind '{}'", source.display()), dir, "");
    }

    pub fn umount(&mut self, dir: &Path) {
        ok(&format!("umount '{}'", dir.display()));
        self.mounts.retain(|m| m != dir);
    }

    /// A fresh filesystem of `size_mb` on a loop device, mounted at `rel`.
    pub fn loop_fs(&mut self, rel: &str, fs: Fs, size_mb: u64) -> PathBuf {
        let image = self.path(&format!("{rel}.fsimg"));
        let mnt = self.mkdir(rel);
        File::create(&image)
            .and_then(|f| f.set_len(size_mb << 20))
            .expect("fs image");
        let mkfs = match fs {
            Fs::Btrfs => "mkfs.btrfs -q -f",
            Fs::Xfs => "mkfs.xfs -q -f",
            Fs::Ext4 => "mkfs.ext4 -q -F",
        };
        ok(&format!("{mkfs} '{}' >/dev/null 2>&1", image.display()));
        let dev = self.losetup(&image, false);
        self.mount(&dev, &mnt, "");
        mnt
    }

    /// Binds a file to a loop device (a volume "attached" the way a hypervisor would).
    pub fn attach_loop(&mut self, file: &Path) -> String {
        self.losetup(file, false)
    }

    /// Binds a file holding a partition table to a loop device that shows its
    /// partitions (`losetup -P`: `<dev>p1`...); detached on Drop.
    pub fn attach_loop_partitioned(&mut self, file: &Path) -> String {
        let dev = ok(&format!("losetup -P -f --show '{}'", file.display()))
            .trim()
            .to_string();
        self.loops.push(dev.clone());
        dev
    }

    /// Binds a file to a read-only loop device (`losetup -r`), as admins look into a backup.
    pub fn attach_loop_ro(&mut self, file: &Path) -> String {
        let dev = ok(&format!("losetup -r -f --show '{}'", file.display()))
            .trim()
            .to_string();
        self.loops.push(dev.clone());
        dev
    }

    /// Detaches a loop device and waits until it has let go of its file: `losetup -d`
    /// only asks for it, and the kernel lets go at the last close (udev may be probing
    /// the device), while backupfs rightly refuses a volume a loop device still holds.
    pub fn detach_loop(&mut self, dev: &str) {
        let name = dev.trim_start_matches("/dev/");
        let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
        let file = std::fs::read_to_string(&backing).expect("a device of this sandbox");
        detach_loop_device(dev, &self.dir);
        self.loops.retain(|d| d != dev);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Until it holds our file no more (another test may have taken it since).
        while std::fs::read_to_string(&backing).is_ok_and(|f| f == file) {
            assert!(
                Instant::now() < deadline,
                "{dev} still holds its file after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A child process owned by the sandbox (killed on Drop); its index.
    pub fn spawn(&mut self, command: &mut Command) -> usize {
        let child = command.spawn().expect("the command starts");
        self.children.push(child);
        self.children.len() - 1
    }

    /// `bash -c script` in the background, owned by the sandbox; its index.
    pub fn spawn_sh(&mut self, script: &str) -> usize {
        self.spawn(
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    }

    pub fn child_pid(&self, child: usize) -> u32 {
        self.children[child].id()
    }

    /// Another process holding `file` the way `kind` says, until released.
    pub fn hold_lock(&mut self, file: &Path) -> usize {
        self.hold(file, Lock::Posix)
    }

    pub fn hold(&mut self, file: &Path, kind: Lock) -> usize {
        let ready = self.path(&format!("lock-ready-{}", self.children.len()));
        let kind_name = match kind {
            Lock::Posix => "posix",
            Lock::Ofd => "ofd",
            Lock::Flock => "flock",
        };
        let child = self.spawn(
            Command::new(PYTHON)
                .arg("-c")
                .arg(
                    "import fcntl,os,struct,sys,time\n\
                     f=open(sys.argv[1],'r+b')\n\
                     kind=sys.argv[3]\n\
                     if kind=='posix': fcntl.lockf(f, fcntl.LOCK_EX)\n\
                     elif kind=='flock': fcntl.flock(f, fcntl.LOCK_EX)\n\
                     else: fcntl.fcntl(f, getattr(fcntl,'F_OFD_SETLK',37), struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 0, 0))\n\
                     open(sys.argv[2],'w').close()\n\
                     time.sleep(600)\n",
                )
                .arg(file)
                .arg(&ready)
                .arg(kind_name)
                .stdin(Stdio::null()),
        );
        wait_for(|| ready.exists(), "the lock holder to start");
        child
    }

    /// Kills a child the sandbox owns and waits for it.
    pub fn release(&mut self, child: usize) {
        let child = &mut self.children[child];
        child.kill().expect("kill the child");
        child.wait().expect("wait for the child");
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.path("backupfs.toml");
        std::fs::write(&path, text).expect("config");
        path
    }

    /// Starts `backupfs mount` and waits for the tree to appear.
    pub fn start_daemon(&mut self, config: &Path) -> Daemon {
        self.start_daemon_env(config, &[])
    }

    /// Starts `backupfs mount` with extra environment variables. Each daemon has a log
    /// of its own, and a runtime directory (its qcow2 exports) inside the sandbox.
    #[track_caller]
    pub fn start_daemon_env(&mut self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mnt = self.path("mnt");
        let runtime_dir = self.path("run");
        let mut command = Command::new(BIN);
        command
            .arg("mount")
            .arg(&mnt)
            .arg("--config")
            .arg(config)
            .env_remove("BACKUPFS_TEST_PAUSE")
            .env_remove("BACKUPFS_TEST_RELEASE")
            .env("RUNTIME_DIRECTORY", &runtime_dir)
            .envs(env.iter().copied());
        self.start_daemon_command(command, &mnt, &runtime_dir)
    }

    /// Starts a daemon from `command` (a `backupfs mount` of `mnt` whose qcow2 exports
    /// go to `runtime_dir`), logging to a file of its own, and waits for the tree.
    #[track_caller]
    pub fn start_daemon_command(
        &mut self,
        command: Command,
        mnt: &Path,
        runtime_dir: &Path,
    ) -> Daemon {
        let mut daemon = self.spawn_daemon_command(command, mnt, runtime_dir);
        daemon.wait_mounted();
        daemon
    }

    /// `start_daemon_command` without the wait: for daemons that must start at the same
    /// moment (then `Daemon::wait_mounted` each).
    #[track_caller]
    pub fn spawn_daemon_command(
        &mut self,
        mut command: Command,
        mnt: &Path,
        runtime_dir: &Path,
    ) -> Daemon {
        // A stale mount of a killed daemon answers ENOTCONN here; the daemon clears it.
        let _ = std::fs::create_dir_all(mnt);
        self.daemons += 1;
        let log = self.path(&format!("daemon-{}.log", self.daemons));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&log)
            .expect("log");
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("backupfs starts");
        Daemon {
            child,
            mnt: mnt.to_path_buf(),
            log,
            runtime_dir: runtime_dir.to_path_buf(),
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Nothing here may panic: a panic while unwinding aborts every other test's
        // cleanup too. Each step goes on whatever the one before it did.
        for child in &mut self.children {
            let _ = child.kill();
        }
        let pids: Vec<i32> = self.children.iter().map(|c| c.id() as i32).collect();
        kill_and_wait(&pids);
        for child in &mut self.children {
            let _ = child.try_wait();
        }
        for mnt in self.mounts.iter().rev() {
            // SAFETY: umount2 with a valid C string.
            unsafe { libc::umount2(cpath(mnt).as_ptr(), libc::MNT_DETACH) };
        }
        // Only devices still backed by a file of this sandbox: one released meanwhile may
        // have been taken by another test, whose device this is now.
        for dev in self.loops.iter().rev() {
            detach_loop_device(dev, &self.dir);
        }
        undo_everything_under(&self.dir);
        if mounts_under(&self.dir).is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "{} still has mounts; left for the next run's sweep",
                self.dir.display()
            );
        }
        if let Some((done, thread)) = self.watchdog.take() {
            let _ = done.send(());
            let _ = thread.join();
        }
    }
}

/// A running `backupfs mount`; killed (-9) on Drop if still running.
pub struct Daemon {
    pub child: Child,
    pub mnt: PathBuf,
    /// This daemon's log (standard output and error), and only this daemon's.
    pub log: PathBuf,
    /// Its RUNTIME_DIRECTORY: its qcow2 exports are under `qcow2-exports/<pid>`.
    pub runtime_dir: PathBuf,
}

impl Daemon {
    /// Waits for this daemon's tree. A stale mount is a fuse mount too, and may answer
    /// from its caches: waits for the daemon to say it has mounted, and for a listing only
    /// a live daemon can give.
    #[track_caller]
    pub fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(self.log().contains("backupfs mounted")
            && std::fs::read_dir(self.mnt.join("backups")).is_ok())
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("backupfs exited ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "backupfs did not mount; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn target(&self, target: &str) -> PathBuf {
        self.mnt.join("backups").join(target)
    }

    /// Whether a listing of `target` on this mount shows the image of backup `id`.
    pub fn lists(&self, target: &str, id: &str) -> bool {
        std::fs::read_dir(self.target(target))
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy() == format!("{id}.img"))
            })
            .unwrap_or(false)
    }

    pub fn volume(&self, backend: &str, volume_id: &str) -> PathBuf {
        self.mnt.join("volumes").join(backend).join(volume_id)
    }

    /// `echo "<line>" > request`, returning the errno of the write if it failed.
    pub fn request(&self, target: &str, line: &str) -> Option<i32> {
        write_errno(
            &self.target(target).join("request"),
            format!("{line}\n").as_bytes(),
        )
    }

    /// Starts a backup and returns its id, read back through the same open file.
    #[track_caller]
    pub fn backup(&self, target: &str, line: &str) -> String {
        let request = self.target(target).join("request");
        let id = ok(&format!(
            "exec 3<>'{}'; echo '{line}' >&3; read -r id <&3; echo \"$id\"",
            request.display()
        ))
        .trim()
        .to_string();
        assert_eq!(id.len(), 36, "a backup id (a UUID): {id:?}");
        id
    }

    pub fn jobs(&self, target: &str) -> String {
        std::fs::read_to_string(self.target(target).join("jobs"))
            .unwrap_or_else(|e| panic!("read jobs: {e}; log:\n{}", self.log()))
    }

    /// The state of a job in `jobs` ("" when it is not listed).
    pub fn job_state(&self, target: &str, backup_id: &str) -> String {
        self.jobs(target)
            .lines()
            .find(|l| l.starts_with(backup_id))
            .and_then(|l| l.split(' ').nth(2))
            .unwrap_or("")
            .to_string()
    }

    #[track_caller]
    pub fn wait_state(&self, target: &str, backup_id: &str, state: &str) {
        wait_for(
            || self.job_state(target, backup_id) == state,
            &format!("job {backup_id} to be {state}"),
        );
    }

    #[track_caller]
    pub fn record(&self, target: &str, backup_id: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.target(target).join(format!("{backup_id}.json")))
            .unwrap_or_else(|e| panic!("record of {backup_id}: {e}"));
        serde_json::from_str(&text).expect("record is JSON")
    }

    pub fn image(&self, target: &str, backup_id: &str) -> PathBuf {
        self.target(target).join(format!("{backup_id}.img"))
    }

    /// Waits until the job has ended; its state.
    #[track_caller]
    pub fn wait_job(&self, target: &str, backup_id: &str) -> String {
        let mut state = String::new();
        wait_for(
            || {
                state = self.job_state(target, backup_id);
                state == "available" || state == "error"
            },
            "the job to end",
        );
        state
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGSTOP, then waits until every thread of the daemon has stopped: kill() wakes one
    /// thread to start the group stop, and until it runs the others go on answering.
    pub fn stop_all_threads(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.child.id());
        wait_for(
            || {
                std::fs::read_dir(&tasks).is_ok_and(|entries| {
                    entries.flatten().all(|task| {
                        // The state follows the command name in parentheses.
                        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                            stat.rsplit_once(") ")
                                .is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
                        })
                    })
                })
            },
            "every thread of the daemon to stop",
        );
    }

    /// SIGTERM, then wait for the process to exit; its exit status.
    #[must_use = "check how the daemon exited"]
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// SIGTERM; the daemon must exit 0 and take its mount with it.
    #[track_caller]
    pub fn stop_clean(self) {
        let (log, mnt) = (self.log.clone(), self.mnt.clone());
        let status = self.stop();
        assert!(
            status.success(),
            "the daemon exited with {status}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(!is_fuse_mount(&mnt), "the mount is gone after a stop");
    }

    /// kill -9 and leave the mount as a dead daemon leaves it (the sandbox detaches it).
    pub fn crash(mut self) {
        self.child.kill().expect("kill -9 the daemon");
        self.child.wait().expect("reap the daemon");
        std::mem::forget(self);
    }

    /// kill -9, then detach the dead mount (what the unit's ExecStopPost does).
    pub fn kill9(self) {
        let mnt = self.mnt.clone();
        self.crash();
        ok(&format!("umount -l '{}'", mnt.display()));
    }

    /// Waits (bounded) for the process to exit; its exit status.
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            kill_and_wait(&[self.child.id() as i32]);
            let _ = self.child.try_wait();
        }
        // The daemon is gone: its connection can go too (see unmount_all_under).
        for entry in mounts() {
            if entry.target == self.mnt && entry.kind.starts_with("fuse") {
                abort_fuse_connection(&entry.device);
            }
        }
        // SAFETY: umount2 with a valid C string.
        unsafe { libc::umount2(cpath(&self.mnt).as_ptr(), libc::MNT_DETACH) };
    }
}

/// A standard layout: backend `ssd` (pool `gold` on `ssd_fs`), backend `hdd` (pool `main`
/// for volumes and pool `backups` for the target `hdd`, both on `hdd_fs`).
pub struct Layout {
    pub gold: PathBuf,
    pub main: PathBuf,
    pub backups: PathBuf,
    pub config: PathBuf,
}

pub fn layout(sb: &mut Sandbox, ssd_fs: Option<Fs>, hdd_fs: Option<Fs>, extra: &str) -> Layout {
    let ssd = match ssd_fs {
        Some(fs) => sb.loop_fs("ssd", fs, 512),
        None => sb.mkdir("ssd"),
    };
    let hdd = match hdd_fs {
        Some(fs) => sb.loop_fs("hdd", fs, 1024),
        None => sb.mkdir("hdd"),
    };
    let gold = ssd.join("gold");
    let main = hdd.join("main");
    let backups = hdd.join("backups");
    for d in [&gold, &main, &backups] {
        std::fs::create_dir_all(d).expect("pool dir");
    }
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n{extra}\n\
         [backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ main = \"{}\", backups = \"{}\" }}\n\
         [targets.hdd]\nbackend = \"hdd\"\npool = \"backups\"\n",
        state.display(),
        gold.display(),
        main.display(),
        backups.display()
    ));
    Layout {
        gold,
        main,
        backups,
        config,
    }
}

/// The environment that holds every job at `point` until `release` exists (see the
/// daemon's test hook): a job stays `finishing` (or `snapshotting`) for as long as a test
/// needs, and jobs behind it stay `queued`.
pub fn pause_env<'a>(point: &'a str, release: &'a Path) -> Vec<(&'a str, &'a str)> {
    vec![
        ("BACKUPFS_TEST_PAUSE", point),
        (
            "BACKUPFS_TEST_RELEASE",
            release.to_str().expect("a UTF-8 path"),
        ),
    ]
}

/// A small deterministic generator (the same seed, the same sequence), so that a failure
/// can be replayed.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() as usize) % items.len()]
    }
}

/// The environment that holds every job at `point` until the daemon stops (a stop then
/// records it `error`, "interrupted").
pub fn hold_env(point: &str) -> Vec<(&str, &str)> {
    vec![("BACKUPFS_TEST_PAUSE", point)]
}

/// Lets jobs held by `pause_env` go on.
pub fn release_jobs(release: &Path) {
    std::fs::write(release, b"").expect("release file");
}

/// Writes `mb` MiB of random data as a volume file.
pub fn random_volume(pool: &Path, volume_id: &str, mb: u64) -> PathBuf {
    let path = pool.join(format!("volume-{volume_id}"));
    ok(&format!(
        "head -c {mb}M /dev/urandom > '{}'",
        path.display()
    ));
    path
}

/// A sparse volume of `size_mb` MiB with `data_mb` MiB of random data at `at_mb` MiB.
pub fn sparse_volume(
    pool: &Path,
    volume_id: &str,
    size_mb: u64,
    at_mb: u64,
    data_mb: u64,
) -> PathBuf {
    let path = pool.join(format!("volume-{volume_id}"));
    ok(&format!(
        "truncate -s {size_mb}M '{p}' && dd if=/dev/urandom of='{p}' bs=1M seek={at_mb} count={data_mb} conv=notrunc status=none",
        p = path.display()
    ));
    path
}

/// Backend `ssd` (pool `gold` on the machine's disk) and a target `target` on a small ext4
/// loop filesystem of `size_mb` MiB, where ENOSPC is easy to reach. Returns the `gold`
/// and backup pool directories and the configuration.
pub fn small_target(sb: &mut Sandbox, target: &str, size_mb: u64) -> (PathBuf, PathBuf, PathBuf) {
    small_target_with(sb, target, size_mb, "")
}

pub fn small_target_with(
    sb: &mut Sandbox,
    target: &str,
    size_mb: u64,
    extra: &str,
) -> (PathBuf, PathBuf, PathBuf) {
    let hdd = sb.loop_fs("hdd", Fs::Ext4, size_mb);
    let gold = sb.mkdir("ssd");
    let backups = hdd.join("backups");
    std::fs::create_dir_all(&backups).expect("pool dir");
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n{extra}\n[backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ backups = \"{}\" }}\n\
         [targets.{target}]\nbackend = \"hdd\"\npool = \"backups\"\n",
        state.display(),
        gold.display(),
        backups.display()
    ));
    (gold, backups, config)
}
