//! A directory that others write (a volume pool, a target's pool), held as a descriptor
//! for the length of one operation: every name in it is opened relative to that
//! descriptor with O_NOFOLLOW and O_NONBLOCK (a FIFO cannot hang the open), and fstat on
//! what was opened makes sure it is a regular file. Temporary files get unpredictable
//! names and O_EXCL; renames and links stay inside the same descriptor. It never follows
//! a symbolic link planted in the directory, nor opens a device or FIFO where a file is
//! expected.

use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode, SFlag};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What a name stood for when a regular file was expected (a symbolic link, a FIFO, a
/// device, a directory): never opened as one.
#[derive(Debug, thiserror::Error)]
#[error("is {0}, not a regular file")]
pub struct NotRegular(pub &'static str);

fn not_regular(kind: &'static str) -> io::Error {
    io::Error::other(NotRegular(kind))
}

/// Whether `e` says a name was not a regular file (see [`NotRegular`]).
pub fn is_not_regular(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NotRegular>())
}

fn kind_of(mode: u32) -> Option<&'static str> {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => None,
        SFlag::S_IFLNK => Some("a symbolic link"),
        SFlag::S_IFDIR => Some("a directory"),
        SFlag::S_IFIFO => Some("a FIFO"),
        SFlag::S_IFSOCK => Some("a socket"),
        SFlag::S_IFBLK => Some("a block device"),
        SFlag::S_IFCHR => Some("a character device"),
        _ => Some("of an unknown type"),
    }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The flags every open of a name in a directory others write carries: no link followed,
/// no descriptor leaked into child processes (qemu), no wait on a FIFO, no controlling tty.
fn guarded(flags: OFlag) -> OFlag {
    flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY
}

