//! The engine's one error type. Each variant says what kind of refusal or failure it is;
//! the FUSE layer turns it into an errno in exactly one place (`fs::errno`).

use crate::copy::CopyError;
use crate::targets::TargetError;
use crate::volume::VolumeError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NotPermitted(String),
    /// An extended attribute that is not set.
    #[error("{0}")]
    NoAttribute(String),
    /// The job was cancelled: backupfs is stopping.
    #[error("interrupted: backupfs stopped during the job")]
    Interrupted,
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// Stored data that does not match its checksums.
    #[error("backup {backup_id} is damaged: blocks {} (of 1 MiB) do not match their checksums", blocks.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))]
    Damaged { backup_id: String, blocks: Vec<u64> },
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub fn io(op: impl Into<String>, source: std::io::Error) -> EngineError {
        EngineError::Io {
            op: op.into(),
            source,
        }
    }

    /// Whether this is the cancellation of a stopping daemon (also when the copier saw it).
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            EngineError::Interrupted | EngineError::Copy(CopyError::Cancelled)
        )
    }

    /// The text a failed job's record, `jobs` line and log carry: always one line, since
    /// `jobs` is one line per job (tools such as qemu-img answer in several).
    pub fn reason(&self) -> String {
        let text = if self.is_interrupted() {
            EngineError::Interrupted.to_string()
        } else {
            self.to_string()
        };
        one_line(&text)
    }
}

/// A line of `jobs` or `restores`: `<who> <volume-id> <state> <done>/<total>[ <error>]`.
pub fn status_line(
    who: &str,
    volume_id: &str,
    state: &str,
    (done, total): (u64, u64),
    error: Option<&str>,
) -> String {
    let mut line = format!("{who} {volume_id} {state} {done}/{total}");
    if let Some(error) = error {
        line.push(' ');
        line.push_str(&one_line(error));
    }
    line
}

/// `text` with its lines joined by "; " and control characters dropped.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_one_line() {
        let e = EngineError::io(
            "attach",
            std::io::Error::other("qemu-img: Could not open\n\ninvalid L1 table\r\n"),
        );
        assert_eq!(
            e.reason(),
            "attach: qemu-img: Could not open; invalid L1 table"
        );
        assert!(!one_line("a\tb\u{7}\nc").contains(['\n', '\t', '\u{7}']));
        assert_eq!(
            EngineError::Copy(CopyError::Cancelled).reason(),
            "interrupted: backupfs stopped during the job"
        );
    }
}
