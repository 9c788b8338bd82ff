//! The shipped ways to run backupfs, run for real: the systemd unit (its ExecStartPre,
//! ExecStart, Environment, KillSignal, ExecStopPost and RestartPreventExitStatus lines,
//! run as systemd runs them, with the installed paths mapped into the sandbox), and
//! `mount.backupfs`, called exactly as mount(8) calls it and also through mount(8) itself
//! (`mount -t backupfs` and an fstab line), installed as /sbin/mount.backupfs in a
//! private mount namespace so that nothing outside the test sees it. The unit's
//! confinement: rated by `systemd-analyze security --offline=yes`, and its capability
//! bounding set, NoNewPrivileges, UMask, LimitNOFILE and MemoryDenyWriteExecute (the
//! kernel's PR_SET_MDWE) applied to the daemon it runs
//! (systemd is not PID 1 here: the device filter is only rated, and the system-call
//! filter is checked against every call the daemon and qemu-storage-daemon make).

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const UNIT: &str = include_str!("../contrib/backupfs.service");
const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/mount.backupfs");
const UNIT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/backupfs.service");
const OPERATING: &str = include_str!("../docs/operating.md");

/// Where the manual installs things (docs/operating.md), which the unit names.
const INSTALLED_BIN: &str = "/usr/local/bin/backupfs";
const INSTALLED_CONFIG: &str = "/etc/backupfs/backupfs.toml";
const INSTALLED_MNT: &str = "/mnt/backupfs";

/// The values of `key` in `section` of the unit, in order.
fn unit_values(section: &str, key: &str) -> Vec<String> {
    let mut current = "";
    let mut values = Vec::new();
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name;
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            values.push(v.trim().to_string());
        }
    }
    values
}

#[track_caller]
fn unit_value(section: &str, key: &str) -> String {
    let values = unit_values(section, key);
    assert_eq!(
        values.len(),
        1,
        "one {section}.{key} in the unit: {values:?}"
    );
    values[0].clone()
}

/// The unit run in a sandbox: the installed paths mapped to the sandbox's.
struct UnitRun {
    mnt: PathBuf,
    config: PathBuf,
}

