//! READDIRPLUS: a directory's entries with their attributes, so that `ls -l` of a target
//! holding many backups needs no lookup or getattr per entry (issue 28). Each entry
//! handed over this way is a reference the kernel takes, counted as a lookup's.

use super::handles::Handle;
use super::tree::Node;
use super::{BackupFs, guard};
use crate::targets::record::Record;
use fuser::{Errno, FileHandle, Generation, INodeNo, ReplyDirectoryPlus};

impl BackupFs {
    pub(super) fn list_plus(&self, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        guard("readdirplus", || {
            let core = &self.core;
            let handle = match core.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let Handle::Dir(entries) = handle.as_ref() else {
                return reply.error(Errno::ENOTDIR);
            };
            // A target lists each backup's image and record side by side: one read of
            // the record serves both.
            let mut last: Option<Record> = None;
            for i in offset as usize..entries.len() {
                let Some((node, name)) = entries.get(i) else {
                    break;
                };
                let node = &node;
                let next = i as u64 + 1;
                if i < 2 {
                    // `.` and `..`: the kernel takes no reference to them.
                    let attr =
                        super::tree::attr(node, node.ino(), &core.modes, 0, 0, core.mounted_at);
                    if reply.add(
                        INodeNo(node.ino()),
                        next,
                        &name,
                        &std::time::Duration::ZERO,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                    continue;
                }
                let record = match node {
                    Node::Image(t, id) | Node::Record(t, id) => {
                        match last.as_ref().filter(|r| r.id == *id) {
                            Some(record) => Some(record.clone()),
                            None => match core.engine.record(t, id) {
                                Ok(record) => {
                                    last = Some(record.clone());
                                    Some(record)
                                }
                                // Gone since the directory was opened: not listed.
                                Err(_) => continue,
                            },
                        }
                    }
                    _ => None,
                };
                let Ok((mut attr, ttl)) = core.attr_with(node, 0, record) else {
                    continue;
                };
                let ino = core.inodes.lookup(node);
                attr.ino = INodeNo(ino);
                // One time for the name and the attributes (a lookup's answer may keep a
                // record's name longer).
                if reply.add(INodeNo(ino), next, name, &ttl, &attr, Generation(0)) {
                    // Did not fit: not handed over, so no reference taken.
                    core.inodes.forget(ino, 1);
                    break;
                }
            }
            reply.ok()
        })
    }
}
