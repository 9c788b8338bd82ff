//! The qemu-storage-daemon process of an export: its command line (format pinned,
//! `backing: null`), the one descriptor it inherits (the image backupfs opened and
//! checked), the check of what it holds open, and its start from a thread that lives as
//! long as the daemon, so that it dies with it. It never names an image by its path.

use super::Mode;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{OnceLock, mpsc};

/// The command line of one export, in qsd's JSON syntax (no comma escaping of paths). The
/// image is `image`, the name of the descriptor `hand_over` gives qsd; its format is pinned
/// (no probing) and `backing: null` keeps QEMU from opening a backing file whatever the
/// header says.
pub(super) fn qsd_args(image: &str, mountpoint: &Path, pidfile: &Path, mode: Mode) -> Vec<String> {
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
pub(super) fn id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// What process `pid` holds open beyond the regular files `allowed` (by identity),
/// /dev/null, /dev/fuse, anonymous pipes and anonymous inodes (eventfd, signalfd...):
/// each as /proc names it.
pub(super) fn foreign_files(pid: u32, allowed: &[(u64, u64)]) -> std::io::Result<Vec<String>> {
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
pub(super) fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

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
}
