//! Objects in memory: the store of the engine's fast test tier, and the reference the
//! other stores are held to (`tests::contract`).

use super::{ObjectStore, bad_name, valid_name};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;

#[derive(Default)]
pub struct MemStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl ObjectStore for MemStore {
    fn describe(&self) -> String {
        "memory".to_string()
    }

    fn get(&self, name: &str, cap: u64) -> io::Result<Option<Vec<u8>>> {
        match self.objects.lock().get(name) {
            Some(bytes) if bytes.len() as u64 > cap => {
                Err(io::Error::from_raw_os_error(libc::EFBIG))
            }
            found => Ok(found.cloned()),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        self.objects.lock().insert(name.to_string(), bytes.to_vec());
        Ok(())
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        let mut objects = self.objects.lock();
        if objects.contains_key(name) {
            return Ok(false);
        }
        objects.insert(name.to_string(), bytes.to_vec());
        Ok(true)
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        self.objects.lock().remove(name);
        Ok(())
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(self
            .objects
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .map(|(name, _)| name.clone())
            .collect())
    }
}
