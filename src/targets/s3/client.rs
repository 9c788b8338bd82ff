//! A small synchronous S3 client: the handful of requests a target needs (GET whole or a
//! range, PUT, create-only PUT, DELETE, HEAD, ListObjectsV2), path-style, signed with
//! SigV4, over `ureq`. Every request has a deadline (a gateway that stops answering fails
//! it with `ETIMEDOUT`); failures are `io::Error`s carrying an errno. It never logs a
//! secret.

use super::sigv4::{self, Credentials, EMPTY_SHA256};
use super::tls::{self, CaFile};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How a bucket is reached.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `http://host:port` or `https://host:port`, no path.
    pub url: String,
    pub bucket: String,
    pub region: String,
}

/// An object as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// The object's entity tag (changes with its bytes): what tells a rewritten record.
    pub etag: String,
}

pub struct Client {
    agent: ureq::Agent,
    endpoint: Endpoint,
    /// `host[:port]` as the HTTP client sends it in `Host`, which is signed.
    host: String,
    credentials: Credentials,
    timeout: Duration,
    /// The `ca_file` whose certificates alone are trusted (None: the bundled Mozilla roots).
    ca_file: Option<PathBuf>,
}

/// How many times a request the gateway answered with a transient failure (500, 502,
/// 503: "slow down") is sent again; a timeout is never retried, so that a stopped
/// gateway costs one deadline.
const RETRIES: u32 = 2;

fn errno(code: i32, message: String) -> io::Error {
    let kind = io::Error::from_raw_os_error(code).kind();
    // The errno stays readable through `raw_os_error` of the outer error's source chain;
    // callers decide on it with `errno_of`.
    io::Error::new(kind, Errno { code, message })
}

/// An error with an errno and a message (the S3 error code and what was asked).
#[derive(Debug)]
pub struct Errno {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Errno {}

/// The errno of an error this module made (or of a plain OS error).
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Errno>())
            .map(|inner| inner.code)
    })
}

/// What an S3 error status means as an errno.
fn status_errno(status: u16) -> i32 {
    match status {
        400 => libc::EINVAL,
        401 | 403 => libc::EACCES,
        404 => libc::ENOENT,
        409 | 412 => libc::EEXIST,
        413 => libc::EFBIG,
        416 => libc::EINVAL,
        500 | 502 | 503 => libc::EAGAIN,
        504 => libc::ETIMEDOUT,
        507 => libc::ENOSPC,
        _ => libc::EIO,
    }
}

/// The `<Code>` of an S3 error body, if it has one.
fn error_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    element(&text, "Code")
        .map(str::to_string)
        .unwrap_or_default()
}

/// The text of the first `<name>…</name>` in `xml`.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(&xml[start..end])
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Parses one page of a ListObjectsV2 answer: the objects, and the continuation token
/// when the listing is truncated.
fn parse_list(xml: &str) -> io::Result<(Vec<Listed>, Option<String>)> {
    let mut objects = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<Contents>") {
        let after = &rest[start + "<Contents>".len()..];
        let end = after
            .find("</Contents>")
            .ok_or_else(|| errno(libc::EIO, "truncated listing".to_string()))?;
        let contents = &after[..end];
        let key = element(contents, "Key")
            .ok_or_else(|| errno(libc::EIO, "listing entry without a key".to_string()))?;
        let size = element(contents, "Size")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let etag = element(contents, "ETag")
            .map(xml_unescape)
            .unwrap_or_default();
        objects.push(Listed {
            key: xml_unescape(key),
            size,
            etag,
        });
        rest = &after[end..];
    }
    let truncated = element(xml, "IsTruncated").is_some_and(|t| t.trim() == "true");
    let token = if truncated {
        Some(
            element(xml, "NextContinuationToken")
                .map(xml_unescape)
                .ok_or_else(|| errno(libc::EIO, "truncated listing without a token".into()))?,
        )
    } else {
        None
    };
    Ok((objects, token))
}

/// Reads an AWS-style credentials file (`[profile]` sections of `key = value` lines) and
/// returns the access key pair of `profile`. The file must be a regular file of root or
/// the user running backupfs that group and others cannot read or write (it is a secret,
/// and whoever can write it chooses the account, so where the backups go).
/// The most a credentials file may hold.
const CREDENTIALS_MAX: u64 = 64 << 10;

