//! The command-line programs beside the daemon: `status` and `wait` (clients of the
//! mounted tree) and `demo` (a sandbox and a walk-through). They live in the binary, not
//! the library: they use only the library's public API and never reach into a daemon.

pub mod demo;
pub mod status;
