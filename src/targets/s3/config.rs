//! The keys of a `[targets.<name>]` table with `kind = "s3"`, and their validation; every
//! error names its key. Reading files (credentials, key, CA certificates) and asking the
//! gateway is left to `open` and `probe`.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3TargetConfig {
    /// `"s3"` (present when the table is read whole; a tagged reader strips it).
    #[serde(default)]
    pub kind: Option<String>,
    /// `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// A PEM file of the CA certificates that alone are trusted for an https `endpoint`
    /// (a private CA); without it, the Mozilla roots bundled with backupfs.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Must exist; never made by backupfs.
    pub bucket: String,
    /// Objects live under it (`site-a/`); empty: the bucket's root.
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// AWS-style credentials file (`[profile]`, `aws_access_key_id`, `aws_secret_access_key`).
    pub credentials: PathBuf,
    #[serde(default = "default_profile")]
    pub profile: String,
    /// The target key (`backupfs keygen FILE`); required unless `encryption = "none"`.
    #[serde(default)]
    pub encryption_key: Option<PathBuf>,
    /// `"aes-256-gcm"` (default) or `"none"`.
    #[serde(default = "default_encryption")]
    pub encryption: String,
    /// `"zstd"` (default) or `"none"`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Seconds any one request may take, 1 to 300.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// As for every target: per volume, keep the newest N backups (0: all).
    #[serde(default)]
    pub keep_last: u32,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_profile() -> String {
    "default".to_string()
}

fn default_encryption() -> String {
    "aes-256-gcm".to_string()
}

fn default_compression() -> String {
    "zstd".to_string()
}

fn default_timeout() -> u64 {
    30
}

/// S3's bucket naming rules (3-63 of lower-case letters, digits, `.` and `-`, starting
/// and ending with a letter or digit).
fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

impl S3TargetConfig {
    /// Every problem of the table, each naming its key (`targets.<name>.<key>`); empty
    /// when it is valid. Files are not read here.
    pub fn validate(&self, target: &str) -> Vec<String> {
        let key = |k: &str| format!("targets.{target}.{k}");
        let mut errors = Vec::new();
        if let Some(kind) = &self.kind
            && kind != "s3"
        {
            errors.push(format!("{}: {kind:?} is not \"s3\"", key("kind")));
        }
        let endpoint = self
            .endpoint
            .strip_prefix("http://")
            .or_else(|| self.endpoint.strip_prefix("https://"));
        match endpoint {
            Some(rest)
                if !rest.trim_end_matches('/').is_empty()
                    && !rest
                        .trim_end_matches('/')
                        .contains(['/', '@', '?', '#', ' ']) => {}
            _ => errors.push(format!(
                "{}: {:?} is not http://host[:port] or https://host[:port]",
                key("endpoint"),
                self.endpoint
            )),
        }
        if let Some(path) = &self.ca_file {
            if self.endpoint.starts_with("http://") {
                errors.push(format!(
                    "{}: set with an http:// endpoint, which uses no certificates: give the endpoint as https:// or leave ca_file out",
                    key("ca_file")
                ));
            } else if !path.is_absolute() {
                errors.push(format!(
                    "{}: {} is not an absolute path",
                    key("ca_file"),
                    path.display()
                ));
            }
        }
        if !valid_bucket(&self.bucket) {
            errors.push(format!(
                "{}: {:?} is not an S3 bucket name (3-63 lower-case letters, digits, '.', '-')",
                key("bucket"),
                self.bucket
            ));
        }
        if self.prefix.starts_with('/')
            || self.prefix.len() > 512
            || !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'\\')
        {
            errors.push(format!(
                "{}: {:?} must be printable ASCII without spaces or a leading '/'",
                key("prefix"),
                self.prefix
            ));
        }
        if self.region.is_empty() || !self.region.bytes().all(|b| b.is_ascii_graphic()) {
            errors.push(format!(
                "{}: {:?} is not a region",
                key("region"),
                self.region
            ));
        }
        if !self.credentials.is_absolute() {
            errors.push(format!(
                "{}: {} is not an absolute path",
                key("credentials"),
                self.credentials.display()
            ));
        }
        if self.profile.is_empty() {
            errors.push(format!("{}: empty", key("profile")));
        }
        match (self.encryption.as_str(), &self.encryption_key) {
            ("aes-256-gcm", None) => errors.push(format!(
                "{}: required (make one with `backupfs keygen FILE`), unless encryption = \"none\"",
                key("encryption_key")
            )),
            ("aes-256-gcm" | "none", Some(path)) if !path.is_absolute() => errors.push(format!(
                "{}: {} is not an absolute path",
                key("encryption_key"),
                path.display()
            )),
            ("aes-256-gcm" | "none", _) => {}
            (other, _) => errors.push(format!(
                "{}: {other:?} is not \"aes-256-gcm\" or \"none\"",
                key("encryption")
            )),
        }
        if !matches!(self.compression.as_str(), "zstd" | "none") {
            errors.push(format!(
                "{}: {:?} is not \"zstd\" or \"none\"",
                key("compression"),
                self.compression
            ));
        }
        if !(1..=300).contains(&self.timeout) {
            errors.push(format!(
                "{}: {} is not 1 to 300 seconds",
                key("timeout"),
                self.timeout
            ));
        }
        errors
    }
}

impl S3TargetConfig {
    /// Whether two targets would share objects: the same gateway and bucket, and one
    /// prefix a prefix of the other (the storage rule: two targets never share storage).
    pub fn overlaps(&self, other: &S3TargetConfig) -> bool {
        let host = |url: &str| url.trim_end_matches('/').to_ascii_lowercase();
        host(&self.endpoint) == host(&other.endpoint)
            && self.bucket == other.bucket
            && (self.prefix.starts_with(&other.prefix) || other.prefix.starts_with(&self.prefix))
    }
}