impl UnitRun {
    /// An Exec line as systemd runs it: no shell, the unit's environment only, a leading
    /// `-` means its failure is ignored. Paths mapped. Under `timeout` when `limit` is
    /// given (the main process is bounded by the sandbox's watchdog instead).
    fn command(&self, line: &str, limit: Option<Duration>) -> (Command, bool) {
        let (line, may_fail) = match line.strip_prefix('-') {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        let words: Vec<String> = line
            .split_whitespace()
            .map(|w| {
                w.replace(INSTALLED_BIN, BIN)
                    .replace(INSTALLED_CONFIG, self.config.to_str().unwrap())
                    .replace(INSTALLED_MNT, self.mnt.to_str().unwrap())
            })
            .collect();
        // The unit's confinement that needs no systemd: its capability bounding set and
        // NoNewPrivileges through setpriv(1), its UMask and LimitNOFILE before exec.
        let mut words = words;
        if let [bounding] = unit_values("Service", "CapabilityBoundingSet").as_slice() {
            let mut caps = vec!["-all".to_string()];
            for cap in bounding.split_whitespace() {
                let name = cap.strip_prefix("CAP_").expect("CAP_ names");
                caps.push(format!("+{}", name.to_lowercase()));
            }
            let mut setpriv = vec![
                "setpriv".to_string(),
                format!("--bounding-set={}", caps.join(",")),
            ];
            if unit_values("Service", "NoNewPrivileges") == ["yes"] {
                setpriv.push("--no-new-privs".to_string());
            }
            setpriv.push("--".to_string());
            words.splice(0..0, setpriv);
        }
        let umask = unit_values("Service", "UMask")
            .first()
            .map(|m| u32::from_str_radix(m, 8).expect("an octal UMask"));
        // Raising the hard limit needs CAP_SYS_RESOURCE, which systemd has and a test
        // in a container may not: at most the hard limit the test has.
        let mut hard = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) fills the struct we own.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
        assert_eq!(got, 0);
        let nofile: Option<u64> = unit_values("Service", "LimitNOFILE")
            .first()
            .map(|n| n.parse::<u64>().expect("a number").min(hard.rlim_max));
        let deny_write_execute = unit_values("Service", "MemoryDenyWriteExecute") == ["yes"];
        let mut command = match limit {
            Some(limit) => timed(limit, &words[0]),
            None => Command::new(&words[0]),
        };
        // SAFETY: umask(2), setrlimit(2) and prctl(2) only, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if let Some(umask) = umask {
                    libc::umask(umask);
                }
                if deny_write_execute {
                    deny_write_execute_memory()?;
                }
                if let Some(nofile) = nofile {
                    let limit = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command
            .args(&words[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null());
        for environment in unit_values("Service", "Environment") {
            let (key, value) = environment.split_once('=').expect("KEY=VALUE");
            command.env(key, value.trim_matches('"'));
        }
        (command, may_fail)
    }

    /// Runs the Exec lines of `key` to their end, as systemd does for ExecStartPre and
    /// ExecStopPost.
    #[track_caller]
    fn run_all(&self, key: &str) {
        for line in unit_values("Service", key) {
            let (mut command, may_fail) = self.command(&line, Some(Duration::from_secs(60)));
            let out = command.output().unwrap();
            assert!(out.status.success() || may_fail, "{key}={line}: {out:?}");
        }
    }

    /// ExecStartPre, then ExecStart as the main process (Type=simple).
    #[track_caller]
    fn start(&self, sb: &mut Sandbox) -> Daemon {
        assert_eq!(unit_value("Service", "Type"), "simple");
        self.run_all("ExecStartPre");
        let (command, _) = self.command(&unit_value("Service", "ExecStart"), None);
        sb.start_daemon_command(command, &self.mnt, Path::new("/run/backupfs"))
    }
}

/// MemoryDenyWriteExecute without systemd: the kernel's own switch (Linux 6.3), which
/// children inherit. Only between fork and exec.
fn deny_write_execute_memory() -> std::io::Result<()> {
    // SAFETY: prctl(2) with integer arguments only.
    let done = unsafe {
        libc::prctl(
            libc::PR_SET_MDWE,
            libc::PR_MDWE_REFUSE_EXEC_GAIN as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn signal_number(name: &str) -> libc::c_int {
    match name {
        "SIGTERM" => libc::SIGTERM,
        "SIGINT" => libc::SIGINT,
        "SIGHUP" => libc::SIGHUP,
        "SIGQUIT" => libc::SIGQUIT,
        other => panic!("KillSignal={other}: not a signal backupfs stops on"),
    }
}

#[test]
fn systemd_unit_is_rated_at_most_6_by_systemd_analyze() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: systemd-analyze is not installed (Debian package systemd)");
        return;
    }
    let out = timed(Duration::from_secs(60), "systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", UNIT_PATH])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for backupfs.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {out:?}"));
    assert!(level <= 6.0, "exposure {level}, more than 6.0:\n{text}");
}

#[test]
fn systemd_unit_keeps_its_mount_visible_to_the_host() {
    // Each of these gives the service a mount namespace of its own, whose mounts systemd
    // keeps from propagating to the host: Cinder would see an empty mountpoint.
    for key in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "BindPaths",
        "BindReadOnlyPaths",
        "TemporaryFileSystem",
        "RootDirectory",
        "RootImage",
        "MountFlags",
    ] {
        assert_eq!(
            unit_values("Service", key),
            Vec::<String>::new(),
            "{key}= would hide the FUSE mount from the host"
        );
    }
    // What the daemon and qemu-storage-daemon need stays allowed.
    let caps = unit_value("Service", "CapabilityBoundingSet");
    assert!(
        caps.split_whitespace().any(|c| c == "CAP_SYS_ADMIN"),
        "{caps}"
    );
    assert_eq!(unit_value("Service", "DeviceAllow"), "/dev/fuse rw");
    assert!(unit_values("Service", "SystemCallFilter")[0].contains("@mount"));
}

/// The system calls of systemd's groups (`systemd-analyze syscall-filter`), each group
/// expanded to its calls.
fn syscall_groups() -> std::collections::HashMap<String, Vec<String>> {
    let out = timed(Duration::from_secs(60), "systemd-analyze")
        .arg("syscall-filter")
        .output()
        .unwrap();
    let mut groups: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut current = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let word = line.trim();
        if word.is_empty() || word.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') {
            current = word.to_string();
        } else {
            groups
                .entry(current.clone())
                .or_default()
                .push(word.to_string());
        }
    }
    groups
}

