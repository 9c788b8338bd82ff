//! Files an operator names in the configuration: a target's key, an s3 target's
//! credentials and CA bundle. Each is opened one way: never blocking on what is not a
//! regular file (a FIFO planted at the path would hang the start), checked as what was
//! opened (`fstat`, not the path), and read up to a cap. The caller judges its mode and
//! owner and says what its file must be.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a file named in the configuration was not taken.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    NotRegular,
}

/// Opens `path` for reading: what was opened must be a regular file.
pub fn open(path: &Path) -> Result<(File, Metadata), OpenError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(OpenError::Io)?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    if !meta.file_type().is_file() {
        return Err(OpenError::NotRegular);
    }
    Ok((file, meta))
}

/// The whole of `file`, or None if it holds more than `cap` bytes.
pub fn read_capped(file: File, cap: u64) -> io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= cap).then_some(bytes))
}

/// `open`, its error as the message of a configuration error (which names the key).
pub fn open_named(path: &Path) -> Result<(File, Metadata), String> {
    open(path).map_err(|e| match e {
        OpenError::Io(e) => format!("{}: {e}", path.display()),
        OpenError::NotRegular => {
            format!("{} is not a regular file", path.display())
        }
    })
}

/// The whole of an opened configuration file, refused if larger than `cap`.
pub fn read_named(path: &Path, file: File, cap: u64) -> Result<Vec<u8>, String> {
    read_capped(file, cap)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| {
            format!(
                "{} is larger than {} KiB: not what this key names",
                path.display(),
                cap >> 10
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_is_opened_and_read_up_to_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Refused at once, not hung waiting for a writer.
        assert!(matches!(open(&fifo), Err(OpenError::NotRegular)));
        assert!(matches!(open(dir.path()), Err(OpenError::NotRegular)));
        assert!(matches!(
            open(&dir.path().join("none")),
            Err(OpenError::Io(_))
        ));
        let file = dir.path().join("f");
        std::fs::write(&file, b"0123456789").unwrap();
        let (opened, _) = open(&file).unwrap();
        assert_eq!(read_capped(opened, 10).unwrap().unwrap(), b"0123456789");
        let (opened, _) = open(&file).unwrap();
        assert!(read_capped(opened, 9).unwrap().is_none());
    }
}
