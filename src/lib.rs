//! backupfs: any Cinder volume backend as backup storage, served as a filesystem.
//! See ARCHITECTURE.md: `config` → `engine` (jobs) → `volume` drivers, `target`s and
//! the one `copy`ier; `fs` maps the mounted tree onto engine calls.

pub mod config;
pub mod copy;
pub mod daemon;
pub mod engine;
pub mod fs;
pub mod ids;
pub mod operator_file;
pub mod registry;
pub mod targets;
pub mod volume;