pub fn read_credentials(path: &Path, profile: &str) -> Result<Credentials, String> {
    let (file, meta) = crate::operator_file::open_named(path)?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:04o}: credentials must not be readable or writable by group or others (chmod 600)",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}: credentials must be root's or this user's (uid {euid}): whoever can write them chooses the account the backups go to",
            path.display(),
            meta.uid()
        ));
    }
    let text = crate::operator_file::read_named(path, file, CREDENTIALS_MAX)?;
    let text = String::from_utf8(text).map_err(|_| format!("{} is not text", path.display()))?;
    parse_credentials(&text, profile).ok_or_else(|| {
        format!(
            "{} has no profile [{profile}] with aws_access_key_id and aws_secret_access_key",
            path.display()
        )
    })
}

fn parse_credentials(text: &str, profile: &str) -> Option<Credentials> {
    let mut section = None::<String>;
    let (mut access, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            section = Some(
                name.strip_prefix("profile ")
                    .unwrap_or(name)
                    .trim()
                    .to_string(),
            );
            continue;
        }
        if section.as_deref() != Some(profile) {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            match key.trim() {
                "aws_access_key_id" => access = Some(value.trim().to_string()),
                "aws_secret_access_key" => secret = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key: access.filter(|a| !a.is_empty())?,
        secret_key: secret.filter(|s| !s.is_empty())?,
    })
}

/// A request's answer: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
}