fn expand(
    groups: &std::collections::HashMap<String, Vec<String>>,
    name: &str,
    into: &mut std::collections::BTreeSet<String>,
) {
    match name.strip_prefix('@') {
        Some(_) => {
            for member in groups.get(name).map(Vec::as_slice).unwrap_or_default() {
                expand(groups, member, into);
            }
        }
        None => {
            into.insert(name.to_string());
        }
    }
}

#[test]
fn systemd_unit_system_call_filter_allows_every_call_the_daemon_makes() {
    for tool in ["systemd-analyze", "strace"] {
        if Command::new(tool).arg("--version").output().is_err() {
            println!("skipped: {tool} is not installed");
            return;
        }
    }
    // What the unit allows: its allow list, less its deny list.
    let groups = syscall_groups();
    let filters = unit_values("Service", "SystemCallFilter");
    let (mut allowed, mut denied) = (Default::default(), Default::default());
    for filter in &filters {
        let (list, set) = match filter.strip_prefix('~') {
            Some(list) => (list, &mut denied),
            None => (filter.as_str(), &mut allowed),
        };
        for name in list.split_whitespace() {
            expand(&groups, name, set);
        }
    }
    assert!(
        allowed.contains("mount") && allowed.contains("read"),
        "{filters:?}"
    );

    // The daemon, traced with its qemu-storage-daemon children: a backup, reads of an
    // image, a restore with cp, a qcow2 volume read and written through its export
    // (with no writable-executable memory, as the unit says).
    let mut sb = Sandbox::new("unit-syscalls");
    let vols = sb.mkdir("vols");
    ok(&format!(
        "qemu-img create -q -f qcow2 '{}' 8M",
        vols.join("volume-q").display()
    ));
    let l = layout(
        &mut sb,
        None,
        None,
        &format!(
            "[backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\" }}",
            vols.display()
        ),
    );
    let source = random_volume(&l.gold, "v", 2);
    let (mnt, runtime_dir, trace) = (sb.path("mnt"), sb.path("run"), sb.path("strace.txt"));
    let mut command = Command::new("strace");
    command
        .args(["-f", "-qq", "-c", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(BIN)
        .arg("mount")
        .arg(&mnt)
        .arg("--config")
        .arg(&l.config)
        .env("RUNTIME_DIRECTORY", &runtime_dir);
    if unit_values("Service", "MemoryDenyWriteExecute") == ["yes"] {
        // SAFETY: prctl(2) only, between fork and exec.
        unsafe { command.pre_exec(deny_write_execute_memory) };
    }
    let mut d = sb.start_daemon_command(command, &mnt, &runtime_dir);
    let id = d.backup("hdd", "v wait");
    ok(&format!(
        "cmp '{}' '{}' && cp '{}' '{}' && cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display(),
        d.image("hdd", &id).display(),
        d.volume("ssd", "r").display(),
        d.volume("ssd", "r").display(),
        source.display()
    ));
    let qcow2 = d.volume("qc", "q");
    ok(&format!(
        "dd if=/dev/urandom of='{q}' bs=1M count=1 conv=notrunc status=none && cat '{q}' >/dev/null",
        q = qcow2.display()
    ));
    // umount ends the daemon, and strace with it: then it writes its count.
    ok(&format!("umount '{}'", mnt.display()));
    assert!(d.wait_exit().success(), "log:\n{}", d.log());

    let counted = std::fs::read_to_string(&trace).unwrap();
    let mut called = Vec::new();
    for line in counted.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() >= 5
            && words[0].parse::<f64>().is_ok()
            && let Some(name) = words.last()
            && *name != "total"
        {
            called.push(name.to_string());
        }
    }
    assert!(called.iter().any(|c| c == "mount"), "{counted}");
    let refused: Vec<&String> = called
        .iter()
        .filter(|c| !allowed.contains(*c) || denied.contains(*c))
        .collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter refuses {refused:?}, which the daemon calls:\n{counted}"
    );
}

