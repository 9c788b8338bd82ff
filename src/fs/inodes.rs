//! The inode table: which node each inode number the kernel holds stands for, counted as
//! the kernel counts its references (one per lookup reply, minus what it forgets), so the
//! table holds no more than the kernel does. Numbers are stable across restarts (a hash
//! of the path), except for the control files `request` and `verify`: every lookup of one
//! gets an inode of its own, because the kernel serialises writes (and the O_TRUNC of
//! `echo >`) per inode, and one shell's `wait` must never hold back another's request.

use super::tree::{self, Node};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Control-file inodes: this bit, and a counter (hashed numbers carry the top bit).
const FRESH: u64 = 1 << 62;

struct Entry {
    node: Stored,
    lookups: u64,
}

/// A node as the table keeps it: a backup's image or record (nearly every entry after
/// `ls -l` of a target of many backups) as its target's number and its id, 40 bytes and
/// nothing on the heap; any other node boxed (issue 28).
enum Stored {
    Backup {
        target: u16,
        image: bool,
        id: crate::ids::BackupId,
    },
    Other(Box<Node>),
}

#[derive(Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    /// The names of the targets `Stored::Backup` numbers.
    targets: Vec<String>,
}

impl Table {
    fn store(&mut self, node: &Node) -> Stored {
        let (Node::Image(target, id) | Node::Record(target, id)) = node else {
            return Stored::Other(Box::new(node.clone()));
        };
        let at = match self.targets.iter().position(|t| t == target) {
            Some(at) => at,
            None => {
                self.targets.push(target.clone());
                self.targets.len() - 1
            }
        };
        match u16::try_from(at) {
            Ok(target) => Stored::Backup {
                target,
                image: matches!(node, Node::Image(..)),
                id: id.clone(),
            },
            Err(_) => Stored::Other(Box::new(node.clone())),
        }
    }

    fn node(&self, stored: &Stored) -> Node {
        match stored {
            Stored::Backup { target, image, id } => {
                let target = self.targets[usize::from(*target)].clone();
                if *image {
                    Node::Image(target, id.clone())
                } else {
                    Node::Record(target, id.clone())
                }
            }
            Stored::Other(node) => node.as_ref().clone(),
        }
    }
}

pub struct Inodes {
    table: Mutex<Table>,
    next_fresh: AtomicU64,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut table = Table::default();
        // The root is never forgotten.
        table.entries.insert(
            tree::ROOT,
            Entry {
                node: Stored::Other(Box::new(Node::Root)),
                lookups: u64::MAX,
            },
        );
        Inodes {
            table: Mutex::new(table),
            next_fresh: AtomicU64::new(1),
        }
    }
}

/// Whether lookups of `node` each get an inode of their own.
pub fn is_fresh_per_lookup(node: &Node) -> bool {
    matches!(node, Node::Request(_) | Node::Verify(_))
}

impl Inodes {
    pub fn get(&self, ino: u64) -> Option<Node> {
        let table = self.table.lock();
        table.entries.get(&ino).map(|e| table.node(&e.node))
    }

    /// The inode number the kernel will know `node` by, taking one reference.
    pub fn lookup(&self, node: &Node) -> u64 {
        let ino = if is_fresh_per_lookup(node) {
            FRESH | self.next_fresh.fetch_add(1, Ordering::Relaxed)
        } else {
            node.ino()
        };
        let mut table = self.table.lock();
        if let Some(entry) = table.entries.get_mut(&ino) {
            entry.lookups = entry.lookups.saturating_add(1);
        } else {
            let node = table.store(node);
            table.entries.insert(ino, Entry { node, lookups: 1 });
        }
        ino
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut table = self.table.lock();
        if let Some(entry) = table.entries.get_mut(&ino) {
            entry.lookups = entry.lookups.saturating_sub(n);
            if entry.lookups == 0 {
                table.entries.remove(&ino);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_as_long_as_the_kernel_holds_them() {
        let inodes = Inodes::default();
        let volume = Node::Volume("b".into(), crate::ids::VolumeId::parse("v").unwrap());
        let ino = inodes.lookup(&volume);
        assert_eq!(inodes.lookup(&volume), ino, "stable numbers");
        assert_eq!(inodes.len(), 2);
        inodes.forget(ino, 1);
        assert_eq!(inodes.get(ino), Some(volume));
        inodes.forget(ino, 1);
        assert_eq!(inodes.get(ino), None);
        assert_eq!(inodes.len(), 1, "only the root");
        inodes.forget(tree::ROOT, 5);
        assert!(inodes.get(tree::ROOT).is_some());
    }

    #[test]
    fn backups_are_kept_in_place_and_given_back_as_the_nodes_they_were() {
        let inodes = Inodes::default();
        let id = crate::ids::BackupId::new();
        let nodes = [
            Node::Image("t".into(), id.clone()),
            Node::Record("t".into(), id.clone()),
            Node::Image("u".into(), id.clone()),
            Node::Record("u".into(), id),
            Node::Target("t".into()),
        ];
        let numbers: Vec<u64> = nodes.iter().map(|n| inodes.lookup(n)).collect();
        for (node, ino) in nodes.iter().zip(&numbers) {
            assert_eq!(inodes.get(*ino).as_ref(), Some(node));
            assert_eq!(*ino, node.ino());
        }
        assert_eq!(inodes.table.lock().targets, ["t", "u"]);
        assert!(std::mem::size_of::<Entry>() <= 48, "an entry stays small");
    }

    #[test]
    fn control_files_get_an_inode_per_lookup_and_never_pile_up() {
        let inodes = Inodes::default();
        let request = Node::Request("t".into());
        let numbers: Vec<u64> = (0..1000).map(|_| inodes.lookup(&request)).collect();
        let mut unique = numbers.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 1000);
        assert!(numbers.iter().all(|n| n & (1 << 63) == 0 && n & FRESH != 0));
        for ino in numbers {
            inodes.forget(ino, 1);
        }
        assert_eq!(inodes.len(), 1);
    }
}
