//! The operator's first hour: `backupfs demo` builds its sandbox, backs up and restores
//! through a real mount with real shell commands, stops by itself when asked to, and
//! leaves no mount and no file behind. Also: the shipped example configuration parses.

mod common;

use common::{BIN, Sandbox, mounts_under};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const DEMO_TIMEOUT: Duration = Duration::from_secs(300);

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Stops a demo that overran: SIGTERM lets it unmount and clean up, SIGKILL if not.
fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `backupfs demo DIR` with BACKUPFS_DEMO_EXIT=1 and no terminal, as in CI.
fn run_demo(dir: &Path) -> Run {
    let mut child = Command::new(BIN)
        .arg("demo")
        .arg(dir)
        .env("BACKUPFS_DEMO_EXIT", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backupfs starts");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > DEMO_TIMEOUT {
            stop(&mut child);
            panic!("the demo did not end within {} s", DEMO_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Run {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

#[test]
fn demo_backs_up_and_restores_through_the_mount_and_leaves_nothing_behind() {
    // The sandbox (an empty directory) undoes whatever a failed demo left.
    let temp = Sandbox::new("demo-given");
    let run = run_demo(&temp.dir);
    let context = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        run.status.success(),
        "demo failed: {:?}\n{context}",
        run.status
    );
    for expected in [
        "$ echo \"demo-ext4 wait\" > mnt/backups/hdd/request",
        "$ cat mnt/backups/hdd/jobs",
        "the image and the volume are identical",
        "$ cp --sparse=always mnt/backups/hdd/",
        "mnt/volumes/ssd/demo-ext4-restored",
        "the restored volume matches the backup",
        "user.backupfs.volume_id=\"demo-ext4\"",
        "demo-sparse available 1073741824/1073741824",
    ] {
        assert!(
            run.stdout.contains(expected),
            "missing {expected:?}\n{context}"
        );
    }
    // The next steps name a program that runs as written (after `cargo run`,
    // `backupfs` is not on PATH: issue 23).
    let status_line = run
        .stdout
        .lines()
        .find(|l| l.ends_with(" status --mount mnt --watch"))
        .unwrap_or_else(|| panic!("no status step\n{context}"));
    let program = status_line.split(' ').next().unwrap_or_default();
    let runs = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        runs,
        "the next steps name {program:?}, which does not run\n{context}"
    );
    assert_eq!(mounts_under(&temp.dir), Vec::<PathBuf>::new(), "{context}");
    // The directory was given, so it stays; everything the demo made inside goes.
    let left: Vec<_> = std::fs::read_dir(&temp.dir)
        .expect("temp dir still there")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}\n{context}");
}

#[test]
fn demo_removes_the_directory_it_made() {
    let temp = Sandbox::new("demo-new");
    let dir = temp.path("new-sandbox");
    let run = run_demo(&dir);
    assert!(
        run.status.success(),
        "demo failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert_eq!(mounts_under(&temp.dir), Vec::<PathBuf>::new());
    assert!(!dir.exists(), "the demo left {}", dir.display());
}

#[test]
fn demo_refuses_a_directory_that_is_not_empty() {
    let temp = Sandbox::new("demo-full");
    let precious = temp.path("precious.txt");
    std::fs::write(&precious, "keep me").expect("write");
    let run = run_demo(&temp.dir);
    assert_eq!(run.status.code(), Some(1), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("not an empty directory"),
        "stderr:\n{}",
        run.stderr
    );
    assert_eq!(std::fs::read_to_string(&precious).expect("read"), "keep me");
    assert_eq!(mounts_under(&temp.dir), Vec::<PathBuf>::new());
}

#[test]
fn example_configuration_parses_with_every_key() {
    let text = include_str!("../contrib/backupfs.toml.example");
    let config = backupfs::config::Config::parse(text).expect("the example parses");
    assert!(config.is_target_pool("hdd", "backups"));
    assert!(config.is_target_pool("ceph", "backups"));
    assert_eq!(config.backends.len(), 3);
    assert_eq!(config.targets.len(), 2);
    let backupfs::registry::DriverConfig::Rbd(ceph) = &config.backends["ceph"].driver else {
        panic!("the ceph backend is an rbd backend");
    };
    assert_eq!(ceph.ceph_client(), "cinder");
    assert_eq!(ceph.timeouts().osd_op.as_secs(), 30);
}

#[test]
fn the_shipped_man_page_is_current() {
    let output = common::timed(Duration::from_secs(60), BIN)
        .arg("man")
        .output()
        .expect("backupfs man");
    assert!(output.status.success());
    let shipped = include_str!("../contrib/backupfs.1");
    assert!(
        String::from_utf8_lossy(&output.stdout) == shipped,
        "contrib/backupfs.1 is stale: run `backupfs man > contrib/backupfs.1`"
    );
}

#[test]
fn the_cinder_guides_cinder_conf_lines_hold_no_inline_comments() {
    // oslo.config keeps `# ...` after a value as part of the value: a copied line
    // `backupfs_mountpoint = /mnt/backupfs  # the default` names a mount called that.
    let readme = include_str!("../docs/cinder.md");
    let mut in_ini = false;
    let mut values = 0;
    for line in readme.lines() {
        match line.trim() {
            "```ini" => in_ini = true,
            "```" => in_ini = false,
            text if in_ini && !text.starts_with('#') && !text.starts_with('[') => {
                if let Some((_, value)) = text.split_once('=') {
                    values += 1;
                    assert!(
                        !value.contains('#'),
                        "inline comment in cinder.conf: {line}"
                    );
                }
            }
            _ => {}
        }
    }
    assert!(
        values >= 3,
        "the cinder.conf block of docs/cinder.md was not found"
    );
}

#[test]
fn pip_install_of_the_cinder_driver_leaves_the_checkout_as_it_was() {
    // docs/cinder.md's `pip install ./contrib/cinder` once left build/ and *.egg-info there.
    let temp = Sandbox::new("pip-install");
    let venv = temp.dir.join("venv");
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(made.success());
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/cinder");
    let before = entries(&package);
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(&package)
        .output()
        .expect("pip install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        entries(&package),
        before,
        "pip install wrote into the checkout"
    );
    assert!(venv.join("bin/python").exists());
}

fn entries(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    names
}

#[test]
fn the_ceph_cluster_script_serves_rbd_on_its_own_ports_and_stops_only_its_own_daemons() {
    // Issue 23: the old script killed whatever PIDs its state file listed. Ports other
    // than the test harness's (3300/6789), so that it runs beside the tests' cluster.
    if Command::new("sh")
        .args(["-c", "command -v ceph-mon"])
        .stdout(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        panic!("ceph-mon is missing: run ./contrib/test.sh, which installs it");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ceph-cluster.sh");
    let temp = Sandbox::new("ceph-script");
    let dir = temp.dir.join("cluster");
    // Stopped whatever happens below.
    struct Stop<'a>(&'a Path, &'a Path);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0).arg("stop").arg(self.1).status();
        }
    }
    let _stop = Stop(&script, &dir);
    let started = common::timed(Duration::from_secs(300), &script)
        .arg("start")
        .arg(&dir)
        .args(["--mon-port", "3321", "--mon-port-v1", "6791"])
        .output()
        .expect("ceph-cluster.sh start");
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let conf = dir.join("ceph.conf");
    let rbd = |args: &[&str]| {
        common::timed(Duration::from_secs(60), "rbd")
            .args(args)
            .env("CEPH_CONF", &conf)
            .output()
            .expect("rbd")
    };
    assert!(
        rbd(&["create", "--size", "4M", "rbd/tried"])
            .status
            .success()
    );
    assert_eq!(
        String::from_utf8_lossy(&rbd(&["ls", "rbd"]).stdout).trim(),
        "tried"
    );
    // A process that is not the script's, written into its PID list (as a reused PID
    // would be), survives the stop.
    let mut bystander = Command::new("sleep").arg("300").spawn().expect("sleep");
    let mut pids = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("pids"))
        .expect("pids");
    std::io::Write::write_all(
        &mut pids,
        format!("osd.9 {} 1\nosd.8 {} \n", bystander.id(), bystander.id()).as_bytes(),
    )
    .expect("write pids");
    let daemons: Vec<i32> = std::fs::read_to_string(dir.join("pids"))
        .expect("pids")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .filter(|pid| *pid != bystander.id() as i32)
        .collect();
    assert_eq!(daemons.len(), 3, "mon, mgr, osd");
    let stopped = Command::new(&script)
        .arg("stop")
        .arg(&dir)
        .status()
        .expect("stop");
    assert!(stopped.success());
    assert!(!dir.exists(), "the cluster's directory is removed");
    for pid in daemons {
        // A zombie waiting for init to reap it has stopped too.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().unwrap_or("").chars().next();
        assert!(
            stat.is_empty() || state == Some('Z'),
            "daemon {pid} still runs: {stat}"
        );
    }
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "the stop killed a process it did not start"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}
