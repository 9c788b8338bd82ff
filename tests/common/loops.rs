//! Loop devices the tests made: found by their backing file (at or below a sandbox), and
//! detached only through a descriptor that shows they still hold it, never by name.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Loop devices whose backing file is at or below `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n');
            let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
            Path::new(backing)
                .starts_with(dir)
                .then(|| format!("/dev/{name}"))
        })
        .collect()
}

/// `struct loop_info64` (linux/loop.h), as `LOOP_GET_STATUS64` fills it (the kernel's
/// layout: all of it is written, the device and inode are read).
#[repr(C)]
#[allow(dead_code)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// The file a loop device is bound to: its path (as sysfs names it, without
/// " (deleted)"), device and inode; None if the device is not bound.
fn loop_backing(dev: &str, device: &File) -> Option<(PathBuf, u64, u64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero loop_info64 is valid (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 through the pointer, which
    // points at `info`.
    if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_GET_STATUS64, &mut info) } != 0 {
        return None;
    }
    let name = dev.trim_start_matches("/dev/");
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let backing = backing.trim_end_matches('\n');
    let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
    Some((PathBuf::from(backing), info.lo_device, info.lo_inode))
}

/// Detaches loop device `dev` only if it is bound to a file at or below `dir`. The check
/// and the detach go through one open descriptor of the device: while it is open, a
/// bound device cannot be cleared and bound to another file (the kernel clears it at the
/// last close). A detach by name (`losetup -d /dev/loopN`) after a check of sysfs could
/// clear a device that was ours when looked at, let go since (a lazy unmount finishing,
/// an autoclear), and just taken by another test: its mount right after mkfs then read
/// nothing ("can't read superblock on /dev/loop0").
pub fn detach_loop_device(dev: &str, dir: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(device) = File::open(dev) else {
        return;
    };
    let Some((path, device_no, inode)) = loop_backing(dev, &device) else {
        return;
    };
    if !path.starts_with(dir) {
        return;
    }
    // The path names the file the device holds (not one made there since).
    if let Ok(meta) = std::fs::metadata(&path)
        && (meta.dev(), meta.ino()) != (device_no, inode)
    {
        return;
    }
    // SAFETY: LOOP_CLR_FD takes no argument; the descriptor is open. Cleared now, or at
    // the last close where the device is still in use (a lazily unmounted filesystem).
    unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD, 0) };
}
