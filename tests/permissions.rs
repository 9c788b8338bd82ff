//! Who may do what through the mount: root does everything; with `allow_other` the
//! `admin_group` reads images, records and jobs; nobody else reads anything; nobody but
//! root writes `request`, writes volumes or deletes backups. Each refusal is checked for
//! its errno: a test that passed on any failure would pass on a crash too. How much each
//! may hold open is capped too (docs/operating.md, "limits"): past a cap, EMFILE.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A group and two users made for one test, removed on Drop. Named after this process,
/// so a later run removes them if this one dies first.
struct Accounts {
    group: String,
    admin: String,
    other: String,
}

/// One operation as another user, printing `ok` or the errno's name.
const AS_USER: &str = r#"
import errno, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        fd = os.open(path, os.O_RDONLY); os.read(fd, 1); os.close(fd)
    elif op == "write":
        fd = os.open(path, os.O_WRONLY); os.write(fd, sys.argv[3].encode()); os.close(fd)
    elif op == "list":
        os.listdir(path)
    elif op == "unlink":
        os.unlink(path)
    elif op == "create":
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    elif op == "getxattr":
        os.getxattr(path, sys.argv[3])
    elif op == "readlink":
        os.readlink(path)
    else:
        sys.exit("unknown operation " + op)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"#;

impl Accounts {
    fn new(tag: char) -> Accounts {
        let base = format!("{}{}{tag}", account_prefix(), std::process::id());
        let accounts = Accounts {
            group: format!("{base}g"),
            admin: format!("{base}a"),
            other: format!("{base}o"),
        };
        // useradd takes a lock on /etc/passwd; parallel tests may meet there.
        let retry = |cmd: String| {
            ok(&format!(
                "for i in $(seq 20); do {cmd} && exit 0; sleep 0.3; done; exit 1"
            ))
        };
        retry(format!("groupadd {}", accounts.group));
        retry(format!(
            "useradd -M -N -s /bin/sh -G {} {}",
            accounts.group, accounts.admin
        ));
        retry(format!("useradd -M -N -s /bin/sh {}", accounts.other));
        accounts
    }

