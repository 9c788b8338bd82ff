//! Cinder itself as a client: contrib/cinder's suite runs Cinder's own code (its test
//! base and in-memory database, its backup manager) and the backupfs Cinder driver
//! against this build's daemon on real mounts. It needs the virtualenv that
//! contrib/test.sh makes, and fails, never skips, without it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_backupfs");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The suite takes about 40 s; a hung daemon or mount must not hang `cargo test`.
const TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn cinder_drives_backupfs_through_the_backup_driver() {
    let python = Path::new(REPO).join("target/cinder-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./contrib/test.sh, which makes the virtualenv with \
         cinder==29.0.0 for this test",
        python.display()
    );
    let output = tempfile::NamedTempFile::new().expect("suite log");
    let log = output.reopen().expect("suite log");
    let mut suite = Command::new(&python)
        // -c: on SIGINT, unittest ends the current test (its cleanup stops daemons
        // and detaches mounts) and stops.
        .args([
            "-m", "unittest", "discover", "-c", "-v", "-s", "tests", "-t", ".",
        ])
        .current_dir(Path::new(REPO).join("contrib/cinder"))
        .env("BACKUPFS_BIN", BIN)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("suite log"))
        .stderr(log)
        .spawn()
        .expect("the virtualenv's python runs");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = suite.try_wait().expect("wait for the suite") {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(suite.id() as i32, libc::SIGINT) };
            std::thread::sleep(Duration::from_secs(60));
            let _ = suite.kill();
            let _ = suite.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(output.path()).unwrap_or_default();
    let ran: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    let passed = status.is_some_and(|s| s.success());
    assert!(
        passed && ran > 0,
        "the Cinder suite {} after {:.0} s ({ran} tests ran):\n{text}",
        if status.is_none() {
            "timed out"
        } else {
            "failed"
        },
        started.elapsed().as_secs_f64()
    );
    // Skips are allowed only where the suite says why; show them.
    for line in text.lines().filter(|l| l.contains("skipped")) {
        eprintln!("{line}");
    }
}
