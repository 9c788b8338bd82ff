//! The `s3` target over https with a private CA (`ca_file`), against a second gateway of
//! this binary's cluster that speaks https alone (`rgw::tls_gateway`): its certificate
//! is trusted through `ca_file` and only through it.

use super::*;

/// On ports of its own: tests/s3.rs's plain gateway is on 7497, the benchmarks' on 7498.
fn tls() -> &'static rgw::TlsGateway {
    rgw::tls_gateway(gateway(), 7499)
}

/// A configuration with one file backend (pool `gold`) and target `off` on `endpoint`,
/// `extra` lines added to the target's table.
fn configuration(fixture: &Fixture, state: &Path, endpoint: &str, extra: &str) -> String {
    let gold = fixture.path("gold");
    std::fs::create_dir_all(&gold).unwrap();
    format!(
        "state_dir = \"{}\"\n[backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [targets.off]\nkind = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{BUCKET}\"\n\
         prefix = \"{}\"\ncredentials = \"{}\"\nencryption_key = \"{}\"\n{extra}",
        state.display(),
        gold.display(),
        fixture.prefix,
        fixture.path("credentials").display(),
        fixture.path("key").display(),
    )
}

/// `backupfs check-config` of `text`: Ok(stdout) or Err(stderr), which must be one of
/// its refusals (exit status 2).
fn check_config(fixture: &Fixture, text: &str) -> Result<String, String> {
    let path = fixture.path("backupfs.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_backupfs"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(2) => Err(stderr),
        other => panic!("check-config exited {other:?}: {stderr}"),
    }
}

#[test]
fn with_ca_file_a_backup_over_https_reads_back_exactly_through_the_mount() {
    let fixture = Fixture::new("https");
    let tls = tls();
    let mut sb = common::Sandbox::new("s3-https");
    let state = sb.mkdir("state");
    let ca_file = format!("ca_file = \"{}\"\n", tls.ca.display());
    let text = configuration(&fixture, &state, &tls.url, &ca_file);
    check_config(&fixture, &text).expect("check-config passes with ca_file");
    let source = common::random_volume(&fixture.path("gold"), "v1", 9);
    common::ok(&format!("truncate -s 20M '{}'", source.display()));
    let d = sb.start_daemon(&sb.write_config(&text));
    let id = d.backup("off", "v1 wait");
    assert_eq!(d.record("off", &id)["status"], "available");
    common::ok(&format!(
        "cmp '{}' '{}'",
        d.image("off", &id).display(),
        source.display()
    ));
    // The objects went to the bucket the plain gateway serves too: one store, two doors.
    assert!(
        fixture
            .objects()
            .iter()
            .any(|(name, _)| name.starts_with("index."))
    );
    std::fs::remove_file(d.image("off", &id)).unwrap();
    d.stop_clean();
}

#[test]
fn a_certificate_not_trusted_or_not_for_the_host_fails_check_config_naming_endpoint() {
    let fixture = Fixture::new("https-refused");
    let tls = tls();
    let state = fixture.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let refused = |endpoint: &str, extra: &str| {
        check_config(&fixture, &configuration(&fixture, &state, endpoint, extra))
            .expect_err("check-config refuses")
    };
    let named = |stderr: &str, key: &str, words: &[&str]| {
        assert!(
            stderr.contains(&format!("targets.off.{key}:"))
                && words.iter().all(|w| stderr.contains(w)),
            "{key} {words:?}: {stderr}"
        );
    };
    // Without ca_file the bundled roots do not know the private CA.
    named(
        &refused(&tls.url, ""),
        "endpoint",
        &["certificate problem", "UnknownIssuer", "set ca_file"],
    );
    // A ca_file of another CA is no better.
    let other = rgw::make_ca(fixture.scratch.path(), "other-ca");
    named(
        &refused(&tls.url, &format!("ca_file = \"{}\"\n", other.display())),
        "endpoint",
        &["certificate problem", "UnknownIssuer", "other-ca.pem"],
    );
    // The right CA, but an address the certificate does not name.
    let ca_file = format!("ca_file = \"{}\"\n", tls.ca.display());
    named(
        &refused(&tls.unnamed_url, &ca_file),
        "endpoint",
        &["certificate problem", "127.0.0.2"],
    );
    // A ca_file that holds no certificate, or is missing, names ca_file.
    let empty = fixture.path("empty.pem");
    std::fs::write(&empty, "").unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o644)).unwrap();
    named(
        &refused(&tls.url, &format!("ca_file = \"{}\"\n", empty.display())),
        "ca_file",
        &["holds no certificate"],
    );
    named(
        &refused(
            &tls.url,
            &format!("ca_file = \"{}\"\n", fixture.path("none.pem").display()),
        ),
        "ca_file",
        &["none.pem"],
    );
    // One that others may write (they would choose whom backupfs trusts).
    let open = fixture.path("open-ca.pem");
    std::fs::copy(&tls.ca, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
    named(
        &refused(&tls.url, &format!("ca_file = \"{}\"\n", open.display())),
        "ca_file",
        &["not writable by group or others"],
    );
    // And one given with an http:// endpoint.
    named(&refused(&gateway().url, &ca_file), "ca_file", &["http://"]);
    // At start-up (the daemon opens the target the same way): the error names endpoint.
    let mut config = fixture.config();
    config.endpoint = tls.url.clone();
    match s3::open("t", &config) {
        Err(S3Error::Config { key, message }) => {
            assert_eq!(key, "targets.t.endpoint", "{message}");
            assert!(message.contains("certificate problem"), "{message}");
        }
        other => panic!("opened: {:?}", other.err()),
    }
    config.ca_file = Some(tls.ca.clone());
    drop(s3::open("t", &config).unwrap());
}