    /// The outcome of one operation as `user`: "ok" or an errno name ("EACCES").
    fn try_as(&self, user: &str, op: &str, path: &std::path::Path, arg: &str) -> String {
        let out = timed(Duration::from_secs(60), "runuser")
            .args(["-u", user, "--", PYTHON, "-c", AS_USER, op])
            .arg(path)
            .arg(arg)
            .output()
            .expect("runuser runs");
        assert!(out.status.success(), "{op} {}: {out:?}", path.display());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[track_caller]
    fn expect(&self, user: &str, op: &str, path: &std::path::Path, arg: &str, outcome: &str) {
        assert_eq!(
            self.try_as(user, op, path, arg),
            outcome,
            "{user}: {op} {} {arg}",
            path.display()
        );
    }

    fn uid(&self, user: &str) -> u32 {
        ok(&format!("id -u {user}")).trim().parse().expect("a uid")
    }

    fn gid(&self) -> u32 {
        ok(&format!("getent group {} | cut -d: -f3", self.group))
            .trim()
            .parse()
            .expect("a gid")
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for (tool, name) in [
            ("userdel", &self.admin),
            ("userdel", &self.other),
            ("groupdel", &self.group),
        ] {
            // Never a panic in Drop: it would abort the rest of the cleanup.
            let _ = timed(Duration::from_secs(30), tool)
                .arg(name)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[test]
fn admin_group_reads_and_nobody_else_writes_or_reads() {
    let accounts = Accounts::new('p');
    let mut sb = Sandbox::new("perms");
    // Other users must be able to reach the mountpoint itself.
    ok(&format!("chmod 755 '{}'", sb.dir.display()));
    let l = layout(
        &mut sb,
        None,
        Some(Fs::Btrfs),
        &format!("allow_other = true\nadmin_group = \"{}\"", accounts.group),
    );
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let t = d.target("hdd");
    let img = d.image("hdd", &id);
    let json = t.join(format!("{id}.json"));
    let vol = d.volume("ssd", "v");
    let (admin, other) = (accounts.admin.as_str(), accounts.other.as_str());

    // The modes with an admin group.
    let gid = accounts.gid();
    for (path, mode, group) in [
        (t.clone(), 0o040750, gid),
        (t.join("by-volume"), 0o040750, gid),
        (img.clone(), 0o100440, gid),
        (json.clone(), 0o100440, gid),
        (t.join("jobs"), 0o100440, gid),
        (t.join("request"), 0o100600, 0),
        (vol.clone(), 0o100600, 0),
        (d.mnt.join("volumes/ssd"), 0o040700, 0),
        (d.mnt.join("metrics"), 0o040750, gid),
        (d.mnt.join("metrics/backupfs.prom"), 0o100440, gid),
        (d.mnt.join("restores"), 0o100440, gid),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.mode(), meta.uid(), meta.gid()),
            (mode, 0, group),
            "{}",
            path.display()
        );
    }

    // The admin group reads images, records and jobs.
    accounts.expect(admin, "read", &img, "", "ok");
    accounts.expect(admin, "read", &json, "", "ok");
    accounts.expect(admin, "read", &t.join("jobs"), "", "ok");
    accounts.expect(admin, "list", &t, "", "ok");
    accounts.expect(admin, "list", &t.join("by-volume"), "", "ok");
    accounts.expect(admin, "getxattr", &img, "user.backupfs.id", "ok");
    accounts.expect(admin, "read", &t.join("by-volume/v/latest.img"), "", "ok");
    // ...and the metrics (node_exporter in the group) and the restores.
    let prom = d.mnt.join("metrics/backupfs.prom");
    accounts.expect(admin, "list", &d.mnt.join("metrics"), "", "ok");
    accounts.expect(admin, "read", &prom, "", "ok");
    accounts.expect(admin, "read", &d.mnt.join("restores"), "", "ok");
    accounts.expect(other, "read", &prom, "", "EACCES");
    accounts.expect(other, "read", &d.mnt.join("restores"), "", "EACCES");

    // Neither user writes anything, deletes anything or touches a volume.
    for user in [admin, other] {
        accounts.expect(user, "write", &t.join("request"), "v\n", "EACCES");
        accounts.expect(
            user,
            "write",
            &t.join("verify"),
            &format!("{id}\n"),
            "EACCES",
        );
        accounts.expect(user, "read", &t.join("request"), "", "EACCES");
        accounts.expect(user, "write", &vol, "x", "EACCES");
        accounts.expect(user, "read", &vol, "", "EACCES");
        accounts.expect(user, "list", &d.mnt.join("volumes/ssd"), "", "EACCES");
        accounts.expect(user, "unlink", &img, "", "EACCES");
        accounts.expect(user, "unlink", &json, "", "EACCES");
        accounts.expect(user, "create", &d.volume("ssd", "new"), "", "EACCES");
        accounts.expect(user, "write", &img, "x", "EACCES");
    }
    // Everybody else reads nothing below the target.
    for what in [&img, &json, &t.join("jobs")] {
        accounts.expect(other, "read", what, "", "EACCES");
    }
    accounts.expect(other, "list", &t, "", "EACCES");
    accounts.expect(other, "getxattr", &img, "user.backupfs.id", "EACCES");
    // The top of the tree is open to look at.
    accounts.expect(other, "list", &d.mnt.join("backups"), "", "ok");

    assert!(d.image("hdd", &id).exists(), "the backup is still there");
    assert_eq!(names_in(&l.gold), ["volume-v"]);
    assert_eq!(
        names_in(&t).iter().filter(|n| n.ends_with(".json")).count(),
        1,
        "no backup was requested"
    );
}

#[test]
fn without_allow_other_only_root_enters_the_mount() {
    let accounts = Accounts::new('q');
    let mut sb = Sandbox::new("owner");
    ok(&format!("chmod 755 '{}'", sb.dir.display()));
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    random_volume(&l.gold, "v", 1);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    for user in [&accounts.admin, &accounts.other] {
        accounts.expect(user, "list", &d.mnt, "", "EACCES");
        accounts.expect(user, "list", &d.mnt.join("backups"), "", "EACCES");
        accounts.expect(user, "read", &d.image("hdd", &id), "", "EACCES");
    }
    assert_eq!(
        names_in(&d.mnt),
        ["backups", "metrics", "restores", "volumes"]
    );
}

/// Opens the paths given (round robin, read-only) as `uid` with groups `gids` until
/// `most` are open or an open fails; prints "<opened> <ok|errno name>" and keeps them
/// open until killed. It drops root itself, so killing it closes the files.
const HOLD_OPEN: &str = r#"
import errno, os, sys, time
uid, gids, most, paths = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if uid != 0:
    groups = [int(g) for g in gids.split(",") if g]
    os.setgroups(groups); os.setgid(groups[0] if groups else uid); os.setuid(uid)
fds, outcome = [], "ok"
while len(fds) < most:
    try:
        fds.append(os.open(paths[len(fds) % len(paths)], os.O_RDONLY))
    except OSError as e:
        outcome = errno.errorcode[e.errno]
        break
print(len(fds), outcome, flush=True)
time.sleep(600)
"#;

/// The soft and hard RLIMIT_NOFILE the limit tests give the daemon. The caps follow
/// from it (docs/operating.md, "limits"): (320 - 256) / 2 = 32 open files in all, 32 / 8 = 4
/// per user other than root, 24 for those users together, (320 - 256) / 16 = 4 qcow2
/// exports.
const NOFILE: u64 = 320;

/// A daemon of `config` whose RLIMIT_NOFILE is `NOFILE`.
fn start_with_nofile(sb: &mut Sandbox, config: &Path) -> Daemon {
    let (mnt, runtime_dir) = (sb.path("mnt"), sb.path("run"));
    let mut command = Command::new(BIN);
    command
        .arg("mount")
        .arg(&mnt)
        .arg("--config")
        .arg(config)
        .env("RUNTIME_DIRECTORY", &runtime_dir);
    // SAFETY: setrlimit(2) only, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    sb.start_daemon_command(command, &mnt, &runtime_dir)
}

/// Starts a `HOLD_OPEN` as `uid`; (its child index, "<opened> <outcome>").
fn hold_open(
    sb: &mut Sandbox,
    uid: u32,
    gids: &[u32],
    most: usize,
    paths: &[PathBuf],
) -> (usize, String) {
    static HOLDERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = HOLDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = sb.path(&format!("held-{n}"));
    let gids: Vec<String> = gids.iter().map(u32::to_string).collect();
    let child = sb.spawn(
        Command::new(PYTHON)
            .arg("-c")
            .arg(HOLD_OPEN)
            .arg(uid.to_string())
            .arg(gids.join(","))
            .arg(most.to_string())
            .args(paths)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("holder output")),
    );
    let mut line = String::new();
    wait_for(
        || {
            line = std::fs::read_to_string(&out).unwrap_or_default();
            line.ends_with('\n')
        },
        "the holder to open its files",
    );
    (child, line.trim().to_string())
}

#[test]
fn open_files_past_the_per_user_and_total_caps_fail_emfile() {
    let accounts = Accounts::new('l');
    let mut sb = Sandbox::new("limits");
    ok(&format!("chmod 755 '{}'", sb.dir.display()));
    let l = layout(
        &mut sb,
        None,
        None,
        &format!("allow_other = true\nadmin_group = \"{}\"", accounts.group),
    );
    random_volume(&l.gold, "v", 1);
    let d = start_with_nofile(&mut sb, &l.config);
    let id = d.backup("hdd", "v wait");
    let img = d.image("hdd", &id);
    let (admin, other) = (accounts.admin.as_str(), accounts.other.as_str());
    let (admin_uid, gid) = (accounts.uid(admin), accounts.gid());
    // Let the kernel's releases of the set-up's files arrive (they are sent after close).
    std::thread::sleep(Duration::from_millis(300));

    // An admin opening one image again and again holds 4 files, then EMFILE.
    let (admin_holder, held) =
        hold_open(&mut sb, admin_uid, &[gid], 100, std::slice::from_ref(&img));
    assert_eq!(held, "4 EMFILE");
    assert!(
        d.log().contains(&format!(
            "refused (EMFILE): uid {admin_uid} has 4 files of the mount open"
        )),
        "{}",
        d.log()
    );
    accounts.expect(admin, "read", &img, "", "EMFILE");
    // Meanwhile root and other users still open.
    accounts.expect(other, "list", &d.mnt.join("backups"), "", "ok");
    std::fs::read(&img).expect("root reads the image");
    std::thread::sleep(Duration::from_millis(300));

    // Root is held to the total only: 28 beside the admin's 4, then EMFILE for all.
    // The kernel sends a release after close returns: a file closed just before may
    // still count, so fewer is retried; more is never allowed.
    let mut tries = 0;
    let root_holder = loop {
        let (holder, held) = hold_open(&mut sb, 0, &[], 100, std::slice::from_ref(&img));
        if held == "28 EMFILE" {
            break holder;
        }
        let opened: usize = held.split(' ').next().unwrap().parse().unwrap();
        assert!(opened < 28 && held.ends_with(" EMFILE"), "{held}");
        sb.release(holder);
        tries += 1;
        assert!(tries < 20, "root kept getting {held}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_errno(
        std::fs::File::open(&img),
        libc::EMFILE,
        "root past the total",
    );
    accounts.expect(other, "list", &d.mnt.join("backups"), "", "EMFILE");
    assert!(
        d.log()
            .contains("refused (EMFILE): 32 files of the mount are open")
    );

    // Closing gives the room back.
    sb.release(root_holder);
    wait_for(|| std::fs::File::open(&img).is_ok(), "root to open again");
    accounts.expect(other, "list", &d.mnt.join("backups"), "", "ok");
    accounts.expect(admin, "read", &img, "", "EMFILE");
    sb.release(admin_holder);
    wait_for(
        || accounts.try_as(admin, "read", &img, "") == "ok",
        "the admin to open again",
    );
    // The caps are in the log, for an operator to see.
    assert!(
        d.log()
            .contains("capped at 32 in all, 4 per user other than root and 24 for those users together (RLIMIT_NOFILE 320)"),
        "{}",
        d.log()
    );
}

#[test]
fn qcow2_exports_past_the_cap_fail_emfile() {
    let accounts = Accounts::new('x');
    let mut sb = Sandbox::new("exports");
    ok(&format!("chmod 755 '{}'", sb.dir.display()));
    let vols = sb.mkdir("vols");
    let qbackups = sb.mkdir("qbackups");
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\nallow_other = true\nadmin_group = \"{}\"\n\
         [backends.qc]\ndriver = \"qcow2\"\npools = {{ vols = \"{}\", qbackups = \"{}\" }}\n\
         [targets.q]\nbackend = \"qc\"\npool = \"qbackups\"\n",
        state.display(),
        accounts.group,
        vols.display(),
        qbackups.display()
    ));
    for n in 1..=5 {
        ok(&format!(
            "qemu-img create -q -f qcow2 '{}' 1M",
            vols.join(format!("volume-q{n}")).display()
        ));
    }
    let d = start_with_nofile(&mut sb, &config);
    assert!(
        d.log().contains("qcow2 exports: at most 4 running at once"),
        "{}",
        d.log()
    );
    let volumes: Vec<PathBuf> = (1..=5).map(|n| d.volume("qc", &format!("q{n}"))).collect();