#[test]
fn systemd_unit_names_only_paths_the_manual_installs() {
    let install = OPERATING
        .split("## Running it for real")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the manual's install steps (docs/operating.md)");
    for key in ["ExecStartPre", "ExecStart", "ExecStopPost"] {
        for line in unit_values("Service", key) {
            for path in line
                .split_whitespace()
                .filter(|w| w.starts_with("-/") || w.starts_with('/'))
            {
                let path = path.trim_start_matches('-');
                if path.starts_with("/bin/") || path.starts_with("/usr/bin/") {
                    // A system tool: it must be there.
                    assert!(Path::new(path).exists(), "{key}={line}: {path} is missing");
                } else {
                    assert!(
                        install.contains(path),
                        "{key}={line}: {path} is not in the install steps of docs/operating.md"
                    );
                }
            }
        }
    }
}

#[test]
fn systemd_unit_starts_serves_stops_and_recovers_the_daemon() {
    // The unit names the paths the manual (docs/operating.md) installs to.
    let exec_start = unit_value("Service", "ExecStart");
    for path in [INSTALLED_BIN, INSTALLED_CONFIG, INSTALLED_MNT] {
        assert!(exec_start.contains(path), "ExecStart={exec_start}");
    }
    assert_eq!(
        exec_start,
        format!("{INSTALLED_BIN} mount {INSTALLED_MNT} --config {INSTALLED_CONFIG}")
    );

    let mut sb = Sandbox::new("unit");
    let l = layout(&mut sb, None, None, "");
    let source = random_volume(&l.gold, "v", 2);
    let run = UnitRun {
        mnt: sb.path("unit-mnt"),
        config: l.config.clone(),
    };
    assert!(!run.mnt.exists());

    // systemctl start: ExecStartPre makes the mountpoint, ExecStart serves it.
    let mut d = run.start(&mut sb);
    // ... confined as the unit says, and still mounting and backing up.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let bit = |cap: &str| match cap {
        "CAP_DAC_OVERRIDE" => 1u64 << 1,
        "CAP_DAC_READ_SEARCH" => 1 << 2,
        "CAP_FOWNER" => 1 << 3,
        "CAP_SYS_ADMIN" => 1 << 21,
        other => panic!("{other}: add its number here"),
    };
    let bounding: u64 = unit_value("Service", "CapabilityBoundingSet")
        .split_whitespace()
        .map(bit)
        .sum();
    assert_eq!(field("CapBnd:"), format!("{bounding:016x}"));
    assert_eq!(field("CapEff:"), format!("{bounding:016x}"));
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Umask:"), unit_value("Service", "UMask"));
    let id = d.backup("hdd", "v wait");
    ok(&format!(
        "cmp '{}' '{}'",
        d.image("hdd", &id).display(),
        source.display()
    ));
    assert!(
        d.log().contains("backupfs mounted"),
        "the unit's BACKUPFS_LOG filter keeps info lines:\n{}",
        d.log()
    );
    // systemctl stop: KillSignal, then the main process must exit successfully (no
    // restart), and ExecStopPost runs (its failure to find a mount is ignored).
    d.signal(signal_number(&unit_value("Service", "KillSignal")));
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(!is_fuse_mount(&run.mnt));
    run.run_all("ExecStopPost");
    drop(d);

    // A crash (the unit restarts on failure): ExecStopPost clears the dead mount, and the
    // restarted daemon serves the same backups.
    assert_eq!(unit_value("Service", "Restart"), "on-failure");
    let d = run.start(&mut sb);
    d.crash();
    assert_errno(
        std::fs::read_dir(&run.mnt),
        libc::ENOTCONN,
        "the mount of a killed daemon",
    );
    run.run_all("ExecStopPost");
    assert!(
        !is_fuse_mount(&run.mnt),
        "ExecStopPost detached the dead mount"
    );
    let mut d = run.start(&mut sb);
    assert_eq!(d.record("hdd", &id)["status"], "available");
    d.signal(signal_number(&unit_value("Service", "KillSignal")));
    assert_eq!(d.wait_exit().code(), Some(0));
    run.run_all("ExecStopPost");
    drop(d);

    // A configuration error ends with a status the unit does not restart on.
    std::fs::write(&run.config, "max_paralel_jobs = 2\n").unwrap();
    run.run_all("ExecStartPre");
    let (mut command, _) = run.command(&exec_start, Some(Duration::from_secs(60)));
    let out = command.output().unwrap();
    let prevent = unit_value("Service", "RestartPreventExitStatus");
    let code = out.status.code().expect("an exit status").to_string();
    assert!(
        prevent.split_whitespace().any(|c| c == code),
        "exit status {code} is not in RestartPreventExitStatus={prevent}: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_paralel_jobs"),
        "{out:?}"
    );
    assert!(!is_fuse_mount(&run.mnt));
}

