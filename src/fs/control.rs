//! The control files' protocol: one write to `request` starts a backup, one write to
//! `verify` queues a check; reading the same open file then gives the answer (the new
//! backup's id, the verify result, or `error: <reason> (<ERRNO>)` after a refusal). A
//! write that waits is answered when its job ends, by the job: no thread waits for it.

use super::core::Core;
use super::errno::{self, errno};
use super::refuse;
use crate::engine::request::{self, USAGE};
use crate::engine::{EngineError, Failure};
use fuser::{Errno, ReplyWrite};
use parking_lot::Mutex;
use std::sync::Arc;
use tracing::warn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    Request,
    Verify,
}

pub(super) const VERIFY_USAGE: &str = "\
usage: echo <backup-id> > verify
  reads the whole backup and checks every block against its checksum; the write
  fails with EIO if any block is damaged. Reading the same open file then gives
  \"ok <backup-id>\" or \"damaged <backup-id> <block,...>\"; the result is also kept
  in the record (verified_at, damaged_blocks).
";

/// The answer to the last write through a control file. It is read from the offset of
/// the first read after it (`exec 3<>request; echo id >&3; read -r id <&3` reads at the
/// position the write left), so any shared file position works.
pub(super) struct Answer {
    text: String,
    base: Option<u64>,
}

impl Answer {
    fn read(&mut self, offset: u64, size: u32) -> Vec<u8> {
        let base = *self.base.get_or_insert(offset);
        let start = (offset.saturating_sub(base) as usize).min(self.text.len());
        let end = start.saturating_add(size as usize).min(self.text.len());
        self.text.as_bytes()[start..end].to_vec()
    }
}

/// An open control file.
pub(super) struct ControlFile {
    pub kind: Control,
    pub target: String,
    answer: Arc<Mutex<Option<Answer>>>,
}

fn set(answer: &Mutex<Option<Answer>>, text: String) {
    *answer.lock() = Some(Answer { text, base: None });
}

/// `error: <reason> (<ERRNO>)`, the one line a refused or failed write leaves to read.
fn error_line(reason: &str, code: Errno) -> String {
    format!(
        "error: {} ({})\n",
        crate::engine::error::one_line(reason),
        errno::name(code)
    )
}

/// The errno of a failed job: its cause's, or EIO when only its reason is known.
fn failure_errno(failure: &Failure) -> Errno {
    failure.cause.as_deref().map_or(Errno::EIO, errno)
}

impl ControlFile {
    pub(super) fn new(kind: Control, target: &str) -> ControlFile {
        ControlFile {
            kind,
            target: target.to_string(),
            answer: Arc::new(Mutex::new(None)),
        }
    }

    pub(super) fn read(&self, offset: u64, size: u32) -> Vec<u8> {
        match self.answer.lock().as_mut() {
            Some(answer) => answer.read(offset, size),
            None => {
                let usage = match self.kind {
                    Control::Request => USAGE,
                    Control::Verify => VERIFY_USAGE,
                };
                let start = (offset as usize).min(usage.len());
                let end = start.saturating_add(size as usize).min(usage.len());
                usage.as_bytes()[start..end].to_vec()
            }
        }
    }

    /// Answers a refusal now: the errno, the logged reason, the line to read back.
    fn refuse_now(&self, op: &str, e: &EngineError, reply: ReplyWrite) {
        let code = refuse(op, e);
        set(&self.answer, error_line(&e.to_string(), code));
        reply.error(code);
    }

    pub(super) fn write(&self, core: &Arc<Core>, data: Vec<u8>, reply: ReplyWrite) {
        match self.kind {
            Control::Request => self.write_request(core, data, reply),
            Control::Verify => self.write_verify(core, data, reply),
        }
    }

    fn write_request(&self, core: &Arc<Core>, data: Vec<u8>, reply: ReplyWrite) {
        let parsed = match request::parse(&data) {
            Ok(parsed) => parsed,
            Err(reason) => {
                warn!(
                    backup_target = self.target,
                    "request refused (EINVAL): {reason}"
                );
                set(&self.answer, error_line(&reason, Errno::EINVAL));
                return reply.error(Errno::EINVAL);
            }
        };
        let (core, target, answer) = (core.clone(), self.target.clone(), self.answer.clone());
        let written = data.len() as u32;
        // Accepting writes the record (two fsyncs): not on the session's threads.
        core.clone().pool.run(move || {
            let file = ControlFile {
                kind: Control::Request,
                target: target.clone(),
                answer: answer.clone(),
            };
            let job = match core.engine.start_backup(&target, &parsed) {
                Ok(job) => job,
                Err(e) => {
                    return file.refuse_now(&format!("backup of {}", parsed.volume_id), &e, reply);
                }
            };
            notice_end(&core, &target, &job);
            set(&answer, format!("{}\n", job.backup_id));
            if !parsed.wait {
                return reply.written(written);
            }
            let backup_id = job.backup_id.clone();
            job.on_end(move |outcome| match outcome {
                Ok(()) => reply.written(written),
                Err(failure) => {
                    let code = failure_errno(failure);
                    set(
                        &answer,
                        error_line(
                            &format!("backup {backup_id} failed: {}", failure.reason),
                            code,
                        ),
                    );
                    reply.error(code)
                }
            });
        });
    }

    fn write_verify(&self, core: &Arc<Core>, data: Vec<u8>, reply: ReplyWrite) {
        let line = String::from_utf8_lossy(&data);
        let backup_id = line
            .strip_suffix('\n')
            .unwrap_or(&line)
            .trim_end_matches(' ')
            .to_string();
        let backup_id = match crate::ids::BackupId::parse(&backup_id) {
            Ok(backup_id) => backup_id,
            Err(e) => {
                warn!(backup_target = self.target, "verify refused (EINVAL): {e}");
                set(&self.answer, error_line(&e.to_string(), Errno::EINVAL));
                return reply.error(Errno::EINVAL);
            }
        };
        let (core, target, answer) = (core.clone(), self.target.clone(), self.answer.clone());
        let written = data.len() as u32;
        core.clone().pool.run(move || {
            let file = ControlFile {
                kind: Control::Verify,
                target: target.clone(),
                answer: answer.clone(),
            };
            let job = match core.engine.start_verify(&target, &backup_id) {
                Ok(job) => job,
                Err(e) => return file.refuse_now(&format!("verify of {backup_id}"), &e, reply),
            };
            notice_end(&core, &target, &job);
            job.on_end(move |outcome| match outcome {
                Ok(()) => {
                    set(&answer, format!("ok {backup_id}\n"));
                    reply.written(written)
                }
                Err(failure) => {
                    let code = failure_errno(failure);
                    match failure.cause.as_deref() {
                        Some(EngineError::Damaged { blocks, .. }) => {
                            let list: Vec<String> = blocks.iter().map(u64::to_string).collect();
                            set(&answer, format!("damaged {backup_id} {}\n", list.join(",")));
                        }
                        _ => set(&answer, error_line(&failure.reason, code)),
                    }
                    warn!(
                        "verify of {backup_id} failed ({}): {}",
                        errno::name(code),
                        failure.reason
                    );
                    reply.error(code)
                }
            });
        });
    }
}

/// When `job` ends its record has changed: the kernel is told before any waiter is
/// answered (waiters are called in the order they came), so a `stat` after `wait` shows
/// the record as it ended.
fn notice_end(core: &Arc<Core>, target: &str, job: &crate::engine::Job) {
    let (core, target, backup_id) = (core.clone(), target.to_string(), job.backup_id.clone());
    job.on_end(move |_| core.record_changed(&target, &backup_id));
}
