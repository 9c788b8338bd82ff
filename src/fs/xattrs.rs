//! Extended attributes: a record's scalar fields as read-only `user.backupfs.*` of its
//! image, operators' `user.*` kept in the record, and a volume's restore note. Setting
//! and removing run on the slow pool (`Core::set_xattr`: a record write).

use super::errno::errno;
use super::tree::Node;
use super::{BackupFs, guard};
use fuser::{Errno, INodeNo, ReplyXattr};
use std::ffi::OsStr;

pub(super) const XATTR_PREFIX: &str = "user.backupfs.";
/// A volume's note about restores: "incomplete: <reason> (<time>)".
const VOLUME_RESTORE_XATTR: &str = "user.backupfs.restore";

impl BackupFs {
    pub(super) fn get_xattr(&self, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guard("getxattr", || {
            // Only `user.*` attributes exist here. `ls -l` asks every file for
            // `security.selinux` and `system.posix_acl_access`; "not supported" (unlike
            // "no such attribute") tells it that the whole filesystem has none, and it
            // stops asking: two round trips per file fewer (issue 28). The kernel passes
            // EOPNOTSUPP on as it is (only ENOSYS would end all getxattr requests).
            if !name.to_str().is_some_and(|n| n.starts_with("user.")) {
                return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            }
            let node = self.core.node(ino);
            if let Ok(Node::Volume(b, v)) = &node {
                // A volume's note: a restore that left it incomplete.
                if name.to_str() != Some(VOLUME_RESTORE_XATTR) {
                    return reply.error(Errno::NO_XATTR);
                }
                return match self.core.engine.volume_note(b, v) {
                    Ok(Some(note)) => reply_xattr(note.as_bytes(), size, reply),
                    Ok(None) => reply.error(Errno::NO_XATTR),
                    Err(e) => reply.error(errno(&e)),
                };
            }
            let Ok(Node::Image(t, id)) = node else {
                return reply.error(Errno::NO_XATTR);
            };
            let Some(name) = name.to_str() else {
                return reply.error(Errno::NO_XATTR);
            };
            let record = match self.core.engine.record(&t, &id) {
                Ok(record) => record,
                Err(e) => return reply.error(errno(&e)),
            };
            let value = match name.strip_prefix(XATTR_PREFIX) {
                Some(field) => record
                    .scalar_fields()
                    .into_iter()
                    .find(|(k, _)| *k == field)
                    .map(|(_, v)| v),
                None => record.xattrs.get(name).cloned(),
            };
            match value {
                Some(value) => reply_xattr(value.as_bytes(), size, reply),
                None => reply.error(Errno::NO_XATTR),
            }
        })
    }

    pub(super) fn list_xattrs(&self, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guard("listxattr", || {
            let node = self.core.node(ino);
            if let Ok(Node::Volume(b, v)) = &node {
                let names = match self.core.engine.volume_note(b, v) {
                    Ok(Some(_)) => format!("{VOLUME_RESTORE_XATTR}\0").into_bytes(),
                    _ => Vec::new(),
                };
                return reply_xattr(&names, size, reply);
            }
            let Ok(Node::Image(t, id)) = node else {
                return reply_xattr(&[], size, reply);
            };
            let record = match self.core.engine.record(&t, &id) {
                Ok(record) => record,
                Err(e) => return reply.error(errno(&e)),
            };
            let mut names = Vec::new();
            for (field, _) in record.scalar_fields() {
                names.extend_from_slice(XATTR_PREFIX.as_bytes());
                names.extend_from_slice(field.as_bytes());
                names.push(0);
            }
            for name in record.xattrs.keys() {
                names.extend_from_slice(name.as_bytes());
                names.push(0);
            }
            reply_xattr(&names, size, reply)
        })
    }
}

fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}
