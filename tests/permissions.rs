//! Who may do what through the mount: root does everything; with `allow_other` the
//! `admin_group` reads images, records and jobs; nobody else reads anything; nobody but
//! root writes `request`, writes volumes or deletes backups. Each refusal is checked for
//! its errno: a test that passed on any failure would pass on a crash too.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
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
