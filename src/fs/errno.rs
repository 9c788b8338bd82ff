//! The one place where an engine error becomes an errno for the kernel.

use crate::engine::EngineError;
use crate::target::TargetError;
use crate::volume::VolumeError;
use fuser::Errno;

fn volume(e: &VolumeError) -> Errno {
    match e {
        VolumeError::NotFound(_) | VolumeError::NoPool(_) => Errno::ENOENT,
        VolumeError::Exists(_) => Errno::EEXIST,
        VolumeError::SnapshotUnsupported(_) => Errno::from_i32(libc::EOPNOTSUPP),
        VolumeError::Io { source, .. } => source.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
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
        EngineError::JobFailed { errno, .. } => Errno::from_i32(*errno),
        EngineError::Volume(v) => volume(v),
        EngineError::Target(t) => match t {
            TargetError::NotFound(_) => Errno::ENOENT,
            TargetError::Locked { .. } => Errno::EBUSY,
            TargetError::BadRecord { .. } => Errno::EIO,
            TargetError::Volume(v) => volume(v),
            TargetError::Io { source, .. } => {
                source.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
            }
        },
        EngineError::Damaged { .. } => Errno::EIO,
        EngineError::Copy(c) => c.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
        EngineError::Io { source, .. } => source.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
    }
}