    // Each open volume is one qemu-storage-daemon: the fifth is refused, not started.
    let (holder, held) = hold_open(&mut sb, 0, &[], 5, &volumes);
    assert_eq!(held, "4 EMFILE");
    assert_eq!(
        processes_under(&d.runtime_dir).len(),
        4,
        "one export per open volume"
    );
    assert!(d.log().contains("Too many open files"), "{}", d.log());
    // Another open of an exported volume shares its export.
    std::fs::read(&volumes[0]).expect("an exported volume reads");

    sb.release(holder);
    wait_for(
        || std::fs::File::open(&volumes[4]).is_ok(),
        "the fifth volume to open once the others are closed",
    );

    // Users other than root hold a share of the exports (images of a qcow2 target are
    // read through one), so that they cannot starve backups: here 1 each, 2 together.
    wait_for(
        || processes_under(&d.runtime_dir).is_empty(),
        "the exports to stop",
    );
    std::thread::sleep(Duration::from_millis(300));
    let id = d.backup("q", "q1 wait");
    let image = d.image("q", &id);
    let (admin_uid, gid) = (accounts.uid(&accounts.admin), accounts.gid());
    let (admin_holder, held) =
        hold_open(&mut sb, admin_uid, &[gid], 3, std::slice::from_ref(&image));
    assert_eq!(held, "1 EMFILE");
    assert!(
        d.log().contains(&format!(
            "refused (EMFILE): uid {admin_uid} has 1 images of qcow2 targets open"
        )),
        "{}",
        d.log()
    );
    // The admin still reads what holds no export; root still opens the image.
    accounts.expect(
        &accounts.admin,
        "read",
        &d.target("q").join("jobs"),
        "",
        "ok",
    );
    std::fs::read(&image).expect("root reads the image");
    sb.release(admin_holder);
    wait_for(
        || accounts.try_as(&accounts.admin, "read", &image, "") == "ok",
        "the admin to read the image again",
    );
}
