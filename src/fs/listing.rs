//! READDIRPLUS: a directory's entries with their attributes, so that `ls -l` of a target
//! holding many backups needs no lookup or getattr per entry (issue 28). Each entry
//! handed over this way is a reference the kernel takes, counted as a lookup's.

use super::handles::Handle;
use super::tree::{self, Node};
use super::{BackupFs, guard};
use fuser::{Errno, FileHandle, Generation, INodeNo, ReplyDirectoryPlus};
use std::time::Duration;

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
            for i in offset as usize..entries.len() {
                let Some((node, name)) = entries.get(i) else {
                    break;
                };
                let node = &node;
                let next = i as u64 + 1;
                if i < 2 {
                    // `.` and `..`: the kernel takes no reference to them.
                    let attr = tree::attr(node, node.ino(), &core.modes, 0, 0, core.mounted_at);
                    if reply.add(
                        INodeNo(node.ino()),
                        next,
                        &name,
                        &Duration::ZERO,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                    continue;
                }
                // A target's backups: their attributes from what the listing read.
                let found = match (node, entries.listed(i)) {
                    (Node::Image(t, id), Some(listed)) => {
                        core.engine.image_allocated(t, id).map(|allocated| {
                            let attr = tree::attr(
                                node,
                                0,
                                &core.modes,
                                listed.size,
                                allocated / 512,
                                listed.completed,
                            );
                            // One time serves the name and the attributes here: the
                            // name's (a deletion elsewhere must show within seconds).
                            (attr, tree::ttl(node).min(tree::NAME_TTL))
                        })
                    }
                    (Node::Record(..), Some(listed)) => {
                        let attr = tree::attr(
                            node,
                            0,
                            &core.modes,
                            u64::from(listed.shown_len),
                            0,
                            listed.completed,
                        );
                        Ok((attr, tree::status_ttl(listed.status)))
                    }
                    // A backend's volumes: as the driver listed them, kept no time, so
                    // that using one asks (a qcow2 image whose header is refused is
                    // listed, but its stat fails with EPERM), and a plain `ls` asks the
                    // driver nothing per volume (an RBD volume's stat is a round trip).
                    (Node::Volume(..), _) => {
                        let (size, allocated, mtime) =
                            entries.volume(i).unwrap_or((0, 0, core.mounted_at));
                        Ok((
                            tree::attr(node, 0, &core.modes, size, allocated / 512, mtime),
                            Duration::ZERO,
                        ))
                    }
                    _ => core.attr_with(node, 0, None),
                };
                let (mut attr, ttl) = match found {
                    Ok(found) => found,
                    // An image whose data went since the directory was opened: gone.
                    Err(_) if matches!(node, Node::Image(..)) => continue,
                    // Listed, but what it is cannot be told now: kept no time, so that
                    // using it asks again (and gets the error).
                    Err(_) => (
                        tree::attr(node, 0, &core.modes, 0, 0, core.mounted_at),
                        Duration::ZERO,
                    ),
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