/// The checks of every `kind = "s3"` target of a configuration (what `check-config`
/// reports, each naming its key): its own keys, then its files and its gateway (`probe`,
/// which writes nothing), `key` (an s3 target's records are sealed with a key derived
/// from its `encryption_key`), and two s3 targets over the same objects.
pub fn check(config: &crate::config::Config, errors: &mut Vec<crate::config::ConfigError>) {
    use crate::registry::TargetKind;
    let invalid =
        |key: String, message: String| crate::config::ConfigError::Invalid { key, message };
    let s3_targets: Vec<(&String, &S3TargetConfig)> = config
        .targets
        .iter()
        .filter_map(|(name, target)| match &target.kind {
            TargetKind::S3(s3) => Some((name, s3.as_ref())),
            _ => None,
        })
        .collect();
    for (name, s3) in &s3_targets {
        let problems = s3.validate(name);
        for problem in &problems {
            let (key, message) = problem
                .split_once(": ")
                .map(|(k, m)| (k.to_string(), m.to_string()))
                .unwrap_or((format!("targets.{name}"), problem.clone()));
            errors.push(invalid(key, message));
        }
        // Its files and the gateway, read-only: a bad certificate, credentials or bucket
        // shows here, not only when the daemon starts.
        if problems.is_empty()
            && let Err(e) = super::probe(name, s3)
        {
            errors.push(match e {
                super::S3Error::Config { key, message } => invalid(key, message),
                other => invalid(format!("targets.{name}"), other.to_string()),
            });
        }
        if config.targets[*name].key.is_some() {
            errors.push(invalid(
                format!("targets.{name}.key"),
                "not for kind = \"s3\": its records are sealed with a key derived from encryption_key".to_string(),
            ));
        }
    }
    for (i, (a, sa)) in s3_targets.iter().enumerate() {
        for (b, sb) in &s3_targets[i + 1..] {
            if sa.overlaps(sb) {
                errors.push(invalid(
                    format!("targets.{b}.prefix"),
                    format!(
                        "the objects of targets.{b} (bucket {:?}, prefix {:?}) overlap those of targets.{a} (prefix {:?}): each target needs a prefix of its own",
                        sb.bucket, sb.prefix, sa.prefix
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<S3TargetConfig, toml::de::Error> {
        toml::from_str(text)
    }

    const GOOD: &str = r#"
        kind = "s3"
        endpoint = "https://rgw.example:7480"
        bucket = "backups"
        prefix = "site-a/"
        credentials = "/etc/backupfs/offsite.credentials"
        encryption_key = "/etc/backupfs/offsite.key"
    "#;

    #[test]
    fn the_issue_example_is_valid_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.validate("offsite"), Vec::<String>::new());
        assert_eq!(config.region, "us-east-1");
        assert_eq!(config.profile, "default");
        assert_eq!(config.compression, "zstd");
        assert_eq!(config.encryption, "aes-256-gcm");
        assert_eq!(config.timeout, 30);
    }

    #[test]
    fn targets_overlap_when_one_prefix_holds_the_other() {
        let a = parse(GOOD).unwrap();
        let mut b = a.clone();
        b.prefix = "site-a/sub/".into();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        b.prefix = "site-b/".into();
        assert!(!a.overlaps(&b));
        b.prefix = "".into();
        assert!(a.overlaps(&b));
        b.bucket = "other".into();
        assert!(!a.overlaps(&b));
    }

    #[test]
    fn ca_file_is_optional_and_taken_for_an_https_endpoint() {
        assert_eq!(parse(GOOD).unwrap().ca_file, None);
        let config = parse(&format!("{GOOD}\nca_file = \"/etc/backupfs/rgw-ca.pem\"\n")).unwrap();
        assert_eq!(
            config.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/backupfs/rgw-ca.pem"))
        );
        assert_eq!(config.validate("t"), Vec::<String>::new());
    }

    #[test]
    fn ca_file_with_an_http_endpoint_or_a_relative_path_is_refused_naming_it() {
        let mut config = parse(GOOD).unwrap();
        config.ca_file = Some("/etc/backupfs/rgw-ca.pem".into());
        config.endpoint = "http://rgw.example:7480".into();
        let errors = config.validate("t");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("targets.t.ca_file:") && errors[0].contains("http://"),
            "{errors:?}"
        );
        config.endpoint = "https://rgw.example:7480".into();
        config.ca_file = Some("rgw-ca.pem".into());
        let errors = config.validate("t");
        assert!(
            errors.len() == 1 && errors[0].starts_with("targets.t.ca_file:"),
            "{errors:?}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = parse(&format!("{GOOD}\nbukcet = \"x\"\n")).unwrap_err();
        assert!(error.to_string().contains("bukcet"), "{error}");
    }

    #[test]
    fn each_error_names_its_key() {
        let mut config = parse(GOOD).unwrap();
        config.endpoint = "rgw:7480".into();
        config.bucket = "Bad_Bucket".into();
        config.prefix = "/abs".into();
        config.credentials = "relative".into();
        config.encryption_key = None;
        config.compression = "lz4".into();
        config.timeout = 0;
        let errors = config.validate("t");
        for key in [
            "endpoint",
            "bucket",
            "prefix",
            "credentials",
            "encryption_key",
            "compression",
            "timeout",
        ] {
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(&format!("targets.t.{key}:"))),
                "{key}: {errors:?}"
            );
        }
        config.encryption = "none".into();
        assert!(
            !config
                .validate("t")
                .iter()
                .any(|e| e.contains("encryption_key"))
        );
    }
}
