//! The one place where an engine error becomes an errno for the kernel.

use crate::engine::EngineError;
use crate::targets::TargetError;
use crate::volume::VolumeError;
use fuser::Errno;

fn os(source: &std::io::Error) -> Errno {
    source.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

fn volume(e: &VolumeError) -> Errno {
    match e {
        VolumeError::NotFound(_) | VolumeError::NoPool(_) => Errno::ENOENT,
        VolumeError::Exists(_) => Errno::EEXIST,
        VolumeError::SnapshotUnsupported(_) => Errno::from_i32(libc::EOPNOTSUPP),
        VolumeError::Busy(_) => Errno::EBUSY,
        VolumeError::Refused(_) => Errno::EPERM,
        VolumeError::NotOurSnapshot(_) => Errno::EPERM,
        VolumeError::Io { source, .. } => os(source),
    }
}

pub fn errno(e: &EngineError) -> Errno {
    match e {
        EngineError::Invalid(_) => Errno::EINVAL,
        EngineError::NotFound(_) => Errno::ENOENT,
        EngineError::Busy(_) => Errno::EBUSY,
        EngineError::NoSpace(_) => Errno::ENOSPC,
        EngineError::Exists(_) => Errno::EEXIST,
        EngineError::NotPermitted(_) => Errno::EPERM,
        EngineError::NoAttribute(_) => Errno::NO_XATTR,
        EngineError::Interrupted => Errno::from_i32(libc::ECANCELED),
        EngineError::Volume(v) => volume(v),
        EngineError::Target(t) => match t {
            TargetError::NotFound(_) => Errno::ENOENT,
            TargetError::Locked { .. }
            | TargetError::NodeTaken { .. }
            | TargetError::ServedAlone { .. } => Errno::EBUSY,
            TargetError::BadRecord { .. } | TargetError::Claim { .. } => Errno::EIO,
            TargetError::Volume(v) => volume(v),
            TargetError::Io { source, .. } => os(source),
        },
        EngineError::Damaged { .. } => Errno::EIO,
        EngineError::Copy(c) => c.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
        EngineError::Io { source, .. } => os(source),
    }
}

/// An open refused for want of room: the caller's "too many open files", as when a
/// process reaches its own RLIMIT_NOFILE.
pub(super) fn limit(_: &super::handles::LimitError) -> Errno {
    Errno::from_i32(libc::EMFILE)
}

/// The symbolic name of an errno, as an operator looks it up (`ENOENT`).
pub fn name(errno: Errno) -> String {
    let code = errno.code();
    let known = [
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EBUSY, "EBUSY"),
        (libc::EEXIST, "EEXIST"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EROFS, "EROFS"),
        (libc::ENODATA, "ENODATA"),
        (libc::E2BIG, "E2BIG"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ETIMEDOUT, "ETIMEDOUT"),
        (libc::ECANCELED, "ECANCELED"),
        (libc::EHOSTDOWN, "EHOSTDOWN"),
        (libc::EMFILE, "EMFILE"),
    ];
    known
        .iter()
        .find(|(c, _)| *c == code)
        .map_or_else(|| format!("errno {code}"), |(_, n)| n.to_string())
}