/// `mount.backupfs <config> <mountpoint> -o <options>`, as mount(8) runs it.
fn helper(sb: &Sandbox, args: &[&str], cwd: &Path) -> Output {
    timed(Duration::from_secs(90), HELPER)
        .args(args)
        .current_dir(cwd)
        .env("BACKUPFS", BIN)
        .env("BACKUPFS_MOUNT_LOG", sb.path("mount.log"))
        .env("BACKUPFS_MOUNT_WAIT", "60")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The backupfs processes serving `mnt` (the helper detaches them from the test).
fn daemons_of(mnt: &Path) -> Vec<i32> {
    processes_under(mnt)
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == Path::new(BIN))
        })
        .collect()
}

#[test]
fn mount_helper_starts_the_daemon_in_the_background_and_umount_stops_it() {
    let mut sb = Sandbox::new("helper");
    let l = layout(&mut sb, None, None, "");
    random_volume(&l.gold, "v", 2);
    let mnt = sb.mkdir("mnt");
    let (config, mnt_arg) = (l.config.to_str().unwrap(), mnt.to_str().unwrap());

    // -f (fake) checks and mounts nothing.
    let out = helper(&sb, &[config, mnt_arg, "-f", "-o", "rw"], &sb.dir);
    assert!(out.status.success(), "{out:?}");
    assert!(!is_fuse_mount(&mnt));

    // It returns once the mount is there; mount options are accepted and ignored.
    let out = helper(&sb, &[config, mnt_arg, "-o", "rw,noatime,_netdev"], &sb.dir);
    assert!(out.status.success(), "{out:?}");
    assert!(is_fuse_mount(&mnt), "mounted when the helper returns");
    let daemons = daemons_of(&mnt);
    assert_eq!(
        daemons.len(),
        1,
        "one daemon in the background: {daemons:?}"
    );
    assert_eq!(
        names_in(&mnt.join("backups/hdd")),
        ["by-volume", "jobs", "request", "verify"]
    );
    assert_eq!(
        write_errno(&mnt.join("backups/hdd/request"), b"v wait\n"),
        None
    );
    let log = std::fs::read_to_string(sb.path("mount.log")).unwrap();
    assert!(
        log.contains("backupfs mounted"),
        "the daemon logs there:\n{log}"
    );

    // A second mount of the same mountpoint is refused with mount(8)'s failure status.
    let out = helper(&sb, &[config, mnt_arg, "-o", "rw"], &sb.dir);
    assert_eq!(out.status.code(), Some(32), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already mounted"),
        "{out:?}"
    );
    assert_eq!(daemons_of(&mnt), daemons);

    // umount stops the daemon.
    ok(&format!("umount '{}'", mnt.display()));
    wait_for(
        || daemons_of(&mnt).is_empty(),
        "the daemon to exit after umount",
    );
    assert!(!is_fuse_mount(&mnt));
    let log = std::fs::read_to_string(sb.path("mount.log")).unwrap();
    assert!(log.contains("backupfs stopped"), "{log}");

    // A configuration given relative to the current directory works too.
    let out = helper(&sb, &["backupfs.toml", mnt_arg, "-o", "rw"], &sb.dir);
    assert!(out.status.success(), "{out:?}");
    assert!(is_fuse_mount(&mnt));
    assert_eq!(names_in(&mnt.join("volumes/ssd")), ["v"]);
    ok(&format!("umount '{}'", mnt.display()));
    wait_for(
        || daemons_of(&mnt).is_empty(),
        "the daemon to exit after umount",
    );

    // A bad configuration fails at once, naming the key, and starts nothing.
    std::fs::write(&l.config, "max_paralel_jobs = 2\n").unwrap();
    let out = helper(&sb, &[config, mnt_arg, "-o", "rw"], &sb.dir);
    assert_eq!(out.status.code(), Some(32), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_paralel_jobs"),
        "{out:?}"
    );
    assert!(!is_fuse_mount(&mnt));
    assert_eq!(daemons_of(&mnt), Vec::<i32>::new());
}

