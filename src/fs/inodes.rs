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
    node: Node,
    lookups: u64,
}

pub struct Inodes {
    entries: Mutex<HashMap<u64, Entry>>,
    next_fresh: AtomicU64,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut entries = HashMap::new();
        // The root is never forgotten.
        entries.insert(
            tree::ROOT,
            Entry {
                node: Node::Root,
                lookups: u64::MAX,
            },
        );
        Inodes {
            entries: Mutex::new(entries),
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
        self.entries.lock().get(&ino).map(|e| e.node.clone())
    }

    /// The inode number the kernel will know `node` by, taking one reference.
    pub fn lookup(&self, node: &Node) -> u64 {
        let ino = if is_fresh_per_lookup(node) {
            FRESH | self.next_fresh.fetch_add(1, Ordering::Relaxed)
        } else {
            node.ino()
        };
        let mut entries = self.entries.lock();
        let entry = entries.entry(ino).or_insert_with(|| Entry {
            node: node.clone(),
            lookups: 0,
        });
        entry.lookups = entry.lookups.saturating_add(1);
        ino
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut entries = self.entries.lock();
        if let Some(entry) = entries.get_mut(&ino) {
            entry.lookups = entry.lookups.saturating_sub(n);
            if entry.lookups == 0 {
                entries.remove(&ino);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
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