impl Client {
    /// A client of `endpoint`; every request fails after `timeout` (connecting, sending
    /// and receiving included). https trusts the Mozilla roots bundled with backupfs.
    pub fn new(
        endpoint: Endpoint,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Client, String> {
        Client::with_ca_file(endpoint, credentials, timeout, None)
    }

    /// As `new`, but https trusts the certificates of `ca_file` alone when it is given.
    pub fn with_ca_file(
        endpoint: Endpoint,
        credentials: Credentials,
        timeout: Duration,
        ca_file: Option<&CaFile>,
    ) -> Result<Client, String> {
        let rest = endpoint
            .url
            .strip_prefix("http://")
            .map(|r| (r, 80))
            .or_else(|| endpoint.url.strip_prefix("https://").map(|r| (r, 443)));
        let Some((authority, default_port)) = rest else {
            return Err(format!(
                "{} is not an http:// or https:// URL",
                endpoint.url
            ));
        };
        let authority = authority.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            return Err(format!(
                "{} must be scheme://host[:port], without a path",
                endpoint.url
            ));
        }
        // The client leaves a default port out of `Host`; the signature must match.
        let host = authority
            .strip_suffix(&format!(":{default_port}"))
            .unwrap_or(authority)
            .to_string();
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .max_idle_connections(64)
            .max_idle_connections_per_host(64)
            .user_agent("backupfs")
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(match ca_file {
                        Some(ca_file) => ca_file.root_certs(),
                        None => ureq::tls::RootCerts::WebPki,
                    })
                    .build(),
            )
            .build();
        let mut endpoint = endpoint;
        endpoint.url = endpoint.url.trim_end_matches('/').to_string();
        Ok(Client {
            agent: config.into(),
            endpoint,
            host,
            credentials,
            timeout,
            ca_file: ca_file.map(|c| c.path.clone()),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn path(&self, key: &str) -> String {
        if key.is_empty() {
            format!("/{}", sigv4::uri_encode(&self.endpoint.bucket, false))
        } else {
            format!(
                "/{}/{}",
                sigv4::uri_encode(&self.endpoint.bucket, false),
                sigv4::uri_encode(key, true)
            )
        }
    }

    /// Sends one signed request; transient failures are sent again (`RETRIES`).
    fn send(
        &self,
        method: &str,
        key: &str,
        query: &[(String, String)],
        extra: &[(&str, String)],
        body: Body,
        cap: u64,
    ) -> io::Result<Answer> {
        let mut attempt = 0;
        loop {
            let answer = self.send_once(method, key, query, extra, &body, cap);
            let transient = match &answer {
                Ok(answer) => matches!(answer.status, 500 | 502 | 503),
                Err(e) => matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ),
            };
            if !transient || attempt >= RETRIES {
                return answer;
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(100 << attempt));
        }
    }

    fn send_once(
        &self,
        method: &str,
        key: &str,
        query: &[(String, String)],
        extra: &[(&str, String)],
        body: &Body,
        cap: u64,
    ) -> io::Result<Answer> {
        let path = self.path(key);
        let payload_sha256 = match body {
            Body::Empty => EMPTY_SHA256.to_string(),
            Body::Bytes(bytes) => sigv4::sha256_hex(bytes),
        };
        let amz_date = sigv4::amz_date(SystemTime::now());
        let mut headers: Vec<(String, String)> = vec![
            ("host".to_string(), self.host.clone()),
            ("x-amz-content-sha256".to_string(), payload_sha256.clone()),
            ("x-amz-date".to_string(), amz_date.clone()),
        ];
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let authorization = sigv4::authorization(
            &sigv4::Request {
                method,
                path: &path,
                query,
                headers: &headers,
                payload_sha256: &payload_sha256,
            },
            &amz_date,
            &self.endpoint.region,
            &self.credentials,
        );
        let query_text = sigv4::canonical_query(query);
        let url = if query_text.is_empty() {
            format!("{}{path}", self.endpoint.url)
        } else {
            format!("{}{path}?{query_text}", self.endpoint.url)
        };
        let what = || format!("{method} {}", self.describe_key(key));
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", authorization);
        let request = headers
            .iter()
            .filter(|(name, _)| name != "host")
            .fold(request, |request, (name, value)| {
                request.header(name.as_str(), value.as_str())
            });
        let sent = match body {
            Body::Empty => request
                .body(())
                .map_err(|e| errno(libc::EINVAL, format!("{}: {e}", what())))
                .and_then(|r| self.agent.run(r).map_err(|e| self.transport(e, &what()))),
            Body::Bytes(bytes) => request
                .body(*bytes)
                .map_err(|e| errno(libc::EINVAL, format!("{}: {e}", what())))
                .and_then(|r| self.agent.run(r).map_err(|e| self.transport(e, &what()))),
        };
        let mut response = sent?;
        let status = response.status().as_u16();
        let body = if method == "HEAD" {
            Vec::new()
        } else if !(200..300).contains(&status) {
            // An error's XML: what the log shows, never data.
            match response
                .body_mut()
                .with_config()
                .limit(64 << 10)
                .read_to_vec()
            {
                Ok(body) => body,
                Err(ureq::Error::BodyExceedsLimit(_)) => Vec::new(),
                Err(e) => return Err(self.transport(e, &what())),
            }
        } else {
            // One byte over the cap tells a bigger object from one of exactly `cap`. A
            // chunk's lands in a kept buffer (`buffers`: no fresh pages per chunk).
            let mut body = super::buffers::for_object(cap);
            match response
                .body_mut()
                .with_config()
                .limit(cap.saturating_add(1))
                .reader()
                .read_to_end(&mut body)
                .map_err(ureq::Error::from)
            {
                Ok(_) => body,
                Err(ureq::Error::BodyExceedsLimit(_)) => {
                    return Err(errno(
                        libc::EFBIG,
                        format!("{}: larger than {cap} bytes", what()),
                    ));
                }
                Err(e) => return Err(self.transport(e, &what())),
            }
        };
        if (200..300).contains(&status) && body.len() as u64 > cap {
            return Err(errno(
                libc::EFBIG,
                format!("{}: larger than {cap} bytes", what()),
            ));
        }
        Ok(Answer { status, body })
    }

    fn describe_key(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.endpoint.bucket)
    }

