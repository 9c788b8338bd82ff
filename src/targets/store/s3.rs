//! Objects in an S3 bucket under a prefix: each written whole by one PUT (atomic on the
//! gateway), created with `If-None-Match: *` (radosgw and S3 refuse a second create with
//! 412), listed by prefix. Errors carry their errno (`ETIMEDOUT` for a gateway that stops
//! answering); what the gateway said is logged, since an errno cannot carry it.

use super::{ObjectStore, bad_name, valid_name};
use crate::targets::s3::client::{Client, Listed, errno_of};
use std::io;
use std::sync::Arc;

pub struct S3Store {
    client: Arc<Client>,
    /// Every name is stored under it (`site-a/`, or empty).
    prefix: String,
}

impl S3Store {
    pub fn new(client: Arc<Client>, prefix: &str) -> S3Store {
        S3Store {
            client,
            prefix: prefix.to_string(),
        }
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// Whether object `name` exists (HEAD: no bytes move).
    pub fn exists(&self, name: &str) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        Ok(self.client.head(&self.key(name)).map_err(plain)?.is_some())
    }

    /// The objects whose names start with `prefix`, with their sizes in bytes.
    pub fn list_sizes(&self, prefix: &str) -> io::Result<Vec<(String, u64)>> {
        self.listed(prefix, |o| o.size)
    }

    /// The objects whose names start with `prefix`, with their entity tags (a tag changes
    /// when the object is rewritten with other bytes).
    pub fn list_tags(&self, prefix: &str) -> io::Result<Vec<(String, String)>> {
        self.listed(prefix, |o| o.etag)
    }

    /// The objects whose names start with `prefix`, under their names in the store (the
    /// bucket's prefix taken off; other keys left out), with what `what` takes of each.
    fn listed<T>(&self, prefix: &str, what: impl Fn(Listed) -> T) -> io::Result<Vec<(String, T)>> {
        Ok(self
            .client
            .list(&self.key(prefix))
            .map_err(plain)?
            .into_iter()
            .filter_map(|o| {
                let name = o.key.strip_prefix(&self.prefix)?.to_string();
                valid_name(&name).then(|| (name, what(o)))
            })
            .collect())
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// The errno alone, which is what callers decide on (ETIMEDOUT, ENOENT, EACCES...); the
/// message goes to the log.
pub fn plain(e: io::Error) -> io::Error {
    match errno_of(&e) {
        Some(code) => {
            tracing::warn!("{e}");
            io::Error::from_raw_os_error(code)
        }
        None => e,
    }
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.client.endpoint().bucket, self.prefix)
    }

    fn get(&self, name: &str, cap: u64) -> io::Result<Option<Vec<u8>>> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        self.client.get(&self.key(name), cap).map_err(plain)
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        self.client.put(&self.key(name), bytes).map_err(plain)
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        self.client
            .put_if_absent(&self.key(name), bytes)
            .map_err(plain)
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        self.client.delete(&self.key(name)).map_err(plain)
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(self
            .client
            .list(&self.key(prefix))
            .map_err(plain)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&self.prefix).map(str::to_string))
            .filter(|name| valid_name(name))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::s3::client::Endpoint;
    use crate::targets::s3::sigv4::Credentials;

    /// A radosgw (or any S3) for the tests that need one: `BACKUPFS_TEST_S3=http://host:port`
    /// with the test cluster's user (TESTACCESSKEY / TESTSECRETKEY; contrib/ceph-cluster.sh
    /// `--rgw-port`). Without it these tests say so and pass: tests/s3.rs starts its own.
    pub fn test_client(bucket: &str) -> Option<Arc<Client>> {
        let url = std::env::var("BACKUPFS_TEST_S3").ok()?;
        let client = Client::new(
            Endpoint {
                url,
                bucket: bucket.to_string(),
                region: "us-east-1".to_string(),
            },
            Credentials {
                access_key: "TESTACCESSKEY".to_string(),
                secret_key: "TESTSECRETKEY".to_string(),
            },
            std::time::Duration::from_secs(10),
        )
        .unwrap();
        client.create_bucket().unwrap();
        Some(Arc::new(client))
    }

    #[test]
    fn the_s3_store_keeps_the_contract_on_radosgw() {
        let Some(client) = test_client("store-contract") else {
            eprintln!("BACKUPFS_TEST_S3 is not set: skipped");
            return;
        };
        let prefix = format!("run-{}/", uuid::Uuid::new_v4());
        let store = S3Store::new(client.clone(), &prefix);
        super::super::tests::contract(&store);
        // Another prefix of the same bucket is another store.
        let other = S3Store::new(client, &format!("other-{prefix}"));
        assert_eq!(other.list("").unwrap(), Vec::<String>::new());
        assert_eq!(other.get("a.1", 100).unwrap(), None);
        // Exactly one of several racing creates wins.
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = &store;
                    scope.spawn(move || {
                        store
                            .put_if_absent("race.1", format!("{i}").as_bytes())
                            .unwrap() as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        for name in store.list("").unwrap() {
            store.delete(&name).unwrap();
        }
    }
}