#[test]
fn mount_helper_log_is_root_s_only() {
    let mut sb = Sandbox::new("helper-log");
    let l = layout(&mut sb, None, None, "");
    let mnt = sb.mkdir("mnt");
    let log = sb.path("mount.log");
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    // A new log, and one an earlier version left world-readable.
    for existing in [false, true] {
        if existing {
            std::fs::write(&log, "an earlier start\n").unwrap();
            std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let out = helper(
            &sb,
            &[l.config.to_str().unwrap(), mnt.to_str().unwrap()],
            &sb.dir,
        );
        assert!(out.status.success(), "{out:?}");
        assert_eq!(mode(&log), 0o600, "the log (existing before: {existing})");
        ok(&format!("umount '{}'", mnt.display()));
        wait_for(
            || daemons_of(&mnt).is_empty(),
            "the daemon to exit after umount",
        );
        std::fs::remove_file(&log).unwrap();
    }
}

#[test]
fn mount_t_backupfs_and_an_fstab_line_run_the_installed_helper() {
    let installed_before = Path::new("/sbin/mount.backupfs").exists();
    let mut sb = Sandbox::new("mount-t");
    let l = layout(&mut sb, None, None, "");
    random_volume(&l.gold, "v", 2);
    let mnt = sb.mkdir("mnt");
    let (upper, work) = (sb.mkdir("sbin-upper"), sb.mkdir("sbin-work"));
    let fstab = sb.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{} {} backupfs defaults 0 0\n",
            l.config.display(),
            mnt.display()
        ),
    )
    .unwrap();
    // In a mount namespace of its own, /sbin gets mount.backupfs (an overlay): mount(8)
    // finds it there as it would after `install -m 755 contrib/mount.backupfs /sbin/`.
    // The mount is checked from inside; the daemon's end is checked from here.
    let script = format!(
        r#"set -eu
sbin=$(readlink -f /sbin)
mount -t overlay overlay -o lowerdir="$sbin",upperdir='{upper}',workdir='{work}' "$sbin"
install -m 755 '{helper}' /sbin/mount.backupfs
live() {{ grep -q " {mnt} fuse" /proc/self/mounts && [ -d '{mnt}/backups' ]; }}
# After umount the daemon takes a moment to exit and free its locks (docs/troubleshooting.md).
serving() {{
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = '{bin}' ] && grep -qF '{mnt}' "$p/cmdline" 2>/dev/null && return 0
    done
    return 1
}}
gone() {{ for i in $(seq 600); do serving || return 0; sleep 0.1; done; return 1; }}
export BACKUPFS='{bin}' BACKUPFS_MOUNT_LOG='{log}' BACKUPFS_MOUNT_WAIT=60

mount -t backupfs '{config}' '{mnt}'
live
echo "v wait" > '{mnt}/backups/hdd/request'
ls '{mnt}/backups/hdd' | grep -c '\.img$'
umount '{mnt}'
! live
gone

mount -T '{fstab}' '{mnt}'
live
ls '{mnt}/volumes/ssd'
umount '{mnt}'
! live
gone
"#,
        upper = upper.display(),
        work = work.display(),
        helper = HELPER,
        mnt = mnt.display(),
        bin = BIN,
        log = sb.path("mount.log").display(),
        config = l.config.display(),
        fstab = fstab.display(),
    );
    let out = timed(Duration::from_secs(180), "unshare")
        .args(["-m", "--propagation", "private", "bash", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\nstdout: {}\nstderr: {}\nlog:\n{}",
        describe(out.status),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(sb.path("mount.log")).unwrap_or_default()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["1", "v"]
    );
    wait_for(
        || daemons_of(&mnt).is_empty(),
        "both daemons to exit after umount",
    );
    let log = std::fs::read_to_string(sb.path("mount.log")).unwrap();
    assert_eq!(log.matches("backupfs stopped").count(), 2, "{log}");
    assert_eq!(
        Path::new("/sbin/mount.backupfs").exists(),
        installed_before,
        "the helper was installed in the test's namespace only"
    );
}
