//! The command-line programs beside the daemon: `status` and `wait` (clients of the mounted
//! tree), `gc` (a garbage collection of an s3 target by hand), `demo` (a sandbox and a
//! walk-through), the manual page. They live in the binary, not
//! the library: they use only the library's public API and never reach into a daemon.

pub mod demo;
pub mod gc;
pub mod man;
pub mod mount;
pub mod render;
pub mod status;
pub mod wait;

use std::io::Write;

/// Where `status` and `wait` look when no `--mount` is given (the systemd unit's mountpoint).
pub const DEFAULT_MOUNT: &str = "/mnt/backupfs";

/// Writes to standard output; false once it is gone (a closed pipe: `status | head`).
pub fn emit(text: &str) -> bool {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
}
