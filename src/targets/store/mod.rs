//! The object store under a catalogue: the few operations that every storage a target
//! lives on offers atomically, and all that records, checksums, claims and leases need.
//! A directory (`DirStore`: files written whole, `O_EXCL` and `link` for creation, which
//! NFS and CephFS honour), a RADOS pool (`RadosStore`: whole-object writes, exclusive
//! create) and an S3 bucket implement it; one catalogue and one lease protocol sit above.
//!
//! There is no compare-and-swap: what changes (a lease) is a chain of immutable objects
//! `<name>.<generation>`, and a change is the creation of the next generation, which
//! exactly one writer wins (see `lease`).
//!
//! Names are flat, ASCII, without `/`, at most 200 bytes; the store never follows a link
//! or waits on a FIFO, and reads at most `cap` bytes of an object (a bigger one is
//! `EFBIG`, never read).

mod dir;
mod mem;
mod rados;
mod s3;

pub use dir::DirStore;
pub use mem::MemStore;
pub use rados::RadosStore;
pub use s3::S3Store;

use std::io;

/// The storage a catalogue lives on.
pub trait ObjectStore: Send + Sync {
    /// Where it is, for messages (`/srv/backups`, `rbd:pool/ns`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
    /// The whole object, if it exists; `EFBIG` if it holds more than `cap` bytes; an
    /// entry that is not a plain object (a link, a FIFO) is an error
    /// (`volume::dir::is_not_regular`), never read.
    fn get(&self, name: &str, cap: u64) -> io::Result<Option<Vec<u8>>>;
    /// Writes the object whole, replacing what was there: a crash leaves the old or the
    /// new bytes, and once it returns the bytes are durable.
    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Creates the object with `bytes` unless it exists (false then, nothing written):
    /// of several writers racing, on any nodes, exactly one gets true.
    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> io::Result<bool>;
    /// `put` for an object rewritten again and again (a heartbeat): a store may keep
    /// what it needs to do that without new space (`DirStore` keeps a spare file).
    fn rewrite(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.put(name, bytes)
    }
    /// Removes the object; gone already is fine.
    fn delete(&self, name: &str) -> io::Result<()>;
    /// The names that start with `prefix`, in no particular order.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    /// Removes what a writer of `name` that died may have left beside it (temporaries);
    /// call only when no other writer of `name` can be alive.
    fn remove_leftovers(&self, _name: &str) {}
}

/// Whether `name` can be an object's name in every store.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
}

fn bad_name(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{name:?} is not an object name"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract every store keeps; run on each of them.
    pub fn contract(store: &dyn ObjectStore) {
        assert_eq!(store.get("a.1", 100).unwrap(), None);
        assert!(store.put_if_absent("a.1", b"one").unwrap());
        assert!(!store.put_if_absent("a.1", b"two").unwrap());
        assert_eq!(store.get("a.1", 100).unwrap().as_deref(), Some(&b"one"[..]));
        store.put("a.1", b"three").unwrap();
        assert_eq!(
            store.get("a.1", 100).unwrap().as_deref(),
            Some(&b"three"[..])
        );
        assert_eq!(
            store.get("a.1", 2).unwrap_err().raw_os_error(),
            Some(libc::EFBIG)
        );
        store.put("b.1", b"").unwrap();
        let mut names = store.list("a.").unwrap();
        names.sort();
        assert_eq!(names, ["a.1"]);
        store.delete("a.1").unwrap();
        store.delete("a.1").unwrap();
        assert_eq!(store.get("a.1", 100).unwrap(), None);
        assert!(store.put_if_absent("a.1", b"again").unwrap());
        assert!(store.put("x/y", b"").is_err());
    }

    #[test]
    fn names_are_flat_and_printable() {
        assert!(valid_name("backupfs.record.x"));
        for bad in ["", ".", "..", "a/b", "a b", "a\nb", &"x".repeat(201)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_memory_store_keeps_the_contract() {
        contract(&MemStore::default());
    }

    #[test]
    fn the_directory_store_keeps_the_contract_and_never_follows_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        contract(&store);
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("l.1")).unwrap();
        assert!(store.get("l.1", 100).is_err());
        // A link is an entry: creating over it fails, putting replaces the link itself.
        assert!(!store.put_if_absent("l.1", b"y").unwrap());
        store.put("l.1", b"y").unwrap();
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"x");
        // Rewritten again and again, an object keeps one spare, never listed; deleting
        // everything leaves nothing behind.
        for beat in 0..5 {
            store
                .rewrite("b.1", format!("beat {beat}").as_bytes())
                .unwrap();
        }
        assert_eq!(store.get("b.1", 100).unwrap().unwrap(), b"beat 4");
        let names = store.list("").unwrap();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        // (b.1's spare; a put replaced l.1's planted link, never writing through it.)
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            names.len() + 1
        );
        for name in names {
            store.delete(&name).unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"x");
    }
}
