//! Keys and files of an `s3` target refused at open, each error naming its key.

use super::*;

#[test]
fn a_wrong_or_missing_key_is_refused_at_open_naming_encryption_key() {
    let fixture = Fixture::new("wrongkey");
    drop(fixture.open());
    let mut config = fixture.config();
    s3::keygen(&fixture.path("other-key")).unwrap();
    config.encryption_key = Some(fixture.path("other-key"));
    match s3::open("t", &config) {
        Err(S3Error::Config { key, message }) => {
            assert_eq!(key, "targets.t.encryption_key", "{message}")
        }
        other => panic!("opened with another key: {:?}", other.err()),
    }
    config.encryption = "none".to_string();
    config.encryption_key = None;
    match s3::open("t", &config) {
        Err(S3Error::Config { key, .. }) => assert_eq!(key, "targets.t.encryption_key"),
        other => panic!("opened without a key: {:?}", other.err()),
    }
    // keygen never overwrites.
    assert!(s3::keygen(&fixture.path("key")).is_err());
    let mode = std::fs::metadata(fixture.path("key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn configuration_errors_name_their_key() {
    let fixture = Fixture::new("config");
    let open_error = |config: &S3TargetConfig| match s3::open("t", config) {
        Err(S3Error::Config { key, message }) => (key, message),
        other => panic!("opened: {:?}", other.err()),
    };
    let mut config = fixture.config();
    config.bucket = "no-such-bucket".to_string();
    assert_eq!(open_error(&config).0, "targets.t.bucket");

    let mut config = fixture.config();
    std::fs::write(
        fixture.path("bad-credentials"),
        "[default]\naws_access_key_id = TESTACCESSKEY\naws_secret_access_key = WRONG\n",
    )
    .unwrap();
    std::fs::set_permissions(
        fixture.path("bad-credentials"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    config.credentials = fixture.path("bad-credentials");
    assert_eq!(open_error(&config).0, "targets.t.credentials");
    std::fs::set_permissions(
        fixture.path("bad-credentials"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (key, message) = open_error(&config);
    assert_eq!(key, "targets.t.credentials");
    assert!(message.contains("mode"), "{message}");

    // A prefix that holds something else is never claimed; one claimed by another
    // target is refused too.
    let config = fixture.config();
    client(BUCKET)
        .put(&format!("{}operator-file", fixture.prefix), b"mine")
        .unwrap();
    let (key, message) = open_error(&config);
    assert_eq!(key, "targets.t.prefix");
    assert!(message.contains("operator-file"), "{message}");
    let mut config = fixture.config();
    config.prefix = format!("{}claimed/", fixture.prefix);
    drop(s3::open("t", &config).unwrap());
    match s3::open("other", &config) {
        Err(S3Error::Config { key, .. }) => assert_eq!(key, "targets.other.prefix"),
        other => panic!("opened: {:?}", other.err()),
    }
}
