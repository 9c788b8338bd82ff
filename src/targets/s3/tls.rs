//! https to the gateway: the CA certificates of a `ca_file` (a private CA, trusted alone
//! in place of the Mozilla roots bundled with backupfs), and what a failed TLS handshake
//! tells the operator. It never turns verification off.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The CA certificates of a `ca_file`, read and checked.
#[derive(Clone, Debug)]
pub struct CaFile {
    pub path: PathBuf,
    certificates: Vec<ureq::tls::Certificate<'static>>,
}

impl CaFile {
    /// The roots an HTTP client trusts: these certificates and no others.
    pub(super) fn root_certs(&self) -> ureq::tls::RootCerts {
        ureq::tls::RootCerts::new_with_certs(&self.certificates)
    }
}

/// More than any CA bundle holds (Debian's whole ca-certificates.crt is about 220 KiB).
const CA_FILE_MAX: u64 = 4 << 20;

/// Reads a PEM file of CA certificates (`ca_file`). Opened as the other files of an s3
/// target (`credentials`, `encryption_key`) are: following a link (a CA bundle often is
/// one), non-blocking (a FIFO planted there cannot hang the start), and only a regular
/// file is read, one that only root or this user can write (it need not be secret).
/// Other PEM blocks (a key) are passed over; a file without a certificate, or with one
/// that cannot serve as a root, is refused.
pub fn read_ca_file(path: &Path) -> Result<CaFile, String> {
    let (file, meta) = crate::operator_file::open_named(path)?;
    // Whoever can write it chooses whom backupfs trusts with the target's data.
    let euid = nix::unistd::geteuid().as_raw();
    if meta.mode() & 0o022 != 0 || (meta.uid() != euid && meta.uid() != 0) {
        return Err(format!(
            "{} (owner uid {}, mode {:04o}) must be root's or this user's and not writable by group or others: whoever can write it chooses which certificates are trusted",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let pem = crate::operator_file::read_named(path, file, CA_FILE_MAX)?;
    // ureq's own root store passes over a certificate it cannot parse; this one says so.
    let mut roots = rustls::RootCertStore::empty();
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(certificate)) => {
                roots
                    .add(rustls::pki_types::CertificateDer::from(certificate.der()))
                    .map_err(|e| {
                        format!(
                            "{}: certificate {} cannot be a trusted root: {e}",
                            path.display(),
                            certificates.len() + 1
                        )
                    })?;
                certificates.push(certificate);
            }
            Ok(_) => {}
            Err(e) => return Err(format!("{}: not a PEM file: {e}", path.display())),
        }
    }
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no certificate (a PEM file of \"-----BEGIN CERTIFICATE-----\" blocks)",
            path.display()
        ));
    }
    Ok(CaFile {
        path: path.to_path_buf(),
        certificates,
    })
}

/// The TLS failure in a transport error, if the handshake failed.
pub(super) fn failure(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(e) => Some(e),
        // rustls reports a failed handshake as an `InvalidData` I/O error around its own.
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

/// What a failed TLS handshake means, and what to change; `ca_file` is the file whose
/// certificates were trusted (None: the bundled roots).
pub(super) fn problem(tls: &rustls::Error, ca_file: Option<&Path>) -> String {
    use rustls::{CertificateError, Error};
    let trusted = match ca_file {
        Some(path) => format!("a CA of ca_file {}", path.display()),
        None => "any CA of the Mozilla roots bundled with backupfs".to_string(),
    };
    match tls {
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "certificate problem: {tls}: give the endpoint by a host name or address that the gateway's certificate names"
        ),
        Error::InvalidCertificate(CertificateError::UnknownIssuer) if ca_file.is_none() => {
            format!(
                "certificate problem: {tls}: the gateway's certificate is not signed by {trusted}; for a certificate of a private CA, set ca_file to a PEM file of that CA's certificate"
            )
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "certificate problem: {tls}: the gateway's certificate is not signed by {trusted}"
        ),
        Error::InvalidCertificate(_) => {
            format!("certificate problem: {tls} (trusted: {trusted})")
        }
        _ => format!("TLS handshake failed: {tls} (does the endpoint's port speak https?)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &[u8]) -> Result<CaFile, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        read_ca_file(&path)
    }

    #[test]
    fn a_missing_or_non_regular_ca_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = read_ca_file(&missing).unwrap_err();
        assert!(
            error.contains("missing.pem") && error.contains("No such file"),
            "{error}"
        );
        let error = read_ca_file(dir.path()).unwrap_err();
        assert!(error.contains("not a regular file"), "{error}");
    }

    #[test]
    fn a_ca_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "").unwrap();
        for mode in [0o664, 0o646] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = read_ca_file(&path).unwrap_err();
            assert!(error.contains("not writable by group or others"), "{error}");
        }
        // Readable by all is fine: it is no secret (and empty, so refused for that).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = read_ca_file(&path).unwrap_err();
        assert!(error.contains("holds no certificate"), "{error}");
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let error = read_ca_file(&path).unwrap_err();
            assert!(error.contains("owner uid 65534"), "{error}");
        }
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        for text in [
            &b""[..],
            b"not pem at all\n",
            // A key alone: passed over, which leaves no certificate.
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            let error = read(text).unwrap_err();
            assert!(error.contains("holds no certificate"), "{error}");
        }
    }

    #[test]
    fn a_certificate_block_that_is_no_certificate_is_refused() {
        let error =
            read(b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n")
                .unwrap_err();
        assert!(
            error.contains("certificate 1 cannot be a trusted root"),
            "{error}"
        );
        let error =
            read(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap_err();
        assert!(error.contains("not a PEM file"), "{error}");
    }

    #[test]
    fn certificate_failures_say_certificate_and_point_at_ca_file() {
        use rustls::{CertificateError, Error};
        let unknown = Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let without = problem(&unknown, None);
        assert!(
            without.starts_with("certificate problem:") && without.contains("set ca_file"),
            "{without}"
        );
        let with = problem(&unknown, Some(Path::new("/etc/backupfs/ca.pem")));
        assert!(with.contains("ca_file /etc/backupfs/ca.pem"), "{with}");
        let name = problem(
            &Error::InvalidCertificate(CertificateError::NotValidForName),
            None,
        );
        assert!(name.contains("host name"), "{name}");
        let other = problem(&Error::DecryptError, None);
        assert!(other.starts_with("TLS handshake failed"), "{other}");
    }
}