/// How long a name made for a temporary file is unpredictable: a v4 UUID (122 random bits).
fn random_part() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A pool directory, open.
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens the directory the configuration names (a link in that path is the
    /// operator's choice, and followed). O_PATH: opening a file in it needs no more than
    /// opening it by path did (search permission, which is all a root-squashed NFS
    /// share may give); listing and syncing open it for reading (`reopen`).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_io)?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `name` is, for messages only: nothing is ever opened by this path.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The entry `name` itself (a link is not followed).
    pub fn stat(&self, name: &str) -> io::Result<FileStat> {
        nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nix_io)
    }

    /// The entry `name`, which must be a regular file.
    pub fn stat_regular(&self, name: &str) -> io::Result<FileStat> {
        let stat = self.stat(name)?;
        match kind_of(stat.st_mode) {
            None => Ok(stat),
            Some(kind) => Err(not_regular(kind)),
        }
    }

    /// Opens the regular file `name` with `flags` (O_RDONLY, O_RDWR, O_DIRECT...). Looked
    /// at before the open, so a device or FIFO is never opened, and checked again on the
    /// descriptor, so one swapped in between is never used.
    pub fn open_file(&self, name: &str, flags: OFlag) -> io::Result<File> {
        self.stat_regular(name)?;
        let fd = match nix::fcntl::openat(&self.fd, name, guarded(flags), Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::Error::ELOOP) => return Err(not_regular("a symbolic link")),
            Err(e) => return Err(nix_io(e)),
        };
        let file = File::from(fd);
        regular_descriptor(&file)?;
        Ok(file)
    }

    /// The whole of the regular file `name`, which may hold at most `cap` bytes: a bigger
    /// one is refused (EFBIG) without being read.
    pub fn read_capped(&self, name: &str, cap: u64) -> io::Result<Vec<u8>> {
        let file = self.open_file(name, OFlag::O_RDONLY)?;
        let size = file.metadata()?.len();
        if size > cap {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        // One byte more than allowed tells a file that grew after the fstat.
        (&file).take(cap + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > cap {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        Ok(bytes)
    }

    /// Creates the new regular file `name` (O_EXCL: fails with EEXIST if anything is
    /// there, a link included) with permissions `mode` set on the descriptor, whatever
    /// the umask.
    pub fn create_new(&self, name: &str, flags: OFlag, mode: u32) -> io::Result<File> {
        let mode = Mode::from_bits_truncate(mode);
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            guarded(flags | OFlag::O_CREAT | OFlag::O_EXCL),
            mode,
        )
        .map_err(nix_io)?;
        let file = File::from(fd);
        let made = nix::sys::stat::fchmod(&file, mode)
            .map_err(nix_io)
            .and_then(|()| regular_descriptor(&file));
        if let Err(e) = made {
            let _ = self.remove(name);
            return Err(e);
        }
        Ok(file)
    }

    /// A new temporary file (read-write, mode 0600) named `<prefix><random><suffix>`:
    /// a name nobody can plant a link at in advance.
    pub fn create_temporary(&self, prefix: &str, suffix: &str) -> io::Result<(String, File)> {
        let mut tries = 0;
        loop {
            let name = format!("{prefix}{}{suffix}", random_part());
            match self.create_new(&name, OFlag::O_RDWR, 0o600) {
                Ok(file) => return Ok((name, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 3 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Renames `from` to `to` in this directory (replacing `to`; a link at `to` is
    /// replaced, never followed).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        nix::fcntl::renameat(&self.fd, from, &self.fd, to).map_err(nix_io)
    }

    /// Renames `from` to `to` in this directory unless `to` exists (EEXIST).
    pub fn rename_new(&self, from: &str, to: &str) -> io::Result<()> {
        nix::fcntl::renameat2(&self.fd, from, &self.fd, to, RenameFlags::RENAME_NOREPLACE)
            .map_err(nix_io)
    }

    /// Swaps the names `a` and `b` in this directory, atomically (both must exist; EINVAL
    /// where the file system cannot, NFS say).
    pub fn exchange(&self, a: &str, b: &str) -> io::Result<()> {
        nix::fcntl::renameat2(&self.fd, a, &self.fd, b, RenameFlags::RENAME_EXCHANGE)
            .map_err(nix_io)
    }

    /// A second name `to` for the file `from` (a link at `from` is linked itself, never
    /// followed); fails with EEXIST rather than replace anything.
    pub fn link(&self, from: &str, to: &str) -> io::Result<()> {
        nix::unistd::linkat(&self.fd, from, &self.fd, to, AtFlags::empty()).map_err(nix_io)
    }

    /// Removes the name `name` (never what a link points at).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(nix_io)
    }

    /// The same directory, open for reading (an O_PATH descriptor can neither list nor
    /// fsync).
    fn reopen(&self) -> io::Result<OwnedFd> {
        nix::fcntl::openat(
            &self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_io)
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        nix::unistd::fsync(self.reopen()?).map_err(nix_io)
    }

    /// The names in the directory (but `.` and `..`), read through its descriptor; a name
    /// that is not UTF-8 comes lossily converted (so it matches none of ours).
    pub fn names(&self) -> io::Result<Vec<String>> {
        self.names_where(|_| true)
    }

    /// The names [`Dir::names`] gives that `keep` keeps, filtered as they are read (a
    /// pool of 100,000 backups holds 400,000 names, a quarter of them records).
    pub fn names_where(&self, keep: impl Fn(&str) -> bool) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        self.for_each_name(|name| {
            if keep(name) {
                names.push(name.to_string());
            }
        })?;
        Ok(names)
    }

    /// Calls `each` with every name [`Dir::names`] gives, as it is read, keeping none: a
    /// caller that wants a few names of a large directory (or a fixed-size value per
    /// name) holds no string per entry (issue 28).
    pub fn for_each_name(&self, mut each: impl FnMut(&str)) -> io::Result<()> {
        let mut listing = nix::dir::Dir::from_fd(self.reopen()?).map_err(nix_io)?;
        for entry in listing.iter() {
            let entry = entry.map_err(nix_io)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            each(&name.to_string_lossy());
        }
        Ok(())
    }
}

/// Checks (fstat) that an open descriptor is a regular file, and clears the O_NONBLOCK
/// the open carried (meaningless for a file, but kept out of the way of anything else).
fn regular_descriptor(file: &File) -> io::Result<()> {
    let stat = nix::sys::stat::fstat(file).map_err(nix_io)?;
    if let Some(kind) = kind_of(stat.st_mode) {
        return Err(not_regular(kind));
    }
    use nix::fcntl::{FcntlArg, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags.difference(OFlag::O_NONBLOCK)))?;
    Ok(())
}

/// Opens the regular file at `path` relative to its directory (see [`Dir::open_file`]):
/// for callers that hold a path of a pool's file.
pub fn open_in(path: &Path, flags: OFlag) -> io::Result<File> {
    let (dir, name) = split(path)?;
    Dir::open(dir)?.open_file(name, flags)
}

/// A path's directory and file name (a UTF-8 one: every name backupfs opens is).
pub fn split(path: &Path) -> io::Result<(&Path, &str)> {
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(invalid)?;
    let dir = path.parent().ok_or_else(invalid)?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    Ok((dir, name))
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Extended attributes of an open file: on the descriptor, never by path.
pub mod xattr {
    use super::*;

    pub fn set(file: &File, name: &str, value: &[u8]) -> io::Result<()> {
        let name = c_name(name)?;
        // SAFETY: a descriptor we borrow, a valid C string and a buffer of value.len() bytes.
        let rc = unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn remove(file: &File, name: &str) -> io::Result<()> {
        let name = c_name(name)?;
        // SAFETY: a descriptor we borrow and a valid C string.
        if unsafe { libc::fremovexattr(file.as_raw_fd(), name.as_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn get(file: &File, name: &str) -> io::Result<Vec<u8>> {
        let name = c_name(name)?;
        let mut value = vec![0u8; 4096];
        // SAFETY: a descriptor we borrow, a valid C string and a buffer of value.len() bytes.
        let n = unsafe {
            libc::fgetxattr(
                file.as_raw_fd(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        value.truncate(n as usize);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn links_fifos_and_devices_are_never_opened_as_files() {
        let scratch = tempfile::tempdir().unwrap();
        let secret = scratch.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        std::os::unix::fs::symlink(&secret, pool.join("link")).unwrap();
        nix::unistd::mkfifo(&pool.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink("/dev/null", pool.join("dev")).unwrap();
        std::fs::write(pool.join("file"), b"ours").unwrap();
        let dir = Dir::open(&pool).unwrap();
        for name in ["link", "fifo", "dev"] {
            let e = dir.open_file(name, OFlag::O_RDONLY).unwrap_err();
            assert!(is_not_regular(&e), "{name}: {e}");
            let e = dir.read_capped(name, 100).unwrap_err();
            assert!(is_not_regular(&e), "{name}: {e}");
        }
        assert_eq!(dir.read_capped("file", 4).unwrap(), b"ours");
        assert_eq!(
            dir.read_capped("file", 3).unwrap_err().raw_os_error(),
            Some(libc::EFBIG)
        );
        let mut names = dir.names().unwrap();
        names.sort();
        assert_eq!(names, ["dev", "fifo", "file", "link"]);
        // Removing a link removes the link.
        dir.remove("link").unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
    }

    #[test]
    fn temporaries_are_new_files_with_their_own_mode_and_never_replace_a_link() {
        let scratch = tempfile::tempdir().unwrap();
        let victim = scratch.path().join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        let dir = Dir::open(scratch.path()).unwrap();
        std::os::unix::fs::symlink(&victim, scratch.path().join("planted")).unwrap();
        let e = dir
            .create_new("planted", OFlag::O_WRONLY, 0o600)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        let (name, file) = dir.create_temporary(".t.", ".tmp").unwrap();
        let (other, _) = dir.create_temporary(".t.", ".tmp").unwrap();
        assert_ne!(name, other);
        assert!(name.starts_with(".t.") && name.ends_with(".tmp") && name.len() > 36);
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        // A rename replaces a link at the destination; it writes nothing through it.
        dir.rename(&name, "planted").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert!(dir.stat_regular("planted").is_ok());
        assert_eq!(
            dir.link(&other, "planted").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