    /// A transport failure as an errno: a deadline passed is `ETIMEDOUT`; a failed TLS
    /// handshake is `EIO` with a message that says what to fix.
    fn transport(&self, e: ureq::Error, what: &str) -> io::Error {
        if let Some(tls) = tls::failure(&e) {
            let url = &self.endpoint.url;
            let problem = tls::problem(tls, self.ca_file.as_deref());
            return errno(libc::EIO, format!("{what} {url}: {problem}"));
        }
        let code = match &e {
            ureq::Error::Timeout(_) => libc::ETIMEDOUT,
            ureq::Error::Io(io) => match io.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => libc::ETIMEDOUT,
                io::ErrorKind::ConnectionRefused => libc::ECONNREFUSED,
                io::ErrorKind::ConnectionReset => libc::ECONNRESET,
                _ => io.raw_os_error().unwrap_or(libc::EIO),
            },
            ureq::Error::HostNotFound => libc::EHOSTUNREACH,
            ureq::Error::ConnectionFailed => libc::ECONNREFUSED,
            _ => libc::EIO,
        };
        let message = if code == libc::ETIMEDOUT {
            format!(
                "{what} {}: no answer within {} s",
                self.endpoint.url,
                self.timeout.as_secs_f64()
            )
        } else {
            format!("{what} {}: {e}", self.endpoint.url)
        };
        errno(code, message)
    }

    fn failed(&self, what: String, answer: &Answer) -> io::Error {
        let code = error_code(&answer.body);
        errno(
            status_errno(answer.status),
            format!("{what}: HTTP {} {code}", answer.status),
        )
    }

    /// The whole object, if it exists; `EFBIG` when it holds more than `cap` bytes.
    pub fn get(&self, key: &str, cap: u64) -> io::Result<Option<Vec<u8>>> {
        let answer = self.send("GET", key, &[], &[], Body::Empty, cap)?;
        match answer.status {
            200 => Ok(Some(answer.body)),
            404 => Ok(None),
            _ => Err(self.failed(format!("GET {}", self.describe_key(key)), &answer)),
        }
    }

    /// Bytes `range` of an object (fewer at its end), if it exists.
    pub fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> io::Result<Option<Vec<u8>>> {
        if range.is_empty() {
            return Ok(self.head(key)?.map(|_| Vec::new()));
        }
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let len = range.end - range.start;
        let answer = self.send("GET", key, &[], &[("range", header)], Body::Empty, len)?;
        match answer.status {
            206 => Ok(Some(answer.body)),
            // The whole object, when it is no longer than the range's start... or the
            // gateway ignored the range: cut it out ourselves.
            200 => {
                let body = answer.body;
                let start = (range.start as usize).min(body.len());
                let end = (range.end as usize).min(body.len());
                Ok(Some(body[start..end].to_vec()))
            }
            416 => Ok(Some(Vec::new())),
            404 => Ok(None),
            _ => Err(self.failed(format!("GET {}", self.describe_key(key)), &answer)),
        }
    }

    /// The object's size, if it exists.
    pub fn head(&self, key: &str) -> io::Result<Option<u64>> {
        let answer = self.send("HEAD", key, &[], &[], Body::Empty, 0)?;
        match answer.status {
            200 => Ok(Some(0)),
            404 => Ok(None),
            _ => Err(self.failed(format!("HEAD {}", self.describe_key(key)), &answer)),
        }
    }

    /// Whether the bucket exists and these credentials may use it.
    pub fn head_bucket(&self) -> io::Result<()> {
        let answer = self.send("HEAD", "", &[], &[], Body::Empty, 0)?;
        match answer.status {
            200 => Ok(()),
            404 => Err(errno(
                libc::ENOENT,
                format!("bucket {} does not exist", self.endpoint.bucket),
            )),
            401 | 403 => Err(errno(
                libc::EACCES,
                format!(
                    "bucket {}: access denied (HTTP {}): wrong credentials?",
                    self.endpoint.bucket, answer.status
                ),
            )),
            _ => Err(self.failed(format!("HEAD bucket {}", self.endpoint.bucket), &answer)),
        }
    }

    /// Makes the bucket (for tests and set-up tools: a target never makes its bucket).
    pub fn create_bucket(&self) -> io::Result<()> {
        let answer = self.send("PUT", "", &[], &[], Body::Empty, 64 << 10)?;
        match answer.status {
            200 | 204 => Ok(()),
            409 if error_code(&answer.body) == "BucketAlreadyOwnedByYou" => Ok(()),
            _ => Err(self.failed(format!("PUT bucket {}", self.endpoint.bucket), &answer)),
        }
    }

    /// Writes the object whole.
    pub fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let answer = self.send("PUT", key, &[], &[], Body::Bytes(bytes), 64 << 10)?;
        match answer.status {
            200 | 201 | 204 => Ok(()),
            _ => Err(self.failed(format!("PUT {}", self.describe_key(key)), &answer)),
        }
    }

    /// Creates the object unless it exists (`If-None-Match: *`): false when it did.
    pub fn put_if_absent(&self, key: &str, bytes: &[u8]) -> io::Result<bool> {
        let extra = [("if-none-match", "*".to_string())];
        let answer = self.send("PUT", key, &[], &extra, Body::Bytes(bytes), 64 << 10)?;
        match answer.status {
            200 | 201 | 204 => Ok(true),
            // 412: it exists; 409: another create of the same name is in flight (S3's
            // ConditionalRequestConflict), and that one wins.
            412 | 409 => Ok(false),
            _ => Err(self.failed(format!("PUT {}", self.describe_key(key)), &answer)),
        }
    }

    /// Removes the object; gone already is fine.
    pub fn delete(&self, key: &str) -> io::Result<()> {
        let answer = self.send("DELETE", key, &[], &[], Body::Empty, 64 << 10)?;
        match answer.status {
            200 | 202 | 204 | 404 => Ok(()),
            _ => Err(self.failed(format!("DELETE {}", self.describe_key(key)), &answer)),
        }
    }

    /// Every object whose key starts with `prefix` (ListObjectsV2, page by page).
    pub fn list(&self, prefix: &str) -> io::Result<Vec<Listed>> {
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![
                ("list-type".to_string(), "2".to_string()),
                ("prefix".to_string(), prefix.to_string()),
                ("max-keys".to_string(), "1000".to_string()),
            ];
            if let Some(token) = &token {
                query.push(("continuation-token".to_string(), token.clone()));
            }
            let answer = self.send("GET", "", &query, &[], Body::Empty, 16 << 20)?;
            if answer.status != 200 {
                return Err(self.failed(
                    format!("LIST s3://{}/{prefix}", self.endpoint.bucket),
                    &answer,
                ));
            }
            let text = String::from_utf8_lossy(&answer.body);
            let (page, next) = parse_list(&text)?;
            objects.extend(page);
            match next {
                Some(next) => token = Some(next),
                None => return Ok(objects),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_page_gives_keys_sizes_and_the_next_token() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys><IsTruncated>true</IsTruncated>
<NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
<Contents><Key>p/a&amp;b</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>
<ETag>&quot;x&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>p/c</Key><Size>0</Size></Contents></ListBucketResult>"#;
        let (objects, token) = parse_list(xml).unwrap();
        assert_eq!(
            objects,
            [
                Listed {
                    key: "p/a&b".into(),
                    size: 12,
                    etag: "\"x\"".into(),
                },
                Listed {
                    key: "p/c".into(),
                    size: 0,
                    etag: String::new(),
                }
            ]
        );
        assert_eq!(
            token.as_deref(),
            Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=")
        );
        let last = "<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>";
        assert_eq!(parse_list(last).unwrap(), (vec![], None));
    }

    #[test]
    fn credentials_owned_by_another_user_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(
            &path,
            "[default]\naws_access_key_id=A\naws_secret_access_key=S\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let me = nix::unistd::geteuid();
        assert!(read_credentials(&path, "default").is_ok());
        if !me.is_root() {
            return; // only root can give the file away
        }
        let other = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&path, Some(other), None).unwrap();
        let refused = read_credentials(&path, "default").unwrap_err();
        assert!(refused.contains("owned by uid 65534"), "{refused}");
    }

    #[test]
    fn credentials_come_from_the_named_profile() {
        let text = "[default]\naws_access_key_id = A1\naws_secret_access_key=S1\n\n\
                    [profile other]\n# comment\naws_access_key_id=A2\naws_secret_access_key = S2 \n";
        let default = parse_credentials(text, "default").unwrap();
        assert_eq!(
            (default.access_key.as_str(), default.secret_key.as_str()),
            ("A1", "S1")
        );
        let other = parse_credentials(text, "other").unwrap();
        assert_eq!(
            (other.access_key.as_str(), other.secret_key.as_str()),
            ("A2", "S2")
        );
        assert!(parse_credentials(text, "missing").is_none());
        assert!(!format!("{other:?}").contains("S2"));
    }

    #[test]
    fn an_endpoint_with_a_path_or_another_scheme_is_refused() {
        let endpoint = |url: &str| Endpoint {
            url: url.to_string(),
            bucket: "b".into(),
            region: "us-east-1".into(),
        };
        let credentials = Credentials {
            access_key: "a".into(),
            secret_key: "s".into(),
        };
        let timeout = Duration::from_secs(1);
        for bad in ["ftp://x", "http://x/path", "x:80", "http://u@x"] {
            assert!(
                Client::new(endpoint(bad), credentials.clone(), timeout).is_err(),
                "{bad}"
            );
        }
        let client = Client::new(endpoint("http://h:80/"), credentials.clone(), timeout).unwrap();
        assert_eq!(client.host, "h");
        let client = Client::new(endpoint("https://h:7480"), credentials, timeout).unwrap();
        assert_eq!(client.host, "h:7480");
        assert_eq!(client.path("p/a b"), "/b/p/a%20b");
    }
}
